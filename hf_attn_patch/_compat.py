"""Everything that exists because of a transformers version, in one place.

hf-attn-patch patches transformers from outside, so its internals change under us between
minor releases. The range we test is `TESTED_TRANSFORMERS` (pyproject.toml states the same
bounds; CI runs the whole suite on both ends). Each shim below says which versions need it.
Families and caches call these functions and never compare versions themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# Keep in step with the `transformers` requirement in pyproject.toml (a test checks they agree).
# The upper bound is the first minor release CI has not run yet; raising it comes with a green CI
# run on the new version.
TESTED_TRANSFORMERS = ">=5.17,<5.26"

__all__ = [
    "TESTED_TRANSFORMERS",
    "transformers_in_tested_range",
    "warn_if_untested_transformers",
    "continuous_batching_prefixes_paged",
    "continuous_batching_kv",
    "is_continuous_batching_call",
    "cache_update_positions",
    "cache_keyword",
    "output_with_cache",
    "falcon_attention_classes",
    "falcon_uses_attention_interface",
]


def installed_transformers() -> str:
    return transformers.__version__


def transformers_in_tested_range(version: str | None = None) -> bool:
    installed = Version(version or installed_transformers())
    return installed.base_version in SpecifierSet(TESTED_TRANSFORMERS)


@functools.cache
def warn_if_untested_transformers() -> None:
    """Warn once per process when the installed transformers is outside the tested range."""
    if transformers_in_tested_range():
        return
    warnings.warn(
        f"hf_attn_patch is tested with transformers {TESTED_TRANSFORMERS}; this is "
        f"{installed_transformers()}. Patching anyway: compare outputs with the unpatched model, and "
        "report what breaks (`hf-attn-patch info` prints what a bug report needs).",
        stacklevel=3,
    )


# --- continuous batching (generate_batch) --------------------------------------------------------


@functools.cache
def continuous_batching_prefixes_paged() -> bool:
    """Up to 5.22 continuous batching runs the model as "paged|<its implementation>"; from 5.23
    it accepts only "sdpa", "paged|eager" or a name containing "flash"."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return "paged|sdpa" in ALL_ATTENTION_FUNCTIONS._global_mapping


def continuous_batching_kv(cache, layer_idx, key, value, sliding_window, kwargs):
    """The packed context of one layer in continuous batching, wherever this version writes it.

    Returns key, value as (Tk, Hkv, D), this layer's cu_seq_lens_k, and the longest context.

    * from 5.24 the attention module itself calls `cache.update(..., kwargs=kwargs)` before the
      attention function (which then gets no `cache`): key/value (1, Hkv, Tk, D) are already the
      gathered context, and kwargs already hold this layer's lengths;
    * 5.23 hands the cache to the attention function, whose `update(..., kwargs=kwargs)` writes
      the new K/V, gathers the context as (1, Hkv, Tk, D) and picks this layer's lengths;
    * up to 5.22 `update(read_index=, write_index=)` returns (Tk, Hkv, D), and the lengths are
      per layer type when the model mixes full and sliding layers.
    """
    if cache is None:  # >= 5.24
        key, value = key[0].transpose(0, 1), value[0].transpose(0, 1)
        cu_seq_lens_k, max_len_k = kwargs["cu_seq_lens_k"], kwargs.get("max_length_k")
    elif _update_takes_kwargs(type(cache)):  # 5.23
        key, value = cache.update(key_states=key, value_states=value, layer_idx=layer_idx, kwargs=kwargs)
        key, value = key[0].transpose(0, 1), value[0].transpose(0, 1)
        cu_seq_lens_k, max_len_k = kwargs["cu_seq_lens_k"], kwargs.get("max_length_k")
    else:  # <= 5.22
        key, value = cache.update(
            key_states=key, value_states=value, layer_idx=layer_idx,
            read_index=kwargs["read_index"], write_index=kwargs["write_index"],
        )
        layer_type = "sliding_attention" if sliding_window else "full_attention"
        cu_seq_lens_k = _for_layer(kwargs["cu_seq_lens_k"], layer_type)
        max_len_k = _for_layer(kwargs.get("max_seqlen_k"), layer_type)
    if max_len_k is None or (isinstance(max_len_k, int) and max_len_k <= 1):
        # Not given (or replaced by a constant for compiled graphs): read it, one sync.
        max_len_k = int((cu_seq_lens_k[1:] - cu_seq_lens_k[:-1]).max())
    return key, value, cu_seq_lens_k, max_len_k


