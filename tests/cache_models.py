"""How the cache tests patch a model. Stand-in until the patch layer lands (phase 1)."""

from __future__ import annotations

import contextlib

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from hf_attn_patch.cache import paged_decode_or_none
from hf_attn_patch.kernels import flash_attention


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    out = paged_decode_or_none(module, query, key, value, attention_mask, scale=scaling, window=sliding_window)
    if out is None:
        out = flash_attention(query, key, value, causal=True, window=sliding_window,
                              key_padding_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register("paged_cache_test", _attention)
AttentionMaskInterface.register("paged_cache_test", flash_attention_mask)


@contextlib.contextmanager
def patched(model):
    previous = model.config._attn_implementation
    model.config._attn_implementation = "paged_cache_test"
    try:
        yield model
    finally:
        model.config._attn_implementation = previous
