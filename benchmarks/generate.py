"""Generation benchmark: `generate` throughput, a bare decode step, and long-prompt prefill,
stock attention implementations against the patched model, in one run.

* generate, Llama-1B-shaped model (hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate
  5632, vocab 32000, random bf16 weights): batch 1 with a 2048-token prompt and batch 16 with
  512-token prompts, 128 new tokens each (min_new_tokens = max_new_tokens, so every provider
  decodes the same count); one warm-up run each, then --repeats rounds that time every provider
  once, each on its own copy of the model (interleaved: a drifting host moves all alike), and
  the median per provider; compiled providers run after, alone. Providers: stock
  `sdpa`, `flex_attention`, `eager`, and `patched` (patch_model on the sdpa model); optionally
  `patched-compiled` / `sdpa-compiled` (static cache, torch.compile fullgraph, reduce-overhead,
  i.e. CUDA graphs). For the patched rows: how many Triton kernel variants the warm-up compiled
  and how many more the timed runs compiled (0 means no per-length recompilation).
  An experiment, on request: `patched-paged-unsplit`, patched-paged with every eager decode
  step's context in one partition of the paged kernel (no merge launch), to weigh one launch a
  layer of host time against the GPU parallelism the split buys at batch 1.
* decode step, same model, batch 1 after a 2048-token prefill, in 3 interleaved rounds: wall
  time of one bare forward (q_len 1, dynamic cache), and from torch.profiler the GPU busy time
  and kernel launches per step.
* prefill, Mistral-shaped model cut to 4 layers (hidden 4096, 32 heads / 8 KV heads,
  intermediate 14336, sliding_window 4096): one 16384-token forward, `sdpa` vs `patched`
  (and `flex_attention` if selected).

Every row that fails (a provider that cannot run, out of memory) is recorded with its error and
the run goes on. Rows are appended to `<out>/generate-<date>-<device>.json`; a PNG with the same
name is drawn next to it.

    python benchmarks/generate.py                      # the full run (needs a CUDA GPU)
    python benchmarks/generate.py --providers sdpa patched patched-compiled
    TRITON_INTERPRET=1 python benchmarks/generate.py --quick   # tiny sizes: a CPU smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
import contextlib
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from _common import RESULTS_DIR, environment, error_string, free_memory, write_results

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROVIDERS = ("sdpa", "flex_attention", "eager", "patched", "patched-paged", "patched-graphs")
# patched-paged: patched, generating into one PagedKVCache (reset between calls);
# patched-graphs: the same with patch_model(cuda_graphs=True), its decode steps replayed as CUDA graphs.
PAGED = ("patched-paged", "patched-graphs")
COMPILED = ("patched-compiled", "sdpa-compiled")
# patched-paged-unsplit: patched-paged whose eager decode steps never split the context (one
# launch a layer fewer: the merge), an experiment for issue 12; not in the default run.
EXPERIMENTS = ("patched-paged-unsplit",)
PAGED += EXPERIMENTS
PREFILL_PROVIDERS = ("sdpa", "flex_attention", "patched")  # eager at 16k would form 16k x 16k scores per head

console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass(frozen=True)
class Workload:
    batch: int
    prompt: int
    new_tokens: int

    @property
    def label(self) -> str:
        return f"B={self.batch} prompt={self.prompt} +{self.new_tokens}"


@dataclass(frozen=True)
class Sizes:
    llama: dict
    workloads: tuple[Workload, ...]
    mistral: dict
    prefill_tokens: int
    decode_steps: int
    llama_label: str = "llama-1b-shape"
    mistral_label: str = "mistral-shape-4-layers"
    extra: dict = field(default_factory=dict)


FULL = Sizes(
    llama=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    workloads=(Workload(1, 2048, 128), Workload(16, 512, 128)),
    mistral=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000, sliding_window=4096),
    prefill_tokens=16384,
    decode_steps=32,
)
QUICK = Sizes(
    llama=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128),
    workloads=(Workload(1, 12, 3), Workload(2, 8, 3)),
    mistral=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, sliding_window=8),
    prefill_tokens=32,
    decode_steps=2,
    llama_label="llama-tiny",
    mistral_label="mistral-tiny-1-layer",
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        if not args.quick:
            console.print("[red]The full run needs a CUDA GPU; use --quick (with TRITON_INTERPRET=1) on a CPU.[/red]")
            return 2
        # Triton picks its interpreter when a kernel is defined: before hf_attn_patch is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    sizes = QUICK if args.quick else FULL
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    env = environment()
    console.print(f"[bold]generate benchmark[/bold] on {env['device']}, {str(dtype).removeprefix('torch.')}, "
                  f"torch {env['torch']}, transformers {_transformers_version()}")

    extra = {"transformers": _transformers_version(), "dtype": str(dtype).removeprefix("torch."),
             "quick": args.quick}
    rows: list[dict] = []
    started = time.perf_counter()
    benches = [] if args.no_generate else [bench_generate(sizes, args.providers, device, dtype, args.repeats)]
    if not args.no_decode_profile:
        stepped = [p for p in args.providers if p in PROVIDERS + EXPERIMENTS]
        benches.append(bench_decode_step(sizes, stepped, device, dtype))
    if not args.no_prefill:
        benches.append(bench_prefill(sizes, [p for p in PREFILL_PROVIDERS if p in args.providers], device, dtype,
                                     args.repeats))
    with torch.no_grad():
        for bench in benches:
            for row in bench:
                row = {**env, **extra, **row}
                path = write_results([row], args.out, "generate")  # as they come: a crash keeps them
                rows.append(row)
                console.print(f"  -> {_row_summary(row)}")
    print_tables(rows)
    if on_gpu:
        print_targets(rows)
    else:
        console.print("CPU smoke run: the kernels ran in Triton's interpreter, so the times check the harness only.")
    if not args.no_plot:
        try:
            plot(rows, path.with_suffix(".png"))
            console.print(f"plot: {path.with_suffix('.png')}")
        except Exception as exc:  # the numbers are saved; a missing matplotlib must not lose them
            console.print(f"[yellow]no plot: {error_string(exc)}[/yellow]")
    console.print(f"results: {path} ({time.perf_counter() - started:.0f} s)")
    return 0


def _row_summary(row: dict) -> str:
    if row.get("error"):
        return f"error: {row['error']}"
    figures = {"tokens_per_s": "tok/s", "ms_per_step": "ms/step", "ms": "ms"}
    return ", ".join(f"{row[key]:.1f} {unit}" for key, unit in figures.items() if key in row) or "done"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (CPU with TRITON_INTERPRET=1)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS + COMPILED + EXPERIMENTS,
                        default=list(PROVIDERS),
                        help=f"default {' '.join(PROVIDERS)}; add {' / '.join(COMPILED)} for static cache + "
                        f"torch.compile (reduce-overhead), {' / '.join(EXPERIMENTS)} for the experiment")
    parser.add_argument("--repeats", type=int, help="timed runs after the warm-up, median taken (default 3; 1 with --quick)")
    parser.add_argument("--no-decode-profile", action="store_true", help="skip the bare decode-step rows")
    parser.add_argument("--no-prefill", action="store_true", help="skip the Mistral 16k prefill rows")
    parser.add_argument("--no-generate", action="store_true", help="skip the generate rows")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


# --- generate -----------------------------------------------------------------------------------


def bench_generate(sizes: Sizes, providers, device, dtype, repeats: int) -> Iterator[dict]:
    """Providers without torch.compile run in rounds, each on its own copy of the model: every
    round times each of them once, so a host whose speed drifts over minutes (by up to 70% on
    one lease, 2026-12-04) moves them all alike. The compiled ones run after, one at a time
    (torch.compile's state is reset between them)."""
    model = build("llama", sizes.llama, device, dtype)
    in_rounds = [p for p in providers if p not in COMPILED]
    alone = [p for p in providers if p in COMPILED]
    for workload in sizes.workloads:
        inputs = random_prompts(workload.batch, workload.prompt, model.config.vocab_size, device)
        rows = _generate_in_rounds(model, in_rounds, workload, inputs, device, repeats, sizes.llama_label)
        for provider in alone:
            rows.update(_generate_in_rounds(model, [provider], workload, inputs, device, repeats,
                                            sizes.llama_label))
        stock = rows.get("sdpa", {}).get("_new_tokens")
        stock_seconds = rows.get("sdpa", {}).get("seconds_all")
        for provider in providers:
            row = rows[provider]
            mine = row.get("seconds_all")
            if provider != "sdpa" and stock_seconds and mine and len(mine) == len(stock_seconds):
                # Rounds are interleaved: within one round both ran on the same host state.
                row["x_sdpa_per_round"] = [theirs / own for theirs, own in zip(stock_seconds, mine)]
            new = row.pop("_new_tokens", None)
            if provider != "sdpa" and stock is not None and new is not None:
                # bf16 on random weights: near-ties may flip; a sanity figure, not a test.
                row["new_tokens_same_as_sdpa"] = (new == stock).float().mean().item()
            yield row
        free_memory()
    del model
    free_memory()


def _generate_in_rounds(model, providers, workload: Workload, inputs, device, repeats: int,
                        label: str) -> dict[str, dict]:
    """Rows of `providers` (each on a copy of `model` when there are several): set-up and
    warm-up of each, then `repeats` rounds timing each once; the median per provider."""
    rows = {p: {"benchmark": "generate", "model": label, "provider": p, "batch": workload.batch,
                "prompt_len": workload.prompt, "new_tokens": workload.new_tokens, "rounds": repeats,
                "interleaved_with": len(providers)}
            for p in providers}
    runs, seconds, tokens = {}, {p: [] for p in providers}, {}
    with contextlib.ExitStack() as stack:
        for provider in providers:
            row = rows[provider]
            console.print(f"generate {workload.label} {provider}: warm-up ...")
            try:
                own = _running(stack, model, provider, copied=len(providers) > 1)
                run = _generate_call(own, provider, workload, inputs, device)
                if provider in PAGED:  # before any graph exists: prefill + first token
                    _, row["ttft_s"] = timed(lambda: run(max_new_tokens=1, min_new_tokens=1), device)
                variants = compiled_kernel_variants()
                _, row["warmup_s"] = timed(run, device)  # for patched-graphs: captures
                if variants is not None and provider.startswith("patched"):
                    row["kernel_variants_compiled_in_warmup"] = compiled_kernel_variants() - variants
                runs[provider] = run
            except Exception as exc:
                row["error"] = error_string(exc)
        before_rounds = compiled_kernel_variants()
        for round_index in range(repeats):
            console.print(f"generate {workload.label}: round {round_index + 1} of {repeats} ({', '.join(runs)})")
            for provider, run in list(runs.items()):
                try:
                    tokens[provider], elapsed = timed(run, device)
                    seconds[provider].append(elapsed)
                except Exception as exc:
                    rows[provider]["error"] = error_string(exc)
                    del runs[provider]
        for provider in runs:
            row = rows[provider]
            if before_rounds is not None and provider.startswith("patched"):
                # Counted over every provider's timed runs: 0 means no per-length recompilation.
                row["kernel_variants_compiled_in_timed_runs"] = compiled_kernel_variants() - before_rounds
            row["seconds"] = statistics.median(seconds[provider])
            row["seconds_all"] = seconds[provider]
            row["tokens_per_s"] = workload.batch * workload.new_tokens / row["seconds"]
            row["tokens_per_s_best"] = workload.batch * workload.new_tokens / min(seconds[provider])
            new = tokens[provider][:, workload.prompt:]
            if new.shape[1] != workload.new_tokens:
                row["error"] = f"decoded {new.shape[1]} tokens, not {workload.new_tokens}"
            else:
                row["_new_tokens"] = new  # compared with sdpa's by the caller, then dropped
    return rows


def _running(stack: contextlib.ExitStack, model, provider: str, copied: bool):
    """`model`, or a copy of it when providers run side by side, running `provider` until the
    stack closes."""
    own = copy.deepcopy(model) if copied else model
    stack.enter_context(provider_context(own, provider))
    return own


def _generate_call(model, provider: str, workload: Workload, inputs, device):
    """`generate` as `provider` runs it; a paged provider reuses one cache (and its graphs)."""
    settings = generate_settings(provider, workload, device)
    cache = paged_cache(model, workload) if provider in PAGED else None

    def run(**overrides):
        if cache is not None:
            cache.reset()
            overrides["past_key_values"] = cache
        with call_context(provider):
            return model.generate(**inputs, **{**settings, **overrides})

    return run


def call_context(provider: str):
    """Around each of `provider`'s calls: an experiment changes a module-level choice only while
    its own calls run, so the providers interleaved with it are untouched."""
    return unsplit_paged_decode() if provider == "patched-paged-unsplit" else contextlib.nullcontext()


@contextlib.contextmanager
def unsplit_paged_decode():
    """The paged decode kernel takes each step's context in one partition: no merge launch."""
    from hf_attn_patch.kernels import _paged_triton

    def one_partition(rows, context_bound, block_n, device):
        return max(block_n, _paged_triton.next_power_of_2(max(context_bound, 1)))

    chosen = _paged_triton._choose_partition_size
    _paged_triton._choose_partition_size = one_partition
    try:
        yield
    finally:
        _paged_triton._choose_partition_size = chosen


def paged_cache(model, workload: Workload):
    from hf_attn_patch.cache import PagedKVCache

    return PagedKVCache(model, max_batch_size=workload.batch,
                        max_tokens=workload.batch * (workload.prompt + workload.new_tokens + 16))


def generate_settings(provider: str, workload: Workload, device) -> dict:
    settings = dict(max_new_tokens=workload.new_tokens, min_new_tokens=workload.new_tokens, do_sample=False,
                    pad_token_id=0)
    if provider.endswith("-compiled"):
        from transformers.generation.configuration_utils import CompileConfig

        if device.type == "cuda":
            config = CompileConfig(fullgraph=True, mode="reduce-overhead")
        else:  # smoke run: no C++ toolchain needed
            config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
            config._compile_all_devices = True
        settings.update(cache_implementation="static", compile_config=config)
    else:
        settings.update(disable_compile=True)
    return settings


# --- decode step ---------------------------------------------------------------------------------


def bench_decode_step(sizes: Sizes, providers, device, dtype, rounds: int = 3) -> Iterator[dict]:
    """Batch 1 after the longest prompt: one bare forward per step, timed over `rounds` rounds
    that each run every provider (on its own copy of the model) once, then profiled."""
    model = build("llama", sizes.llama, device, dtype)
    prompt = max(w.prompt for w in sizes.workloads)
    inputs = random_prompts(1, prompt, model.config.vocab_size, device)
    rows, steps, models, caches = {}, {}, {}, {}
    with contextlib.ExitStack() as stack:
        for provider in providers:
            rows[provider] = row = {"benchmark": "decode-step", "model": sizes.llama_label, "provider": provider,
                                    "batch": 1, "prompt_len": prompt, "steps": sizes.decode_steps,
                                    "rounds": rounds}
            console.print(f"decode step after {prompt} tokens {provider}: warm-up ...")
            try:
                own = _running(stack, model, provider, copied=len(providers) > 1)
                cache = None
                if provider in PAGED:
                    cache = paged_cache(own, Workload(1, prompt, 2 * sizes.decode_steps + 8))
                with call_context(provider):
                    decode_steps(own, inputs, 2, device, cache)  # warm-up (and capture)
                models[provider], caches[provider], steps[provider] = own, cache, []
            except Exception as exc:
                row["error"] = error_string(exc)
        for _ in range(rounds):
            for provider in list(models):
                try:
                    with call_context(provider):
                        steps[provider] += decode_steps(models[provider], inputs, sizes.decode_steps, device,
                                                        caches[provider])
                except Exception as exc:
                    rows[provider]["error"] = error_string(exc)
                    del models[provider]
        for provider, own in models.items():
            row = rows[provider]
            try:
                row["ms_per_step"] = 1e3 * statistics.median(steps[provider])
                row["ms_per_step_min"] = 1e3 * min(steps[provider])
                if device.type == "cuda":
                    row["weight_read_ms"] = weight_read_ms(own, torch.cuda.get_device_name(device))
                if provider not in PAGED:
                    row.update(profile_decode(own, inputs, sizes.decode_steps, device))
            except Exception as exc:
                row["error"] = error_string(exc)
    yield from rows.values()
    del model, models
    free_memory()


def decode_steps(model, inputs, steps: int, device, cache=None) -> list[float]:
    """Prefill, then `steps` single-token forwards; seconds of each forward. With a paged cache,
    it is reset first and passed to the prefill (as generate does)."""
    if cache is not None:
        cache.reset()
        out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    else:
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
    seconds = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        next_ids = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def profile_decode(model, inputs, steps: int, device) -> dict:
    """GPU busy time and kernel launches per decode step, from torch.profiler."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
            next_ids = out.logits[:, -1:].argmax(-1)
        synchronize(device)
    # Where the host's time goes: the step is launch-bound, so the CPU ops say more than the kernels.
    host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return {
        **gpu_kernels_per_step(prof, steps, top=5),
        "top_host_ops_self_ms_per_step": {e.key[:80]: e.self_cpu_time_total / 1e3 / steps for e in host},
    }


def gpu_kernels_per_step(prof, steps: int, top: int) -> dict:
    """From a torch.profiler run of `steps` steps: GPU busy time, kernel count and the `top`
    kernels by time, per step."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + (getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0))
    ranked = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return {
        "gpu_busy_ms_per_step": sum(by_name.values()) / 1e3 / steps,
        "kernels_per_step": len(kernels) / steps,
        "top_kernels_ms_per_step": {name[:80]: us / 1e3 / steps for name, us in ranked},
    }


# --- prefill -------------------------------------------------------------------------------------


def bench_prefill(sizes: Sizes, providers, device, dtype, repeats: int) -> Iterator[dict]:
    model = build("mistral", sizes.mistral, device, dtype)
    inputs = random_prompts(1, sizes.prefill_tokens, model.config.vocab_size, device)
    for provider in providers:
        row = {"benchmark": "prefill", "model": sizes.mistral_label, "provider": provider, "batch": 1,
               "prompt_len": sizes.prefill_tokens, "window": model.config.sliding_window,
               "layers": model.config.num_hidden_layers}
        console.print(f"prefill {sizes.prefill_tokens} tokens {provider} ...")
        try:
            with provider_context(model, provider):
                def run():
                    return model(**inputs, use_cache=False, logits_to_keep=1)

                timed(run, device)
                seconds = [timed(run, device)[1] for _ in range(repeats)]
            row["ms"] = 1e3 * statistics.median(seconds)
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as exc:
            row["error"] = error_string(exc)
        finally:
            free_memory()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        yield row
    del model
    free_memory()


# --- shared --------------------------------------------------------------------------------------


def build(family: str, shape: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM)}[family]
    config = config_class(**shape, max_position_embeddings=32768, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config).to(dtype)
    return model.eval()


