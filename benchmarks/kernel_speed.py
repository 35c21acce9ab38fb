"""Kernel benchmark: our `flash_attention` against torch SDPA's backends and FlexAttention.

One run times every provider side by side (bf16, H = 16, B * N = 16k tokens, N = 1k / 4k / 16k,
D = 64 / 128, plus GQA 32/8 at D = 128) in four modes: non-causal, causal, and causal sliding
windows W = 1024 and 4096. For each row it records the forward, the forward + backward, and the
backward (the difference of the two) in ms and TFLOP/s, together with the machine's ceilings
(bf16 matmul, device copy), appends the rows to `<out>/kernels-<date>-<device>.json`, prints a
table and the issue-2 targets, and draws the plots (`plot.py`).

    python benchmarks/kernel_speed.py                 # the full run (~7 min on an H100, cold caches)
    python benchmarks/kernel_speed.py --d 128         # D = 128 only: 265 s on the H100, 2026-11-23
    python benchmarks/kernel_speed.py --quick         # one small shape per mode
    python benchmarks/kernel_speed.py --dry-run       # CPU, tiny shapes: checks the harness only
    python benchmarks/kernel_speed.py --cuda-graphs   # every provider timed as CUDA-graph replays

By default each call is timed as a Python call, host launch time included: a short call (N = 1k)
can be bound by it. `--cuda-graphs` times the same calls captured in a CUDA graph, for every
provider alike, so the rows compare the kernels alone (rows say which: `timing`). Each row also
records the wall time of the provider's first forward and first forward + backward of its shape
class (`first_fwd_s`, `first_fwd_bwd_s`): compile and autotuning, never in the timings. They
measure a cold start only in a fresh process with an empty Triton cache (`TRITON_CACHE_DIR`).

FLOPs: a forward is 4 * B * H * pairs * D, pairs = the (query, key) pairs that are visible:
N^2, N^2 / 2 when causal (the usual convention), and exactly sum_p min(p + 1, W) for a window.
A backward counts 2.5x its forward.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    write_results,
)

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS = 16 * 1024  # B * N
HEADS = 16
GQA_HEADS = (32, 8)
SEQ_LENS = (1024, 4096, 16384)
WINDOWS = (1024, 4096)
WINDOW_MIN_SEQ_LEN = 4096  # window rows only where the window is a real saving
MODES = ("noncausal", "causal", "window")
PROVIDERS = ("ours", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")
MAX_REL_ERROR = 2e-2  # bf16 output vs the SDPA reference
BACKWARD_FLOP_FACTOR = 2.5
TORCH_WARNING_SOURCE = re.compile(r"\s*\(Triggered internally at [^)]*\)")  # noise in an error cell

# Captured output (a log, a remote run) is not a terminal: rich would wrap it at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    Hkv: int
    N: int
    D: int

    @property
    def heads_label(self) -> str:
        return f"{self.H}/{self.Hkv}"


@dataclass(frozen=True)
class Case:
    """What is masked: mode 'noncausal', 'causal' or 'window' (causal, the W most recent keys)."""

    mode: str
    window: int | None = None

    @property
    def causal(self) -> bool:
        return self.mode != "noncausal"

    @property
    def label(self) -> str:
        return f"window W={self.window}" if self.window else self.mode


@dataclass
class Settings:
    device: torch.device
    shapes: list[Shape]
    modes: list[str]
    windows: list[int]
    window_min_seq_len: int
    providers: list[str]
    backward: bool
    warmup_ms: float
    rep_ms: float
    started: float  # perf_counter at the start, for progress lines
    cuda_graphs: bool = False  # time CUDA-graph replays (no host launch time)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from(args)
    env = environment()
    console.print(f"[bold]{env['device']}[/]  torch {env['torch']}  triton {env['triton']}")
    if settings.cuda_graphs:
        console.print("timing: every call replayed from a CUDA graph (no host launch time, no L2 flush)")

    # Rows are written as they come, so a crash late in the run keeps what was measured.
    ceilings = measure_ceilings(settings.device, settings.warmup_ms, settings.rep_ms)
    rows = [dict(row, **env) for row in ceilings]
    path = write_results(rows, args.out, "kernels")
    for shape in settings.shapes:
        shape_rows = [dict(row, **env) for row in bench_shape(shape, settings)]
        write_results(shape_rows, args.out, "kernels")
        rows += shape_rows
        free_memory()

    print_ceilings(rows)
    print_tables(rows, show_backward=settings.backward, show_forward=args.only != "bwd")
    print_targets(rows)
    print_first_calls(rows)
    console.print(f"rows appended to {path}  ({time.perf_counter() - settings.started:.0f} s)")
    if not args.no_plot:
        draw_plots(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape per mode (smoke run)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run on the CPU at tiny sizes (Triton interpreter for ours) to check the harness; "
        "results go to a temporary folder unless --out is given",
    )
    parser.add_argument(
        "--only",
        choices=("fwd", "bwd"),
        help="fwd: forward only; bwd: show the backward (the forward is still timed, since "
        "backward = (fwd + bwd) - fwd)",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--windows", nargs="+", type=int, help=f"window sizes (default {WINDOWS})")
    parser.add_argument("--d", nargs="+", type=int, default=[64, 128], help="head dims")
    parser.add_argument("--n", nargs="+", type=int, help=f"sequence lengths (default {SEQ_LENS})")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--no-gqa", action="store_true", help=f"skip the GQA {GQA_HEADS} shapes")
    parser.add_argument("--warmup-ms", type=float, default=25)
    parser.add_argument("--rep-ms", type=float, default=100)
    parser.add_argument("--out", type=Path, help=f"results folder (default {RESULTS_DIR})")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time every provider's calls replayed from a CUDA graph: kernel time without the host's")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="kernels-dry-run-")) if args.dry_run else RESULTS_DIR
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    if args.dry_run:
        # Ours runs in Triton's interpreter on a CPU; it reads this when the kernels are defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        # The interpreter takes ~1 s for a forward + backward here: keep it to two tiny shapes.
        shapes = [Shape(1, 2, 2, 128, min(args.d)), Shape(1, 2, 1, 128, min(args.d))]
        windows = args.windows or [32, 64]
        warmup_ms, rep_ms = min(args.warmup_ms, 1), min(args.rep_ms, 5)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: use --dry-run to check the harness on a CPU")
        device = torch.device("cuda")
        if args.quick:
            shapes = [Shape(1, HEADS, HEADS, 4096, max(args.d))]
        else:
            shapes = default_shapes(args.d, args.n or SEQ_LENS, gqa=not args.no_gqa)
        windows = args.windows or list(WINDOWS)
        warmup_ms, rep_ms = args.warmup_ms, args.rep_ms
    return Settings(
        device=device,
        shapes=shapes,
        modes=args.modes,
        windows=windows,
        # Small runs have one length: take the windows there.
        window_min_seq_len=min(s.N for s in shapes) if (args.quick or args.dry_run) else WINDOW_MIN_SEQ_LEN,
        providers=args.providers,
        backward=args.only != "fwd",
        warmup_ms=warmup_ms,
        rep_ms=rep_ms,
        started=time.perf_counter(),
        cuda_graphs=args.cuda_graphs and not args.dry_run,
    )


def default_shapes(head_dims: list[int], seq_lens: list[int], gqa: bool) -> list[Shape]:
    shapes = [Shape(TOKENS // n, HEADS, HEADS, n, d) for d in head_dims for n in seq_lens]
    if gqa and 128 in head_dims:
        shapes += [Shape(TOKENS // n, *GQA_HEADS, n, 128) for n in seq_lens]
    return shapes


def cases_for(shape: Shape, settings: Settings) -> list[Case]:
    cases = [Case(mode) for mode in ("noncausal", "causal") if mode in settings.modes]
    if "window" in settings.modes and shape.N >= settings.window_min_seq_len:
        cases += [Case("window", w) for w in settings.windows]
    return cases


# --- one shape ----------------------------------------------------------------------------------


def bench_shape(shape: Shape, settings: Settings) -> list[dict]:
    """Every case and provider on one shape, with fresh random inputs (never zeros)."""
    torch._dynamo.reset()  # FlexAttention compiles once per shape, from a clean slate
    q, k, v, grad_out = random_inputs(shape, settings.device)
    providers = [make_provider(name, shape, settings.device) for name in settings.providers]
    rows = []
    for case in cases_for(shape, settings):
        elapsed = time.perf_counter() - settings.started
        where = f"D={shape.D} heads={shape.heads_label} N={shape.N} B={shape.B} {case.label}"
        console.print(f"[{elapsed:4.0f} s] {where}", highlight=False, markup=False)
        expected = reference_output(q, k, v, case)
        for provider in providers:
            if provider.supports(case):
                rows += bench_provider(provider, shape, case, (q, k, v, grad_out), expected, settings)
        del expected
        free_memory()
    return rows


def random_inputs(shape: Shape, device: torch.device):
    def randn(heads: int) -> torch.Tensor:
        x = torch.randn(shape.B, heads, shape.N, shape.D, device=device, dtype=torch.bfloat16)
        return x.requires_grad_()

    q, k, v = randn(shape.H), randn(shape.Hkv), randn(shape.Hkv)
    grad_out = torch.randn_like(q).detach()
    return q, k, v, grad_out


def bench_provider(provider, shape: Shape, case: Case, tensors, expected, settings: Settings) -> list[dict]:
    """Check one provider against the reference once, then time it; errors become rows."""
    q, k, v, grad_out = tensors
    base = dict(row_base(provider.name, shape, case), timing="cuda-graph" if settings.cuda_graphs else "eager")
    passes = ["fwd", "fwd+bwd", "bwd"] if settings.backward else ["fwd"]
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # SDPA says why a backend cannot run in a warning
        try:
            with provider.context():
                attention = provider.build(case)
                # The first calls compile and autotune (from a cold cache, in a fresh process):
                # their wall time is reported beside the timings, never mixed into them.
                started = time.perf_counter()
                out = attention(q, k, v)
                wait_for(q)
                base["first_fwd_s"] = round(time.perf_counter() - started, 3)
                base["rel_error"] = relative_error(out.detach(), expected) if expected is not None else None
                del out
                if settings.backward:
                    started = time.perf_counter()
                    torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out)
                    wait_for(q)
                    base["first_fwd_bwd_s"] = round(time.perf_counter() - started, 3)
                times = time_passes(attention, tensors, settings)
        except Exception as exc:  # OOM, unsupported shape or backend, a kernel that fails
            error = failure(exc, caught)
    if error:  # out here, the exception's frames (and their tensors) are gone: memory can go
        free_memory()
        return [dict(base, **{"pass": p, "ms": None, "tflops": None, "error": error}) for p in passes]
    if expected is not None and not base["rel_error"] <= MAX_REL_ERROR:  # also catches NaN
        base["error"] = f"mismatch: relative error {base['rel_error']:.3g} > {MAX_REL_ERROR:g} vs SDPA"
    forward_flops = attention_flops(shape, case)
    flops = {"fwd": forward_flops, "bwd": BACKWARD_FLOP_FACTOR * forward_flops}
    flops["fwd+bwd"] = flops["fwd"] + flops["bwd"]
    return [dict(base, **{"pass": p, "ms": times[p], "tflops": tflops(flops[p], times[p])}) for p in passes]


def wait_for(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def failure(exc: Exception, caught: list) -> str:
    """The error, plus SDPA's warnings, which are where it says why a backend was refused."""
    reasons = [TORCH_WARNING_SOURCE.sub("", str(w.message)).strip() for w in caught if w.category is UserWarning]
    text = error_string(exc) + (f" ({' '.join(reasons)})" if reasons else "")
    return text if len(text) <= 400 else text[:397] + "..."


