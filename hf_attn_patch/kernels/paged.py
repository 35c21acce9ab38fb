"""`paged_attention` and `write_to_pages`: decode over a paged KV cache (vLLM's PagedAttention).

Layout (DESIGN.md, "Decode with a paged cache"):

* k_pages, v_pages: (num_blocks, block_size, Hkv, D), one pool per layer.
* block_table: (B, max_blocks) int32, logical block i of sequence b -> physical block.
  Token t of a sequence lives in slot t % block_size of logical block t // block_size; its flat
  slot number (what `write_to_pages` takes) is physical * block_size + t % block_size.
* seq_lens: (B,) int32, tokens per sequence including the new one, already written.

Semantics are those of `reference.paged_attention_reference`: `flash_attention` for the last
query position. The Triton launch is registered as torch custom ops so a decode step runs
under `torch.compile`; eager calls launch directly (the ops' dispatch is host time, twice per
layer of every decode step that is not a replayed CUDA graph). Nothing on the GPU path reads
tensor values on the host, so a step can be captured as a CUDA graph.

Out-of-range values never make a kernel read or write outside its tensors. The kernels mask
them (free on the GPU): keys past the block table's width, and positions whose table entry is
not a block of the pool, contribute nothing; slots outside the pool are not written. Checking
the values instead costs a device-to-host sync, so it runs only where it is free (CPU tensors)
or asked for (`validate=True`).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _paged_triton
from ._checks import SUPPORTED_HEAD_DIMS, check_device, check_dtypes, check_sinks, window_reach
from ._launch import PLAIN, route

__all__ = ["paged_attention", "write_to_pages"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    window: int | tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    validate: bool | None = None,
    sinks: int = 0,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged K/V.

    q: (B, Hq, D); query head h reads KV head h // (Hq // Hkv). The query stands at position
    seq_lens[b] - 1. window: int W (the W most recent keys, its own included) or (left, right),
    of which decode uses only left. alibi_slopes: (Hq,) adds slope * (j - pos) to the scores.
    scale defaults to D ** -0.5. Returns (B, Hq, D) in q's dtype; a sequence of length 0 gives
    zeros.

    sinks: an int S >= 0, attention sinks (StreamingLLM): with a window, the keys at positions
    [0, min(S, first window position)) stay visible too; without a window S changes nothing.
    sink_logits: (Hq,) floating point, a learned per-head logit that joins each row's softmax
    denominator once (exp(sink_h) with a zero value vector); forward only.

    Entries the window excludes are never read (they may be -1, blocks given back to the pool);
    with sinks, neither are those between the sinks and the window (a streaming cache's).
    Out-of-range values are masked, never read: positions past the table's width
    (seq_lens[b] > max_blocks * block_size) and positions whose entry is not in
    [0, num_blocks) contribute nothing, as if outside the window; a row left with no key
    gives zeros. validate: check seq_lens and the entries read, raising a ValueError that names
    the first bad one; None (the default) checks CPU tensors only, since on a GPU the check
    would stall the decode step on a device-to-host sync.
    """
    check_paged_inputs(q, k_pages, v_pages, block_table, seq_lens, alibi_slopes=alibi_slopes,
                       sinks=sinks, sink_logits=sink_logits)
    left, _ = window_reach(True, window)
    sinks = int(sinks) if left >= 0 else 0  # without a window every key is visible already
    if _should_validate(validate, block_table, seq_lens):
        check_paged_values(k_pages, block_table, seq_lens, left, sinks)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float32)
    if sink_logits is not None:
        sink_logits = sink_logits.to(torch.float32)
    if _through_custom_op(q, k_pages, v_pages, block_table, seq_lens, alibi_slopes, sink_logits):
        return torch.ops.hf_attn_patch.paged_attention(
            q, k_pages, v_pages, block_table, seq_lens, alibi_slopes, left, scale, sinks, sink_logits
        )
    return _paged_triton.decode(q, k_pages, v_pages, block_table, seq_lens, alibi_slopes, left, scale,
                                sinks=sinks, sink_logits=sink_logits)


