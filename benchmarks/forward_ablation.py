"""Where does our causal forward lose to a bare one? (issue 14; ready for the next GPU session)

Session 10's run D (benchmarks/results/h200-2026-12-04-session10/run-d) found our forward
kernel at a bare FA2-style kernel's speed non-causal (D = 128, N = 16k, H200) but 7-12% under it
causal, at the same tiles. This script bisects that: one bare forward kernel (bf16 or fp16, MHA,
N a multiple of the blocks, no padding/window/ALiBi) with compile-time switches that each add
one thing our kernel does, timed beside `flash_attention` in one process:

- split_loops: the key range cut the way ours cuts it (`_flash_triton._block_ranges`): a masked
  loop before the unmasked one and one after, even where the first is empty;
- safe_max: the guard against rows with nothing visible yet (m = -inf -> subtract 0);
- masked_loads: K/V of unmasked blocks loaded under ours' compile-time all-true mask (the head
  dim's, broadcast over keys) with zero fill; it should fold away, and this row checks that it does;
- store_lse: the log-sum-exp written for the backward.

Every variant is checked against sdpa first. Rows print as they come and are appended to
`<out>/forward-ablation-<date>-<device>.json`.

    python benchmarks/forward_ablation.py                      # GPU: B 1, H 16, N 16k, D 128
    TRITON_INTERPRET=1 python benchmarks/forward_ablation.py --quick   # CPU: logic only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _common import RESULTS_DIR, do_bench_median, environment, write_results  # noqa: E402
from hf_attn_patch.kernels import flash_attention  # noqa: E402
from hf_attn_patch.kernels._flash_triton import _block_ranges  # noqa: E402

SWITCHES = ("split_loops", "safe_max", "masked_loads", "store_lse")


@triton.jit
def _step(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, offs_n, qk_scale,
          MASKED: tl.constexpr, SAFE_MAX: tl.constexpr, MASKED_LOADS: tl.constexpr):
    """One key block of the online softmax."""
    if MASKED_LOADS or MASKED:
        # ours' unmasked blocks: the head dim's mask, all true at compile time when D is a power of 2
        load_ok = tl.broadcast_to(tl.full([k_ptrs.shape[1]], 1, tl.int1)[None, :], k_ptrs.shape)
        if MASKED:  # boundary blocks: the keys some row of the tile sees, as ours
            load_ok = load_ok & (offs_n <= tl.max(offs_m, 0))[:, None]
        k = tl.load(k_ptrs, mask=load_ok, other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = m_new
    if SAFE_MAX:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED_LOADS or MASKED:
        v = tl.load(v_ptrs, mask=load_ok, other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _loop(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, qk_scale, start, end,
          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, SAFE_MAX: tl.constexpr,
          MASKED_LOADS: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, offs_n, qk_scale, MASKED, SAFE_MAX,
                              MASKED_LOADS)
    return acc, m_i, l_i


@triton.jit
def _ablation_fwd(Q, K, V, O, Lse, seq_len, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                  SPLIT_LOOPS: tl.constexpr, SAFE_MAX: tl.constexpr, MASKED_LOADS: tl.constexpr,
                  STORE_LSE: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: start them first (ours does too)
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    base = pid_bh.to(tl.int64) * seq_len * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + base
    v_base = V + base
    first_pos = pid_m * BLOCK_M
    if SPLIT_LOOPS:  # ours: lo..hi visible to some row, full_lo..full_hi to every row
        hi = seq_len + first_pos * 0
        full_hi = hi
        if CAUSAL:
            hi = first_pos + BLOCK_M
            full_hi = first_pos + 1
        start, full_start, full_end, end = _block_ranges(first_pos * 0, hi, first_pos * 0, full_hi, BLOCK_N)
        acc, m_i, l_i = _loop(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, qk_scale, start, full_start,
                              BLOCK_N, HEAD_DIM, True, SAFE_MAX, MASKED_LOADS)
        acc, m_i, l_i = _loop(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, qk_scale, full_start, full_end,
                              BLOCK_N, HEAD_DIM, False, SAFE_MAX, MASKED_LOADS)
        acc, m_i, l_i = _loop(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, qk_scale, full_end, end,
                              BLOCK_N, HEAD_DIM, True, SAFE_MAX, MASKED_LOADS)
    else:
        full_end = seq_len
        if CAUSAL:
            full_end = first_pos  # key blocks wholly below the diagonal
        acc, m_i, l_i = _loop(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, qk_scale, 0, full_end,
                              BLOCK_N, HEAD_DIM, False, SAFE_MAX, MASKED_LOADS)
        if CAUSAL:
            acc, m_i, l_i = _loop(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, qk_scale, full_end,
                                  first_pos + BLOCK_M, BLOCK_N, HEAD_DIM, True, SAFE_MAX, MASKED_LOADS)
    acc = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty))
    if STORE_LSE:
        tl.store(Lse + pid_bh * seq_len + offs_m, m_i + tl.math.log2(l_i))


def ablation_forward(q, k, v, causal: bool, tiles: tuple, switches: frozenset):
    (batch, heads, n, d), (block_m, block_n, warps, stages) = q.shape, tiles
    out = torch.empty_like(q)
    lse = torch.empty(batch * heads * n, device=q.device, dtype=torch.float32)
    _ablation_fwd[(n // block_m, batch * heads)](
        q, k, v, out, lse, n, d**-0.5 * 1.4426950408889634, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
        CAUSAL=causal, SPLIT_LOOPS="split_loops" in switches, SAFE_MAX="safe_max" in switches,
        MASKED_LOADS="masked_loads" in switches, STORE_LSE="store_lse" in switches, num_warps=warps,
        num_stages=stages)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, Triton's interpreter, tiny sizes")
    parser.add_argument("--out", type=Path, help=f"results folder (default {RESULTS_DIR})")
    args = parser.parse_args()
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="forward-ablation-quick-")) if args.quick else RESULTS_DIR
    device = "cpu" if args.quick else "cuda"
    batch, heads, n, d = (1, 2, 128, 32) if args.quick else (1, 16, 16384, 128)
    dtype = torch.float32 if args.quick else torch.bfloat16
    tile_sets = [(32, 16, 4, 2), (32, 32, 4, 2)] if args.quick else [(128, 128, 8, 3), (128, 64, 8, 3)]
    variants = [frozenset(), *(frozenset([name]) for name in SWITCHES), frozenset(SWITCHES)]
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, d, device=device, dtype=dtype) for _ in range(3))
    rows, env = [], environment()

    for causal in (False, True):
        flops = 4 * batch * heads * n * n * d / (2 if causal else 1)
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        calls = {"ours (flash_attention)": lambda: flash_attention(q, k, v, causal=causal)}
        for tiles in tile_sets:
            for switches in variants:
                label = "+".join(sorted(switches)) or "bare"
                calls[f"{label} {tiles[0]}x{tiles[1]} w{tiles[2]} s{tiles[3]}"] = (
                    lambda tiles=tiles, switches=switches: ablation_forward(q, k, v, causal, tiles, switches))
        for name, call in calls.items():
            row = dict(benchmark="forward-ablation", causal=causal, variant=name, B=batch, H=heads, N=n, D=d,
                       dtype=str(dtype).removeprefix("torch."), **env)
            try:
                row["max_abs_err"] = (call().float() - expected).abs().max().item()
                if not args.quick:
                    ms = do_bench_median(call)
                    row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
            except Exception as exc:  # a variant that fails is a row, not a stop
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            print({key: row[key] for key in ("causal", "variant", "max_abs_err", "tflops", "error") if key in row},
                  flush=True)
    for row in rows:
        cell = f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row else row.get("error", f"err {row['max_abs_err']:.1e}")
        print(f"{'causal' if row['causal'] else 'non-causal':>10}  {row['variant']:<58} {cell}")
    print(f"rows appended to {write_results(rows, args.out, 'forward-ablation')}")


if __name__ == "__main__":
    main()