def random_prompts(batch: int, length: int, vocab: int, device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, vocab, (batch, length), generator=generator).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@contextlib.contextmanager
def provider_context(model, provider: str):
    """The model runs `provider` inside the block and is back on stock sdpa after it."""
    from hf_attn_patch import patch_model, unpatch_model

    base = provider.removesuffix("-compiled")
    try:
        if base == "patched-graphs":
            patch_model(model, cuda_graphs=True)
        elif base.startswith("patched"):
            patch_model(model)
        else:
            model.set_attn_implementation(base)
        yield
    finally:
        unpatch_model(model)
        model.set_attn_implementation("sdpa")
        torch._dynamo.reset()  # compiled graphs of one provider must not serve the next


def compiled_kernel_variants() -> int | None:
    """Compiled Triton kernels held by our kernel modules (None under the interpreter)."""
    from hf_attn_patch.kernels import _flash_triton, _paged_triton

    total, found = 0, False
    for module in (_flash_triton, _paged_triton):
        for obj in vars(module).values():
            caches = getattr(getattr(obj, "fn", obj), "device_caches", None)  # autotuners wrap a JITFunction
            if caches is not None:
                found = True
                total += sum(len(entry[0]) for entry in caches.values())
    return total if found else None


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# --- report --------------------------------------------------------------------------------------


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_tables(rows: list[dict]) -> None:
    generate = [r for r in rows if r["benchmark"] == "generate"]
    if generate:
        table = Table(title="generate (tokens/s = batch x new tokens / wall time of generate)")
        for column in ("workload", "provider", "s", "tok/s", "x sdpa", "first call s", "TTFT s", "same tokens",
                       "kernel variants", "error"):
            table.add_column(column, justify="left" if column in ("workload", "provider", "error") else "right")
        for r in generate:
            sdpa = _find(rows, "generate", "sdpa", r["batch"], r["prompt_len"])
            ratio = r.get("tokens_per_s") / sdpa["tokens_per_s"] if r.get("tokens_per_s") and sdpa and sdpa.get(
                "tokens_per_s") else None
            variants = r.get("kernel_variants_compiled_in_warmup")
            variants = "-" if variants is None else f"{variants} (+{r['kernel_variants_compiled_in_timed_runs']})"
            table.add_row(f"B={r['batch']} prompt={r['prompt_len']} +{r['new_tokens']}", r["provider"],
                          _cell(r.get("seconds"), ".2f"), _cell(r.get("tokens_per_s"), ".1f"), _cell(ratio, ".2f"),
                          _cell(r.get("warmup_s"), ".2f"), _cell(r.get("ttft_s"), ".3f"),
                          _cell(r.get("new_tokens_same_as_sdpa"), ".0%"), variants, r.get("error", ""))
        console.print(table)
    decode = [r for r in rows if r["benchmark"] == "decode-step"]
    if decode:
        table = Table(title="bare decode step, batch 1 (dynamic cache; paged cache for patched-paged/-graphs)")
        for column in ("after prompt", "provider", "ms/step", "min ms", "weight read ms", "GPU busy ms/step",
                       "kernels/step", "error"):
            table.add_column(column, justify="left" if column in ("provider", "error") else "right")
        for r in decode:
            table.add_row(str(r["prompt_len"]), r["provider"], _cell(r.get("ms_per_step"), ".2f"),
                          _cell(r.get("ms_per_step_min"), ".2f"), _cell(r.get("weight_read_ms"), ".2f"),
                          _cell(r.get("gpu_busy_ms_per_step"), ".2f"), _cell(r.get("kernels_per_step"), ".0f"),
                          r.get("error", ""))
        console.print(table)
    prefill = [r for r in rows if r["benchmark"] == "prefill"]
    if prefill:
        table = Table(title=f"prefill, {prefill[0]['model']} (window {prefill[0]['window']}), batch 1")
        for column in ("tokens", "provider", "ms", "x sdpa", "peak GiB", "error"):
            table.add_column(column, justify="left" if column in ("provider", "error") else "right")
        sdpa = next((r for r in prefill if r["provider"] == "sdpa" and r.get("ms")), None)
        for r in prefill:
            ratio = sdpa["ms"] / r["ms"] if sdpa and r.get("ms") else None
            table.add_row(str(r["prompt_len"]), r["provider"], _cell(r.get("ms"), ".1f"), _cell(ratio, ".2f"),
                          _cell(r.get("peak_memory_gib"), ".2f"), r.get("error", ""))
        console.print(table)


