"""Triton kernels for the paged KV cache: decode attention (flash-decoding) and the slot writes.

Decode runs in two passes, as vLLM's paged attention v2 and flash-decoding do:

1. `_decode_partition_kernel`, one program per (sequence, KV head, partition of the context).
   The program reads each of its K/V pages once for all the query heads that share the KV head:
   the group's query heads are the rows of the tile (padded to 16 rows for `tl.dot`), so GQA
   costs no extra memory traffic. It keeps the online-softmax max and sum in float32 and stores
   them with its unnormalised partial output.
2. `_merge_partitions_kernel`, one program per (sequence, query head), rescales and sums the
   partitions. When the whole context fits one partition the first pass writes the output
   directly and the second is skipped.

The grid depends only on shapes (batch, heads, block-table width), never on the values of
`seq_lens`, so a decode step can be captured in a CUDA graph; programs whose partition lies
beyond their sequence (or before its window) do nothing, and the merge reads only the
partitions that hold keys.

No load leaves its tensor, whatever the values of `seq_lens` and `block_table`: keys stop at
the table's width (`context_bound`), and a position whose table entry is not a block of the
pool (EVICTED, negative, >= num_blocks) is masked like a key outside the window. Both cost a
few scalar or per-key integer compares, nothing per element of K or V.

Attention sinks (compile-time switches, off by default, so plain decode compiles as before):

* HAS_SINKS: with a window, keys [0, min(sinks, first window position)) stay visible. A
  partition then reads at most two ranges, the sinks' and the window's, through the same online
  softmax; the blocks between them are never read (a streaming cache has given them back).
  The merge reads the partitions holding sinks and those holding the window, each once.
* HAS_SINK_LOGITS: one more term exp(sink_h - max) in each row's softmax denominator, added
  exactly once per row: by the single partition when there is one, else by the merge (the
  partitions' sums never include it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import interpreter_enabled
from ._launch import cdiv, next_power_of_2
from ._launch import launch as direct_launch  # `launch` names the LaunchConfig below

LOG2E = 1.4426950408889634

# The smallest partition: below it the merge pass costs more than the parallelism buys.
_MIN_PARTITION = 256
# Rows of the tile: tl.dot needs at least 16.
_MIN_GROUP_ROWS = 16


def decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
    window_left: int,
    scale: float,
    partition_size: int | None = None,
    launch: LaunchConfig | None = None,
    sinks: int = 0,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the decode kernels; inputs are checked by the caller. Returns (B, Hq, D).

    partition_size and launch override the defaults (benchmarks sweep them to tune those).
    sinks: keys [0, sinks) stay visible beside the window (no effect without one).
    sink_logits: (Hq,) float32, the learned per-head sink logits, or None.
    """
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_pages.shape
    group = q_heads // kv_heads
    out = empty_output(q)
    if batch == 0:
        return out

    launch = launch or default_launch(head_dim)
    block_n = launch.block_n
    context_bound = block_table.shape[1] * block_size  # static: never read seq_lens on the host
    if partition_size is None:
        partition_size = _choose_partition_size(batch * kv_heads, context_bound, block_n, q.device)
    num_partitions = max(1, cdiv(context_bound, partition_size))
    single = num_partitions == 1

    meta = dict(
        GROUP=group,
        GROUP_ROWS=max(_MIN_GROUP_ROWS, next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        HAS_ALIBI=alibi_slopes is not None,
        IEEE_DOT=q.dtype == torch.float32,
        # Without a window every key is visible already: sinks change nothing.
        HAS_SINKS=sinks > 0 and window_left >= 0,
        HAS_SINK_LOGITS=sink_logits is not None,
    )
    slopes = alibi_slopes if alibi_slopes is not None else _placeholder(q.device)
    sink_values = sink_logits if sink_logits is not None else _placeholder(q.device)
    if single:
        part_max = part_sum = part_out = out  # unused when SINGLE_PARTITION
    else:
        part_max = q.new_empty((batch, q_heads, num_partitions), dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        part_out = q.new_empty((batch, q_heads, num_partitions, head_dim), dtype=torch.float32)

    direct_launch(
        _decode_partition_kernel, (batch * kv_heads, num_partitions),
        (q, k_pages, v_pages, block_table, seq_lens, slopes, sink_values,
         out, part_max, part_sum, part_out,
         *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(),
         *out.stride(),
         kv_heads, num_partitions, partition_size, window_left, sinks, scale * LOG2E,
         context_bound, k_pages.shape[0]),
        dict(SINGLE_PARTITION=single, num_warps=launch.num_warps, num_stages=launch.num_stages, **meta),
    )
    if not single:
        direct_launch(
            _merge_partitions_kernel, (batch * q_heads,),
            (part_max, part_sum, part_out, seq_lens, sink_values, out,
             *out.stride(),
             q_heads, num_partitions, partition_size, window_left, sinks, context_bound),
            dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=meta["HEAD_DIM_PAD"], BLOCK_P=min(32, next_power_of_2(num_partitions)),
                 HAS_SINKS=meta["HAS_SINKS"], HAS_SINK_LOGITS=meta["HAS_SINK_LOGITS"], num_warps=4),
        )
    return out


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int  # tokens per inner step of the decode loop
    num_warps: int
    num_stages: int


def default_launch(head_dim: int) -> LaunchConfig:
    """64 tokens of K and V per step (bf16, D=128: 32 KiB) keeps enough bytes in flight per
    program while two stages still fit shared memory; half that at D=256."""
    if head_dim > 128:
        return LaunchConfig(block_n=32, num_warps=8, num_stages=2)
    return LaunchConfig(block_n=64, num_warps=4, num_stages=2)


_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    """An empty float32 tensor for a pointer argument the kernel does not read (its HAS_ flag
    is off): one per device, not two allocations in every decode call."""
    empty = _PLACEHOLDERS.get(device)
    if empty is None:
        empty = _PLACEHOLDERS[device] = torch.empty(0, dtype=torch.float32, device=device)
    return empty


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """The (B, Hq, D) output buffer, contiguous, in q's dtype."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def write(
    key: torch.Tensor,
    value: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Copy key/value (B, Hkv, N, D) into the pages at slot_mapping (B, N); negative = skip."""
    batch, kv_heads, tokens, head_dim = key.shape
    if batch * tokens == 0:
        return
    head_dim_pad = next_power_of_2(head_dim)
    heads_per_program = min(next_power_of_2(kv_heads), max(1, 4096 // head_dim_pad))
    grid = (batch * tokens, cdiv(kv_heads, heads_per_program))
    direct_launch(
        _write_slots_kernel, grid,
        (key, value, k_pages, v_pages, slot_mapping,
         *key.stride(), *value.stride(), *k_pages.stride(), *v_pages.stride(),
         *slot_mapping.stride(),
         tokens, kv_heads, k_pages.shape[0] * k_pages.shape[1]),
        dict(BLOCK_SIZE=k_pages.shape[1], HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, HEADS=heads_per_program,
             num_warps=4),
    )


def _choose_partition_size(rows: int, context_bound: int, block_n: int, device: torch.device) -> int:
    """Largest power-of-two partition that still gives every SM a few programs.

    One partition (no merge pass) when batch x KV heads alone fills the GPU; split the context
    otherwise, down to _MIN_PARTITION tokens. Uses shapes only, so it is CUDA-graph safe.
    """
    # Two programs per SM: on an H100 (2026-11-23) batch 1 at 32k reads 2.43 TB/s with 512-token
    # partitions against 2.12 with 256 (four per SM); larger batches are the same either way.
    wanted_programs = 2 * _multiprocessor_count(device)
    size = max(block_n, next_power_of_2(max(context_bound, 1)))
    while size > _MIN_PARTITION and rows * math.ceil(context_bound / size) < wanted_programs:
        size //= 2
    return max(size, block_n)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number keeps test shapes split the way a GPU splits them


# --- kernels ------------------------------------------------------------------------------------

# Triton 3.9's interpreter multiplies bfloat16 tiles as raw 16-bit integers; there, and only
# there, bfloat16 dots go through float32 (same products, exact in float32).
_UPCAST_BF16_DOTS = tl.constexpr(interpreter_enabled())


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    if _UPCAST_BF16_DOTS and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)



@triton.jit
def _decode_partition_kernel(
    Q, K_pages, V_pages, Block_table, Seq_lens, Alibi_slopes, Sink_logits,
    Out, Part_max, Part_sum, Part_out,
    stride_qb, stride_qh, stride_qd,
    stride_kn, stride_ks, stride_kh, stride_kd,
    stride_vn, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tc,
    stride_ob, stride_oh, stride_od,
    kv_heads, num_partitions, partition_size, window_left, sinks, scale_log2, context_bound, num_blocks,
    GROUP: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    SINGLE_PARTITION: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_SINK_LOGITS: tl.constexpr,
):
    seq_head = tl.program_id(0)
    partition = tl.program_id(1)
    batch = seq_head // kv_heads
    kv_head = seq_head % kv_heads

    seq_len = tl.load(Seq_lens + batch).to(tl.int32)
    query_pos = seq_len - 1
    first_visible = tl.where(window_left >= 0, tl.maximum(query_pos - window_left, 0), 0)
    part_start = partition * partition_size
    part_end = part_start + partition_size
    lo = tl.maximum(part_start, first_visible)
    # Keys past the table's width have no entry to read: seq_lens too large for the table.
    hi = tl.minimum(tl.minimum(part_end, seq_len), context_bound)
    has_keys = lo < hi
    sink_hi = part_start  # the sinks' keys in this partition: [part_start, sink_hi), none without sinks
    if HAS_SINKS:
        # Wholly before the window: blocks between the sinks and the window are never read.
        sink_hi = tl.minimum(tl.minimum(tl.minimum(sinks, first_visible), part_end), context_bound)
        has_keys = has_keys | (part_start < sink_hi)

    rows = tl.arange(0, GROUP_ROWS)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM

    if SINGLE_PARTITION:
        acc, row_max, row_sum = _attend_partition(
            Q, K_pages, V_pages, Block_table, Alibi_slopes,
            stride_qb, stride_qh, stride_qd, stride_kn, stride_ks, stride_kh, stride_kd,
            stride_vn, stride_vs, stride_vh, stride_vd, stride_tb, stride_tc,
            batch, kv_head, heads, row_ok, dims, dim_ok, part_start, sink_hi, lo, hi, query_pos,
            scale_log2, num_blocks,
            GROUP_ROWS, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, HAS_ALIBI, IEEE_DOT, HAS_SINKS,
        )
        if HAS_SINK_LOGITS:
            # The whole row is here: its sink term joins the denominator once, now.
            sink = tl.load(Sink_logits + heads, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            new_max = tl.maximum(row_max, sink)
            correction = tl.exp2(row_max - new_max)
            acc = acc * correction[:, None]
            row_sum = row_sum * correction + tl.exp2(sink - new_max)
        # An empty sequence has row_sum == 0 and acc == 0: its output is zeros.
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
        out_ptrs = Out + batch * stride_ob + heads[:, None] * stride_oh + dims[None, :] * stride_od
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        if has_keys:
            acc, row_max, row_sum = _attend_partition(
                Q, K_pages, V_pages, Block_table, Alibi_slopes,
                stride_qb, stride_qh, stride_qd, stride_kn, stride_ks, stride_kh, stride_kd,
                stride_vn, stride_vs, stride_vh, stride_vd, stride_tb, stride_tc,
                batch, kv_head, heads, row_ok, dims, dim_ok, part_start, sink_hi, lo, hi, query_pos,
                scale_log2, num_blocks,
                GROUP_ROWS, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, HAS_ALIBI, IEEE_DOT, HAS_SINKS,
            )
            # Partition buffers are contiguous (B, Hq, P[, D]).
            stat_offs = (batch * kv_heads * GROUP + heads) * num_partitions + partition
            tl.store(Part_max + stat_offs, row_max, mask=row_ok)
            tl.store(Part_sum + stat_offs, row_sum, mask=row_ok)
            out_ptrs = Part_out + stat_offs[:, None] * HEAD_DIM + dims[None, :]
            tl.store(out_ptrs, acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _attend_partition(
    Q, K_pages, V_pages, Block_table, Alibi_slopes,
    stride_qb, stride_qh, stride_qd, stride_kn, stride_ks, stride_kh, stride_kd,
    stride_vn, stride_vs, stride_vh, stride_vd, stride_tb, stride_tc,
    batch, kv_head, heads, row_ok, dims, dim_ok, sink_lo, sink_hi, lo, hi, query_pos,
    scale_log2, num_blocks,
    GROUP_ROWS: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """One partition's keys: the sinks' [sink_lo, sink_hi) (HAS_SINKS), then the window's
    [lo, hi), through one online softmax. Returns the unnormalised output, the max (log2 units) and the sum."""
    # A finite floor, not -inf: a step whose keys are all masked (table entries outside the
    # pool) then leaves the max finite, and exp2(max - new_max) never computes -inf - -inf.
    row_max = tl.full([GROUP_ROWS], -1.0e30, dtype=tl.float32)
    row_sum = tl.zeros([GROUP_ROWS], dtype=tl.float32)
    acc = tl.zeros([GROUP_ROWS, HEAD_DIM_PAD], dtype=tl.float32)
    if HAS_SINKS:
        acc, row_max, row_sum = _attend_range(
            Q, K_pages, V_pages, Block_table, Alibi_slopes,
            stride_qb, stride_qh, stride_qd, stride_kn, stride_ks, stride_kh, stride_kd,
            stride_vn, stride_vs, stride_vh, stride_vd, stride_tb, stride_tc,
            batch, kv_head, heads, row_ok, dims, dim_ok, sink_lo, sink_hi, query_pos, scale_log2,
            num_blocks, acc, row_max, row_sum,
            GROUP_ROWS, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, HAS_ALIBI, IEEE_DOT,
        )
    acc, row_max, row_sum = _attend_range(
        Q, K_pages, V_pages, Block_table, Alibi_slopes,
        stride_qb, stride_qh, stride_qd, stride_kn, stride_ks, stride_kh, stride_kd,
        stride_vn, stride_vs, stride_vh, stride_vd, stride_tb, stride_tc,
        batch, kv_head, heads, row_ok, dims, dim_ok, lo, hi, query_pos, scale_log2,
        num_blocks, acc, row_max, row_sum,
        GROUP_ROWS, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, HAS_ALIBI, IEEE_DOT,
    )
    return acc, row_max, row_sum


@triton.jit
def _attend_range(
    Q, K_pages, V_pages, Block_table, Alibi_slopes,
    stride_qb, stride_qh, stride_qd, stride_kn, stride_ks, stride_kh, stride_kd,
    stride_vn, stride_vs, stride_vh, stride_vd, stride_tb, stride_tc,
    batch, kv_head, heads, row_ok, dims, dim_ok, lo, hi, query_pos, scale_log2, num_blocks,
    acc, row_max, row_sum,
    GROUP_ROWS: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """Online softmax over keys [lo, hi) of one sequence for one KV head's query group,
    continuing the state (acc, row_max, row_sum) it is given; returns the new state.

    Scores are scaled by scale * log2(e) once so the loop uses exp2.
    """
    q_ptrs = Q + batch * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if HAS_ALIBI:
        slopes = tl.load(Alibi_slopes + heads, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634

    # Steps are aligned to BLOCK_N. Masked keys load as zeros, so whatever a pool slot outside
    # the sequence holds (a fresh torch.empty pool can hold NaN) never reaches the output.
    start = (lo // BLOCK_N) * BLOCK_N
    table_row = Block_table + batch.to(tl.int64) * stride_tb
    for block_start in range(start, hi, BLOCK_N):
        positions = block_start + tl.arange(0, BLOCK_N)
        key_ok = (positions >= lo) & (positions < hi)
        physical = tl.load(table_row + (positions // BLOCK_SIZE) * stride_tc, mask=key_ok, other=0)
        physical = physical.to(tl.int64)
        key_ok = key_ok & (physical >= 0) & (physical < num_blocks)  # EVICTED or past the pool
        slot = positions % BLOCK_SIZE
        load_mask = key_ok[:, None] & dim_ok[None, :]

        k_ptrs = (K_pages + physical[:, None] * stride_kn + slot[:, None] * stride_ks
                  + kv_head * stride_kh + dims[None, :] * stride_kd)
        k = tl.load(k_ptrs, mask=load_mask, other=0.0)
        scores = _dot(q, tl.trans(k), IEEE_DOT) * scale_log2
        if HAS_ALIBI:
            scores += slopes[:, None] * (positions - query_pos).to(tl.float32)[None, :]
        scores = tl.where(key_ok[None, :], scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        correction = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probs, axis=1)

        v_ptrs = (V_pages + physical[:, None] * stride_vn + slot[:, None] * stride_vs
                  + kv_head * stride_vh + dims[None, :] * stride_vd)
        v = tl.load(v_ptrs, mask=load_mask, other=0.0)
        acc = acc * correction[:, None]
        acc += _dot(probs.to(v.dtype), v, IEEE_DOT)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _merge_partitions_kernel(
    Part_max, Part_sum, Part_out, Seq_lens, Sink_logits, Out,
    stride_ob, stride_oh, stride_od,
    q_heads, num_partitions, partition_size, window_left, sinks, context_bound,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_SINK_LOGITS: tl.constexpr,
):
    """Combine the partitions of one (sequence, query head): rescale to the global max, sum.
    The sink logit, if any, joins the sum here, once."""
    seq_head = tl.program_id(0)
    batch = seq_head // q_heads
    head = seq_head % q_heads

    seq_len = tl.load(Seq_lens + batch).to(tl.int32)
    first_visible = tl.where(window_left >= 0, tl.maximum(seq_len - 1 - window_left, 0), 0)
    # Exactly the partitions the first pass wrote (none when the sequence is empty); keys end
    # at the table's width there too.
    key_end = tl.minimum(seq_len, context_bound)
    first_part = first_visible // partition_size
    end_part = tl.where(key_end > first_visible, (key_end - 1) // partition_size + 1, first_part)
    # With sinks, also the partitions [0, sink_parts) that hold sinks and lie before the window's
    # first one: the loops run over index i < count, partition i before sink_parts, then the
    # window's partitions.
    sink_parts = 0
    if HAS_SINKS:
        sink_end = tl.minimum(tl.minimum(sinks, first_visible), context_bound)
        sink_parts = tl.minimum((sink_end + partition_size - 1) // partition_size, first_part)
    count = sink_parts + end_part - first_part

    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    stats = Part_max + seq_head.to(tl.int64) * num_partitions
    sums = Part_sum + seq_head.to(tl.int64) * num_partitions
    outs = Part_out + seq_head.to(tl.int64) * num_partitions * HEAD_DIM

    max_seen = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    for i0 in range(0, count, BLOCK_P):
        index = i0 + tl.arange(0, BLOCK_P)
        parts = tl.where(index < sink_parts, index, index - sink_parts + first_part)
        max_seen = tl.maximum(max_seen, tl.load(stats + parts, mask=index < count, other=float("-inf")))
    global_max = tl.max(max_seen, axis=0)
    if HAS_SINK_LOGITS:
        sink = tl.load(Sink_logits + head).to(tl.float32) * 1.4426950408889634
        global_max = tl.maximum(global_max, sink)

    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc = tl.zeros([BLOCK_P, HEAD_DIM_PAD], dtype=tl.float32)
    for i0 in range(0, count, BLOCK_P):
        index = i0 + tl.arange(0, BLOCK_P)
        parts = tl.where(index < sink_parts, index, index - sink_parts + first_part)
        part_ok = index < count
        part_max = tl.load(stats + parts, mask=part_ok, other=float("-inf"))
        weight = tl.where(part_ok, tl.exp2(part_max - global_max), 0.0)
        total += weight * tl.load(sums + parts, mask=part_ok, other=0.0)
        partial = tl.load(outs + parts[:, None] * HEAD_DIM + dims[None, :],
                          mask=part_ok[:, None] & dim_ok[None, :], other=0.0)
        acc += weight[:, None] * partial
    row_sum = tl.sum(total, axis=0)
    if HAS_SINK_LOGITS:
        row_sum += tl.exp2(sink - global_max)
    out = tl.sum(acc, axis=0) / tl.where(row_sum > 0, row_sum, 1.0)
    out_ptrs = Out + batch * stride_ob + head * stride_oh + dims * stride_od
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=dim_ok)


@triton.jit
def _write_slots_kernel(
    K, V, K_pages, V_pages, Slots,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkn, stride_pks, stride_pkh, stride_pkd,
    stride_pvn, stride_pvs, stride_pvh, stride_pvd,
    stride_sb, stride_sn,
    tokens, kv_heads, num_slots,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HEADS: tl.constexpr,
):
    """One program per (token, group of KV heads): copy its K and V rows into their slot.
    A slot outside the pool is skipped like a negative one: no store ever leaves the pages."""
    token = tl.program_id(0)
    batch = token // tokens
    position = token % tokens
    slot = tl.load(Slots + batch * stride_sb + position * stride_sn).to(tl.int64)
    if (slot >= 0) & (slot < num_slots):
        page = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        dims = tl.arange(0, HEAD_DIM_PAD)
        mask = (heads < kv_heads)[:, None] & (dims < HEAD_DIM)[None, :]

        src = K + batch * stride_kb + position * stride_kn + heads[:, None] * stride_kh + dims[None, :] * stride_kd
        dst = (K_pages + page * stride_pkn + offset * stride_pks
               + heads[:, None] * stride_pkh + dims[None, :] * stride_pkd)
        tl.store(dst, tl.load(src, mask=mask).to(K_pages.dtype.element_ty), mask=mask)

        src = V + batch * stride_vb + position * stride_vn + heads[:, None] * stride_vh + dims[None, :] * stride_vd
        dst = (V_pages + page * stride_pvn + offset * stride_pvs
               + heads[:, None] * stride_pvh + dims[None, :] * stride_pvd)
        tl.store(dst, tl.load(src, mask=mask).to(V_pages.dtype.element_ty), mask=mask)