def time_passes(attention: Callable, tensors, settings: Settings) -> dict[str, float]:
    q, k, v, grad_out = tensors
    times = {"fwd": do_bench_median(lambda: attention(q, k, v), settings.warmup_ms, settings.rep_ms,
                                    cuda_graph=settings.cuda_graphs)}
    if settings.backward:
        # autograd.grad returns the gradients instead of accumulating them into .grad
        times["fwd+bwd"] = do_bench_median(
            lambda: torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out),
            settings.warmup_ms,
            settings.rep_ms,
            cuda_graph=settings.cuda_graphs,
        )
        times["bwd"] = times["fwd+bwd"] - times["fwd"]
    return times


def row_base(provider: str, shape: Shape, case: Case) -> dict:
    return {
        "kernel": "flash_attention",
        "provider": provider,
        "mode": case.mode,
        "window": case.window,
        "B": shape.B,
        "H": shape.H,
        "Hkv": shape.Hkv,
        "N": shape.N,
        "D": shape.D,
        "dtype": "bfloat16",
        "pass": None,
        "ms": None,
        "tflops": None,
        "rel_error": None,
        "error": None,
    }


def visible_pairs(seq_len: int, case: Case) -> float:
    if case.window:
        # sum over positions p of min(p + 1, W): a triangle up to W, then W per position
        ramp = min(seq_len, case.window)
        return ramp * (ramp + 1) / 2 + (seq_len - ramp) * case.window
    return seq_len**2 / 2 if case.causal else seq_len**2


