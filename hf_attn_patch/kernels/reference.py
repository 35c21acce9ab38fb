"""Plain PyTorch attention: the single source of truth for what every kernel computes.

Semantics (DESIGN.md, "The one attention call"):

* q: (B, Hq, Nq, D), k and v: (B, Hkv, Nk, D), Hq % Hkv == 0; query head h reads KV head
  h // (Hq // Hkv).
* Query row i stands at key position pos(i) = Nk - Nq + i (bottom-right alignment).
* causal: key j is visible to query i when j <= pos(i).
* window: an int W keeps the W most recent keys including the query's own
  (0 <= pos(i) - j < W); a tuple (left, right) keeps -right <= pos(i) - j <= left.
* key_padding_mask: (B, Nk), true/1 where the key is a real token.
* alibi_slopes: (Hq,) adds slope_h * (j - pos(i)) to the scores.
* doc_ids: (B, N) with Nq == Nk, packed documents: each run of equal ids in a row is one
  document, and key j is visible to query i only inside the same run (on top of the rest).
  Positions stay those of the row, so ALiBi distances are the documents' own.
* A row that sees no key returns zeros. The softmax runs in float32 (float64 for float64 inputs).

It is slow and memory-hungry (it builds the full score matrix) and is meant for tests.
"""

from __future__ import annotations

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention as DESIGN.md defines it; differentiable, returns q's dtype."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = head_dim**-0.5 if scale is None else scale

    group = q_heads // kv_heads
    k = k.to(compute_dtype).repeat_interleave(group, dim=1)
    v = v.to(compute_dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(compute_dtype), k) * scale

    # distance[i, j] = pos(i) - j
    query_pos = torch.arange(q_len, device=q.device) + (k_len - q_len)
    key_pos = torch.arange(k_len, device=q.device)
    distance = query_pos[:, None] - key_pos[None, :]

    if alibi_slopes is not None:
        scores = scores - alibi_slopes.to(compute_dtype)[None, :, None, None] * distance

    visible = visibility(distance, causal=causal, window=window)[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.bool()[:, None, None, :]
    if doc_ids is not None:
        runs = document_runs(doc_ids)
        visible = visible & (runs[:, None, :, None] == runs[:, None, None, :])
    visible = visible.expand(batch, q_heads, q_len, k_len)

    row_sees_something = visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf"))
    # Rows that see nothing: give softmax finite scores, then zero the result (no NaN, no NaN grad).
    scores = torch.where(row_sees_something, scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1) * row_sees_something
    return torch.einsum("bhqk,bhkd->bhqd", probs, v).to(q.dtype)


def visibility(
    distance: torch.Tensor, *, causal: bool, window: int | tuple[int, int] | None
) -> torch.Tensor:
    """Boolean (Nq, Nk) mask of visible pairs, from distance = pos(i) - j."""
    visible = torch.ones_like(distance, dtype=torch.bool)
    if causal:
        visible &= distance >= 0
    if window is not None:
        left, right = window_bounds(window)
        visible &= (distance <= left) & (distance >= -right)
    return visible


def document_runs(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) index of each position's run of equal ids: [7, 7, 3, 7] -> [0, 0, 1, 2]."""
    changes = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.nn.functional.pad(changes.long().cumsum(-1), (1, 0))


def window_bounds(window: int | tuple[int, int]) -> tuple[int, int]:
    """(left, right) reach of a window: an int W means the W most recent keys, (W - 1, 0)."""
    if isinstance(window, tuple):
        return window
    return window - 1, 0


def paged_attention_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    window: int | tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention over a paged cache: gather each sequence's pages, then attention_reference.

    q: (B, Hq, D), one new token per sequence, standing at the last of its seq_lens[b] positions.
    k_pages, v_pages: (num_blocks, block_size, Hkv, D). block_table: (B, max_blocks), logical
    block i of sequence b lives in physical block block_table[b, i]; token t sits in slot
    t % block_size of logical block t // block_size. Entries the window excludes are never read.
    Positions with no block to read (past the table's width, or an entry outside
    [0, num_blocks)) are masked: they contribute nothing. A sequence of length 0 returns zeros.
    Returns (B, Hq, D) in q's dtype.
    """
    num_blocks, block_size = k_pages.shape[:2]
    width = block_table.shape[1]
    outputs = []
    for b in range(q.shape[0]):
        length = int(seq_lens[b])
        if length <= 0 or width == 0:
            outputs.append(torch.zeros_like(q[b]))
            continue
        first = 0
        if window is not None:
            left, _ = window_bounds(window)
            first = max(0, length - 1 - left)
        # Only gather what the window can see: blocks before it may have been given back.
        positions = torch.arange(first, length, device=q.device)
        logical = positions // block_size
        physical = block_table[b, logical.clamp(max=width - 1)].long()
        real = (logical < width) & (physical >= 0) & (physical < num_blocks)
        physical = physical.clamp(0, num_blocks - 1)  # gathered in range, then masked
        slots = positions % block_size
        k = k_pages[physical, slots].permute(1, 0, 2)[None]  # (1, Hkv, n, D)
        v = v_pages[physical, slots].permute(1, 0, 2)[None]
        v = torch.where(real[None, None, :, None], v, torch.zeros_like(v))  # 0 * NaN would be NaN
        # The query stands at position length - 1; keys start at `first`, so distances match.
        out = attention_reference(
            q[b][None, :, None], k, v, causal=True, window=window,
            key_padding_mask=real[None], alibi_slopes=alibi_slopes, scale=scale,
        )
        outputs.append(out[0, :, 0])
    return torch.stack(outputs)