def is_continuous_batching_call(cache, kwargs) -> bool:
    """Does this attention call come from continuous batching? (It carries packed lengths and
    the cache's read/write indices; from 5.24 without the cache itself.)"""
    if cache is not None:
        return True
    cu_k = kwargs.get("cu_seq_lens_k")
    return isinstance(cu_k, torch.Tensor) and "read_index" in kwargs and "write_index" in kwargs


def _for_layer(value, layer_type):
    return value[layer_type] if isinstance(value, dict) else value


@functools.cache
def _update_takes_kwargs(cache_type) -> bool:
    return "kwargs" in inspect.signature(cache_type.update).parameters


# --- Cache.update -------------------------------------------------------------------------------


def cache_update_positions(args, kwargs) -> torch.Tensor | None:
    """The step's token positions where transformers hands them to `Cache.update`, else None:
    5.24 passes the model's `kwargs=` with "position_ids"; 5.17 passes nothing; releases before
    the tested range passed a `cache_kwargs` dict with "cache_position"."""
    for extra in (*args, *kwargs.values()):
        if isinstance(extra, dict):
            for name in ("cache_position", "position_ids"):
                if isinstance(extra.get(name), torch.Tensor):
                    return extra[name]
    return None


def cache_keyword(kwargs: dict) -> str:
    """The name a model's forward was given its cache under: 5.24 renamed `past_key_values` to
    `cache` (the old name still works there, with a deprecation warning); pass on the same one."""
    return "cache" if "cache" in kwargs else "past_key_values"


def output_with_cache(output_type, logits: torch.Tensor, cache):
    """A model output of `output_type` with these logits and this cache: its field is `cache`
    from 5.24 on (`past_key_values` there is a deprecated alias that logs a warning), and
    `past_key_values` before."""
    return output_type(logits=logits, **{_cache_field(output_type): cache})


@functools.lru_cache(maxsize=None)
def _cache_field(output_type) -> str:
    """Looked up once per output class: a graphed decode step builds an output every token."""
    fields = {field.name for field in dataclasses.fields(output_type)}
    return "cache" if "cache" in fields else "past_key_values"


# --- Falcon ----------------------------------------------------------------------------------


@functools.cache
def falcon_attention_classes() -> dict | None:
    """Up to 5.24 FalconDecoderLayer picks its attention class by implementation name from
    `FALCON_ATTENTION_CLASSES`, and FalconAttention computes attention itself, taking the ALiBi
    tensor as an argument. 5.25 removed the dict: FalconAttention calls transformers' attention
    interface like Llama, and ALiBi reaches it added into the 4-D attention mask. None there."""
    from transformers.models.falcon import modeling_falcon

    return getattr(modeling_falcon, "FALCON_ATTENTION_CLASSES", None)


def falcon_uses_attention_interface() -> bool:
    """Does FalconAttention call transformers' attention interface (from 5.25)?"""
    return falcon_attention_classes() is None


# --- packed sequences (position_ids that restart, no attention mask) -----------------------------


def packed_documents(mask_function):
    """(document ids (B, N), the mask function they were combined with), or None.

    For a packed batch, `create_causal_mask` detects the documents from `position_ids` and hands
    the mask entry `and_masks(base, packed_sequence_mask_function(ids))`; from 5.24 (not in 5.17)
    `base` is wrapped in `remap_positions_for_packed_sequence`, which only renumbers positions
    inside each document and changes nothing the kernel needs. `base` is returned unwrapped.
    """
    from transformers import masking_utils

    parts = _closure_value(mask_function, _and_code(), "mask_functions")
    if parts is None or len(parts) != 2:
        return None
    ids = _closure_value(parts[1], _packed_code(), "packed_sequence_mask")
    if ids is None:
        return None
    base = parts[0]
    remap = getattr(masking_utils, "remap_positions_for_packed_sequence", None)
    if remap is not None:
        base = _closure_value(base, remap(masking_utils.causal_mask_function, None).__code__,
                              "mask_function") or base
    return ids, base


@functools.cache
def _and_code():
    from transformers import masking_utils

    return masking_utils.and_masks(masking_utils.causal_mask_function).__code__


@functools.cache
def _packed_code():
    from transformers import masking_utils

    return masking_utils.packed_sequence_mask_function(None).__code__


def _closure_value(function, code, name: str):
    """The value of free variable `name` in a closure built from `code`, else None."""
    if getattr(function, "__code__", None) is not code or function.__closure__ is None:
        return None
    return function.__closure__[code.co_freevars.index(name)].cell_contents