def attention_flops(shape: Shape, case: Case) -> float:
    return 4 * shape.B * shape.H * visible_pairs(shape.N, case) * shape.D


def tflops(flops: float, ms: float) -> float | None:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else None


# --- reference ----------------------------------------------------------------------------------


@torch.no_grad()
def reference_output(q, k, v, case: Case) -> torch.Tensor | None:
    """SDPA with its default backend choice, on K/V expanded to every query head.

    SDPA has no window, so windows are computed one query chunk at a time with an explicit mask
    over just the keys that chunk can see: exact, and never an N x N mask. None (no check, but
    the timings still run) if the reference itself fails.
    """
    try:
        return _reference_output(q, k, v, case)
    except Exception as exc:
        console.print(f"[yellow]no reference output, outputs not checked: {error_string(exc)}[/]")
        free_memory()
        return None


def _reference_output(q, k, v, case: Case) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.detach(), k.detach().repeat_interleave(groups, 1), v.detach().repeat_interleave(groups, 1)
    if case.window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    return windowed_reference(q, k, v, case.window)


def windowed_reference(q, k, v, window: int, chunk: int = 1024) -> torch.Tensor:
    seq_len = q.shape[2]
    out = torch.empty_like(q)
    positions = torch.arange(seq_len, device=q.device)
    for start in range(0, seq_len, chunk):
        stop = min(start + chunk, seq_len)
        first_key = max(0, start - window + 1)
        distance = positions[start:stop, None] - positions[None, first_key:stop]
        visible = (distance >= 0) & (distance < window)
        out[:, :, start:stop] = F.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, first_key:stop], v[:, :, first_key:stop], attn_mask=visible
        )
    return out


