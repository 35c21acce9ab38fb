"""transformers' continuous batching (`generate_batch`, its `PagedAttentionCache`) on our kernels.

Continuous batching packs every scheduled request into one row: queries (1, Hq, Tq, D) with
`cu_seq_lens_q` marking where each request starts, some requests still in their prompt (maybe
a chunk of it), most decoding one token. Its cache keeps K/V in its own pages, addressed by the
flat `read_index` / `write_index` it hands to the attention function with the `cache` itself.

Our attention entry lets transformers' cache do the bookkeeping it owns (write the new K/V,
gather each request's context, with its sliding-window rules) through the stock `update` (called
by us or, from 5.24, by the attention module itself: `_compat.continuous_batching_kv`), then
runs the attention itself with `paged_attention`: every query token is a decode query whose
"pages" are the gathered rows (one token per page), so prompts, prompt chunks and decode steps
of any mix go through one launch per layer, with GQA read natively and no (Tq, Tk) mask built.

How continuous batching picks the entry depends on the transformers version
(`_compat.continuous_batching_prefixes_paged`):

* up to 5.22 it prefixes the model's implementation with "paged|": a model patched by
  `patch_model` ("hf_attn_patch") becomes "paged|hf_attn_patch", registered here, so
  `generate_batch` on a patched model runs on our kernels with nothing else to do;
* from 5.23 it accepts only "sdpa", "paged|eager" or a name containing "flash", so the model
  has to be pointed at `FLASH_STYLE_NAME` for the run: `with continuous_batching(model): ...`
  (harmless on older versions too).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

from .._compat import continuous_batching_kv, continuous_batching_prefixes_paged, is_continuous_batching_call
from ..kernels import paged_attention

__all__ = ["PAGED_PREFIX_NAME", "FLASH_STYLE_NAME", "continuous_batching", "continuous_batching_attention"]

PAGED_PREFIX_NAME = "paged|hf_attn_patch"
# "flash" in the name is what transformers >= 5.23 checks; no digit after it, so transformers
# never mistakes it for flash-attn 2/3 and never tries to import flash_attn_with_kvcache.
FLASH_STYLE_NAME = "hf_attn_patch_paged_flash"
# Query tokens per launch: bounds the (tokens, context) index table of a long prompt chunk.
_MAX_TABLE_ENTRIES = 1 << 25


def continuous_batching_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    cache=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry for continuous batching: (1, Hq, Tq, D) -> ((1, Tq, Hq, D), None)."""
    if not is_continuous_batching_call(cache, kwargs):
        raise ValueError(
            f"{PAGED_PREFIX_NAME!r} / {FLASH_STYLE_NAME!r} serve transformers' continuous batching only "
            "(generate_batch): they need its paged cache. Use the patched model's own implementation otherwise."
        )
    if dropout and module.training:
        raise ValueError("continuous batching runs in eval mode; attention dropout is not supported")
    key, value, cu_seq_lens_k, max_len_k = continuous_batching_kv(cache, module.layer_idx, key, value, sliding_window, kwargs)
    out = varlen_decode_attention(
        query[0].transpose(0, 1),  # (Tq, Hq, D), a strided view
        key,
        value,
        kwargs["cu_seq_lens_q"],
        cu_seq_lens_k,
        max_len_k,
        window=sliding_window,
        scale=scaling,
    )
    return out[None], None


def varlen_decode_attention(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_len_k, *, window=None, scale=None):
    """Causal attention over packed sequences, each query token as one `paged_attention` row.

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D); sequence s owns queries cu_q[s]:cu_q[s+1] and keys
    cu_k[s]:cu_k[s+1], its queries being its last keys (bottom-right alignment, as in a chunked
    prompt). Query tokens past cu_q[-1] (padding) get zeros. Returns (Tq, Hq, D).
    """
    tokens = q.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tokens == 0:
        return out
    num_seqs = cu_seq_lens_q.numel() - 1
    token = torch.arange(tokens, device=q.device)
    seq = torch.searchsorted(cu_seq_lens_q[1:], token, right=True).clamp_max(num_seqs - 1)
    q_start, k_start = cu_seq_lens_q[seq], cu_seq_lens_k[seq]
    q_len = cu_seq_lens_q[seq + 1] - q_start
    k_len = cu_seq_lens_k[seq + 1] - k_start
    # The query's own key is its position + 1 keys into the sequence's context.
    seq_lens = torch.where(token < cu_seq_lens_q[-1], k_len - q_len + (token - q_start) + 1, 0).to(torch.int32)
    width = max(1, int(max_len_k))
    k_pages, v_pages = k[:, None], v[:, None]  # one token per page: the table indexes rows directly
    chunk = max(1, _MAX_TABLE_ENTRIES // width)
    offsets = torch.arange(width, device=q.device, dtype=torch.int32)
    for start in range(0, tokens, chunk):
        rows = slice(start, start + chunk)
        table = k_start[rows, None].to(torch.int32) + offsets
        out[rows] = paged_attention(q[rows], k_pages, v_pages, table, seq_lens[rows], window=window, scale=scale)
    return out


@contextlib.contextmanager
def continuous_batching(model):
    """Point a patched model at our continuous-batching entry for the duration of the block.

    Needed from transformers 5.23 on (see the module docstring); a no-op before.
    """
    if continuous_batching_prefixes_paged():
        yield model
        return
    configs = _attention_configs(model)
    previous = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = FLASH_STYLE_NAME
    try:
        yield model
    finally:
        for c, name in zip(configs, previous):
            c._attn_implementation = name


def register() -> None:
    """Make both names known to transformers (idempotent)."""
    for name in (PAGED_PREFIX_NAME, FLASH_STYLE_NAME):
        AttentionInterface.register(name, continuous_batching_attention)


# --- helpers -------------------------------------------------------------------------------------


def _attention_configs(model):
    config = model.config
    configs = [config]
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if text is not config:
        configs.append(text)
    return configs


register()