# Peak HBM bandwidth by device name (vendor figures), for the weight-read bound of a decode step.
PEAK_TB_S = {"H200": 4.8, "H100": 3.35, "A100": 2.0}


def print_targets(rows: list[dict]) -> None:
    """Issue 12's targets, each against the rows measured beside it in this run."""
    lines = []

    def check(label, value, need, higher_is_better=True, unit="tok/s"):
        met = value >= need if higher_is_better else value <= need
        mark = "[green]met[/green]" if met else "[red]not met[/red]"
        lines.append(f"{label}: {value:.2f} {unit} vs {need:.2f}: {mark}")

    for r in rows:
        if r["benchmark"] != "generate" or not r.get("tokens_per_s"):
            continue
        label = f"B={r['batch']} {r['provider']}"
        sdpa = _find(rows, "generate", "sdpa", r["batch"], r["prompt_len"])
        eager = _find(rows, "generate", "eager", r["batch"], r["prompt_len"])
        if r["provider"] == "patched":
            for other in (sdpa, eager):
                if other and other.get("tokens_per_s"):
                    check(f"{label} >= 1.0 x {other['provider']}", r["tokens_per_s"], other["tokens_per_s"])
            if r.get("x_sdpa_per_round"):
                best = r["tokens_per_s_best"] / sdpa["tokens_per_s_best"]
                lines.append(f"  x sdpa round by round: {' '.join(f'{x:.2f}' for x in r['x_sdpa_per_round'])}; "
                             f"best run against best run: {best:.2f}")
        if r["provider"] == "patched-graphs" and sdpa and sdpa.get("tokens_per_s"):
            factor = 5.0 if r["batch"] == 1 else 3.0
            check(f"{label} >= {factor:g} x sdpa", r["tokens_per_s"], factor * sdpa["tokens_per_s"])
            compiled = _find(rows, "generate", "sdpa-compiled", r["batch"], r["prompt_len"])
            if compiled and compiled.get("tokens_per_s"):
                check(f"{label} > sdpa-compiled", r["tokens_per_s"], compiled["tokens_per_s"])
    step = {r["provider"]: r for r in rows if r["benchmark"] == "decode-step" and r.get("ms_per_step")}
    if "patched" in step and "sdpa" in step:
        check("bare decode step patched <= sdpa", step["patched"]["ms_per_step"], step["sdpa"]["ms_per_step"],
              higher_is_better=False, unit="ms")
    graphs = step.get("patched-graphs")
    if graphs and graphs.get("weight_read_ms"):
        check("bare replayed decode step <= 3 x weight-read time", graphs["ms_per_step"],
              3 * graphs["weight_read_ms"], higher_is_better=False, unit="ms")
        lines.append(f"  weight-read time / replayed step = {graphs['weight_read_ms'] / graphs['ms_per_step']:.2f}")
    if lines:
        console.print("[bold]targets (issue 12)[/bold]")
        for line in lines:
            console.print("  " + line)


