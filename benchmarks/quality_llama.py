"""Quality of a small Llama converted to fewer key/value heads, before and after uptraining.

1. Pre-train a byte-level Llama with multi-head attention (vocabulary 256: UTF-8 bytes, no
   tokenizer; hidden 512, 8 layers, 8 heads of 64, intermediate 1536, 1024-byte sequences,
   about 27M parameters) from scratch on Python's standard library source: the .py files under
   `sysconfig.get_paths()["stdlib"]` (site-/dist-packages left out), sorted by path, each file
   followed by a NUL byte. Every 20th file (index 19, 39, ...) is held out. The budget is
   fixed in tokens (`--pretrain-tokens`, default 60M, ~2 epochs of the ~30 MB training split).
2. Convert the checkpoint to 4 KV heads and to 1 (MQA) with every method in
   `hf_attn_patch.conversion.METHODS` (calibration: 64 training sequences).
3. Uptrain each converted model on 5% of the pre-training tokens (same data, same batch):
   (1 - w) * next-byte loss + w * KL toward the pre-trained MHA model (w = `--distill-weight`,
   default 0.5; 0 is plain LM loss).

Reported for the original, each converted and each uptrained model: held-out loss per byte in
nats, bits per byte and perplexity per byte (byte = token here), over all full 1024-byte
windows of the held-out files. Training runs through `hf_attn_patch.training.uptrain` (on CUDA
our kernels, forward and backward, bf16 autocast; on a CPU stock attention, float32); on CUDA the evaluation loads each
checkpoint in bf16 and patches it (our kernels); on a CPU (`--quick`) it runs float32 on stock
transformers (the JSON says which), and a path check compares both on the original model.

    python benchmarks/quality_llama.py                        # GPU, ~4 min on an H100 (estimate)
    TRITON_INTERPRET=1 python benchmarks/quality_llama.py --quick    # CPU smoke run, ~1-2 min
    python benchmarks/quality_llama.py --markdown benchmarks/results/quality-llama-....json

The Python version decides which standard library is read, so numbers from machines with
different Pythons differ a little; the JSON records the version, file and byte counts.
Rows are appended to `<out>/quality-llama-<date>-<device>.json`; a PNG is written beside it.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import (RESULTS_DIR, environment, error_string, free_memory, latest_run, read_results, results_path,
                     write_results)
from _quality import (
    error_row,
    header_row,
    method_series,
    available_methods,
    convert,
    load_model,
    markdown_table,
    plot_lines,
    print_table,
    run_info,
    stdlib_files,
    train,
    train_summary,
)

NAME = "quality-llama"
HELD_OUT_EVERY = 20
CALIBRATION_SEQUENCES = 64

FULL = dict(hidden=512, layers=8, heads=8, intermediate=1536, seq_len=1024, batch_size=32,
            pretrain_tokens=60_000_000, kv_heads=[4, 1], max_train_bytes=None, max_eval_bytes=None)
QUICK = dict(hidden=64, layers=2, heads=4, intermediate=128, seq_len=64, batch_size=8,
             pretrain_tokens=8 * 64 * 40, kv_heads=[2, 1], max_train_bytes=400_000, max_eval_bytes=16_384)
# A stand-in a 2-core CPU trains in minutes (~1M parameters): same data, method and schedule.
CPU = dict(hidden=128, layers=4, heads=8, intermediate=384, seq_len=256, batch_size=16,
           pretrain_tokens=2_000_000, kv_heads=[4, 1], max_train_bytes=None, max_eval_bytes=262_144)
SIZES = {"full": FULL, "cpu": CPU, "quick": QUICK}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.markdown:
        print(markdown(read_results(args.markdown)))
        return
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eval_path = args.eval_path if args.eval_path != "auto" else ("patched" if device.type == "cuda" else "stock")
    methods = available_methods(args.methods)
    size = SIZES[args.size]
    seq_len, batch_size = size["seq_len"], size["batch_size"]
    # Training under Triton's interpreter takes ~30 s a step even at --quick sizes: a CPU trains on
    # stock attention, and the path check runs our kernels there.
    train_patched = device.type == "cuda" and not args.no_patch

    train_data, held_out, described = stdlib_bytes(seq_len, size["max_train_bytes"], size["max_eval_bytes"])
    tokens_per_step = batch_size * seq_len
    pretrain_steps = max(1, round(args.pretrain_tokens / tokens_per_step))
    uptrain_steps = max(1, round(args.uptrain_fraction * pretrain_steps))
    calibration = train_data[torch.randperm(len(train_data), generator=torch.Generator().manual_seed(1))
                             [:CALIBRATION_SEQUENCES]]
    settings = {
        "quick": args.quick, "size": args.size, "model": {k: size[k] for k in ("hidden", "layers", "heads", "intermediate", "seq_len")},
        "kv_heads": args.kv_heads, "methods": methods, "eval_path": eval_path,
        "eval_dtype": "bfloat16" if eval_path == "patched" else "float32", "data": described,
        "batch_size": batch_size, "pretrain_steps": pretrain_steps, "pretrain_tokens": pretrain_steps * tokens_per_step,
        "pretrain_lr": args.pretrain_lr, "uptrain_steps": uptrain_steps,
        "uptrain_tokens": uptrain_steps * tokens_per_step, "uptrain_fraction": args.uptrain_fraction,
        "uptrain_lr": args.uptrain_lr, "distill_weight": args.distill_weight,
        "calibration": f"{len(calibration)} training sequences of {seq_len} bytes", "train_patched": train_patched,
    }
    print(f"stdlib: {described['train_files']} training files ({described['train_bytes']:,} bytes), "
          f"{described['held_out_files']} held out ({described['held_out_windows']} windows of {seq_len}); "
          f"pre-training {pretrain_steps} steps x {tokens_per_step:,} tokens, uptraining {uptrain_steps} steps")

    # Rows are appended to the JSON as they are measured, so a run cut short keeps them.
    common, rows, timings = environment(), [], {}

    def record(row: dict) -> None:
        rows.append({**row, **common})
        write_results([rows[-1]], args.out, NAME)

    record({"kind": "run", "benchmark": NAME, **run_info("quality_llama", argv), "settings": settings})
    try:
        check = measure(args, size, train_data, held_out, calibration, methods, eval_path, device, pretrain_steps,
                        uptrain_steps, train_patched, record, timings)
    except KeyboardInterrupt:
        print("interrupted: the rows measured so far are in the JSON")
        check = None
    record({"kind": "end", "benchmark": NAME, "path_check": check, "timings": timings,
            "seconds": round(time.perf_counter() - started, 1)})
    print_results(rows)
    print(f"\nwrote {results_path(args.out, NAME)}")
    if not args.no_plot:
        png = plot(rows, results_path(args.out, NAME).with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    print("\n" + markdown(rows))


def measure(args, size, train_data, held_out, calibration, methods, eval_path, device, pretrain_steps,
            uptrain_steps, train_patched, record, timings) -> dict | None:
    """Pre-train, evaluate; per KV heads and method: convert, evaluate, uptrain, evaluate. Returns the path check."""
    common_train = dict(data=train_data, seq_len=size["seq_len"], batch_size=size["batch_size"], grad_accum=1,
                        mixed_precision="auto", gradient_checkpointing=False, patch=train_patched,
                        save_every=0, seed=0)
    with tempfile.TemporaryDirectory(prefix="quality-llama-") as scratch:
        scratch = Path(scratch)
        clock = time.perf_counter()
        result = train(model=fresh_llama(size), output_dir=str(scratch / "pretrain"), max_steps=pretrain_steps,
                       lr=args.pretrain_lr, warmup_steps=max(1, pretrain_steps // 20), weight_decay=0.1,
                       log_every=max(1, pretrain_steps // 10), **common_train)
        original_dir = Path(result.final_dir)
        pretrain = train_summary(result)
        pretrain["tokens_per_second"] = round(result.tokens_seen / max(result.seconds, 1e-9))
        record({"kind": "pretrain", "benchmark": NAME, **pretrain})
        timings["pretrain"] = round(time.perf_counter() - clock, 1)
        row = result_row("original", None, size["heads"], evaluate(original_dir, held_out, eval_path, device))
        record(row)
        print(f"original: {row['bits_per_byte']:.4f} bits/byte")

        clock = time.perf_counter()
        for kv_heads in args.kv_heads:
            for method in methods:
                converted = scratch / f"kv{kv_heads}-{method}"
                try:
                    conversion = convert(original_dir, converted, kv_heads, method, calibration)
                    row = result_row("converted", method, kv_heads, evaluate(converted, held_out, eval_path, device))
                    row["convert"] = conversion
                except Exception as error:  # one method failing must not lose the others
                    record(error_row(NAME, "converted", method, kv_heads, error))
                    continue
                record(row)
                print(f"  kv {kv_heads} {method}: converted, {row['bits_per_byte']:.4f} bits/byte")
                if args.no_uptrain:
                    continue
                output = scratch / f"train-kv{kv_heads}-{method}"
                try:
                    result = train(model=str(converted), output_dir=str(output), teacher=str(original_dir),
                                   distill_weight=args.distill_weight, max_steps=uptrain_steps, lr=args.uptrain_lr,
                                   warmup_steps=max(1, uptrain_steps // 10), log_every=max(1, uptrain_steps // 4),
                                   **common_train)
                    row = result_row("uptrained", method, kv_heads,
                                     evaluate(Path(result.final_dir), held_out, eval_path, device))
                    row["train"] = train_summary(result)
                except Exception as error:
                    record(error_row(NAME, "uptrained", method, kv_heads, error))
                    continue
                finally:
                    shutil.rmtree(output, ignore_errors=True)
                    free_memory()
                record(row)
                print(f"  kv {kv_heads} {method}: uptrained, {row['bits_per_byte']:.4f} bits/byte")
        timings["convert_and_uptrain"] = round(time.perf_counter() - clock, 1)
        return path_check(original_dir, held_out, device)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: a 2-layer model, 40 steps")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and PNG")
    parser.add_argument("--methods", nargs="+", help="conversion methods (default: all in METHODS)")
    parser.add_argument("--kv-heads", nargs="+", type=int, help="default 4 1 (--quick: 2 1)")
    parser.add_argument("--pretrain-tokens", type=int, help="default 60M (--quick: 20k)")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--uptrain-fraction", type=float, default=0.05, help="of the pre-training tokens")
    parser.add_argument("--uptrain-lr", type=float, default=3e-4)
    parser.add_argument("--distill-weight", type=float, default=0.5, help="0: LM loss only")
    parser.add_argument("--no-uptrain", action="store_true", help="conversion only")
    parser.add_argument("--no-patch", action="store_true", help="train on stock attention on CUDA too")
    parser.add_argument("--eval-path", choices=["auto", "patched", "stock"], default="auto",
                        help="patched: our kernels, bf16 (default on CUDA); stock: unpatched float32 (default on CPU)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the markdown table of the newest run in JSON and exit")
    parser.add_argument("--size", choices=sorted(SIZES), help="model and data preset (default full; --quick: quick)")
    args = parser.parse_args(argv)
    args.size = args.size or ("quick" if args.quick else "full")
    size = SIZES[args.size]
    args.kv_heads = args.kv_heads or size["kv_heads"]
    args.pretrain_tokens = args.pretrain_tokens or size["pretrain_tokens"]
    bad = [g for g in args.kv_heads if g < 1 or size["heads"] % g]
    if bad:
        parser.error(f"--kv-heads must divide {size['heads']}, got {bad}")
    return args


# --- data and model -----------------------------------------------------------------------------


def stdlib_bytes(seq_len: int, max_train_bytes: int | None, max_eval_bytes: int | None):
    """(training sequences, held-out sequences, description): the stdlib split by file, as byte ids."""
    root, files = stdlib_files()
    held = [path for index, path in enumerate(files) if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    kept = [path for index, path in enumerate(files) if index % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]

    def windows(paths, limit):
        stream, used = bytearray(), 0
        for path in paths:
            stream += path.read_bytes() + b"\0"
            used += 1
            if limit and len(stream) >= limit:
                break
        stream = stream[:limit] if limit else stream
        count = len(stream) // seq_len
        ids = torch.frombuffer(stream[: count * seq_len], dtype=torch.uint8).long().view(count, seq_len)
        return ids, len(stream), used

    train_data, train_bytes, train_files = windows(kept, max_train_bytes)
    held_out, held_bytes, held_files = windows(held, max_eval_bytes)
    described = {
        "python": sys.version.split()[0], "stdlib": str(root), "files": len(files), "train_files": train_files,
        "held_out_files": held_files, "held_out_rule": f"sorted index % {HELD_OUT_EVERY} == {HELD_OUT_EVERY - 1}",
        "train_bytes": train_bytes, "held_out_bytes": held_bytes, "train_sequences": len(train_data),
        "held_out_windows": len(held_out), "truncated_for_quick": bool(max_train_bytes),
    }
    return train_data, held_out, described


def fresh_llama(size: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
        intermediate_size=size["intermediate"], max_position_embeddings=size["seq_len"],
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@torch.no_grad()
def evaluate(folder: Path, held_out: torch.Tensor, eval_path: str, device: torch.device,
             batch_size: int = 16) -> float:
    """Mean next-byte cross-entropy (nats) over every position of the held-out windows."""
    from hf_attn_patch import patch_model, unpatch_model

    if eval_path == "patched":
        model = patch_model(load_model(folder, dtype=torch.bfloat16).to(device).eval())
    else:
        model = unpatch_model(load_model(folder).to(device).eval())
    total, count = 0.0, 0
    for start in range(0, len(held_out), batch_size):
        batch = held_out[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    del model
    free_memory()
    return total / count


def path_check(folder: Path, held_out: torch.Tensor, device: torch.device) -> dict:
    """The original model's held-out loss on both paths (8 windows on CPU, all on CUDA)."""
    subset = held_out if device.type == "cuda" else held_out[:8]
    try:
        stock, patched = (evaluate(folder, subset, path, device) for path in ("stock", "patched"))
    except Exception as error:
        return {"model": "original", "error": error_string(error, 400)}
    print(f"path check on the original: loss stock {stock:.5f}, patched {patched:.5f} nats/byte")
    return {"model": "original", "windows": len(subset), "stock_float32": stock, "patched_bf16": patched}


