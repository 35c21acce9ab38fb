"""Quality over a long stream: full attention, a sliding window, and a window with attention sinks.

The model is `quality_llama.py`'s byte-level Llama (hidden 512, 8 layers, 8 heads of 64, trained
on 1024-byte sequences of Python's standard library), pre-trained here (`--pretrain-tokens`,
the same recipe and data) or loaded (`--checkpoint DIR`). The evaluation text is one long
stream: the held-out files (every 20th, quality_llama's rule) concatenated, each followed by a
NUL byte, cut to `--stream-bytes` (default 65,536: 64 training lengths).

Each attention pattern reads the whole stream in one teacher-forced forward pass, with absolute
positions 0..N-1 (RoPE applied once, as a cache stores keys):

- full: causal attention over everything before (a cache that keeps the whole stream);
- window W: the W most recent positions only (a cache that drops what leaves the window);
- window W + S sinks: the first S positions of the stream stay visible too (StreamingLLM).

That is exactly what streaming generation with such a cache predicts for each next byte, so
bits per byte here is what streaming would score, without generating 64k bytes one at a time.
The pattern is applied by an attention function registered with transformers'
`AttentionInterface` (no model code copied): on CUDA `hf_attn_patch.kernels.flash_attention
(causal=True, window=W, sinks=S)`, on a CPU (or `--attention reference`) the plain-PyTorch
`attention_reference`, chunked over queries. The JSON names the one that ran.

Reported per pattern: bits per byte over the stream, within and past the training length, per
`--bucket-bytes` segment of the stream (quality against position), and the peak K/V memory a
streaming generation of the stream needs: the whole stream's K/V for full attention, the blocks
of a `PagedKVCache(window=W, sinks=S)` for the others (S + W tokens in blocks, plus one block),
in bf16, with bytes per token from `hf_attn_patch.kv_size`. A path check compares our attention
with stock transformers sdpa (full causal, and a dense mask of the window + sinks pattern) on a
short prefix.

    python benchmarks/streaming_quality.py                      # GPU: pre-train 40M tokens, then evaluate
    python benchmarks/streaming_quality.py --checkpoint DIR     # evaluate a pre-trained model
    python benchmarks/streaming_quality.py --quick              # CPU smoke run, 20-60 s: not results
    python benchmarks/streaming_quality.py --markdown JSON      # the docs/streaming.md table of a run

Rows are appended to `<out>/streaming-quality-<date>-<device>.json` as they are measured (a
pattern that fails becomes an error row and the others go on); a PNG is written beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the hub

import torch

from hf_attn_patch.cache import streaming_blocks

from _common import (RESULTS_DIR, environment, error_string, free_memory, latest_run, read_results, results_path,
                     write_results)
from _quality import (header_row, load_model, markdown_table, print_table, run_info, stdlib_files, train,
                      train_summary)
from quality_llama import CPU, FULL, HELD_OUT_EVERY, QUICK, fresh_llama, stdlib_bytes

NAME = "streaming-quality"
# The name our evaluation attention is registered under. It has no mask entry, so transformers
# builds no mask for it (masking_utils: "custom attention without equivalent mask creation").
ATTN_NAME = "hf_attn_patch_streaming_eval"
REFERENCE_CHUNK = 256  # query rows per attention_reference call: bounds its (rows x keys) scores
KV_DTYPE = ("bf16", 2)  # what a GPU generation would store K/V in

# Stream, windows and sinks per size; the model and its pre-training are quality_llama's.
STREAM = {
    "full": dict(stream_bytes=65_536, windows=[128, 256, 512, 1024], sinks=4, sweep_window=256,
                 sweep_sinks=[1, 16], pretrain_tokens=40_000_000),
    # quality_llama's CPU stand-in (4 layers, 256-byte training length; its pre-training took 140 s
    # on 2 free cores in quality_llama's run).
    "cpu": dict(stream_bytes=8_192, windows=[32, 64, 128, 256], sinks=4, sweep_window=64, sweep_sinks=[1, 16],
                pretrain_tokens=CPU["pretrain_tokens"]),
    "quick": dict(stream_bytes=2_048, windows=[16, 32], sinks=4, sweep_window=16, sweep_sinks=[1, 16],
                  pretrain_tokens=QUICK["pretrain_tokens"]),
}
MODEL = {"full": FULL, "cpu": CPU, "quick": QUICK}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.markdown:
        print(markdown(read_results(args.markdown)))
        return
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.attention if args.attention != "auto" else ("kernel" if device.type == "cuda" else "reference")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stream, described = held_out_stream(args.stream_bytes)
    patterns = attention_patterns(args)

    common, rows = environment(), []

    def record(row: dict) -> None:
        rows.append({**row, **common})
        write_results([rows[-1]], args.out, NAME)

    settings = {
        "quick": args.quick, "size": args.size, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "stream": described, "bucket_bytes": args.bucket_bytes, "sinks": args.sinks,
        "patterns": patterns,
        "attention": backend_description(backend), "eval_dtype": str(dtype).removeprefix("torch."),
        "kernel_has_sinks": kernel_has_sinks(), "kv_dtype": KV_DTYPE[0],
    }
    record({"kind": "run", "benchmark": NAME, **run_info("streaming_quality", argv), "settings": settings})
    print(f"stream: {described['bytes']:,} held-out bytes from {described['files']} files; "
          f"{len(patterns)} attention patterns on {backend_description(backend)}")
    failed = None
    try:
        with tempfile.TemporaryDirectory(prefix="streaming-quality-") as scratch:
            folder = args.checkpoint or pretrain(args, device, Path(scratch), record)
            measure(args, folder, stream, patterns, backend, device, dtype, record)
    except KeyboardInterrupt:
        print("interrupted: the rows measured so far are in the JSON")
    except Exception as error:  # pre-training or loading failed: keep what was measured, say why, exit 1
        traceback.print_exc()
        failed = error_string(error, 400)
    record({"kind": "end", "benchmark": NAME, "error": failed, "seconds": round(time.perf_counter() - started, 1)})
    print_results(rows)
    path = results_path(args.out, NAME)
    print(f"\nwrote {path}")
    if not args.no_plot:
        try:
            png = plot(rows, path.with_suffix(".png"))
        except Exception as error:  # a plot must never cost the numbers, which are in the JSON
            print(f"plot failed: {error_string(error)}")
        else:
            if png:
                print(f"wrote {png}")
    print("\n" + markdown(rows))
    if failed:
        raise SystemExit(f"failed: {failed}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny model, a 2 KiB stream")
    parser.add_argument("--size", choices=sorted(STREAM),
                        help="model, stream and windows preset (default full; --quick: quick)")
    parser.add_argument("--checkpoint", type=Path, help="a pre-trained Llama folder to evaluate (no pre-training)")
    parser.add_argument("--keep-checkpoint", type=Path, metavar="DIR",
                        help="copy the model pre-trained here to DIR (for later --checkpoint runs)")
    parser.add_argument("--pretrain-tokens", type=int, help="default 40M (--quick: 20k)")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--no-patch", action="store_true", help="pre-train on stock attention on CUDA too")
    parser.add_argument("--stream-bytes", type=int, help="evaluation stream length (default 65536; --quick 2048)")
    parser.add_argument("--windows", nargs="+", type=int, help="window sizes W (default 128 256 512 1024)")
    parser.add_argument("--sinks", type=int, help="S for every window (default 4)")
    parser.add_argument("--sweep-window", type=int, help="the window that also gets --sweep-sinks (default 256)")
    parser.add_argument("--sweep-sinks", nargs="*", type=int, help="more sink counts at --sweep-window (default 1 16)")
    parser.add_argument("--bucket-bytes", type=int,
                        help="segment length for quality against position (default: the training length)")
    parser.add_argument("--attention", choices=["auto", "kernel", "reference"], default="auto",
                        help="kernel: flash_attention (default on CUDA); reference: attention_reference (CPU default)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and PNG")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the markdown table of the newest run in JSON and exit")
    args = parser.parse_args(argv)
    args.size = args.size or ("quick" if args.quick else "full")
    defaults = STREAM[args.size]
    for name in ("pretrain_tokens", "stream_bytes", "windows", "sinks", "sweep_window", "sweep_sinks"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.markdown:
        return args
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint} has no config.json; pass a folder saved by save_pretrained")
    if args.stream_bytes < 2:
        parser.error(f"--stream-bytes must be at least 2, got {args.stream_bytes}")
    bad = [w for w in args.windows + [args.sweep_window] if not 1 <= w < args.stream_bytes]
    if bad:
        parser.error(f"windows must lie in [1, --stream-bytes = {args.stream_bytes}), got {bad}")
    if args.sinks < 0 or any(s < 0 for s in args.sweep_sinks) or (args.bucket_bytes or 1) < 1:
        parser.error("--sinks, --sweep-sinks must be >= 0 and --bucket-bytes >= 1")
    return args


def attention_patterns(args) -> list[dict]:
    """full, then each window alone, then each window with S sinks, then the sweep of S."""
    patterns = [{"pattern": "full", "window": None, "sinks": 0}]
    patterns += [{"pattern": "window", "window": w, "sinks": 0} for w in args.windows]
    if args.sinks:
        patterns += [{"pattern": "window+sinks", "window": w, "sinks": args.sinks} for w in args.windows]
    seen = {(p["window"], p["sinks"]) for p in patterns}
    for s in args.sweep_sinks:
        if (args.sweep_window, s) not in seen:
            patterns.append({"pattern": "window+sinks" if s else "window", "window": args.sweep_window, "sinks": s})
            seen.add((args.sweep_window, s))
    return patterns


# --- data and model -----------------------------------------------------------------------------


def held_out_stream(n_bytes: int) -> tuple[torch.Tensor, dict]:
    """The first n_bytes of the held-out files (quality_llama's split), concatenated, NUL after each."""
    root, files = stdlib_files()
    held = [path for index, path in enumerate(files) if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    stream, used = bytearray(), []
    for path in held:
        if len(stream) >= n_bytes:
            break
        stream += path.read_bytes() + b"\0"
        used.append(path)
    if len(stream) < n_bytes:
        raise SystemExit(f"the held-out files hold {len(stream):,} bytes; --stream-bytes {n_bytes:,} is too long")
    ids = torch.frombuffer(bytearray(stream[:n_bytes]), dtype=torch.uint8).long()
    return ids, {"bytes": n_bytes, "files": len(used), "first_file": str(used[0].relative_to(root)),
                 "last_file": str(used[-1].relative_to(root)), "python": sys.version.split()[0],
                 "held_out_rule": f"sorted index % {HELD_OUT_EVERY} == {HELD_OUT_EVERY - 1}"}


def pretrain(args, device: torch.device, scratch: Path, record) -> Path:
    """quality_llama's pre-training (model, data, schedule); returns the saved model's folder."""
    size = MODEL[args.size]
    # (the held-out windows it also cuts are not used here: one window is asked for)
    train_data, _, described = stdlib_bytes(size["seq_len"], size["max_train_bytes"], size["seq_len"])
    tokens_per_step = size["batch_size"] * size["seq_len"]
    steps = max(1, round(args.pretrain_tokens / tokens_per_step))
    # On a CPU the interpreter would take ~30 s a step: train on stock attention there.
    patched = device.type == "cuda" and not args.no_patch
    print(f"pre-training {steps} steps x {tokens_per_step:,} tokens on {described['train_files']} stdlib files "
          f"({'our kernels' if patched else 'stock attention'})")
    result = train(model=fresh_llama(size), output_dir=str(scratch / "pretrain"), max_steps=steps,
                   lr=args.pretrain_lr, warmup_steps=max(1, steps // 20), weight_decay=0.1,
                   log_every=max(1, steps // 10), data=train_data, seq_len=size["seq_len"],
                   batch_size=size["batch_size"], grad_accum=1, mixed_precision="auto",
                   gradient_checkpointing=False, patch=patched, save_every=0, seed=0)
    summary = train_summary(result)
    summary["tokens_per_second"] = round(result.tokens_seen / max(result.seconds, 1e-9))
    record({"kind": "pretrain", "benchmark": NAME, **summary, "train_patched": patched,
            "model": {k: size[k] for k in ("hidden", "layers", "heads", "intermediate", "seq_len")},
            "data": {k: described[k] for k in ("train_files", "train_bytes", "train_sequences")}})
    folder = Path(result.final_dir)
    if args.keep_checkpoint:
        shutil.copytree(folder, args.keep_checkpoint, dirs_exist_ok=True)
        print(f"pre-trained model copied to {args.keep_checkpoint}")
    return folder


# --- the attention patterns ---------------------------------------------------------------------


def kernel_has_sinks() -> bool:
    from hf_attn_patch.kernels import flash_attention

    return "sinks" in inspect.signature(flash_attention).parameters


def backend_description(backend: str) -> str:
    if backend == "kernel":
        return "hf_attn_patch.kernels.flash_attention"
    return f"hf_attn_patch.kernels.reference.attention_reference (query chunks of {REFERENCE_CHUNK})"


def pattern_attention(q, k, v, *, window: int | None, sinks: int, scale: float | None, backend: str) -> torch.Tensor:
    """Causal attention with the pattern, q (B, Hq, N, D), k/v (B, Hkv, N, D) -> (B, Hq, N, D)."""
    if backend == "kernel":
        from hf_attn_patch.kernels import flash_attention

        if sinks and not kernel_has_sinks():
            raise RuntimeError("flash_attention has no sinks= keyword in this checkout: window+sinks needs it "
                               "(or run with --attention reference on a short stream)")
        extra = {"sinks": sinks} if sinks else {}  # full and window-only run on a kernel without sinks=
        return flash_attention(q, k, v, causal=True, window=window, scale=scale, **extra)
    from hf_attn_patch.kernels.reference import attention_reference

    # Queries [start, end) against keys [0, end): the reference puts them at positions start..end-1.
    chunks = []
    for start in range(0, q.shape[2], REFERENCE_CHUNK):
        end = start + REFERENCE_CHUNK
        chunks.append(attention_reference(q[:, :, start:end], k[:, :, :end], v[:, :, :end], causal=True,
                                          window=window, sinks=sinks, scale=scale))
    return torch.cat(chunks, dim=2)


@contextlib.contextmanager
def attention_pattern(model, *, window: int | None, sinks: int, backend: str):
    """Make the model's attention `pattern_attention` for the block; yields a call counter, so the
    caller can prove that every layer went through it."""
    from transformers import AttentionInterface

    calls = [0]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if attention_mask is not None:  # one unpadded stream: nothing may need a mask here
            raise ValueError(f"{ATTN_NAME} takes no attention mask (got {type(attention_mask).__name__})")
        calls[0] += 1
        out = pattern_attention(query, key.to(query.dtype), value.to(query.dtype), window=window, sinks=sinks,
                                scale=scaling, backend=backend)
        return out.transpose(1, 2), None  # transformers wants (B, N, Hq, D)

    AttentionInterface.register(ATTN_NAME, attention)
    previous = model.config._attn_implementation
    model.config._attn_implementation = ATTN_NAME
    try:
        yield calls
    finally:
        model.config._attn_implementation = previous


@torch.no_grad()
def token_losses(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """(losses, logits): next-byte cross-entropy in nats at positions 0..N-2, float32 on the CPU,
    and the logits (float32, on the model's device)."""
    ids = ids[None].to(model.device)
    logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits[0, :-1].float()
    losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    return losses.cpu(), logits


# --- measurement --------------------------------------------------------------------------------


def measure(args, folder: Path, stream: torch.Tensor, patterns: list[dict], backend: str,
            device: torch.device, dtype: torch.dtype, record) -> None:
    """One result row per pattern (an error row when it fails), then the path check."""
    from hf_attn_patch.cache import PagedKVCache

    model = load_model(folder, dtype=dtype).to(device).eval()
    config = model.config
    training_length = config.max_position_embeddings
    bucket_bytes = args.bucket_bytes or training_length
    per_token, kv_source = kv_bytes_per_token(folder, config)
    block_size = inspect.signature(PagedKVCache).parameters["block_size"].default  # the cache's default
    record({"kind": "model", "benchmark": NAME, "folder": str(folder), "training_length": training_length,
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "head_dim": config.hidden_size // config.num_attention_heads,
            "kv_bytes_per_token": per_token, "kv_bytes_source": kv_source, "paged_block_size": block_size,
            "bucket_bytes": bucket_bytes})
    print(f"model: {config.num_hidden_layers} layers, {config.num_attention_heads} heads, training length "
          f"{training_length}; K/V {per_token:,} bytes per token ({KV_DTYPE[0]}, {kv_source})")

    for pattern in patterns:
        label = pattern_label(pattern)
        tokens, tokens_source = kv_tokens(pattern, len(stream), block_size)
        base = {"kind": "result", "benchmark": NAME, **pattern, "label": label, "attention": backend,
                "kv_tokens": tokens, "kv_tokens_source": tokens_source, "kv_bytes": tokens * per_token}
        clock = time.perf_counter()
        try:
            with attention_pattern(model, window=pattern["window"], sinks=pattern["sinks"], backend=backend) as calls:
                losses, _ = token_losses(model, stream)
            if calls[0] != config.num_hidden_layers:
                raise RuntimeError(f"the model called the pattern's attention {calls[0]} times for "
                                   f"{config.num_hidden_layers} layers: it was not used as registered")
        except Exception as error:  # one pattern failing (OOM, a kernel missing a keyword) must not lose the rest
            print(f"  {label}: FAILED: {error_string(error)}")
            record({**base, "error": error_string(error, 400)})
            free_memory()
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {**base, **summarise(losses, training_length, bucket_bytes),
               "seconds": round(time.perf_counter() - clock, 2), "error": None}
        record(row)
        print(f"  {label}: {row['bits_per_byte']:.4f} bits/byte (past {training_length}: "
              f"{_fmt(row['bits_per_byte_past_training'])}), K/V {format_bytes(row['kv_bytes'])}, {row['seconds']} s")
        free_memory()

    record({"kind": "path_check", "benchmark": NAME, **path_check(model, stream, patterns, backend, training_length)})
    del model
    free_memory()


def summarise(losses: torch.Tensor, training_length: int, bucket_bytes: int) -> dict:
    """Bits per byte over the stream, before/past the training length, and per bucket of positions
    (the position a prediction is made at: bucket b holds positions [b * size, (b + 1) * size))."""
    bits = losses.double() / math.log(2)
    buckets = torch.arange(len(bits)) // bucket_bytes
    sums = torch.zeros(int(buckets[-1]) + 1, dtype=torch.float64).index_add_(0, buckets, bits)
    counts = torch.bincount(buckets).double()
    inside, past = bits[:training_length], bits[training_length:]
    return {
        "loss_nats": losses.double().mean().item(),
        "bits_per_byte": bits.mean().item(),
        "bits_per_byte_within_training": inside.mean().item(),
        "bits_per_byte_past_training": past.mean().item() if len(past) else None,
        "buckets": {"size": bucket_bytes, "bits_per_byte": (sums / counts).tolist(), "counts": counts.long().tolist()},
        "predictions": len(bits),
    }


def path_check(model, stream: torch.Tensor, patterns: list[dict], backend: str, training_length: int) -> dict:
    """Our attention against stock transformers sdpa on a prefix of two training lengths: full
    causal, and the first window+sinks pattern as a dense boolean (1, 1, N, N) mask."""
    from hf_attn_patch.kernels.reference import visibility

    prefix = stream[: min(len(stream), 2 * training_length)]
    n = len(prefix)
    checks = {"prefix_bytes": n}
    sink_pattern = next((p for p in patterns if p["sinks"]), None)
    for pattern in [patterns[0]] + ([sink_pattern] if sink_pattern else []):
        label = pattern_label(pattern)
        try:
            with attention_pattern(model, window=pattern["window"], sinks=pattern["sinks"], backend=backend):
                ours, ours_logits = token_losses(model, prefix)
            mask = None
            if pattern["window"] is not None:
                positions = torch.arange(n, device=model.device)
                mask = visibility(positions[:, None] - positions[None, :], causal=True, window=pattern["window"],
                                  sinks=pattern["sinks"], key_pos=positions)[None, None]
            previous = model.config._attn_implementation
            model.config._attn_implementation = "sdpa"
            try:
                stock, stock_logits = token_losses(model, prefix, attention_mask=mask)
            finally:
                model.config._attn_implementation = previous
        except Exception as error:
            checks[label] = {"error": error_string(error, 400)}
            print(f"path check {label}: FAILED: {error_string(error)}")
            continue
        checks[label] = {"ours_bits_per_byte": ours.mean().item() / math.log(2),
                         "stock_sdpa_bits_per_byte": stock.mean().item() / math.log(2),
                         "max_abs_logit_difference": (ours_logits - stock_logits).abs().max().item()}
        print(f"path check {label} on {n} bytes: ours {checks[label]['ours_bits_per_byte']:.5f}, stock sdpa "
              f"{checks[label]['stock_sdpa_bits_per_byte']:.5f} bits/byte, max |logit diff| "
              f"{checks[label]['max_abs_logit_difference']:.2e}")
    return checks


# --- K/V memory ---------------------------------------------------------------------------------


def kv_bytes_per_token(folder: Path, config) -> tuple[int, str]:
    """K/V bytes per token at KV_DTYPE, from hf_attn_patch.kv_size, checked against
    2 x layers x KV heads x head dim x bytes (the formula alone if kv_size fails)."""
    from hf_attn_patch.cache.paged import KVShape

    shape = KVShape.from_config(config)
    formula = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * KV_DTYPE[1]
    try:
        from hf_attn_patch.kv_size import kv_size_report

        report = kv_size_report(folder, dtype=KV_DTYPE[0])
        from_kv_size = next(v for v in report.variants if v.kv_heads == shape.num_kv_heads).kv_bytes_per_token
    except Exception as error:
        return formula, f"2 x layers x KV heads x head dim x bytes (kv_size failed: {error_string(error)})"
    if from_kv_size != formula:  # say so rather than lose the run: the table then shows the formula's
        return formula, f"2 x layers x KV heads x head dim x bytes (kv_size said {from_kv_size})"
    return from_kv_size, "hf_attn_patch.kv_size (= 2 x layers x KV heads x head dim x bytes)"


def kv_tokens(pattern: dict, stream_len: int, block_size: int) -> tuple[int, str]:
    """(token slots, where the count comes from) a streaming generation of the stream holds at its
    peak: every token for full attention; for a window, the blocks of a PagedKVCache with that
    window and sinks (the sinks' blocks, the blocks W consecutive positions touch, one more)."""
    if pattern["window"] is None:
        return stream_len, "the whole stream"
    blocks = streaming_blocks(pattern["window"], pattern["sinks"], block_size)
    source = "hf_attn_patch.cache.streaming_blocks"
    return min(blocks * block_size, math.ceil(stream_len / block_size) * block_size), source


# --- output -------------------------------------------------------------------------------------


def pattern_label(pattern: dict) -> str:
    if pattern["window"] is None:
        return "full"
    return f"W={pattern['window']}" + (f" S={pattern['sinks']}" if pattern["sinks"] else "")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    results = [row for row in latest_run(rows) if row.get("kind") == "result"]
    model = header_row(rows, "model")
    length = model.get("training_length", "L")
    full = next((r for r in results if r["pattern"] == "full" and not r.get("error")), None)
    columns = ["attention", "window", "sinks", "bits/byte (stream)", f"first {length} bytes", f"past {length}",
               "last segment", "peak K/V (streaming)", "K/V vs full"]
    lines = []
    for row in results:
        cells = [row["pattern"], str(row["window"] or "-"), str(row["sinks"])]
        if row.get("error"):
            lines.append(cells + ["error: " + row["error"][:60], "", "", "", "", ""])
            continue
        ratio = f"{row['kv_bytes'] / full['kv_bytes']:.4f}" if full else "-"
        lines.append(cells + [_fmt(row["bits_per_byte"]), _fmt(row["bits_per_byte_within_training"]),
                              _fmt(row["bits_per_byte_past_training"]), _fmt(row["buckets"]["bits_per_byte"][-1]),
                              f"{format_bytes(row['kv_bytes'])} ({row['kv_tokens']:,} tok)", ratio])
    return columns, lines


def print_results(rows: list[dict]) -> None:
    run = header_row(rows)
    settings = run.get("settings", {})
    columns, lines = _table(rows)
    print_table(f"byte-level Llama, {settings.get('stream', {}).get('bytes', '?'):,}-byte held-out stream: "
                f"bits per byte ({run.get('device')}, {settings.get('attention')}, {settings.get('eval_dtype')})",
                columns, lines)


def markdown(rows: list[dict]) -> str:
    run, model, pretrain, end = (header_row(rows, kind) for kind in ("run", "model", "pretrain", "end"))
    settings = run.get("settings", {})
    stream = settings.get("stream", {})
    smoke = " **CPU smoke run: not results.**" if settings.get("quick") else ""
    trained = f"checkpoint {settings.get('checkpoint')}"
    if pretrain:
        trained = (f"pre-trained in the run: {pretrain.get('tokens_seen', 0):,} tokens, {pretrain.get('seconds')} s, "
                   f"final loss {_fmt(pretrain.get('final_loss'))}")
    note = (f"{run.get('device')}, {run.get('date')}, `{run.get('command')}`, commit {run.get('git_commit')}; "
            f"{trained}; training length {model.get('training_length')}; stream {stream.get('bytes', 0):,} bytes "
            f"of {stream.get('files')} held-out files (Python {stream.get('python')}); attention "
            f"{settings.get('attention')}, {settings.get('eval_dtype')}; K/V {model.get('kv_bytes_per_token')} "
            f"bytes per token ({settings.get('kv_dtype')}, {model.get('kv_bytes_source')}), paged blocks of "
            f"{model.get('paged_block_size')}; {end.get('seconds', '?')} s in all.{smoke}")
    columns, lines = _table(rows)
    check = header_row(rows, "path_check")
    checks = [f"{label}: ours {c['ours_bits_per_byte']:.5f} vs stock sdpa {c['stock_sdpa_bits_per_byte']:.5f} "
              f"bits/byte, max |logit diff| {c['max_abs_logit_difference']:.2e}"
              for label, c in check.items() if isinstance(c, dict) and "ours_bits_per_byte" in c]
    text = note + "\n\n" + markdown_table(columns, lines)
    if checks:
        text += f"\n\nPath check on the first {check['prefix_bytes']} bytes: " + "; ".join(checks) + "."
    return text


def plot(rows: list[dict], path: Path) -> Path | None:
    """Top left: bits per byte per segment of the stream, a line per pattern. Bottom left: each
    pattern's gap to the best pattern in that segment (the text's own difficulty cancels out).
    Right: bits per byte past the training length against the peak K/V memory of streaming."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (the JSON has every number)")
        return None
    results = [row for row in latest_run(rows) if row.get("kind") == "result" and not row.get("error")]
    if not results:
        return None
    run, model = header_row(rows), header_row(rows, "model")
    length = model.get("training_length")
    windows = sorted({r["window"] for r in results if r["window"] is not None})
    colours = {w: f"C{i}" for i, w in enumerate(windows)}
    main_sinks = run.get("settings", {}).get("sinks")  # the S every window gets; the sweep's others are dotted
    other_styles = iter([":", "-.", (0, (5, 1)), (0, (1, 3))] * 4)
    figure = plt.figure(figsize=(14, 7.5))
    grid = figure.add_gridspec(2, 2, width_ratios=[3, 2])
    values_axes, gap_axes = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[1, 0])
    right = figure.add_subplot(grid[:, 1])
    best = [min(values) for values in zip(*(row["buckets"]["bits_per_byte"] for row in results))]
    for row in results:
        size, values = row["buckets"]["size"], row["buckets"]["bits_per_byte"]
        xs = [(index + 0.5) * size / 1024 for index in range(len(values))]
        if row["window"] is None:
            style = dict(color="black", linewidth=2)
        elif row["sinks"] in (0, main_sinks):
            style = dict(color=colours[row["window"]], linestyle="-" if row["sinks"] else "--", linewidth=1.5)
        else:  # the sweep over S at one window
            style = dict(color=colours[row["window"]], linestyle=next(other_styles), linewidth=1)
        values_axes.plot(xs, values, label=row["label"], **style)
        gap_axes.plot(xs, [v - b for v, b in zip(values, best)], label=row["label"], **style)
        y = row["bits_per_byte_past_training"]
        y = row["bits_per_byte"] if y is None else y
        right.scatter(row["kv_bytes"], y, color=style["color"], marker="o" if row["sinks"] else "x")
        right.annotate(row["label"], (row["kv_bytes"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for axes in (values_axes, gap_axes):
        if length:
            axes.axvline(length / 1024, color="grey", linewidth=0.8, linestyle=":")
        axes.grid(alpha=0.3)
    values_axes.set_ylabel("bits per byte (lower is better)")
    values_axes.set_title(f"quality against position (dashed: window only; solid: window + {main_sinks} sinks; "
                          f"grey: training length {length})", fontsize=9)
    values_axes.legend(fontsize=7, ncol=3)
    gap_axes.set_xlabel("position in the stream (KiB)")
    gap_axes.set_ylabel("bits per byte above the best pattern")
    right.set_xscale("log", base=2)
    right.set_xlabel("peak K/V memory of streaming (bytes, bf16)")
    right.set_ylabel(f"bits per byte past position {length}" if length else "bits per byte")
    right.set_title("quality against memory (x: window only, o: with sinks)", fontsize=9)
    right.grid(alpha=0.3)
    stream = run.get("settings", {}).get("stream", {})
    figure.suptitle(f"byte-level Llama, {stream.get('bytes', 0):,}-byte held-out stream "
                    f"({run.get('device')}, {run.get('date')})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

if __name__ == "__main__":
    main()