# --- providers ----------------------------------------------------------------------------------
# A provider builds, outside the timed region, a function attention(q, k, v) -> out for one case.


def make_provider(name: str, shape: Shape, device: torch.device):
    if name == "ours":
        return Ours()
    if name == "flex":
        return Flex(shape, device)
    return Sdpa(name)


class Ours:
    name = "ours"

    def supports(self, case: Case) -> bool:
        return True

    def context(self):
        return contextlib.nullcontext()

    def build(self, case: Case) -> Callable:
        # Imported here so that the peers still run while our kernel does not import.
        from hf_attn_patch.kernels import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, causal=case.causal, window=case.window)


class Sdpa:
    """torch SDPA with one backend forced; the backend's own error says when it cannot run."""

    def __init__(self, name: str):
        from torch.nn.attention import SDPBackend

        self.name = name
        self.backend = {
            "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        }[name]

    def supports(self, case: Case) -> bool:
        return case.window is None  # SDPA has no sliding window (only a dense N x N mask)

    def context(self):
        # Entered around the whole timing, not per call: the context costs microseconds.
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self.backend)

    def build(self, case: Case) -> Callable:
        def attention(q, k, v):
            gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, **gqa)

        return attention


class Flex:
    """FlexAttention, compiled once per shape; block masks are built here, never timed."""

    name = "flex"

    def __init__(self, shape: Shape, device: torch.device):
        self.shape, self.device = shape, device
        self.compiled = None

    def supports(self, case: Case) -> bool:
        return True

    def context(self):
        return contextlib.nullcontext()

    def build(self, case: Case) -> Callable:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if self.compiled is None:
            self.compiled = torch.compile(flex_attention, dynamic=False)
        mask_mod = flex_mask_mod(case)
        block_mask = None
        if mask_mod is not None:
            n = self.shape.N
            block_mask = create_block_mask(mask_mod, None, None, n, n, device=self.device)
        gqa = self.shape.H != self.shape.Hkv
        return lambda q, k, v: self.compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def flex_mask_mod(case: Case):
    if not case.causal:
        return None  # no block mask: every block is full

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < case.window)

    return sliding_window if case.window else causal


# --- report -------------------------------------------------------------------------------------