# --- rows and output ----------------------------------------------------------------------------


def result_row(stage: str, method: str | None, kv_heads: int, loss: float) -> dict:
    return {"kind": "result", "benchmark": NAME, "stage": stage, "method": method, "kv_heads": kv_heads,
            "loss_nats": loss, "bits_per_byte": loss / math.log(2), "ppl": math.exp(loss), "error": None}


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row.get("error"):
        return "error"
    return f"{row['bits_per_byte']:.4f} / {row['ppl']:.3f}"


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    results = [row for row in latest_run(rows) if row.get("kind") == "result"]
    find = {(row["stage"], row["method"], row["kv_heads"]): row for row in results}
    original = next((row for row in results if row["stage"] == "original"), None)
    columns = ["KV heads", "method", "bits/byte / ppl, converted", "after uptraining"]
    lines = [[str(original["kv_heads"]) if original else "-", "original (MHA)", _cell(original), ""]]
    methods = sorted({row["method"] for row in results if row["method"]}, key=lambda m: (m != "mean", m))
    for kv_heads in sorted({row["kv_heads"] for row in results if row["method"]}, reverse=True):
        for method in methods:
            lines.append([str(kv_heads), method, _cell(find.get(("converted", method, kv_heads))),
                          _cell(find.get(("uptrained", method, kv_heads)))])
    return columns, lines


