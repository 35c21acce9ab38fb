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
* sinks: an int S >= 0, attention sinks (StreamingLLM): keys at positions j < S stay visible
  whatever the window says; causality, padding and documents still apply. With no window every
  key is already visible and S changes nothing. Not combined with doc_ids.
* sink_logits: (Hq,) a learned per-head logit that joins the softmax denominator as one more
  score with a zero value vector: out_i = sum_j exp(s_ij) v_j / (exp(sink_h) + sum_j exp(s_ij)).
  It takes mass away from the keys; it is differentiable. A row that sees no key still returns
  zeros (all its mass goes to the sink).
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
    sinks: int = 0,
    sink_logits: torch.Tensor | None = None,
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

    visible = visibility(distance, causal=causal, window=window, sinks=sinks, key_pos=key_pos)[None, None]
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
    if sink_logits is None:
        probs = torch.softmax(scores, dim=-1) * row_sees_something
    else:
        # One more column per head holding the sink's logit; its probability multiplies no value.
        sink_column = sink_logits.to(compute_dtype)[None, :, None, None].expand(batch, q_heads, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :-1]
        probs = probs * row_sees_something
    return torch.einsum("bhqk,bhkd->bhqd", probs, v).to(q.dtype)


def visibility(
    distance: torch.Tensor,
    *,
    causal: bool,
    window: int | tuple[int, int] | None,
    sinks: int = 0,
    key_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (Nq, Nk) mask of visible pairs, from distance = pos(i) - j and, for sinks, the
    keys' positions j (key_pos, (Nk,))."""
    visible = torch.ones_like(distance, dtype=torch.bool)
    if window is not None:
        left, right = window_bounds(window)
        visible &= (distance <= left) & (distance >= -right)
        if sinks > 0:
            visible |= (key_pos < sinks)[None, :]
    if causal:
        visible &= distance >= 0
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
    sinks: int = 0,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over a paged cache: gather each sequence's pages, then attention_reference.

    q: (B, Hq, D), one new token per sequence, standing at the last of its seq_lens[b] positions.
    k_pages, v_pages: (num_blocks, block_size, Hkv, D). block_table: (B, max_blocks), logical
    block i of sequence b lives in physical block block_table[b, i]; token t sits in slot
    t % block_size of logical block t // block_size. Entries the window excludes are never read;
    with sinks=S the first S positions are read too (streaming: the blocks between them and the
    window may have been given back). sink_logits as in `attention_reference`.
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
        # Only gather what the window (and the sinks) can see: blocks between may have been given back.
        positions = torch.arange(first, length, device=q.device)
        sink_positions = torch.arange(min(sinks, first), device=q.device)
        positions = torch.cat([sink_positions, positions])
        logical = positions // block_size
        physical = block_table[b, logical.clamp(max=width - 1)].long()
        real = (logical < width) & (physical >= 0) & (physical < num_blocks)
        physical = physical.clamp(0, num_blocks - 1)  # gathered in range, then masked
        slots = positions % block_size
        k = k_pages[physical, slots].permute(1, 0, 2)[None]  # (1, Hkv, n, D)
        v = v_pages[physical, slots].permute(1, 0, 2)[None]
        v = torch.where(real[None, None, :, None], v, torch.zeros_like(v))  # 0 * NaN would be NaN
        # Keys are not contiguous when sinks sit apart from the window, so the mask is built here
        # (the window, causality and missing blocks) and ALiBi from the true distances.
        out = _decode_reference(
            q[b], k[0], v[0], distance=length - 1 - positions, visible=real,
            alibi_slopes=alibi_slopes, scale=scale, sink_logits=sink_logits,
        )
        outputs.append(out)
    return torch.stack(outputs)


def _decode_reference(q, k, v, *, distance, visible, alibi_slopes, scale, sink_logits):
    """One query per head (Hq, D) over gathered keys (Hkv, n, D) at the given distances."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    group = q_heads // k.shape[0]
    k = k.to(compute_dtype).repeat_interleave(group, dim=0)
    v = v.to(compute_dtype).repeat_interleave(group, dim=0)
    scores = torch.einsum("hd,hkd->hk", q.to(compute_dtype), k) * scale
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.to(compute_dtype)[:, None] * distance.to(compute_dtype)[None, :]
    scores = scores.masked_fill(~visible[None, :], float("-inf"))
    if sink_logits is not None:
        scores = torch.cat([scores, sink_logits.to(compute_dtype)[:, None]], dim=-1)
    if not bool(visible.any()):
        return torch.zeros_like(q)
    probs = torch.softmax(scores, dim=-1)[:, : k.shape[1]]
    return torch.einsum("hk,hkd->hd", probs, v).to(q.dtype)
