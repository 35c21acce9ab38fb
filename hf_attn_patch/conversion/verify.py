"""Checking the written checkpoint before it is moved into place.

Modes:
- "shapes": the written headers are re-read; every rewritten tensor has the shape the new config
  asks for and every other tensor the shape and dtype it had. Cheap at any size.
- "full": shapes, then the checkpoint is loaded with stock `from_pretrained` (no missing,
  unexpected or mismatched keys allowed) and one forward pass runs on a few tokens. GQA-BERT,
  which stock BERT cannot hold, is loaded with its pooled key/value heads repeated back into a
  stock BertModel: the same function, so it proves the weights are complete and usable.
- "auto" (default): "full" up to FULL_VERIFY_LIMIT_BYTES of weights, "shapes" above, so that
  converting a 7B model does not also mean holding it in memory.
- "off": nothing.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ConversionError
from .plan import ConversionPlan
from .source import CONFIG_NAME, SourceCheckpoint, read_source

VERIFY_MODES = ("auto", "full", "shapes", "off")
FULL_VERIFY_LIMIT_BYTES = 1 << 30
_PROBE_TOKENS = 8


def resolve_verify(verify: str, weight_bytes: int) -> str:
    if verify not in VERIFY_MODES:
        raise ConversionError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    if verify == "auto":
        return "full" if weight_bytes <= FULL_VERIFY_LIMIT_BYTES else "shapes"
    return verify


def verify_checkpoint(folder: Path, source: SourceCheckpoint, plan: ConversionPlan, mode: str) -> str:
    """Run the checks of `mode` on folder; return one sentence saying what was checked."""
    if mode == "off":
        return "not verified (verify='off')"
    _check_shapes(folder, source, plan)
    if mode == "shapes":
        return "headers re-read: every tensor has the shape and dtype the new config implies (not loaded)"
    if plan.stock_loadable:
        return _load_and_run(folder, source)
    return _load_and_run_expanded_bert(folder, source, plan)


def _check_shapes(folder: Path, source: SourceCheckpoint, plan: ConversionPlan) -> None:
    written = read_source(folder)
    expected = {name: (info.shape, info.dtype) for name, info in source.tensors.items()}
    for layer in plan.layers:
        for name, shape in layer.output_shapes().items():
            expected[name] = (shape, source.tensors[name].dtype)
    actual = {name: (info.shape, info.dtype) for name, info in written.tensors.items()}
    if actual != expected:
        wrong = sorted(
            name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name)
        )
        raise ConversionError(
            f"the written checkpoint does not match the plan (first: {wrong[0]!r}: expected "
            f"{expected.get(wrong[0])}, wrote {actual.get(wrong[0])}); this is a bug, please report it"
        )


def _load_and_run(folder: Path, source: SourceCheckpoint) -> str:
    model_class = _model_class(folder)
    try:
        with _quiet_transformers():
            model, info = model_class.from_pretrained(folder, output_loading_info=True)
    except Exception as error:  # any loading failure means the checkpoint is unusable
        raise ConversionError(
            f"the converted checkpoint does not load with {model_class.__name__}: {error}"
        ) from error
    # A weight the source never had (a BertModel saved without its pooler) is missing from the
    # source just the same: not the conversion's doing. Names are compared by suffix, since the
    # model class may add or drop a prefix such as "bert.".
    info["missing_keys"] = [key for key in info.get("missing_keys") or () if _in_source(key, source)]
    problems = {
        key: sorted(info[key])
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if info.get(key)
    }
    if problems:
        raise ConversionError(
            f"{model_class.__name__}.from_pretrained reported {problems}; the converted checkpoint "
            "is incomplete"
        )
    _run_forward(model)
    return (
        f"loaded with transformers.{model_class.__name__}.from_pretrained (no missing, unexpected or "
        f"mismatched keys) and ran one forward pass on {_PROBE_TOKENS} tokens: finite outputs"
    )


def _in_source(key: str, source: SourceCheckpoint) -> bool:
    return any(name.endswith(key) or key.endswith(name) for name in source.tensors)


def _load_and_run_expanded_bert(folder: Path, source: SourceCheckpoint, plan: ConversionPlan) -> str:
    """Repeat each pooled key/value head over its group into a stock-shaped BERT and run it."""
    repeats = plan.num_query_heads // plan.kv_heads_after
    written = read_source(folder)
    expanded = {}
    for shard in written.shards:
        expanded.update(load_file(folder / shard))
    for layer in plan.layers:
        for name in layer.kv_names:  # BERT layers are SeparateKV; query and output keep their shapes
            heads = expanded[name].unflatten(0, (plan.kv_heads_after, plan.head_dim))
            expanded[name] = heads.repeat_interleave(repeats, dim=0).flatten(0, 1).contiguous()
    with tempfile.TemporaryDirectory(prefix="hf-attn-patch-verify-") as scratch:
        config = {key: value for key, value in written.config.items() if key != "num_key_value_heads"}
        Path(scratch, CONFIG_NAME).write_text(json.dumps(config))
        save_file(expanded, Path(scratch) / "model.safetensors", metadata={"format": "pt"})
        _load_and_run(Path(scratch), source)
    return (
        f"GQA-BERT: stock BERT cannot load it; its pooled key/value heads, repeated {repeats}x into a "
        f"stock-shaped checkpoint, loaded with from_pretrained (no missing, unexpected or mismatched keys) "
        f"and ran one forward pass on {_PROBE_TOKENS} tokens: finite outputs"
    )


def _model_class(folder: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    for name in config.architectures or ():
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _run_forward(model) -> None:
    vocab = model.config.vocab_size
    input_ids = (torch.arange(_PROBE_TOKENS) % vocab).unsqueeze(0)
    with torch.no_grad():
        output = model(input_ids=input_ids)
    first = output[0]
    if not torch.isfinite(first.float()).all():
        raise ConversionError("the converted model loads but its forward pass gives non-finite outputs")


@contextmanager
def _quiet_transformers():
    """Hide transformers' loading progress bars and info logs during verification."""
    from transformers.utils import logging

    bars_were_on, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars_were_on:
            logging.enable_progress_bar()
        logging.set_verbosity(verbosity)