def print_results(rows: list[dict]) -> None:
    run = header_row(rows)
    columns, lines = _table(rows)
    print_table(f"byte-level Llama on the stdlib: held-out bits per byte / perplexity per byte "
                f"({run.get('device')}, eval {run.get('settings', {}).get('eval_path')})", columns, lines)


def markdown(rows: list[dict]) -> str:
    run = header_row(rows)
    settings, pretrain, end = run.get("settings", {}), header_row(rows, "pretrain"), header_row(rows, "end")
    data = settings.get("data", {})
    smoke = " **CPU smoke run: not results.**" if settings.get("quick") else ""
    note = (f"{run.get('device')}, {run.get('date')}, `{run.get('command')}`; model {settings.get('model')}; "
            f"Python {data.get('python')} stdlib, {data.get('train_files')} training files "
            f"({data.get('train_bytes'):,} bytes), {data.get('held_out_files')} held out "
            f"({data.get('held_out_windows')} windows); pre-training {settings.get('pretrain_steps')} steps, "
            f"{settings.get('pretrain_tokens'):,} tokens, {pretrain.get('seconds')} s "
            f"({pretrain.get('tokens_per_second', 0):,} tokens/s); uptraining {settings.get('uptrain_steps')} steps "
            f"({settings.get('uptrain_tokens'):,} tokens, distill weight {settings.get('distill_weight')}); "
            f"eval path {settings.get('eval_path')} ({settings.get('eval_dtype')}); {end.get('seconds', '?')} s in all."
            f"{smoke}")
    columns, lines = _table(rows)
    return note + "\n\n" + markdown_table(columns, lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    results = [row for row in latest_run(rows) if row.get("kind") == "result" and not row.get("error")]
    series, original = method_series(results, "bits_per_byte")
    run = header_row(rows)
    title = f"byte-level Llama, stdlib held-out ({run.get('device')}, {run.get('date')})"
    return plot_lines(path, title, "held-out bits per byte (lower is better)", series,
                      original["bits_per_byte"] if original else None, "original (MHA)")


if __name__ == "__main__":
    main()
