"""A/B of the repeat-launch path in one process (session 7, issue 12): bare patched decode steps
of the Llama-1B shape with Triton's `CompiledKernel[grid]` runner against its C launcher called
directly (no launch metadata, no hook chains), alternating in rounds so host drift hits both.

    python benchmarks/results/h200-2026-12-04-session7/ab_launcher.py --out $OUT
"""
import argparse, json, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from generate import FULL, build, random_prompts  # noqa: E402

from hf_attn_patch import patch_model  # noqa: E402
from hf_attn_patch.kernels import _launch  # noqa: E402


def steps(model, inputs, count):
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(count):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        ids = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    model = patch_model(build("llama", FULL.llama, torch.device("cuda"), torch.bfloat16))
    result = {"device": torch.cuda.get_device_name(), "rounds": args.rounds}
    with torch.no_grad():
        for batch, prompt in ((1, 2048), (16, 512)):
            inputs = random_prompts(batch, prompt, model.config.vocab_size, "cuda")
            steps(model, inputs, 4)  # compile and tune
            launchers = {key: entry[2] for key, entry in _launch._COMPILED.items()}
            times = {"runner": [], "c_launcher": []}
            for _ in range(args.rounds):
                for mode in times:
                    for key, entry in _launch._COMPILED.items():
                        launcher = launchers.setdefault(key, entry[2])  # a specialisation new this round
                        _launch._COMPILED[key] = (entry[0], entry[1], launcher if mode == "c_launcher" else None)
                    times[mode] += steps(model, inputs, 32)
            row = {mode: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t)} for mode, t in times.items()}
            row["stats"] = _launch.fast_launch_stats()
            result[f"B={batch} prompt={prompt}"] = row
            print(f"B={batch} prompt={prompt}: {json.dumps(row)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab-launcher.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
