"""Where a decode step's host time goes: stock sdpa against patched, on one host, in one run.

A decode step of generate.py's Llama-1B shape (B=1, after a 2048-token prompt, DynamicCache)
is bound by the host. This measures, for sdpa and patched:

* the bare step (median of N, synchronised around each step, as generate.py times it);
* host-device syncs per step (torch.cuda.set_sync_debug_mode, counted);
* each piece of our path timed alone, per call, with stock's counterpart beside it:
  the mask entry, the attention entry, flash_attention, the bare Triton launch;
* torch.profiler with record_function around our mask entry, attention entry, input checks
  and kernel launch (self CPU time per step, top ops);
* cProfile of the patched steps (own time and cumulative, top functions).

    python benchmarks/decode_profile.py [--steps 30] [--out benchmarks/results/decode-profile.json]
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import io
import json
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment  # noqa: E402
from generate import FULL, build, gpu_kernels_per_step, provider_context, random_prompts  # noqa: E402
from host_overhead import per_call_us  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1,
                        help="rows decoded together (generate.py's B=16 row: --batch 16 --prompt 512)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--interleaved-only", action="store_true", help="skip the profiles")
    parser.add_argument("--pieces-only", action="store_true", help="only the per-call host cost of each piece")
    parser.add_argument("--in-situ-only", action="store_true",
                        help="only the host time spent inside each part of real decode steps")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    model = build("llama", FULL.llama, device, torch.bfloat16)
    inputs = random_prompts(args.batch, args.prompt, model.config.vocab_size, device)
    report = {"environment": environment(), "batch": args.batch, "prompt_len": args.prompt, "steps": args.steps,
              "providers": {}}
    if args.pieces_only:
        report["pieces_us_per_call"] = pieces(model, device)
        print(json.dumps(report["pieces_us_per_call"], indent=1))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
        return 0
    if args.in_situ_only:
        report["in_situ_ms_per_step"] = {}
        for provider in ("sdpa", "patched", "sdpa", "patched"):  # twice: the host drifts
            with torch.no_grad(), provider_context(model, provider):
                row = in_situ(model, inputs, args.steps)
            report["in_situ_ms_per_step"].setdefault(provider, []).append(row)
            print(provider, json.dumps(row), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
        return 0
    # Hosts differ a lot and drift within a run: alternate the providers, round after round.
    report["interleaved"] = interleaved(model, inputs, rounds=args.rounds, steps=8)
    print(json.dumps(report["interleaved"]["summary"], indent=1), flush=True)
    for provider in () if args.interleaved_only else ("sdpa", "patched"):
        with torch.no_grad(), provider_context(model, provider):
            report["providers"][provider] = profile_provider(model, inputs, args.steps, provider)
    if not args.interleaved_only:
        report["pieces_us_per_call"] = pieces(model, device)
    print(json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


def interleaved(model, inputs, rounds: int, steps: int) -> dict:
    """sdpa, patched, and patched with Triton's own launch path, rotated step by step over one
    DynamicCache (all three read and append the same cache layout), so that the host's drift,
    large on these machines, falls on all three alike. Per provider: each synchronised step, and
    the host-only time of a group of `steps` unsynchronised steps."""
    from hf_attn_patch import patch_model, unpatch_model
    from hf_attn_patch.kernels._launch import tritons_own_launch

    providers = ("sdpa", "patched", "patched-tritons-launch")
    samples = {p: {"synced_ms": [], "host_only_ms": []} for p in providers}

    def use(provider):
        unpatch_model(model)
        model.set_attn_implementation("sdpa")
        if provider != "sdpa":
            patch_model(model)
        return tritons_own_launch() if provider.endswith("tritons-launch") else contextlib.nullcontext()

    with torch.no_grad():
        cache, ids = prefill(model, inputs)
        mask = inputs["attention_mask"]
        for i in range(rounds * len(providers) + len(providers)):
            provider = providers[i % len(providers)]
            with use(provider):
                for synced in (True, False):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(1 if synced else steps):
                        mask = one_more_key(mask)
                        ids = step(model, cache, ids, mask)
                    seconds = (time.perf_counter() - start) / (1 if synced else steps)
                    torch.cuda.synchronize()
                    if i >= len(providers):  # the first round warms up
                        samples[provider]["synced_ms" if synced else "host_only_ms"].append(1e3 * seconds)
        unpatch_model(model)
        model.set_attn_implementation("sdpa")
    summary = {
        p: {f"{k}_{stat}": round(fn(v), 3) for k, v in s.items()
            for stat, fn in (("median", statistics.median), ("min", min))}
        for p, s in samples.items()
    }
    return {"summary": summary, "rounds": samples}


def one_more_key(mask):
    """The 2-D attention mask after a decode step: one more real key per row."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)


