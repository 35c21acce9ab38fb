"""The one call a patched attention function makes to use the paged cache.

transformers hands an attention function (module, query, key, value, attention_mask, ...) but
not the cache. `PagedKVCache.update` remembers the exact key tensor it returned for each layer,
so the attention function can ask, first thing, whether its key came from a paged cache:

    out = paged_decode_or_none(module, query, key, value, attention_mask,
                               scale=scaling, window=sliding_window, alibi_slopes=slopes)
    if out is not None:
        return out  # (B, Hq, 1, D), like flash_attention's output
    ... the usual flash_attention path ...

Pass key exactly as received (no .contiguous(), no expansion): recognition is by identity.

A streaming cache (`PagedKVCache(window=W, sinks=S)`) also decides the window and sinks of the
prompt's own attention: callers that run that attention themselves find the cache with
`paged_cache_for` and ask it (`cache.attention_window(window)`), as models/_attention.py does.
"""

from __future__ import annotations

import torch

from .paged import LIVE_CACHES, PagedKVCache

__all__ = ["paged_decode_or_none", "paged_cache_for"]


def paged_decode_or_none(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Decode through the paged cache when key came from a `PagedKVCache`, else None.

    query: (B, Hq, Nq, D); key, value: what the cache's update returned for module.layer_idx.
    On a prompt step the cache stores the real (non-padding) tokens, read from attention_mask
    (None, 2-D padding mask or 4-D mask), and this returns None: the caller runs its prompt
    attention over key/value as usual. On a decode step it returns (B, Hq, 1, D) from
    `paged_attention`; on a step of Nq > 1 new tokens after the prompt, (B, Hq, Nq, D) from
    `flash_attention` over the row's keys read back from the pages. For any other key (no paged
    cache) it returns None at once.
    """
    cache = paged_cache_for(module, key)
    if cache is None:
        return None
    return cache.attend(
        module.layer_idx, query, key, attention_mask,
        scale=scale, window=window, alibi_slopes=alibi_slopes, config=getattr(module, "config", None),
    )


def paged_cache_for(module: torch.nn.Module, key: torch.Tensor) -> "PagedKVCache | None":
    """The live `PagedKVCache` whose `update` returned `key` for module.layer_idx (not yet
    attended to), else None."""
    if not LIVE_CACHES:
        return None
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        return None
    for cache in list(LIVE_CACHES):
        if cache.owns(layer_idx, key):
            return cache
    return None
