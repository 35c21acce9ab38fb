"""Paged KV cache benchmark (issue 6): decode bandwidth, KV memory, continuous-batching throughput,
beam search.

Four sections, each row timed or measured on its own so one failure leaves the others:

* decode: `paged_attention` (bf16, 32 query / 8 KV heads, D = 128, 16-token blocks in shuffled
  order) for B in {1, 32, 64} x context {4k, 8k, 32k}, against torch SDPA on a contiguous cache
  (a query of length 1, enable_gqa=True) in the same run. Bandwidth = K + V bytes read / median
  time, eager (`do_bench`) and CUDA-graph replayed (`do_bench_cudagraph`). `ours` is the
  default launch; rows `ours-p<P>` sweep the flash-decoding partition size and rows
  `ours-n<BLOCK_N>w<warps>s<stages>` the launch config, to tune the defaults. Graph replays do
  not flush L2, so the small shapes (B = 1 at 4k / 8k: 17 / 34 MB of K+V) may read from L2
  there; the eager numbers include the Python launch overhead, which decides B = 1 times.
* memory: 16 left-padded prompts of 128 ... 4096 tokens + 256 new tokens on the Llama-1B shape
  (random bf16 weights, patched): the KV bytes the default DynamicCache holds against those
  PagedKVCache uses (peak blocks), and the process's peak allocation above the weights for each.
* throughput: `generate_batch` of 64 prompts x 512 tokens, 128 new tokens each, Llama-1B
  shape: the patched model (our kernels) against stock `paged|sdpa` (`sdpa` on transformers >=
  5.23), in tokens per second over the whole call, after a warm-up call each.
* beams: beam search, 4 prompts x 1024 tokens, 4 beams, 128 new tokens, Llama-1B shape: stock
  sdpa and the patched model with the default cache (which copies every layer's K/V of every
  beam at each reorder) against the patched model with a PagedKVCache (beams share blocks,
  copy-on-write), eager and with CUDA graphs. Wall time of `generate` (median of 3 after a
  warm-up), the K/V held at the end (default cache) or at peak (paged), the peak allocation
  above what was allocated before the call, and whether the tokens are stock's.

    python benchmarks/paged.py                              # everything, on a GPU
    python benchmarks/paged.py --sections decode --out DIR  # one section
    TRITON_INTERPRET=1 python benchmarks/paged.py --quick   # CPU smoke run, tiny shapes

Rows are appended to `<out>/paged-<date>-<device>.json`; a PNG with one panel per section is
written beside it, and the issue's targets are printed at the end.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from _common import (
    RESULTS_DIR,
    do_bench_median,
    environment,
    error_string,
    free_memory,
    measure_ceilings,
    relative_error,
    results_path,
    write_results,
)

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ("decode", "memory", "throughput", "beams")
MAX_REL_ERROR = 2e-2  # bf16 decode output vs SDPA
TARGET_TBPS_LARGE_BATCH = 2.7  # B >= 32
TARGET_TBPS_B1_32K = 2.4
TARGET_SPEEDUP = 3.0  # generate_batch, ours / stock
MEMORY_PROMPT_LENGTHS = (128, 4096, 256, 3072, 512, 2048, 768, 1536, 1024, 384, 3584, 640, 2560, 192, 896, 1280)

console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass
class Settings:
    device: torch.device
    quick: bool
    batches: list[int]
    contexts: list[int]
    partitions: list[int]
    launches: list[str]
    warmup_ms: float
    rep_ms: float


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from(args)
    env = environment()
    console.print(f"[bold]{env['device']}[/]  torch {env['torch']}  triton {env['triton']}  "
                  f"transformers {transformers_version()}")
    env["transformers"] = transformers_version()
    started = time.perf_counter()

    rows = [dict(row, section="ceiling", **env) for row in measure_ceilings(settings.device, settings.warmup_ms, settings.rep_ms)]
    path = write_results(rows, args.out, "paged")
    for section in args.sections:
        runner = {"decode": run_decode, "memory": run_memory, "throughput": run_throughput,
                  "beams": run_beams}[section]
        for row in runner(settings):
            row = dict(row, section=section, **env)
            write_results([row], args.out, "paged")  # as they come: a crash keeps what was measured
            rows.append(row)
            free_memory()

    print_tables(rows)
    print_targets(rows)
    console.print(f"rows appended to {path}  ({time.perf_counter() - started:.0f} s)")
    if not args.no_plot:
        draw_plot(rows, results_path(args.out, "paged").with_suffix(".png"))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a CPU smoke run under TRITON_INTERPRET=1")
    parser.add_argument("--batches", nargs="+", type=int, help="decode batch sizes (default 1 32 64)")
    parser.add_argument("--contexts", nargs="+", type=int, help="decode context lengths (default 4096 8192 32768)")
    parser.add_argument("--partitions", nargs="+", type=int, default=[256, 512, 1024, 2048],
                        help="partition sizes to sweep (ours-p<P> rows); give 0 to skip the sweep")
    parser.add_argument("--launches", nargs="+", default=["32x4x3", "64x4x3", "64x8x2", "128x8x2"],
                        help="decode launch configs to sweep, BLOCK_N x warps x stages (ours-n..w..s.. rows); "
                             "give 0 to skip")
    parser.add_argument("--warmup-ms", type=float, default=25)
    parser.add_argument("--rep-ms", type=float, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def settings_from(args) -> Settings:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        raise SystemExit("no CUDA GPU: run with --quick (and TRITON_INTERPRET=1) for a CPU smoke run")
    quick = args.quick
    return Settings(
        device=device,
        quick=quick,
        batches=args.batches or ([1, 2] if quick else [1, 32, 64]),
        contexts=args.contexts or ([64, 200] if quick else [4096, 8192, 32768]),
        partitions=[] if args.partitions == [0] else ([64] if quick else args.partitions),
        launches=[] if args.launches == ["0"] else (["32x4x1"] if quick else args.launches),
        warmup_ms=1 if quick else args.warmup_ms,
        rep_ms=5 if quick else args.rep_ms,
    )


def transformers_version() -> str:
    import transformers

    return transformers.__version__


# --- decode -------------------------------------------------------------------------------------


def run_decode(settings: Settings):
    heads, kv_heads, head_dim = (4, 2, 32) if settings.quick else (32, 8, 128)
    for batch in settings.batches:
        for context in settings.contexts:
            yield from guarded(dict(batch=batch, context=context, heads=f"{heads}/{kv_heads}", head_dim=head_dim),
                               lambda: decode_rows(settings, batch, context, heads, kv_heads, head_dim))


def decode_rows(settings, batch, context, heads, kv_heads, head_dim, block_size=16):
    from hf_attn_patch.kernels import _paged_triton, paged_attention

    device, dtype = settings.device, torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(batch * 100003 + context)
    k = torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype, generator=generator)
    v = torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype, generator=generator)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype, generator=generator)
    # The same K/V in shuffled 16-token pages: the kernel sees a real, non-contiguous table.
    blocks = math.ceil(context / block_size)
    table = torch.randperm(batch * blocks, device=device, generator=generator).view(batch, blocks).to(torch.int32)
    k_pages, v_pages = (to_pages(t, table, block_size) for t in (k, v))
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    nbytes = 2 * k.numel() * k.element_size()

    expected = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    got = paged_attention(q, k_pages, v_pages, table, seq_lens)
    error = relative_error(got, expected)
    default_launch = _paged_triton.default_launch(head_dim)
    default_partition = _paged_triton._choose_partition_size(batch * kv_heads, blocks * block_size,
                                                             default_launch.block_n, device)

    providers = {
        "ours": lambda: paged_attention(q, k_pages, v_pages, table, seq_lens),
        "sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True),
    }
    for size in settings.partitions:
        if size < context:
            providers[f"ours-p{size}"] = lambda size=size: _paged_triton.decode(
                q, k_pages, v_pages, table, seq_lens, None, -1, head_dim ** -0.5, partition_size=size)
    for spec in settings.launches:
        block_n, warps, stages = (int(x) for x in spec.split("x"))
        launch = _paged_triton.LaunchConfig(block_n, warps, stages)
        providers[f"ours-n{block_n}w{warps}s{stages}"] = lambda launch=launch: _paged_triton.decode(
            q, k_pages, v_pages, table, seq_lens, None, -1, head_dim ** -0.5, launch=launch)
    for provider, fn in providers.items():
        row = dict(provider=provider, batch=batch, context=context, heads=f"{heads}/{kv_heads}",
                   head_dim=head_dim, block_size=block_size, bytes=nbytes, error=None)
        try:
            if provider == "ours":
                row.update(partition=default_partition,
                           launch=f"{default_launch.block_n}x{default_launch.num_warps}x{default_launch.num_stages}")
            if provider.startswith("ours"):  # every variant must be right before it is timed
                row["rel_error"] = error if provider == "ours" else relative_error(fn(), expected)
                if row["rel_error"] > MAX_REL_ERROR:
                    row["error"] = f"wrong output: relative error {row['rel_error']:.2e} vs SDPA"
            row["ms"] = do_bench_median(fn, settings.warmup_ms, settings.rep_ms)
            row["tbps"] = nbytes / (row["ms"] * 1e-3) / 1e12
            row["ms_graph"] = graph_median(fn, settings)
            row["tbps_graph"] = nbytes / (row["ms_graph"] * 1e-3) / 1e12 if row["ms_graph"] else None
        except Exception as exc:
            row["error"] = error_string(exc)
        yield row


def to_pages(t: torch.Tensor, table: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (num_blocks, block_size, Hkv, D) laid out through the block table."""
    batch, kv_heads, n, head_dim = t.shape
    blocks = table.shape[1]
    padded = F.pad(t, (0, 0, 0, blocks * block_size - n))
    rows = padded.view(batch, kv_heads, blocks, block_size, head_dim).permute(0, 2, 3, 1, 4)
    pages = torch.empty(table.numel(), block_size, kv_heads, head_dim, dtype=t.dtype, device=t.device)
    pages[table.flatten().long()] = rows.reshape(batch * blocks, block_size, kv_heads, head_dim)
    return pages