class Results:
    """The kernel rows of a run, looked up by (provider, mode, window, pass, config, N);
    a config is (D, H, Hkv)."""

    def __init__(self, rows: list[dict]):
        self.rows = [r for r in rows if r["kernel"] == "flash_attention"]
        self.index = {self.key(r): r for r in self.rows}

    @staticmethod
    def key(row: dict) -> tuple:
        config = (row["D"], row["H"], row["Hkv"])
        return row["provider"], row["mode"], row["window"], row["pass"], config, row["N"]

    def get(self, *key) -> dict | None:
        return self.index.get(key)

    def value(self, field: str, *key) -> float | None:
        row = self.get(*key)
        return row[field] if row and row["ms"] is not None else None

    def steps(self) -> list[str]:
        """The passes a target can compare: fwd, and bwd unless the run was forward only."""
        return [p for p in ("fwd", "bwd") if any(r["pass"] == p for r in self.rows)]

    def providers(self) -> list[str]:
        return [p for p in PROVIDERS if any(r["provider"] == p for r in self.rows)]

    def configs(self) -> list[tuple]:
        return sorted({(r["D"], r["H"], r["Hkv"]) for r in self.rows})

    def cases(self) -> list[tuple]:
        return sorted({(r["mode"], r["window"]) for r in self.rows}, key=mode_order)

    def batch(self, config: tuple, n: int) -> int:
        return next(r["B"] for r in self.rows if self.key(r)[4:] == (config, n))

    def seq_lens(self, config: tuple, mode: str, window: int | None = None) -> list[int]:
        return sorted({r["N"] for r in self.rows if (r["mode"], r["window"]) == (mode, window)
                       and (r["D"], r["H"], r["Hkv"]) == config})


def print_ceilings(rows: list[dict]) -> None:
    for row in rows:
        if row["kernel"] != "ceiling":
            continue
        value = f"{format_tflops(row['tflops'])} TFLOP/s" if "tflops" in row else f"{row['tbps']:.3g} TB/s"
        console.print(f"ceiling {row['provider']} ({row['shape']}): [bold]{value}[/]")


def print_tables(rows: list[dict], show_forward: bool = True, show_backward: bool = True) -> None:
    """One table per mode: a line per (D, heads, N), a column per provider, cells 'fwd / bwd'."""
    results = Results(rows)
    passes = [p for p, shown in (("fwd", show_forward), ("bwd", show_backward)) if shown]
    for mode, window in results.cases():
        title = f"{Case(mode, window).label}: TFLOP/s, {' / '.join(passes)}"
        table = Table(title=title, title_justify="left")
        for column in ("D", "heads", "N", "B", *results.providers()):
            table.add_column(column, justify="right")
        notes: list[str] = []
        for config in results.configs():
            for n in results.seq_lens(config, mode, window):
                cells = [
                    table_cell([results.get(p, mode, window, step, config, n) for step in passes], notes)
                    for p in results.providers()
                ]
                d, h, hkv = config
                table.add_row(str(d), f"{h}/{hkv}", str(n), str(results.batch(config, n)), *cells)
        if mode == "window":
            table.caption = "SDPA has no sliding window: its backends are not run here."
        console.print(table)
        for number, note in enumerate(notes, 1):
            console.print(f"  [{number}] {note}", style="dim", highlight=False, markup=False)


def print_first_calls(rows: list[dict]) -> None:
    """Seconds of each provider's first forward and first forward + backward per shape class:
    compile and autotuning (from a cold cache, only a fresh process's first run shows it)."""
    firsts = [r for r in rows if r.get("first_fwd_s") is not None and r.get("pass") == "fwd"]
    if not firsts:
        return
    table = Table(title="first call, s (compile + autotune): fwd / fwd+bwd", title_justify="left")
    for column in ("provider", "mode", "D", "heads", "N", "seconds"):
        table.add_column(column, justify="left" if column in ("provider", "mode") else "right")
    for r in firsts:
        both = r.get("first_fwd_bwd_s")
        seconds = f"{r['first_fwd_s']:.1f}" + ("" if both is None else f" / {both:.1f}")
        table.add_row(r["provider"], Case(r["mode"], r["window"]).label, str(r["D"]), f"{r['H']}/{r['Hkv']}",
                      str(r["N"]), seconds)
    console.print(table)


def table_cell(rows: list[dict | None], notes: list[str]) -> str:
    """'612 / 480'; an error becomes 'error [n]' with the message as note n under the table."""
    present = [r for r in rows if r is not None]
    if not present:
        return ""
    failed = next((r for r in present if r["ms"] is None), None)
    if failed:
        return f"[red]error \\[{note_number(notes, failed)}][/]"
    values = " / ".join(format_tflops(r["tflops"]) for r in present)
    if present[0]["error"]:  # timed, but its output disagrees with SDPA's
        return f"[red]{values} !\\[{note_number(notes, present[0])}][/]"
    return values


def note_number(notes: list[str], row: dict) -> int:
    note = f"{row['provider']}: {row['error']}"
    if note not in notes:
        notes.append(note)
    return notes.index(note) + 1


