"""Session 9, run V: a bare decode step at batch 16 (Llama-1B shape, 512-token prompts, attention
mask as generate passes it), stock sdpa vs patched: wall time per step and, from torch.profiler,
device time and kernel count per step. Run P/U: patched generate is 0.78-0.86x sdpa at B=16
but level at B=1.
    python benchmarks/results/h200-2026-12-04-session9/run-v/probe_b16.py
"""
import sys, time
from pathlib import Path
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from generate import FULL, build, provider_context, random_prompts  # noqa: E402

dev = torch.device("cuda")
model = build("llama", FULL.llama, dev, torch.bfloat16)
inputs = random_prompts(16, 512, model.config.vocab_size, dev)
for provider in ("sdpa", "patched", "sdpa", "patched"):
    with torch.no_grad(), provider_context(model, provider):
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        cache, nxt, mask = out.past_key_values, out.logits[:, -1:].argmax(-1), inputs["attention_mask"]

        def step():
            global nxt, mask
            mask = torch.cat([mask, mask.new_ones(16, 1)], 1)
            nxt = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

        for _ in range(3):
            step()
        times = []
        for _ in range(10):
            torch.cuda.synchronize(); t = time.perf_counter(); step(); torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        times.sort()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0 and not e.key.startswith("aten::")]
        kernels = sum(e.count for e in events) / 3
        busy = sum(e.self_device_time_total for e in events) / 3 / 1e3
        print(f"{provider}: step median {times[5]*1e3:.2f} ms, min {times[0]*1e3:.2f}; GPU busy {busy:.2f} ms, {kernels:.0f} kernels a step")
        if provider == "patched":
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))