def graph_median(fn, settings) -> float | None:
    """Median ms of `fn` replayed from a CUDA graph (no launch overhead), or None off CUDA."""
    if settings.device.type != "cuda":
        return None
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=settings.rep_ms, return_mode="median"))


# --- memory -------------------------------------------------------------------------------------


def llama_1b(settings: Settings):
    """Random bf16 Llama with the Llama-1B shape (tiny under --quick), on the device, eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if settings.quick:
        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    else:
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
    config.pad_token_id, config.eos_token_id = 0, 1
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with settings.device:
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None  # every sequence runs its full length
    return model.eval()


def run_memory(settings: Settings):
    yield from guarded(dict(provider="memory"), lambda: memory_rows(settings))


def memory_rows(settings: Settings):
    from hf_attn_patch import patch_model
    from hf_attn_patch.cache import PagedKVCache

    lengths = [3, 17, 9, 12] if settings.quick else list(MEMORY_PROMPT_LENGTHS)
    new_tokens = 4 if settings.quick else 256
    block_size = 16
    model = patch_model(llama_1b(settings))
    width = max(lengths)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (len(lengths), width), generator=generator)
    mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()
    ids, mask = (ids * mask).to(settings.device), mask.to(settings.device)
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    common = dict(prompts=len(lengths), new_tokens=new_tokens, tokens=sum(lengths) + len(lengths) * new_tokens,
                  ideal_bytes=per_token * sum(n + new_tokens - 1 for n in lengths), error=None)

    def generate(**kwargs):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, return_dict_in_generate=True, **kwargs)

    with peak_memory(settings.device) as peak:
        out = generate()
    dynamic = out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in dynamic.layers for t in (layer.keys, layer.values)
               if t is not None)
    reference = out.sequences.cpu()
    del out, dynamic
    free_memory()
    yield dict(common, provider="dynamic-cache", kv_bytes=held, pool_bytes=held, peak_alloc_bytes=peak.value)

    blocks = sum(math.ceil((n + new_tokens) / block_size) for n in lengths) + len(lengths)
    with peak_memory(settings.device) as peak:
        cache = PagedKVCache(model, max_batch_size=len(lengths), num_blocks=blocks, block_size=block_size)
        out = generate(past_key_values=cache)
    stats = cache.stats()
    same = torch.equal(out.sequences.cpu(), reference)
    yield dict(common, provider="paged-cache", kv_bytes=stats["bytes_peak"], pool_bytes=stats["bytes_total"],
               peak_alloc_bytes=peak.value, blocks_peak=stats["blocks_peak"], block_size=block_size,
               same_tokens=same)


class peak_memory:
    """Peak bytes allocated on the device above what was allocated at entry (None off CUDA)."""

    def __init__(self, device):
        self.device, self.value = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated() - self.base
        return False


# --- throughput ---------------------------------------------------------------------------------


def run_throughput(settings: Settings):
    yield from guarded(dict(provider="throughput"), lambda: throughput_rows(settings))


def throughput_rows(settings: Settings):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from hf_attn_patch import patch_model
    from hf_attn_patch.cache import batching, continuous_batching

    prompts_n, prompt_len, new_tokens = (4, 8, 3) if settings.quick else (64, 512, 128)
    generator = torch.Generator().manual_seed(0)
    model = llama_1b(settings)
    prompts = [torch.randint(2, model.config.vocab_size, (prompt_len,), generator=generator).tolist()
               for _ in range(prompts_n)]
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)

    def batch_config(cuda_graphs=None):
        if settings.quick:
            return ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=32, use_cuda_graph=False)
        return ContinuousBatchingConfig(use_cuda_graph=cuda_graphs)

    def timed(run_model, cuda_graphs=None):
        run_model.generate_batch(prompts[:2], generation_config=generation,
                                 continuous_batching_config=batch_config(cuda_graphs))  # warm-up
        sync(settings.device)
        start = time.perf_counter()
        results = run_model.generate_batch(prompts, generation_config=generation,
                                           continuous_batching_config=batch_config(cuda_graphs))
        sync(settings.device)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.generated_tokens) for r in results.values())
        return results, dict(seconds=seconds, generated_tokens=tokens, tok_per_s=tokens / seconds)

    common = dict(prompts=prompts_n, prompt_len=prompt_len, new_tokens=new_tokens, error=None)
    model.set_attn_implementation("sdpa")
    stock_name = "paged|sdpa" if batching._prefixes_paged() else "sdpa"  # what CB runs sdpa as
    stock_results = None
    try:
        stock_results, measured = timed(model)
        yield dict(common, provider=f"stock {stock_name}", **measured)
    except Exception as exc:
        yield dict(common, provider=f"stock {stock_name}", error=error_string(exc))
    free_memory()

    patch_model(model)
    for cuda_graphs, label in ((None, "ours"), (False, "ours-no-graphs")):
        try:
            with continuous_batching(model):
                results, measured = timed(model, cuda_graphs)
            row = dict(common, provider=label, **measured)
            if stock_results is not None:
                same = sum(results[r].generated_tokens == stock_results[r].generated_tokens for r in results)
                row["same_requests"] = f"{same}/{len(results)}"
            yield row
            break  # the default configuration worked: no need for the fallback
        except Exception as exc:
            yield dict(common, provider=label, error=error_string(exc))
        free_memory()


# --- beam search ---------------------------------------------------------------------------------


def run_beams(settings: Settings):
    yield from guarded(dict(provider="beams"), lambda: beam_rows(settings))


BEAM_PROVIDERS = ("stock sdpa, default cache", "patched, default cache", "patched, paged cache",
                  "patched + graphs, paged cache")


def beam_rows(settings: Settings):
    from hf_attn_patch import patch_model, unpatch_model
    from hf_attn_patch.cache import PagedKVCache

    prompts, prompt_len, beams, new_tokens = (2, 12, 3, 4) if settings.quick else (4, 1024, 4, 128)
    repeats = 1 if settings.quick else 3
    block_size = 16
    model = llama_1b(settings)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (prompts, prompt_len), generator=generator).to(settings.device)
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    common = dict(prompts=prompts, prompt_len=prompt_len, beams=beams, new_tokens=new_tokens, error=None,
                  rounds=repeats, unshared_kv_bytes=per_token * prompts * beams * (prompt_len + new_tokens - 1))
    # Room for every beam's own copy of everything: the pool never limits the run.
    blocks = prompts * beams * math.ceil((prompt_len + new_tokens) / block_size)
    stock = None
    for provider in BEAM_PROVIDERS:
        row = dict(common, provider=provider)
        try:
            if provider.startswith("patched"):
                patch_model(model, cuda_graphs="graphs" in provider)
            cache = (PagedKVCache(model, max_batch_size=prompts * beams, num_blocks=blocks, block_size=block_size)
                     if "paged" in provider else None)

            def run():
                if cache is not None:
                    cache.reset()
                return model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      num_beams=beams, do_sample=False, pad_token_id=0, disable_compile=True,
                                      return_dict_in_generate=True,
                                      **({} if cache is None else {"past_key_values": cache}))

            run()  # warm-up: Triton compiles, graphs are captured
            seconds = []
            for _ in range(repeats):
                with peak_memory(settings.device) as peak:  # synchronises on entry
                    start = time.perf_counter()
                    out = run()
                    sync(settings.device)
                    seconds.append(time.perf_counter() - start)
                if cache is None:  # what the default cache holds at the end
                    row["kv_bytes"] = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers
                                          for t in (layer.keys, layer.values) if t is not None)
                else:
                    row["kv_bytes"] = cache.stats()["bytes_peak"]
                    row["blocks_peak"] = cache.stats()["blocks_peak"]
            row["seconds"] = sorted(seconds)[len(seconds) // 2]
            row["tok_per_s"] = prompts * new_tokens / row["seconds"]
            row["peak_alloc_bytes"] = peak.value
            sequences = out.sequences.cpu()
            if stock is None:
                stock = sequences
            else:  # bf16 on random weights: a near-tie may flip a beam; a sanity figure
                row["same_tokens_as_stock"] = (sequences == stock).float().mean().item()
            del out
        except Exception as exc:
            row["error"] = error_string(exc)
        finally:
            if provider.startswith("patched"):
                unpatch_model(model)
        yield row
        free_memory()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- reporting ----------------------------------------------------------------------------------


def guarded(context: dict, make_rows):
    """Yield the rows of `make_rows()`; a failure becomes one error row instead of ending the run."""
    try:
        yield from make_rows()
    except Exception as exc:
        console.print(f"[red]{context}: {error_string(exc)}[/]")
        yield dict(context, error=error_string(exc))


def print_tables(rows: list[dict]) -> None:
    ceiling = next((r for r in rows if r.get("provider") == "copy-d2d"), None)
    if ceiling:
        console.print(f"device copy ceiling: {ceiling['tbps']:.2f} TB/s (read + write)")
    decode = [r for r in rows if r.get("section") == "decode"]
    if decode:
        table = Table(title="decode: K+V bytes read / time (TB/s), eager | CUDA graph")
        for column in ("B", "context", "provider", "ms", "TB/s", "ms graph", "TB/s graph", "note"):
            table.add_column(column, justify="left" if column in ("provider", "note") else "right")
        for r in decode:
            note = r.get("error") or (f"P={r['partition']}, {r['launch']}, " if "partition" in r else "") + (
                f"err {r['rel_error']:.1e}" if "rel_error" in r else "")
            table.add_row(str(r.get("batch")), str(r.get("context")), str(r.get("provider", "")),
                          fmt(r.get("ms"), "{:.3f}"), fmt(r.get("tbps"), "{:.2f}"),
                          fmt(r.get("ms_graph"), "{:.3f}"), fmt(r.get("tbps_graph"), "{:.2f}"), note)
        console.print(table)
    memory = [r for r in rows if r.get("section") == "memory"]
    if memory:
        table = Table(title="memory: 16 prompts of 128..4096 + 256 new tokens (GiB)")
        for column in ("cache", "KV held (peak)", "pool", "ideal KV", "peak alloc", "note"):
            table.add_column(column)
        for r in memory:
            note = r.get("error") or ("" if r.get("same_tokens", True) else "tokens differ from the default cache")
            table.add_row(str(r.get("provider")), gib(r.get("kv_bytes")), gib(r.get("pool_bytes")),
                          gib(r.get("ideal_bytes")), gib(r.get("peak_alloc_bytes")), note)
        console.print(table)
    beams = [r for r in rows if r.get("section") == "beams"]
    if beams:
        first = beams[0]
        table = Table(title=f"beam search: {first.get('prompts')} prompts x {first.get('prompt_len')} tokens, "
                            f"{first.get('beams')} beams, +{first.get('new_tokens')} (K/V GiB; unshared: "
                            f"{gib(first.get('unshared_kv_bytes'))})")
        for column in ("provider", "seconds", "tok/s", "x stock", "K/V held", "peak alloc", "same tokens", "note"):
            table.add_column(column)
        stock = next((r for r in beams if r.get("provider", "").startswith("stock") and r.get("tok_per_s")), None)
        for r in beams:
            ratio = r["tok_per_s"] / stock["tok_per_s"] if stock and r.get("tok_per_s") else None
            same = r.get("same_tokens_as_stock")
            table.add_row(str(r.get("provider")), fmt(r.get("seconds"), "{:.2f}"), fmt(r.get("tok_per_s"), "{:.1f}"),
                          fmt(ratio, "{:.2f}"), gib(r.get("kv_bytes")), gib(r.get("peak_alloc_bytes")),
                          "-" if same is None else f"{same:.0%}", r.get("error") or "")
        console.print(table)
    throughput = [r for r in rows if r.get("section") == "throughput"]
    if throughput:
        table = Table(title="generate_batch: 64 prompts x 512 tokens, 128 new tokens")
        for column in ("provider", "seconds", "tok/s", "same requests as stock", "note"):
            table.add_column(column)
        for r in throughput:
            table.add_row(str(r.get("provider")), fmt(r.get("seconds"), "{:.2f}"), fmt(r.get("tok_per_s"), "{:.0f}"),
                          str(r.get("same_requests", "")), r.get("error") or "")
        console.print(table)


def print_targets(rows: list[dict]) -> None:
    """The issue's targets against this run (graph-replayed bandwidth where measured)."""
    lines = []
    for r in rows:
        if r.get("section") == "decode" and r.get("provider") == "ours" and not r.get("error"):
            tbps = r.get("tbps_graph") or r.get("tbps")
            goal = None
            if r["batch"] >= 32:
                goal = TARGET_TBPS_LARGE_BATCH
            elif r["batch"] == 1 and r["context"] == 32768:
                goal = TARGET_TBPS_B1_32K
            if goal is not None:
                value = f"{tbps:.2f} TB/s (eager {r['tbps']:.2f})" if r.get("tbps_graph") else f"{tbps:.2f} TB/s"
                lines.append((f"decode B={r['batch']} ctx={r['context']}", value, f">= {goal}", tbps >= goal))
    stock = next((r for r in rows if str(r.get("provider", "")).startswith("stock") and r.get("tok_per_s")), None)
    ours = next((r for r in rows if str(r.get("provider", "")).startswith("ours") and r.get("section") == "throughput"
                 and r.get("tok_per_s")), None)
    if stock and ours:
        speedup = ours["tok_per_s"] / stock["tok_per_s"]
        lines.append(("generate_batch ours / stock", f"{speedup:.2f}x", f">= {TARGET_SPEEDUP}x", speedup >= TARGET_SPEEDUP))
    if lines:
        table = Table(title="issue 6 targets (decode: CUDA-graph replayed, i.e. without launch overhead)")
        for column in ("measure", "value", "target", "met"):
            table.add_column(column)
        for name, value, goal, met in lines:
            table.add_row(name, value, goal, "yes" if met else "[red]no[/]")
        console.print(table)