def write_to_pages(
    key: torch.Tensor,
    value: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool | None = None,
) -> None:
    """Write new tokens' K/V into their slots, in place.

    key, value: (B, Hkv, N, D), the layout transformers hands to its caches (any strides).
    slot_mapping: (B, N) integer flat slots (physical block * block_size + offset); a negative
    slot skips the token (left padding, finished sequences). One launch for the whole batch,
    so a prefill writes all prompt tokens in one pass. A slot past the pool is not written;
    validate (None: CPU tensors only, as for `paged_attention`) raises a ValueError for it.
    """
    check_write_inputs(key, value, k_pages, v_pages, slot_mapping)
    if _should_validate(validate, slot_mapping):
        check_slot_values(k_pages, slot_mapping)
    if _through_custom_op(key, value, k_pages, v_pages, slot_mapping):
        torch.ops.hf_attn_patch.write_to_pages(key, value, k_pages, v_pages, slot_mapping)
    else:
        _paged_triton.write(key, value, k_pages, v_pages, slot_mapping)


def _through_custom_op(*tensors: torch.Tensor | None) -> bool:
    """The ops under torch.compile and for tensor subclasses; and for inputs that want gradients
    (the ops define none: through them autograd warns at backward, a direct launch would give a
    result that silently has no gradient)."""
    return route(*tensors) is not PLAIN


# --- input checks -------------------------------------------------------------------------------


