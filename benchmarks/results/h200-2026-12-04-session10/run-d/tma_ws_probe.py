"""Probe (session 10, issue 14): would a forward that loads K/V through tensor descriptors (TMA)
and asks Triton 3.6 to warp-specialise its key loop beat our forward kernel on the H200?

Not the package's kernel: a bare forward for one case (bf16, D = 128, MHA, N a multiple of the
blocks, non-causal or causal, no padding/window/ALiBi), written only to answer that question
before the real kernel is changed. Q, K, V, O are viewed as (B*H*N, D) 2-D tensors, one host
tensor descriptor each; a program owns BLOCK_M query rows of one (batch, head). Causal programs
run their full key blocks in the specialised loop and the diagonal blocks masked after it.

Each variant (blocks, warps, stages, warp specialisation on/off) is checked against sdpa, then
timed with triton.testing.do_bench beside our `flash_attention` forward and SDPA's cuDNN and
flash backends, in the same process. A variant that does not compile is a row with its error.

    python tma_ws_probe.py                 # GPU: B=1, H=16, N=16384, D=128
    TRITON_INTERPRET=1 python tma_ws_probe.py --quick     # CPU: logic only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository root


@triton.jit
def _probe_fwd(desc_q, desc_k, desc_v, desc_o, seq_len, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               CAUSAL: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    row0 = pid_bh * seq_len
    q = desc_q.load([row0 + pid_m * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = seq_len
    if CAUSAL:
        full_end = pid_m * BLOCK_M  # key blocks wholly below the diagonal
    for start_n in tl.range(0, full_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = desc_k.load([row0 + start_n, 0])
        s = tl.dot(q, k.T) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([row0 + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    if CAUSAL:  # the diagonal's key blocks, masked
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        for start_n in range(full_end, (pid_m + 1) * BLOCK_M, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = desc_k.load([row0 + start_n, 0])
            s = tl.dot(q, k.T) * qk_scale
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = desc_v.load([row0 + start_n, 0])
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
    acc = acc / l_i[:, None]
    desc_o.store([row0 + pid_m * BLOCK_M, 0], acc.to(desc_o.dtype))


@triton.jit
def _probe_fwd_pointers(Q, K, V, O, seq_len, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        CAUSAL: tl.constexpr):
    """The same forward with plain unmasked pointer loads (no descriptors): separates what TMA
    gives from what our kernel's generality (masks, guards) costs."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    base = tl.program_id(1).to(tl.int64) * seq_len * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = seq_len
    if CAUSAL:
        full_end = pid_m * BLOCK_M
    for start_n in range(0, full_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    if CAUSAL:
        for start_n in range(full_end, (pid_m + 1) * BLOCK_M, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty))


def probe_forward(q, k, v, causal: bool, block_m: int, block_n: int, warps: int, stages: int, ws: bool):
    batch, heads, n, d = q.shape
    out = torch.empty_like(q)
    if ws == "ptr":  # contiguous (B, H, N, D) inputs, pointer loads
        _probe_fwd_pointers[(n // block_m, batch * heads)](
            q, k, v, out, n, d**-0.5 * 1.4426950408889634, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
            CAUSAL=causal, num_warps=warps, num_stages=stages)
        return out
    flat = [t.reshape(batch * heads * n, d) for t in (q, k, v, out)]
    descs = [TensorDescriptor.from_tensor(flat[0], [block_m, d]), TensorDescriptor.from_tensor(flat[1], [block_n, d]),
             TensorDescriptor.from_tensor(flat[2], [block_n, d]), TensorDescriptor.from_tensor(flat[3], [block_m, d])]
    grid = (n // block_m, batch * heads)
    _probe_fwd[grid](*descs, n, d**-0.5 * 1.4426950408889634, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
                     CAUSAL=causal, WARP_SPECIALIZE=ws, num_warps=warps, num_stages=stages)
    return out


def parse_variant(text: str) -> tuple:
    blocks, warps, stages, *ws = text.split("-")
    block_m, block_n = (int(x) for x in blocks.split("x"))
    mode = "ptr" if ws == ["ptr"] else ws == ["ws"]  # ptr: pointer loads, no descriptors
    return block_m, block_n, int(warps.removeprefix("w")), int(stages.removeprefix("s")), mode


def record(rows: list, row: dict, out: Path) -> None:
    """Keep the row, print it, and rewrite the JSON: a run cut short keeps what it measured."""
    rows.append(row)
    print(row, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tma_ws_probe.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--variants", nargs="+",
                        help="BMxBN-wW-sS[-ws|-ptr], e.g. 256x64-w16-s2-ws (default: six); -ptr: pointer loads")
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    batch, heads, n, d = (1, 2, 128, 32) if args.quick else (1, 16, 16384, 128)
    dtype = torch.float32 if args.quick else torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, d, device=device, dtype=dtype) for _ in range(3))
    variants = ([(64, 32, 4, 2, False)] if args.quick else
                [(bm, bn, w, s, ws) for ws in (False, True) for bm, bn, w, s in
                 ((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3))])
    if args.variants:
        variants = [parse_variant(text) for text in args.variants]
    rows = []
    for causal in (False, True):
        flops = 4 * batch * heads * n * n * d / (2 if causal else 1)
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)

        def tflops(ms):
            return flops / (ms * 1e-3) / 1e12

        if not args.quick:
            from hf_attn_patch.kernels import flash_attention

            peers = {"ours (flash_attention)": lambda: flash_attention(q, k, v, causal=causal)}
            for name, backend in (("sdpa cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
                                  ("sdpa flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION)):
                def call(backend=backend):
                    with torch.nn.attention.sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                peers[name] = call
            for name, fn in peers.items():
                row = dict(causal=causal, variant=name)
                try:
                    row["max_abs_err"] = (fn().float() - expected).abs().max().item()
                    ms = triton.testing.do_bench(fn)
                    row.update(ms=ms, tflops=tflops(ms))
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                record(rows, row, args.out)
        for bm, bn, w, s, ws in variants:
            kind = "ptr" if ws == "ptr" else "tma"
            row = dict(causal=causal, variant=f"{kind} {bm}x{bn} w{w} s{s}" + (" ws" if ws is True else ""))
            try:
                started = time.perf_counter()
                out = probe_forward(q, k, v, causal, bm, bn, w, s, ws)
                row["compile_s"] = time.perf_counter() - started
                row["max_abs_err"] = (out.float() - expected).abs().max().item()
                if not args.quick:
                    ms = triton.testing.do_bench(lambda: probe_forward(q, k, v, causal, bm, bn, w, s, ws))
                    row.update(ms=ms, tflops=tflops(ms))
            except Exception as exc:  # a variant that does not compile is a row, not a stop
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            record(rows, row, args.out)
    for row in rows:
        cell = f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row else row.get("error", "")
        print(f"{'causal' if row['causal'] else 'non-causal':>10}  {row['variant']:<28} {cell}")


if __name__ == "__main__":
    main()