def draw_plot(rows: list[dict], png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
        decode = [r for r in rows if r.get("section") == "decode" and r.get("provider") in ("ours", "sdpa")]
        shapes = sorted({(r["batch"], r["context"]) for r in decode})
        for i, provider in enumerate(("ours", "sdpa")):
            values = [next((r.get("tbps_graph") or r.get("tbps") or 0 for r in decode
                            if r["provider"] == provider and (r["batch"], r["context"]) == s), 0) for s in shapes]
            axes[0].bar([x + 0.4 * i for x in range(len(shapes))], values, width=0.4, label=provider)
        ceiling = next((r for r in rows if r.get("provider") == "copy-d2d"), None)
        if ceiling:
            axes[0].axhline(ceiling["tbps"], color="gray", linestyle="--", label="copy ceiling")
        axes[0].set_xticks([x + 0.2 for x in range(len(shapes))], [f"B{b}\n{c // 1024}k" if c % 1024 == 0 else f"B{b}\n{c}" for b, c in shapes])
        axes[0].set_ylabel("TB/s (K+V read)")
        axes[0].set_title("decode bandwidth")
        axes[0].legend()

        memory = [r for r in rows if r.get("section") == "memory" and r.get("kv_bytes")]
        names = [r["provider"] for r in memory]
        axes[1].bar([x - 0.2 for x in range(len(names))], [r["kv_bytes"] / 2**30 for r in memory], width=0.4,
                    label="K/V held at peak")
        axes[1].bar([x + 0.2 for x in range(len(names))], [r["pool_bytes"] / 2**30 for r in memory], width=0.4,
                    label="allocated (pool)")
        axes[1].set_xticks(range(len(names)), names)
        axes[1].set_ylabel("GiB")
        axes[1].legend()
        axes[1].set_title("KV held at peak, 16 mixed prompts")

        throughput = [r for r in rows if r.get("section") == "throughput" and r.get("tok_per_s")]
        axes[2].bar([r["provider"] for r in throughput], [r["tok_per_s"] for r in throughput])
        axes[2].set_ylabel("tokens / s")
        axes[2].set_title("generate_batch, Llama-1B shape")

        beams = [r for r in rows if r.get("section") == "beams" and r.get("tok_per_s")]
        names = [r["provider"].replace(", ", "\n") for r in beams]
        axes[3].bar([x - 0.2 for x in range(len(beams))], [r["tok_per_s"] for r in beams], width=0.4,
                    label="tokens / s", color="tab:blue")
        axes[3].set_ylabel("tokens / s")
        memory_axis = axes[3].twinx()
        memory_axis.bar([x + 0.2 for x in range(len(beams))], [r["kv_bytes"] / 2**30 for r in beams], width=0.4,
                        label="K/V held (GiB)", color="tab:orange")
        memory_axis.set_ylabel("K/V held, GiB")
        axes[3].set_xticks(range(len(beams)), names, fontsize=7)
        axes[3].set_title("beam search, Llama-1B shape")
        axes[3].legend(loc="upper left")
        memory_axis.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        console.print(f"plot: {png}")
    except Exception as exc:  # a missing matplotlib must not lose a finished run
        console.print(f"[yellow]no plot: {error_string(exc)}[/]")


def fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.3f}"


if __name__ == "__main__":
    main()
