"""The one call every patched family ends in, and what the stock-path fallbacks share.

`attend` is the single place where a patched model's attention reaches the kernels: the
transformers-interface families (Llama, Mistral, BERT) and Falcon's swapped forward all call it.
Dispatch that depends on where K/V live (a paged KV cache's decode, for one) belongs here, so
that it is added once for every family.
"""

from __future__ import annotations

import warnings

import torch

from ..cache.hooks import paged_cache_for
from ..kernels import flash_attention
from ..kernels.reference import document_runs, visibility

__all__ = ["attend", "autocast_inputs", "align_to_keys", "padding_or_documents", "dense_mask",
           "weights_over_keys", "warn_once"]


def attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool,
    window: int | tuple[int, int] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one patched module: q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> (B, Nq, Hq, D).

    Semantics are the kernels' (DESIGN.md, "The one attention call"): bottom-right aligned
    queries, K/V heads shared by groups of query heads without being expanded. The result comes
    back as (B, Nq, Hq, D), the layout transformers' attention functions return; the kernel
    writes its output in that layout, so the transpose costs nothing.
    """
    query, key, value = autocast_inputs(query, key, value)
    sinks = 0
    cache = paged_cache_for(module, key)
    if cache is not None:
        # K/V in a PagedKVCache (hf_attn_patch.cache): a streaming cache sets the window and the
        # sinks of the prompt and of every decode step; a decode step reads the cache's pages.
        window, sinks = cache.attention_window(window)
        paged = cache.attend(module.layer_idx, query, key, key_padding_mask, scale=scale, window=window,
                             alibi_slopes=alibi_slopes, config=getattr(module, "config", None))
        if paged is not None:
            return paged.transpose(1, 2)
    out = flash_attention(
        query,
        key,
        value,
        causal=causal,
        window=window,
        key_padding_mask=key_padding_mask,
        alibi_slopes=alibi_slopes,
        scale=scale,
        doc_ids=doc_ids,
        sinks=sinks,
    )
    return out.transpose(1, 2)


def autocast_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under autocast (accelerate's bf16 mixed precision), cast q, k, v to the autocast dtype.

    The projections come out in bf16, but RoPE multiplies q and k by float32 cos/sin and so
    lifts them to float32 while v stays bf16. Stock SDPA is on autocast's lower-precision list
    and casts its inputs; our kernels take one dtype, so we cast the same way.
    """
    device_type = query.device.type
    if not torch.is_autocast_enabled(device_type):
        return query, key, value
    dtype = torch.get_autocast_dtype(device_type)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def padding_or_documents(
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(key_padding_mask, doc_ids) from what our mask entry returned: a bool (B, n) padding mask,
    or for packed sequences int32 (B, N) document ids (a padding mask from it is always bool)."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.dtype == torch.int32:
        return None, mask
    return mask, None


def align_to_keys(
    key_padding_mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Match our mask entry's (B, n) mask of positions [0, n) with K/V of length Nk.

    n > Nk: a sliding-window cache returned only the last Nk positions; keep their columns.
    n < Nk: prefill into a static cache, whose slots from n on are not written yet; cut K/V.
    """
    if key_padding_mask is None:
        return None, key, value
    n, k_len = key_padding_mask.shape[-1], key.shape[2]
    if n > k_len:
        return key_padding_mask[:, n - k_len :], key, value
    if n < k_len:
        return key_padding_mask, key[:, :, :n], value[:, :, :n]
    return key_padding_mask, key, value


def weights_over_keys(weights: torch.Tensor | None, k_len: int) -> torch.Tensor | None:
    """Attention weights over all Nk keys the cache returned, as stock returns them.

    `align_to_keys` cuts a static cache's unwritten slots before the attention runs; stock
    attends over them masked, so its weights have zero columns there. Put those columns back.
    """
    if weights is None or weights.shape[-1] >= k_len:
        return weights
    return torch.nn.functional.pad(weights, (0, k_len - weights.shape[-1]))


def dense_mask(
    q_len: int,
    key: torch.Tensor,
    *,
    causal: bool,
    window: int | tuple[int, int] | None,
    key_padding_mask: torch.Tensor | None,
    dtype: torch.dtype,
    doc_ids: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The additive (B or 1, 1 or Hq, Nq, Nk) mask that eager attention needs for the kernels'
    semantics: 0 (or with `alibi_slopes`, the ALiBi bias -slope_h * distance) where a key is
    visible, the dtype's minimum where not.

    Only the fallbacks build it (output_attentions, dropout in training): the kernel path never
    materialises a mask of this size.
    """
    k_len = key.shape[2]
    query_pos = torch.arange(q_len, device=key.device) + (k_len - q_len)
    distance = query_pos[:, None] - torch.arange(k_len, device=key.device)[None, :]
    visible = visibility(distance, causal=causal, window=window)[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(device=key.device, dtype=torch.bool)[:, None, None, :]
    if doc_ids is not None:
        runs = document_runs(doc_ids.to(key.device))
        visible = visible & (runs[:, None, :, None] == runs[:, None, None, :])
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=key.device)
    if alibi_slopes is not None:
        bias = -alibi_slopes.to(device=key.device, dtype=torch.float32)[:, None, None] * distance
        return torch.where(visible, bias.to(dtype), blocked)
    return torch.where(visible, torch.zeros((), dtype=dtype, device=key.device), blocked)


_warned: set[str] = set()


def warn_once(reason: str, message: str) -> None:
    """Warn the first time a fallback for `reason` happens in this process, then stay quiet."""
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(message, stacklevel=3)
