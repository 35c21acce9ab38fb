# Session 8: host time of one decode step's paged calls for one layer (write_to_pages +
# paged_attention, B=1, Llama-1B heads) with the Triton launches stubbed out, through the torch
# custom ops and directly (what eager calls do since commit "paged: eager calls launch directly").
# CPU only: TRITON_INTERPRET=1 python benchmarks/results/h200-2026-12-04-session8/host_time_paged_ops.py
import time

import torch

from hf_attn_patch.kernels import _paged_triton, paged, paged_attention, write_to_pages

_paged_triton.decode = lambda q, *args, **kwargs: torch.empty_like(q)
_paged_triton.write = lambda *args: None
q = torch.randn(1, 32, 64)
k_pages, v_pages = torch.randn(200, 16, 8, 64), torch.randn(200, 16, 8, 64)
block_table = torch.arange(130, dtype=torch.int32)[None]
seq_lens = torch.tensor([2049], dtype=torch.int32)
key, value = torch.randn(1, 8, 1, 64), torch.randn(1, 8, 1, 64)
slots = torch.tensor([[2048]])


def step():
    write_to_pages(key, value, k_pages, v_pages, slots, validate=False)
    paged_attention(q, k_pages, v_pages, block_table, seq_lens, validate=False)


def per_step_us(n=5000):
    for _ in range(500):
        step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n * 1e6


with torch.no_grad():
    direct = per_step_us()
    paged._through_custom_op = lambda *tensors: True
    ops = per_step_us()
print(f"write_to_pages + paged_attention host time: custom ops {ops:.1f} us, direct {direct:.1f} us")
