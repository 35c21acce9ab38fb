"""Session 9, run T: two probes in one GPU call.
1. Where a patched decode step with a PagedKVCache (no CUDA graphs) loses 3.7 ms to the same step
   with the dynamic cache (run S: 17.26 vs 13.55 ms): torch.profiler of both, CPU and CUDA tables.
2. Why the causal D=64 N=1k backward (run S: fwd+bwd 0.94 ms) is slower than the non-causal one
   (0.81 ms): per-kernel CUDA times, the configs chosen, fwd+bwd with and without CUDA graphs.
    python benchmarks/results/h200-2026-12-04-session9/run-t/probe.py
"""
import sys, time
from pathlib import Path
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from generate import FULL, build, provider_context, random_prompts, paged_cache, Workload  # noqa: E402
from hf_attn_patch.kernels import flash_attention, _flash_triton  # noqa: E402

dev = torch.device("cuda")


def decode_probe():
    model = build("llama", FULL.llama, dev, torch.bfloat16)
    inputs = random_prompts(1, 2048, model.config.vocab_size, dev)
    with torch.no_grad(), provider_context(model, "patched"):
        for name in ("dynamic", "paged", "dynamic", "paged"):
            cache = paged_cache(model, Workload(1, 2048, 64)) if name == "paged" else None
            if cache is not None:
                out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
            else:
                out = model(**inputs, use_cache=True, logits_to_keep=1)
            c, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                nxt = model(input_ids=nxt, past_key_values=c, use_cache=True).logits[:, -1:].argmax(-1)
            times = []
            for _ in range(10):
                torch.cuda.synchronize(); t = time.perf_counter()
                nxt = model(input_ids=nxt, past_key_values=c, use_cache=True).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize(); times.append(time.perf_counter() - t)
            times.sort()
            print(f"{name}: median {times[5]*1e3:.2f} ms/step, min {times[0]*1e3:.2f}")
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    nxt = model(input_ids=nxt, past_key_values=c, use_cache=True).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
            ka = prof.key_averages()
            print(f"--- {name}: by self CPU time (5 steps)")
            print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
            print(f"--- {name}: by device time (5 steps)")
            print(ka.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


def causal_probe():
    for causal in (False, True):
        q, k, v = (torch.randn(16, 16, 1024, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)
        step = lambda: torch.autograd.grad(flash_attention(q, k, v, causal=causal), (q, k, v), g)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            step()
        torch.cuda.synchronize()
        eager_ms = (time.perf_counter() - t) / 50 * 1e3
        # GPU time alone: the same calls inside a CUDA graph
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay(); torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            graph.replay()
        torch.cuda.synchronize()
        graph_ms = (time.perf_counter() - t) / 50 * 1e3
        print(f"causal={causal}: fwd+bwd eager {eager_ms:.3f} ms, in a CUDA graph {graph_ms:.3f} ms")
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
    for key, config in _flash_triton._CHOSEN_CONFIGS.items():
        print(getattr(getattr(key[0], "fn", key[0]), "__name__", key[0]), key[1:3], {n: config[n] for n in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if n in config})


if __name__ == "__main__":
    which = sys.argv[1:] or ["causal", "decode"]
    if "causal" in which:
        causal_probe()
    if "decode" in which:
        decode_probe()
