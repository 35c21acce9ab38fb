"""Copies of a patched model (issue 13): `copy.deepcopy` (EMA, accelerate and peft utilities) and
pickle (`torch.save(model)`) give a model that is patched in every sense.

For every family and layout of test_patch.py's table: the copy `is_patched`, gives the patched
original's outputs, runs on our kernels only, and `unpatch_model(copy)` gives it back the stock
model's outputs while the original stays patched. `save_pretrained` never writes our
implementation's name.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_attn_patch import is_patched, patch_model, patched, unpatch_model
from hf_attn_patch.models import ATTN_IMPLEMENTATION

from .helpers import forbid_stock_attention
from .test_patch import CASES, batch, build, logits

COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
}
FAMILIES = ("llama", "mistral", "bert")  # those with an eager_attention_forward to forbid


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_copy_of_a_patched_model_is_patched_and_unpatches(case, how, device, monkeypatch):
    model, inputs = build(case, device), batch(device, case.decoder)
    stock = logits(model, inputs)
    patch_model(model)
    expected = logits(model, inputs)

    twin = COPIES[how](model)
    assert is_patched(twin)
    with monkeypatch.context() as m:  # the copy runs on our kernels, nothing stock
        forbid_stock_attention(m, FAMILIES, "the copy ran stock attention")
        assert torch.equal(logits(twin, inputs), expected)
    assert patch_model(twin) is twin and is_patched(twin)  # patching again: still a no-op

    unpatch_model(twin)
    assert not is_patched(twin)
    assert twin.config._attn_implementation != ATTN_IMPLEMENTATION
    assert all("forward" not in module.__dict__ for module in twin.modules())
    assert torch.equal(logits(twin, inputs), stock)

    assert is_patched(model) and model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert torch.equal(logits(model, inputs), expected)
    unpatch_model(model)
    assert torch.equal(logits(model, inputs), stock)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_unpatching_the_original_leaves_its_copy_patched(case, device):
    model, inputs = build(case, device), batch(device, case.decoder)
    patch_model(model)
    expected = logits(model, inputs)
    twin = copy.deepcopy(model)
    unpatch_model(model)
    assert not is_patched(model) and is_patched(twin)
    assert torch.equal(logits(twin, inputs), expected)
    with patched(twin):  # a patched copy stays patched after the block
        pass
    assert is_patched(twin)


def test_copy_of_a_part_is_patched_and_names_what_to_unpatch(device):
    """A layer copied out of a patched model runs patched, but its record is on the whole model."""
    model = build(CASES[0], device)
    patch_model(model)
    layer = copy.deepcopy(model.model.layers[0])
    assert is_patched(layer)
    with pytest.raises(ValueError, match="patched as part of a larger model"):
        unpatch_model(layer)


@pytest.mark.parametrize("how", ["original", "deepcopy"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_save_pretrained_never_writes_our_implementation(case, how, tmp_path, device):
    model, inputs = build(case, device), batch(device, case.decoder)
    stock = logits(model, inputs)
    patch_model(model)
    saved = model if how == "original" else copy.deepcopy(model)
    saved.save_pretrained(tmp_path)
    for written in tmp_path.glob("*.json"):
        assert ATTN_IMPLEMENTATION not in written.read_text(), written.name
    loaded = type(model).from_pretrained(tmp_path).to(device).eval()
    assert not is_patched(loaded) and loaded.config._attn_implementation != ATTN_IMPLEMENTATION
    real = inputs["attention_mask"].bool()
    assert torch.equal(logits(loaded, inputs)[real], stock[real])
    assert is_patched(saved)  # saving changed nothing


def test_torch_save_then_load_in_a_new_process(tmp_path, device):
    """torch.save(model) pickles the whole patched model; a fresh Python loads it patched, with
    our implementation registered by the unpickling itself, and it runs on our kernels."""
    cases = [case for case in CASES if case.name in ("llama-gqa", "falcon-rw-alibi")]
    for case in cases:
        model, inputs = build(case, device), batch(device, case.decoder)
        patch_model(model)
        torch.save({"model": model, "inputs": inputs, "expected": logits(model, inputs)},
                   tmp_path / f"{case.name}.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        for name in {[case.name for case in cases]!r}:
            saved = torch.load(sys.argv[1] + "/" + name + ".pt", weights_only=False)
            from hf_attn_patch import is_patched, unpatch_model
            model = saved["model"]
            assert is_patched(model), name
            with torch.no_grad():
                assert torch.equal(model(**saved["inputs"]).logits, saved["expected"]), name
            unpatch_model(model)
            assert not is_patched(model), name
        print("loaded patched")
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded patched" in result.stdout
