"""Shared pieces of the quality benchmarks (`quality_minilm.py`, `quality_llama.py`).

- `convert(...)`: `convert_checkpoint` with calibration data for the methods that take it;
- `train(...)`, `train_summary(result)`: `hf_attn_patch.training.uptrain` and what to keep of it;
- `stdlib_files()`: Python's standard library sources, sorted (the text both scripts train on);
- `print_table`, `markdown_table`, `plot_lines`: output with rich / matplotlib when present,
  plain text / a message when not;
- `run_info()`: versions, command line and git commit for the JSON.
"""

from __future__ import annotations

import inspect
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from _common import error_string, latest_run

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package


# --- result rows ---------------------------------------------------------------------------------


def header_row(rows: list[dict], kind: str = "run") -> dict:
    """The newest run's row of `kind` ("run", "end", "pretrain"), or {}."""
    return next((row for row in latest_run(rows) if row.get("kind") == kind), {})


def error_row(benchmark: str, stage: str, method: str, kv_heads: int, error: Exception, **extra) -> dict:
    """A result row for a conversion or uptraining that failed; the run goes on."""
    print(f"  kv {kv_heads} {method}: {stage} FAILED: {error_string(error)}")
    return {"kind": "result", "benchmark": benchmark, **extra, "stage": stage, "method": method,
            "kv_heads": kv_heads, "error": error_string(error, 400)}


# --- conversion ---------------------------------------------------------------------------------


def available_methods(requested: list[str] | None) -> list[str]:
    from hf_attn_patch.conversion import METHODS

    if not requested:
        return sorted(METHODS, key=lambda name: (name != "mean", name))
    unknown = [name for name in requested if name not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; this checkout has {sorted(METHODS)}")
    return requested


def convert(src: Path, dst: Path, kv_heads: int, method: str, calibration) -> dict:
    """convert_checkpoint(src, dst, ...); calibration is passed when convert_checkpoint takes it."""
    from hf_attn_patch.conversion import convert_checkpoint

    kwargs = {"num_kv_heads": kv_heads, "method": method, "verify": "shapes"}
    parameters = inspect.signature(convert_checkpoint).parameters
    if "calibration" in parameters:
        kwargs["calibration"] = calibration
    elif method != "mean":
        raise RuntimeError(f"convert_checkpoint takes no calibration= argument; method {method!r} may need one")
    started = time.perf_counter()
    convert_checkpoint(src, dst, **kwargs)
    return {"seconds": round(time.perf_counter() - started, 3), "calibration_passed": "calibration" in kwargs}


# --- training -----------------------------------------------------------------------------------


def train(**fields):
    """hf_attn_patch.training.uptrain(UptrainConfig(**fields)); returns its UptrainResult."""
    from hf_attn_patch.training import UptrainConfig, uptrain

    return uptrain(UptrainConfig(**fields))


def train_summary(result) -> dict:
    """Steps, tokens, seconds and the loss at the start and the end (mean of the last 10% of steps)."""
    losses = [loss for _, loss in result.losses]
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": result.steps, "tokens_seen": result.tokens_seen, "seconds": round(float(result.seconds), 1),
            "objective": result.objective, "first_loss": losses[0] if losses else None,
            "final_loss": sum(tail) / len(tail) if tail else None}


def load_model(path: str | Path, dtype: torch.dtype | None = None):
    """A checkpoint folder as its model class: GQA-BERT through load_gqa_bert (patched), causal
    LMs with AutoModelForCausalLM, other BERTs with AutoModel (unpatched)."""
    import transformers

    from hf_attn_patch.models.bert import load_gqa_bert

    config = transformers.AutoConfig.from_pretrained(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if config.model_type == "bert":
        if getattr(config, "num_key_value_heads", None) is not None:
            return load_gqa_bert(path, **kwargs)
        return transformers.AutoModel.from_pretrained(path, **kwargs)
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


# --- data ---------------------------------------------------------------------------------------


def stdlib_files() -> tuple[Path, list[Path]]:
    """Python's standard library .py files (site-/dist-packages left out), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        path for path in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(path.relative_to(root).parts) and path.is_file()
    )
    return root, files


# --- output -------------------------------------------------------------------------------------


def run_info(name: str, argv: list[str]) -> dict:
    """Versions, command line and commit: what a reader needs to rerun the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("torch", "triton", "transformers", "accelerate", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    interpret = os.environ.get("TRITON_INTERPRET")
    prefix = "TRITON_INTERPRET=1 " if interpret == "1" else ""
    command = f"{prefix}python benchmarks/{name}.py {shlex.join(argv)}".rstrip()
    return {"versions": versions, "command": command, "git_commit": commit,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows)]
        print(f"\n{title}")
        for line in [columns, *rows]:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
        return
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    Console(width=None if sys.stdout.isatty() else 150).print(table)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def method_series(results: list[dict], metric: str, original_kv_heads: int | None = None) -> tuple[dict, dict | None]:
    """Plot series from result rows: one per method and stage ("converted" solid, "uptrained"
    dashed), each starting at the original model. Returns (series for plot_lines, original row)."""
    original = next((row for row in results if row["stage"] == "original"), None)
    series = {}
    for stage, label, dashed in (("converted", "converted", False), ("uptrained", "after uptraining", True)):
        for method in sorted({row["method"] for row in results if row["stage"] == stage}):
            points = sorted(((row["kv_heads"], row[metric]) for row in results
                             if row["stage"] == stage and row["method"] == method), reverse=True)
            if original:
                points.insert(0, (original_kv_heads or original["kv_heads"], original[metric]))
            series[f"{method} {label}"] = ([x for x, _ in points], [y for _, y in points], dashed)
    return series, original


def plot_lines(path: Path, title: str, ylabel: str, series: dict, baseline: float | None,
               baseline_label: str, invert_x: bool = True) -> Path | None:
    """One line per series name: {name: ([kv_heads], [values], dashed: bool)}. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib; the JSON has every number)")
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for name, (xs, ys, dashed) in series.items():
        method = name.split(" ")[0]
        colour = colours.setdefault(method, f"C{len(colours)}")
        axes.plot(xs, ys, marker="o", linestyle="--" if dashed else "-", color=colour, label=name)
    if baseline is not None:
        axes.axhline(baseline, color="black", linewidth=0.8, label=baseline_label)
    all_x = sorted({x for xs, _, _ in series.values() for x in xs})
    axes.set_xscale("log", base=2)
    axes.set_xticks(all_x, [str(x) for x in all_x])
    axes.minorticks_off()
    if invert_x:
        axes.invert_xaxis()
    axes.set_xlabel("KV heads")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
