"""Host time of one attention call at decode shape, layer by layer of our call stack.

A decode step of a 1B model is bound by the host launching kernels (benchmarks/generate.py's
decode-step profile), so every microsecond of Python per attention call counts 16 times a
token. This times, per call, without synchronising (the GPU lags behind; only the host cost is
measured): the Triton launch (`_flash_triton.forward`), the torch custom op around it (what
torch.compile goes through), `flash_attention` (checks included), and a floor of two tensor
allocations; a layer's whole attention call, stock (transformers' sdpa entry) and ours; then
one forward + backward with gradients, through the eager autograd.Function and through the
custom ops; Triton's C launcher alone, given tensors and given addresses; one layer's paged
decode calls, direct and through Triton's own launch; then a cProfile of the launch, and of
whole decode steps of generate.py's Llama-1B shape (sdpa and patched).

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
        for extra_rows in (lambda: entry_rows(q, k, v), lambda: launcher_rows(args), lambda: paged_rows(q, k)):
            try:
                extra_rows()
            except Exception as exc:  # keep the other rows of the run
                print(f"    (rows failed: {type(exc).__name__}: {exc})")
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


def entry_rows(q, k, v) -> None:
    """One layer's attention call as a patched and a stock model make it: transformers' sdpa
    entry (what an unpatched Llama calls), our AttentionInterface entry, and torch's sdpa alone.
    The gap between the first two is what a host-bound decode step pays per layer."""
    from transformers import LlamaConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import LlamaAttention

    from hf_attn_patch.models._interface import attention_forward

    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim)
    with torch.device("meta"):  # the entries read the module's attributes, never its weights
        module = LlamaAttention(config, layer_idx=0).eval()
    scale = head_dim**-0.5
    rows = {
        "stock sdpa_attention_forward (an unpatched layer's call)":
            lambda: sdpa_attention_forward(module, q, k, v, None, scaling=scale),
        "ours attention_forward (a patched layer's call)": lambda: attention_forward(module, q, k, v, None, scaling=scale),
        "torch sdpa alone (enable_gqa=True)":
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
    }
    for name, fn in rows.items():
        print(f"{per_call_us(fn):8.1f} us  {name}")


def launcher_rows(args) -> None:
    """Triton's C launcher alone, for the forward kernel, given the tensors (it calls data_ptr()
    back and asks the driver about each pointer) and given their addresses (what `launch` passes)."""
    from hf_attn_patch.kernels import _launch

    seen = []
    real_launch = _launch.launch

    def record(fn, grid, launch_args, constexprs):
        seen.append((fn, grid, launch_args, constexprs))
        real_launch(fn, grid, launch_args, constexprs)

    _flash_triton.launch = record
    try:
        _flash_triton.forward(*args)
    finally:
        _flash_triton.launch = real_launch
    fn, grid, launch_args, constexprs = seen[-1]
    specialisation, addresses = _launch._specialise(launch_args)
    known = _launch._COMPILED.get(_launch._cache_key(fn, torch.cuda.current_device(), constexprs, specialisation))
    if known is None or known[2] is None:
        print("    (C launcher rows skipped: no direct launcher for this Triton)")
        return
    _, constexpr_params, (run, function, packed_metadata) = known
    grid = tuple(grid(constexprs)) + (1,)
    stream = torch.cuda.current_stream().cuda_stream
    for label, values in (("tensors", launch_args), ("addresses", addresses)):
        call = lambda values=values: run(*grid, stream, function, packed_metadata, None, None, None,  # noqa: E731
                                        *values, *constexpr_params)
        print(f"{per_call_us(call, 300):8.1f} us  C launcher alone, given {label}")  # 300: under the launch queue's depth
    print(f"{per_call_us(lambda: _launch._specialise(launch_args)):8.1f} us  _launch._specialise "
          f"({len(launch_args)} arguments)")


def paged_rows(q, k) -> None:
    """One layer's paged decode calls (write_to_pages + paged_attention, B=1, 2048 keys in
    16-token blocks): direct launches vs Triton's own `JITFunction.run`."""
    from hf_attn_patch.kernels import _launch, paged_attention, write_to_pages

    heads_kv, dim = k.shape[1], k.shape[-1]
    blocks = 136
    k_pages = torch.randn(blocks, 16, heads_kv, dim, device=q.device, dtype=q.dtype)
    v_pages = torch.randn_like(k_pages)
    block_table = torch.arange(blocks, dtype=torch.int32, device=q.device)[None]
    seq_lens = torch.tensor([2049], dtype=torch.int32, device=q.device)
    slots = torch.tensor([[2048]], device=q.device)
    new_k = torch.randn(1, heads_kv, 1, dim, device=q.device, dtype=q.dtype)

    def layer():
        write_to_pages(new_k, new_k, k_pages, v_pages, slots)
        paged_attention(q[:, :, 0], k_pages, v_pages, block_table, seq_lens)

    print(f"{per_call_us(layer):8.1f} us  paged layer (write_to_pages + paged_attention), direct launches")
    with _launch.tritons_own_launch():
        print(f"{per_call_us(layer):8.1f} us  paged layer, Triton's own launch")


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