def check_paged_inputs(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None,
    sinks: int = 0,
    sink_logits: torch.Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices for `paged_attention`; a ValueError says what to change."""
    if q.dim() != 3:
        raise ValueError(
            f"q must be 3-D (batch, num_q_heads, head_dim), one token per sequence; got {tuple(q.shape)}. "
            "For a (B, H, 1, D) query pass q[:, :, 0]."
        )
    _check_pages(k_pages, v_pages)
    batch, q_heads, head_dim = q.shape
    _, _, kv_heads, page_dim = k_pages.shape
    if page_dim != head_dim:
        raise ValueError(f"head dim mismatch: q has {head_dim}, the pages have {page_dim}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of the pages' KV heads ({kv_heads})")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    check_dtypes(q, ("k_pages", k_pages), ("v_pages", v_pages))
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(
            f"block_table must be (batch, max_blocks) = ({batch}, ...), got {tuple(block_table.shape)}"
        )
    if tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"seq_lens must have shape (batch,) = ({batch},), got {tuple(seq_lens.shape)}")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 (or int64), got {t.dtype}; convert with .to(torch.int32)")
    extra = []
    if alibi_slopes is not None:
        if tuple(alibi_slopes.shape) != (q_heads,):
            raise ValueError(
                f"alibi_slopes must have shape (num_q_heads,) = ({q_heads},), got {tuple(alibi_slopes.shape)}"
            )
        if not alibi_slopes.is_floating_point():
            raise ValueError(f"alibi_slopes must be floating point, got {alibi_slopes.dtype}")
        extra.append(alibi_slopes)
    check_sinks(q, sinks, sink_logits)
    check_device(q, k_pages, v_pages, block_table, seq_lens, *extra)


def check_paged_values(
    k_pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, window_left: int,
    sinks: int = 0,
) -> None:
    """The values `paged_attention` reads: every length fits the table, every table entry a
    sequence reads (from its window's first block to its last, and with sinks the blocks of
    positions [0, min(sinks, window start))) is a block of the pool."""
    num_blocks, block_size = k_pages.shape[:2]
    width = block_table.shape[1]
    lengths = seq_lens.detach().long().cpu()
    table = block_table.detach().long().cpu()
    capacity = width * block_size
    wrong = (lengths < 0) | (lengths > capacity)
    if wrong.any():
        b = int(wrong.nonzero()[0, 0])
        raise ValueError(
            f"seq_lens[{b}] = {int(lengths[b])}, but a sequence holds 0 to {capacity} tokens: "
            f"the block table has {width} blocks of {block_size} per sequence. Pass the "
            "lengths the table was built for, or a wider table."
        )
    first = (lengths - 1 - window_left).clamp(min=0) if window_left >= 0 else torch.zeros_like(lengths)
    columns = torch.arange(width)
    read = (columns >= (first // block_size)[:, None]) & (columns <= ((lengths - 1) // block_size)[:, None])
    if sinks > 0 and window_left >= 0:  # the blocks between the sinks and the window may be -1
        sink_end = first.clamp(max=sinks)
        read |= columns[None, :] < ((sink_end + block_size - 1) // block_size)[:, None]
    wrong = read & ((table < 0) | (table >= num_blocks))
    if wrong.any():
        b, i = (int(x) for x in wrong.nonzero()[0])
        raise ValueError(
            f"block_table[{b}, {i}] = {int(table[b, i])} is not a block of the pool (0 to "
            f"{num_blocks - 1}), but sequence {b} (length {int(lengths[b])}) reads that block. "
            "-1 marks a block given back to the pool: only blocks wholly before the window (and "
            "after the sinks) may be given back. Fix the table or seq_lens."
        )


def check_slot_values(k_pages: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Every slot `write_to_pages` writes lies in the pool (negative slots are skipped)."""
    num_slots = k_pages.shape[0] * k_pages.shape[1]
    slots = slot_mapping.detach().long().cpu()
    wrong = slots >= num_slots
    if wrong.any():
        b, n = (int(x) for x in wrong.nonzero()[0])
        raise ValueError(
            f"slot_mapping[{b}, {n}] = {int(slots[b, n])}, past the pool's {num_slots} slots "
            f"({k_pages.shape[0]} blocks of {k_pages.shape[1]}); use -1 to skip a token"
        )


def _should_validate(validate: bool | None, *index_tensors: torch.Tensor) -> bool:
    """Explicit True/False wins; by default, check values only where reading them is free:
    CPU tensors, outside torch.compile's tracing."""
    if validate is not None:
        return validate
    if torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" for t in index_tensors)


def check_write_inputs(
    key: torch.Tensor,
    value: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Shapes, dtypes and devices for `write_to_pages`."""
    if key.dim() != 4 or key.shape != value.shape:
        raise ValueError(
            "key and value must both be (batch, num_kv_heads, seq_len, head_dim), "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    _check_pages(k_pages, v_pages)
    batch, kv_heads, tokens, head_dim = key.shape
    if (kv_heads, head_dim) != tuple(k_pages.shape[2:]):
        raise ValueError(
            f"key has {kv_heads} heads of dim {head_dim}, the pages hold {tuple(k_pages.shape[2:])}"
        )
    if tuple(slot_mapping.shape) != (batch, tokens):
        raise ValueError(f"slot_mapping must have shape (batch, seq_len) = {(batch, tokens)}, got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in _INDEX_DTYPES:
        raise ValueError(f"slot_mapping must be int64 or int32, got {slot_mapping.dtype}")
    if key.dtype != k_pages.dtype or value.dtype != v_pages.dtype:
        raise ValueError(
            f"key/value dtypes ({key.dtype}, {value.dtype}) must match the pages' ({k_pages.dtype}); "
            "build the cache in the model's dtype"
        )
    check_device(key, value, k_pages, v_pages, slot_mapping)


def _check_pages(k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
    if k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            "k_pages and v_pages must both be (num_blocks, block_size, num_kv_heads, head_dim), "
            f"got {tuple(k_pages.shape)} and {tuple(v_pages.shape)}"
        )


# --- torch custom ops ---------------------------------------------------------------------------
# window_left: keys with pos - j <= window_left are visible; -1 = no window. sinks: keys j < sinks
# stay visible beside the window. sink_logits: (Hq,) float32 or None.


@torch.library.custom_op("hf_attn_patch::paged_attention", mutates_args=())
def _paged_attention_op(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor],
    window_left: int,
    scale: float,
    sinks: int = 0,
    sink_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _paged_triton.decode(q, k_pages, v_pages, block_table, seq_lens, alibi_slopes, window_left, scale,
                                sinks=sinks, sink_logits=sink_logits)


@_paged_attention_op.register_fake
def _paged_attention_fake(q, k_pages, v_pages, block_table, seq_lens, alibi_slopes, window_left, scale,
                          sinks=0, sink_logits=None):
    return _paged_triton.empty_output(q)


@torch.library.custom_op("hf_attn_patch::write_to_pages", mutates_args=("k_pages", "v_pages"))
def _write_to_pages_op(
    key: torch.Tensor,
    value: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    _paged_triton.write(key, value, k_pages, v_pages, slot_mapping)


@_write_to_pages_op.register_fake
def _write_to_pages_fake(key, value, k_pages, v_pages, slot_mapping):
    return None