def weight_read_ms(model, device_name: str) -> float | None:
    """Bytes of the weights over the device's peak bandwidth: a decode step's floor at batch 1."""
    peak = next((tb for name, tb in PEAK_TB_S.items() if name in device_name), None)
    if peak is None:
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return weight_bytes / (peak * 1e12) * 1e3


def _find(rows, benchmark, provider, batch, prompt_len):
    return next((r for r in rows if r["benchmark"] == benchmark and r["provider"] == provider
                 and r["batch"] == batch and r["prompt_len"] == prompt_len), None)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generate = [r for r in rows if r["benchmark"] == "generate"]
    workloads = sorted({(r["batch"], r["prompt_len"], r["new_tokens"]) for r in generate})
    panels = []  # (title, y label, [(provider, value)])
    for batch, prompt, new in workloads:
        bars = [(r["provider"], r.get("tokens_per_s")) for r in generate if (r["batch"], r["prompt_len"]) == (batch, prompt)]
        panels.append((f"generate B={batch}, prompt {prompt}, +{new}", "tokens/s", bars))
    decode = [r for r in rows if r["benchmark"] == "decode-step"]
    if decode:
        panels.append((f"decode step after {decode[0]['prompt_len']} tokens, B=1", "ms",
                       [(r["provider"], r.get("ms_per_step")) for r in decode]))
    prefill = [r for r in rows if r["benchmark"] == "prefill"]
    if prefill:
        panels.append((f"prefill {prefill[0]['prompt_len']} tokens, window {prefill[0]['window']}", "ms",
                       [(r["provider"], r.get("ms")) for r in prefill]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (title, unit, bars) in zip(axes[0], panels):
        names = [name for name, _ in bars]
        ax.bar(names, [value or 0.0 for _, value in bars],
               color=["tab:orange" if name.startswith("patched") else "tab:blue" for name in names])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", rotation=30)
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"{device}: {rows[0]['model'] if rows else ''} (missing bars: see errors in the JSON)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