def prefill(model, inputs):
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def step(model, cache, next_ids, attention_mask):
    out = model(input_ids=next_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    return out.logits[:, -1:].argmax(-1)


def profile_provider(model, inputs, steps, provider) -> dict:
    result = {}
    for with_mask in (False, True):  # generate() always passes the 2-D attention mask
        cache, ids = prefill(model, inputs)
        mask = inputs["attention_mask"]
        for _ in range(3):
            mask = one_more_key(mask) if with_mask else None
            ids = step(model, cache, ids, mask)
        times = []
        for _ in range(steps):
            mask = one_more_key(mask) if with_mask else None
            torch.cuda.synchronize()
            start = time.perf_counter()
            ids = step(model, cache, ids, mask)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        key = "with_attention_mask" if with_mask else "no_attention_mask"
        result[f"ms_per_step_{key}"] = 1e3 * statistics.median(times)

    # Syncs per step (generate passes the mask, so count with it).
    cache, ids = prefill(model, inputs)
    mask = inputs["attention_mask"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(5):
                mask = one_more_key(mask)
                ids = step(model, cache, ids, mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)]
    result["syncs_per_step"] = len(syncs) / 5
    result["sync_examples"] = sorted(set(syncs))[:5]

    # torch.profiler with our entries labelled.
    from torch.profiler import ProfilerActivity, profile, record_function

    cache, ids = prefill(model, inputs)
    mask = inputs["attention_mask"]
    with labelled(record_function), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            mask = one_more_key(mask)
            ids = step(model, cache, ids, mask)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
    result["host_self_ms_per_step"] = {e.key[:90]: round(e.self_cpu_time_total / 1e3 / steps, 4) for e in rows}
    result.update(gpu_kernels_per_step(prof, steps, top=12))
    labels = [e for e in prof.key_averages() if e.key.startswith("hf_attn_patch.")]
    result["labelled_total_ms_per_step"] = {e.key: round(e.cpu_time_total / 1e3 / steps, 4) for e in labels}
    result["labelled_calls_per_step"] = {e.key: e.count / steps for e in labels}

    # cProfile of the steps.
    cache, ids = prefill(model, inputs)
    mask = inputs["attention_mask"]
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        mask = one_more_key(mask)
        ids = step(model, cache, ids, mask)
    torch.cuda.synchronize()
    profiler.disable()
    result["ms_per_step_under_cprofile"] = (time.perf_counter() - start) / steps * 1e3
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(35)
        print(f"\n===== {provider}: cProfile by {order} =====\n{text.getvalue()}")
        result[f"cprofile_{order}"] = text.getvalue().splitlines()[:60]
    return result


def in_situ(model, inputs, steps: int) -> dict:
    """Host time inside each part of real decode steps (a synchronised step each, no profiler:
    two perf_counter calls per wrapped call). The steps run twice over the same KV lengths and
    the second pass is reported, so stock sdpa has its cuDNN plans for every length by then."""
    for _ in range(2):  # the first pass meets each KV length, the second is the one kept
        cache, ids = prefill(model, inputs)
        mask = inputs["attention_mask"]
        with timed_parts() as spent:
            totals = []
            for _ in range(steps):
                mask = one_more_key(mask)
                torch.cuda.synchronize()
                start = time.perf_counter()
                ids = step(model, cache, ids, mask)
                torch.cuda.synchronize()
                totals.append(time.perf_counter() - start)
    row = {"step_median": round(1e3 * statistics.median(totals), 3), "step_min": round(1e3 * min(totals), 3)}
    row.update({name: round(1e3 * seconds / steps, 3) for name, seconds in spent.items()})
    return row


@contextlib.contextmanager
def timed_parts():
    """Accumulated wall time inside the model's parts and ours, by name."""
    from transformers.models.llama import modeling_llama
    from transformers.modeling_utils import AttentionInterface

    from hf_attn_patch.kernels import _flash_triton, flash as flash_module
    from hf_attn_patch.models import _attention

    spent: dict[str, float] = {}

    def timing(name, original):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    parts = [
        (modeling_llama.LlamaModel, "forward", "model forward"),
        (modeling_llama, "create_causal_mask", "mask creation"),
        (modeling_llama.LlamaDecoderLayer, "forward", "decoder layers"),
        (modeling_llama.LlamaAttention, "forward", "attention modules"),
        (modeling_llama.LlamaMLP, "forward", "MLPs"),
        (modeling_llama.LlamaRMSNorm, "forward", "RMSNorms"),
        (modeling_llama, "apply_rotary_pos_emb", "rotary"),
        (_attention, "flash_attention", "ours: flash_attention"),
        (flash_module, "check_attention_inputs", "ours: input checks"),
        (flash_module._flash_triton, "forward", "ours: _flash_triton.forward"),
        (_flash_triton, "launch", "ours: launch"),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, label in parts:
            stack.enter_context(mock.patch.object(owner, name, timing(label, getattr(owner, name))))
        mapping = AttentionInterface._global_mapping
        for name in ("hf_attn_patch", "sdpa"):
            if name in mapping:
                stack.enter_context(mock.patch.dict(mapping, {name: timing("attention function", mapping[name])}))
        yield spent


@contextlib.contextmanager
def labelled(record_function):
    """record_function around our mask entry, attention entry, checks and launch (this script only)."""
    from hf_attn_patch.kernels import _flash_triton, flash as flash_module

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            with record_function(label):
                return original(*args, **kwargs)

        return mock.patch.object(owner, name, wrapper)

    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    with contextlib.ExitStack() as stack:
        for owner, name, label in [
            (flash_module, "check_attention_inputs", "hf_attn_patch.checks"),
            (_flash_triton, "_launch_tuned", "hf_attn_patch.launch"),
            (flash_module, "flash_attention", "hf_attn_patch.flash_attention"),
        ]:
            stack.enter_context(wrap(owner, name, label))
        for interface, label in ((AttentionInterface, "hf_attn_patch.attention_entry"),
                                 (AttentionMaskInterface, "hf_attn_patch.mask_entry")):
            for name in list(interface._global_mapping):
                if name in ("hf_attn_patch", "sdpa"):
                    original = interface._global_mapping[name]

                    def wrapper(*args, _original=original, _label=f"{label}[{name}]", **kwargs):
                        with record_function(_label):
                            return _original(*args, **kwargs)

                    stack.enter_context(mock.patch.dict(interface._global_mapping, {name: wrapper}))
        yield


def pieces(model, device) -> dict:
    """Each piece of the attention path alone, per call, host time (no sync inside the loop)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    from hf_attn_patch.kernels import _flash_triton, flash_attention
    from hf_attn_patch.kernels._launch import tritons_own_launch
    from hf_attn_patch.models import register
    from hf_attn_patch.models._interface import attention_forward, key_padding_mask

    register()
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 32, 1, 64, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 2049, 64, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask2d = torch.ones(1, 2049, dtype=torch.long, device=device)
    cache_position = torch.tensor([2048], device=device)

    def per_call(fn, calls=1000):
        try:
            return _per_call(fn, calls)
        except Exception as exc:  # a piece whose signature moved in this transformers: say so
            return f"{type(exc).__name__}: {exc}"[:200]

    def _per_call(fn, calls):
        return round(per_call_us(fn, calls), 1)

    rows = {}
    with torch.no_grad():
        rows["ours: mask entry (2-D mask given)"] = per_call(lambda: key_padding_mask(
            1, 1, 2049, q_offset=2048, kv_offset=0, mask_function=causal_mask_function, attention_mask=mask2d,
            device=device))
        rows["stock: sdpa_mask (2-D mask given)"] = per_call(lambda: sdpa_mask(
            batch_size=1, q_length=1, kv_length=2049, q_offset=2048, kv_offset=0,
            mask_function=causal_mask_function, attention_mask=mask2d, device=device, cache_position=cache_position))
        rows["ours: attention entry"] = per_call(lambda: attention_forward(module, q, k, v, None, scaling=0.125))
        rows["stock: sdpa_attention_forward"] = per_call(lambda: sdpa_attention_forward(
            module, q, k, v, None, scaling=0.125, is_causal=False))
        rows["ours: flash_attention"] = per_call(lambda: flash_attention(q, k, v, causal=True, scale=0.125))
        args = (q, k, v, None, None, -1, 0, 0.125)
        rows["ours: Triton launch (_flash_triton.forward)"] = per_call(lambda: _flash_triton.forward(*args))
        with tritons_own_launch():
            rows["ours: attention entry, Triton's own launch"] = per_call(
                lambda: attention_forward(module, q, k, v, None, scaling=0.125))
            rows["ours: Triton launch, Triton's own path"] = per_call(lambda: _flash_triton.forward(*args))
        rows["floor: torch.empty x2"] = per_call(lambda: (torch.empty_like(q), torch.empty(1, 32, 1, device=device)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
