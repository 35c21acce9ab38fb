"""Host time of one attention call at decode shape, layer by layer of our call stack.

A decode step of a 1B model is bound by the host launching kernels (benchmarks/generate.py's
decode-step profile), so every microsecond of Python per attention call counts 16 times a
token. This times, per call, without synchronising (the GPU lags behind; only the host cost is
measured): the Triton launch (`_flash_triton.forward`), the torch custom op around it (what
torch.compile goes through), `flash_attention` (checks included), and a floor of two tensor
allocations; then one forward + backward with gradients, through the eager autograd.Function
and through the custom ops; then a cProfile of the launch, and of whole decode steps of
generate.py's Llama-1B shape (sdpa and patched).

    python benchmarks/host_overhead.py            # CUDA GPU
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_attn_patch.kernels import _flash_triton, flash_attention  # noqa: E402


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(1, 32, 1, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 2049, 128, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    args = (q, k, v, None, None, -1, 0, 128**-0.5)
    rows = {
        "Triton launch (_flash_triton.forward)": lambda: _flash_triton.forward(*args),
        "torch custom op": lambda: torch.ops.hf_attn_patch.flash_attention_forward(*args),
        "flash_attention (checks + direct launch)": lambda: flash_attention(q, k, v, causal=True),
        "torch.empty x2 (floor of any launcher)": lambda: (torch.empty_like(q), torch.empty(1, 32, 1, device=device)),
    }
    with torch.no_grad():
        for name, fn in rows.items():
            print(f"{per_call_us(fn):8.1f} us  {name}")
    training_rows(q, k, v)
    with torch.no_grad():
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(500):
            _flash_triton.forward(*args)
        profiler.disable()
        torch.cuda.synchronize()
    print("\ncProfile of 500 launches (by own time):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    decode_step_profiles()


def training_rows(q, k, v) -> None:
    """Host time of one forward + backward with gradients: eager tensors take a plain
    autograd.Function; compiled code and tensor subclasses take the custom ops (forced here)."""
    from hf_attn_patch.kernels import flash

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)

    def step():
        torch.autograd.grad(flash_attention(*leaves, causal=True), leaves, grad_out)

    print(f"{per_call_us(step, 500):8.1f} us  forward + backward, eager autograd.Function")
    eager_route = flash.route
    flash.route = lambda *tensors: flash.CUSTOM_OP
    try:
        print(f"{per_call_us(step, 500):8.1f} us  forward + backward, through the custom ops")
    finally:
        flash.route = eager_route


def decode_step_profiles(steps: int = 30) -> None:
    """Wall time of a bare decode step of generate.py's Llama-1B shape, sdpa vs patched, and a
    cProfile of the patched steps: where the host's time goes outside torch's own ops."""
    from generate import FULL, build, provider_context, random_prompts

    model = build("llama", FULL.llama, torch.device("cuda"), torch.bfloat16)
    inputs = random_prompts(1, 2048, model.config.vocab_size, torch.device("cuda"))
    for provider in ("sdpa", "patched"):
        with torch.no_grad(), provider_context(model, provider):
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                next_ids = model(input_ids=next_ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            profiler = cProfile.Profile()
            torch.cuda.synchronize()
            start = time.perf_counter()
            profiler.enable()
            for _ in range(steps):
                next_ids = model(input_ids=next_ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            profiler.disable()
            print(f"\n{provider}: {(time.perf_counter() - start) / steps * 1e3:.1f} ms a decode step under cProfile")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