def print_targets(rows: list[dict]) -> None:
    """Issue 2's targets: ratios of two measurements of this run, a column per N.

    Each cell is 'fwd / bwd'; 'met' says whether every ratio of the line meets the target, and
    'wrong output' when ours failed its check against SDPA (its speed then means nothing).
    """
    results = Results(rows)
    steps = results.steps()
    seq_lens = sorted({r["N"] for r in results.rows})
    table = Table(title=f"targets (issue 2), ratios {' / '.join(steps)}", title_justify="left")
    for column in ("target", "D", "heads", "mode"):
        table.add_column(column)
    for n in seq_lens:
        table.add_column(seq_len_label(n), justify="right")
    table.add_column("met")
    for line in target_lines(results, steps):
        cells = [" / ".join(map(format_ratio, line.ratios[n])) if n in line.ratios else "" for n in seq_lens]
        d, h, hkv = line.config
        table.add_row(line.target, str(d), f"{h}/{hkv}", line.mode, *cells, line.verdict())
    console.print(table)


@dataclass
class TargetLine:
    target: str
    config: tuple  # (D, H, Hkv)
    mode: str
    ratios: dict[int, list[float | None]]  # N -> one ratio per pass
    met: Callable[[float], bool]
    ours: list[dict | None]  # our rows behind the ratios, to flag a wrong output

    def verdict(self) -> str:
        ratios = [r for per_n in self.ratios.values() for r in per_n]
        if any(row and row["error"] for row in self.ours):
            return "[red]wrong output[/]"
        if None in ratios:
            return "?"
        return "yes" if all(map(self.met, ratios)) else "[red]no[/]"


def target_lines(results: Results, steps: list[str]) -> list[TargetLine]:
    lines = []
    for peer in [p for p in ("sdpa-flash", "sdpa-cudnn") if p in results.providers()]:
        for config in results.configs():
            for mode in ("noncausal", "causal"):
                lens = results.seq_lens(config, mode)
                if lens:
                    speedups = {n: speedup(results, peer, (mode, None), config, n, steps) for n in lens}
                    ours = our_rows(results, [(mode, None)], config, lens, steps)
                    lines.append(TargetLine(f"ours / {peer} >= 1", config, mode, speedups, at_least(1), ours))

    for config in results.configs():
        windows = sorted({w for mode, w in results.cases() if w and results.seq_lens(config, mode, w)})
        if not windows:
            continue
        n = max(results.seq_lens(config, "window", windows[0]))  # the longest: 16k in a full run
        if "flex" in results.providers():
            for w in windows:
                speedups = {n: speedup(results, "flex", ("window", w), config, n, steps)}
                ours = our_rows(results, [("window", w)], config, [n], steps)
                target = "ours / flex >= 1.2"
                lines.append(TargetLine(target, config, f"W={w}", speedups, at_least(1.2), ours))
        # the smallest window's time over full causal attention's, same length
        smallest, causal = ("window", windows[0]), ("causal", None)
        fractions = {n: [ratio(results.value("ms", "ours", *smallest, step, config, n),
                               results.value("ms", "ours", *causal, step, config, n)) for step in steps]}
        ours = our_rows(results, [smallest, causal], config, [n], steps)
        target = "ours time, window / causal <= 1/8"
        lines.append(TargetLine(target, config, f"W={windows[0]}", fractions, at_most(1 / 8), ours))
    return lines


def speedup(results: Results, peer: str, case: tuple, config: tuple, n: int, steps: list[str]) -> list:
    """ours / peer in TFLOP/s, one per pass."""
    return [ratio(results.value("tflops", "ours", *case, step, config, n),
                  results.value("tflops", peer, *case, step, config, n)) for step in steps]


def our_rows(results: Results, cases: list[tuple], config: tuple, lens: list[int], steps: list[str]) -> list:
    return [results.get("ours", *case, step, config, n) for case in cases for step in steps for n in lens]


def at_least(goal: float) -> Callable[[float], bool]:
    return lambda r: r >= goal


def at_most(goal: float) -> Callable[[float], bool]:
    return lambda r: r <= goal


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def seq_len_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def format_tflops(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def mode_order(mode_window: tuple[str, int | None]) -> tuple[int, int]:
    mode, window = mode_window
    return MODES.index(mode), window or 0


def draw_plots(path: Path) -> None:
    try:
        from plot import plot_results

        for png in plot_results(path):
            console.print(f"plot: {png}")
    except Exception as exc:  # a missing matplotlib must not lose a finished run
        console.print(f"[yellow]no plot: {error_string(exc)}[/]")


if __name__ == "__main__":
    main()
