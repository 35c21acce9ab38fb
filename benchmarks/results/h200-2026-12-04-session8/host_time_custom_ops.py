# Session 8: host time of one forward + backward call of flash_attention with the Triton launches
# stubbed out, through the custom ops (torch.compile's path) and through the eager autograd.Function
# (commit "Eager training runs the flash kernels through a plain autograd.Function"). CPU only:
#   TRITON_INTERPRET=1 python benchmarks/results/h200-2026-12-04-session8/host_time_custom_ops.py
import time, torch
from hf_attn_patch.kernels import flash, _flash_triton
q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) for _ in range(3))
_flash_triton.forward = lambda q, *a: (torch.empty_like(q), q.new_empty(q.shape[:-1]))
_flash_triton.backward = lambda g, q, k, v, *a: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
def step():
    torch.autograd.grad(flash.flash_attention(q, k, v, causal=True), (q, k, v), q)
def t(n=3000):
    for _ in range(300): step()
    s = time.perf_counter()
    for _ in range(n): step()
    return (time.perf_counter() - s) / n * 1e6
eager = t()
flash.route = lambda *tensors: flash.CUSTOM_OP
ops = t()
print(f"fwd+bwd host time: custom ops {ops:.1f} us, eager autograd.Function {eager:.1f} us")
