"""The supported transformers range, and what broke across versions inside it.

Each test here failed on some version of the range before its fix: the range in pyproject and
in the code agreeing, the warning outside the range, Falcon models built from a patched config,
and StaticCache attention weights over the whole cache.
"""

from __future__ import annotations

import copy
import re
import tomllib
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from transformers import StaticCache

from hf_attn_patch import _compat, is_patched, patch_model, unpatch_model
from hf_attn_patch.models import ATTN_IMPLEMENTATION

from .helpers import relative_error
from .test_patch import falcon_7b, falcon_40b, falcon_rw, llama, mistral

ROOT = Path(__file__).resolve().parent.parent


def test_tested_range_is_the_one_pyproject_states():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    stated = [d for d in project["dependencies"] if re.match(r"transformers\b", d)]
    assert stated == [f"transformers{_compat.TESTED_TRANSFORMERS}"]
    assert _compat.TESTED_TRANSFORMERS in (ROOT / "README.md").read_text()
    assert _compat.transformers_in_tested_range(), (
        f"the suite runs on transformers {transformers.__version__}, outside {_compat.TESTED_TRANSFORMERS}")


@pytest.mark.parametrize("version,inside", [("5.17.0", True), ("5.24.0", True), ("5.25.0", True),
                                            ("5.25.1", True), ("5.16.1", False), ("5.26.0", False),
                                            ("5.26.0.dev0", False),
                                            ("6.0.0", False)])
def test_tested_range_bounds(version, inside):
    assert _compat.transformers_in_tested_range(version) is inside


def test_warns_once_outside_the_tested_range(monkeypatch):
    monkeypatch.setattr(_compat, "installed_transformers", lambda: "5.99.0")
    _compat.warn_if_untested_transformers.cache_clear()
    try:
        with pytest.warns(UserWarning, match=re.escape(_compat.TESTED_TRANSFORMERS) + ".*5.99.0"):
            _compat.warn_if_untested_transformers()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _compat.warn_if_untested_transformers()  # once per process
    finally:
        _compat.warn_if_untested_transformers.cache_clear()


def test_patch_model_checks_the_version_and_still_patches():
    with mock.patch("hf_attn_patch.models.warn_if_untested_transformers") as check:
        model = patch_model(llama())
    check.assert_called()
    assert is_patched(model)


def test_no_warning_inside_the_tested_range():
    _compat.warn_if_untested_transformers.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(llama())


@pytest.mark.parametrize("build", [falcon_7b, falcon_40b, falcon_rw], ids=["falcon-7b", "falcon-40b", "falcon-rw"])
def test_falcon_builds_from_a_patched_config(build, device):
    """FalconDecoderLayer looks its attention class up by config._attn_implementation."""
    torch.manual_seed(0)
    model = patch_model(build().eval().to(device))
    ids = torch.randint(1, 128, (2, 7), device=device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    for config in (model.config, copy.deepcopy(model.config)):
        assert config._attn_implementation == ATTN_IMPLEMENTATION
        twin = type(model)(config).eval().to(device)
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            got, expected = twin(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        real = mask.bool()
        assert relative_error(got[real], expected[real]) < 1e-5
    unpatch_model(model)
    type(model)(model.config)  # the stock config builds too, after unpatching


@pytest.mark.parametrize("build", [llama, mistral, falcon_7b, falcon_40b, falcon_rw],
                         ids=["llama", "mistral", "falcon-7b", "falcon-40b", "falcon-rw"])
def test_static_cache_attention_weights_span_the_whole_cache(build, device):
    """Stock returns prefill weights over every static-cache slot, zeros where unwritten.

    Stock eager Falcon cannot be the reference here (in transformers 5.x its eager weights ignore
    the causal mask, and its ALiBi branch fails with a static cache), so the reference for every
    family is the patched model's own weights without a cache (which tests/test_patch.py checks
    against stock), zero-padded to the cache length; for Llama and Mistral stock's own
    static-cache weights must equal them too. Mistral's sliding layers keep a cache no
    longer than the window, which a longer prompt does not fill: there the weights stay 7 wide.
    """
    torch.manual_seed(0)
    model = build().eval().to(device)
    model.set_attn_implementation("eager")  # stock sdpa returns no weights
    ids = torch.randint(1, 128, (2, 7), device=device)

    def prefill_weights(cache_len):
        cache = StaticCache(config=model.config, max_cache_len=cache_len) if cache_len else None
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=cache is not None, output_attentions=True)
        return out.attentions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the patched model warns that weights run on eager
        stock_static = prefill_weights(9) if build in (llama, mistral) else None
        patch_model(model)
        no_cache = prefill_weights(None)
        got = prefill_weights(9)
    width = 7 if build is mistral else 9
    assert len(got) == len(no_cache) == model.config.num_hidden_layers
    for layer, (layer_got, reference) in enumerate(zip(got, no_cache)):
        expected = torch.nn.functional.pad(reference, (0, width - 7))
        assert layer_got.shape == (2, 4, 7, width)
        assert torch.allclose(layer_got, expected, atol=1e-5)
        if stock_static is not None:
            assert torch.allclose(stock_static[layer], expected, atol=1e-5)


def test_info_prints_what_a_bug_report_needs():
    import subprocess
    import sys

    import triton

    result = subprocess.run([sys.executable, "-m", "hf_attn_patch", "info"], capture_output=True, text=True,
                            check=True, timeout=120)
    lines = dict(line.split(None, 1) if "  " not in line else [p.strip() for p in line.split("  ", 1)]
                 for line in result.stdout.splitlines())
    assert lines["transformers"] == transformers.__version__
    assert lines["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert lines["triton"] == triton.__version__
    for name in ("python", "accelerate", "safetensors", "CUDA", "GPU", "kernels run"):
        assert lines[name]
    assert lines["tested transformers"].startswith(_compat.TESTED_TRANSFORMERS)
    assert lines["families"] == "Llama, Mistral, Falcon, BERT"
    expected_mode = "compiled by Triton" if torch.cuda.is_available() and not _interpreted() else "interpreter"
    assert expected_mode in lines["kernels run"]


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def test_a_graphed_step_builds_its_output_under_the_cache_name_of_the_installed_release():
    """5.24 renamed the outputs' `past_key_values` to `cache`; the old name still works there
    but logs a deprecation on the first graphed step of every generate."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import generic

    cache, logits = object(), torch.zeros(1, 1, 4)
    with mock.patch.object(generic.logger, "warning_once") as warned:
        out = _compat.output_with_cache(CausalLMOutputWithPast, logits, cache)
    assert not warned.called
    assert out.to_tuple() == (logits, cache)
