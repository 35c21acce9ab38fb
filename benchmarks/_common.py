"""Helpers every benchmark script shares: timing, machine ceilings, environment, JSON results.

Benchmarks append rows (plain dicts) to one JSON file per script, date and device, e.g.
`benchmarks/results/kernels-2026-11-22-nvidia-h100-80gb-hbm3.json`; each row carries the
device, library versions, date and a run id, so files from different machines can be compared
and a plot can pick out the newest run. Import from a script in this folder with
`from _common import ...` (running `python benchmarks/<script>.py` puts this folder on the path).
"""

from __future__ import annotations

import datetime
import gc
import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = [
    "RESULTS_DIR",
    "do_bench_median",
    "measure_ceilings",
    "device_name",
    "device_slug",
    "environment",
    "results_path",
    "write_results",
    "read_results",
    "latest_run",
    "free_memory",
    "error_string",
    "relative_error",
]


# --- timing -------------------------------------------------------------------------------------


def do_bench_median(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100,
                    cuda_graph: bool = False) -> float:
    """Median time of one call of `fn`, in milliseconds.

    On CUDA this is `triton.testing.do_bench` (CUDA events, L2 flushed between calls), or with
    `cuda_graph` `triton.testing.do_bench_cudagraph`: the calls captured in a CUDA graph and
    replayed, so the host's launch time is not in the figure (nor is an L2 flush). On a CPU
    (smoke runs only) a wall-clock loop stands in for it, so the same script runs anywhere; CPU
    numbers are real but say nothing about GPU performance.
    """
    if torch.cuda.is_available():
        import triton.testing

        if cuda_graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return _wall_clock_median(fn, warmup_ms, rep_ms)


def _wall_clock_median(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    fn()  # first call: compilation, caches
    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
        fn()
    times_ms = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times_ms) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_ms)


# --- ceilings -----------------------------------------------------------------------------------


def measure_ceilings(
    device: torch.device | str | None = None, warmup_ms: float = 25, rep_ms: float = 100
) -> list[dict]:
    """Measure what this machine can do at best, so tables are comparable across machines.

    Returns two rows: a bf16 matrix multiply (8192^3 on a GPU) in TFLOP/s, and a
    device-to-device copy in TB/s (bytes read + bytes written per second). On a CPU the sizes
    are small, to keep smoke runs short.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    return [
        _matmul_ceiling(device, 8192 if on_gpu else 256, warmup_ms, rep_ms),
        _copy_ceiling(device, 2**30 if on_gpu else 2**26, warmup_ms, rep_ms),
    ]


def _matmul_ceiling(device: torch.device, size: int, warmup_ms: float, rep_ms: float) -> dict:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = do_bench_median(lambda: a @ b, warmup_ms, rep_ms)
    del a, b
    free_memory()
    return {
        "kernel": "ceiling",
        "provider": "matmul-bf16",
        "shape": f"{size}x{size}x{size}",
        "ms": ms,
        "tflops": 2 * size**3 / (ms * 1e-3) / 1e12,
        "error": None,
    }


def _copy_ceiling(device: torch.device, nbytes: int, warmup_ms: float, rep_ms: float) -> dict:
    src = torch.randn(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = do_bench_median(lambda: dst.copy_(src), warmup_ms, rep_ms)
    del src, dst
    free_memory()
    return {
        "kernel": "ceiling",
        "provider": "copy-d2d",
        "shape": f"{nbytes} bytes",
        "ms": ms,
        "tbps": 2 * nbytes / (ms * 1e-3) / 1e12,  # read + write
        "error": None,
    }


# --- environment --------------------------------------------------------------------------------


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu {platform.machine()}"


def device_slug(name: str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': safe in a file name."""
    return re.sub(r"[^a-z0-9]+", "-", (name or device_name()).lower()).strip("-")


def environment() -> dict:
    """Fields stamped on every row: where and with what the numbers were measured."""
    import triton

    now = datetime.datetime.now()
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": now.strftime("%Y-%m-%d"),
        "run_id": now.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# --- results files ------------------------------------------------------------------------------


def results_path(out_dir: str | Path, name: str, date: str | None = None, slug: str | None = None) -> Path:
    date = date or datetime.date.today().isoformat()
    return Path(out_dir) / f"{name}-{date}-{slug or device_slug()}.json"


def write_results(rows: Iterable[dict], out_dir: str | Path, name: str) -> Path:
    """Append rows to `<out_dir>/<name>-<date>-<device>.json` (a JSON list); returns the path.

    Appending, not overwriting, keeps earlier runs of the same day on the same device.
    """
    path = results_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_results(path) if path.exists() else []
    path.write_text(json.dumps(existing + list(rows), indent=1) + "\n")
    return path


def read_results(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows of the newest run in a results file (files accumulate runs)."""
    if not rows:
        return []
    newest = max(row.get("run_id", "") for row in rows)
    return [row for row in rows if row.get("run_id", "") == newest]


# --- small helpers ------------------------------------------------------------------------------


def free_memory() -> None:
    """Give cached GPU memory back between shapes, so one shape's leftovers cannot OOM the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_string(exc: BaseException, limit: int = 160) -> str:
    """One line naming the exception, short enough for a table cell and a JSON field."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error ||actual - expected|| / ||expected||, computed in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
