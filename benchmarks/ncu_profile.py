"""Nsight Compute profile of our flash kernels beside the peers': why a ratio is what it is.

One forward and one backward per provider and case, each kernel profiled with `ncu --set full`
after a warm-up (autotuning and compilation happen outside the profiled range), then a table of
the figures that explain a kernel's speed: duration, tensor-core (GMMA) pipe activity, SM and
memory throughput, registers, shared memory, occupancy, and the warp stall reasons that dominate.
`--summarise FILE.csv` redraws the table from a saved raw CSV.

    python benchmarks/ncu_profile.py                     # needs a CUDA GPU and `ncu` on PATH
    python benchmarks/ncu_profile.py --cases noncausal packed --out benchmarks/results

Cases (bf16, D = 128, H = 16, B x N = 16k): `noncausal` and `causal` at N = 16k, ours against SDPA
cuDNN (issue 14's peer); `packed`: documents 128-2048 long in one 16k row, causal, ours against
FlexAttention with a document block mask (issue 15's peer). Writes `ncu-<date>-<device>.json`
(the table) and the raw per-kernel metrics as `.csv` next to it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from _common import RESULTS_DIR, environment, results_path

CASES = ("noncausal", "causal", "packed")
TOKENS, HEADS, HEAD_DIM = 16 * 1024, 16, 128

# Raw ncu metric names (ncu 2025.3 on sm_90) per table column; one a GPU lacks stays empty.
COLUMNS = {
    "us": "gpu__time_duration.sum",
    "grid": "launch__grid_size",
    "block": "launch__block_size",
    "regs": "launch__registers_per_thread",
    "smem KiB": "launch__shared_mem_per_block_dynamic",
    "occupancy %": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "tensor pipe %": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "FMA pipe %": "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    "ALU pipe %": "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
    "XU (exp2) %": "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
    "issue %": "sm__issue_active.avg.pct_of_peak_sustained_elapsed",
    "SM %": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "DRAM %": "dram__cycles_active.avg.pct_of_peak_sustained_elapsed",
}
MARKER = "ncu_profile call: "
# Attention kernels by name: ours, cuDNN's, Flex's (Triton templates), FlashAttention's.
KERNELS_OF_INTEREST = ("_fwd_kernel", "_bwd_", "cudnn", "sdpa", "flex_attention", "flash")
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return profiled_calls(args.cases, args.providers)
    if args.summarise:
        saved = json.loads(args.summarise.with_suffix(".json").read_text())
        rows = summarise(args.summarise.read_text(), saved["calls"])
        print_table(rows)
        args.summarise.with_suffix(".json").write_text(json.dumps({**saved, "metrics": COLUMNS, "rows": rows},
                                                                  indent=1))
        return 0
    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu (Nsight Compute) is not on PATH", file=sys.stderr)
        return 2
    env = environment()
    path = results_path(args.out, "ncu")
    args.out.mkdir(parents=True, exist_ok=True)
    command = [ncu, "--profile-from-start", "off", "--set", "full", "--page", "raw", "--csv",
               sys.executable, __file__, "--child", "--cases", *args.cases, "--providers", *args.providers]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    raw = done.stdout
    path.with_suffix(".csv").write_text(raw)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
        return done.returncode
    labels = [line[len(MARKER):] for line in done.stderr.splitlines() if line.startswith(MARKER)]
    rows = summarise(raw, labels)
    print_table(rows)
    path.write_text(json.dumps({**env, "calls": labels, "metrics": COLUMNS, "rows": rows}, indent=1))
    print(f"results: {path} (raw metrics: {path.with_suffix('.csv')})")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--providers", nargs="+", default=["ours", "sdpa-cudnn", "flex"],
                        help="ours, sdpa-cudnn (not for packed), flex (packed only)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--summarise", type=Path, help="redraw the table of a saved raw .csv (its .json beside it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- the profiled process -----------------------------------------------------------------------


def profiled_calls(cases, providers) -> int:
    """Warm every (case, provider) up, then run each once inside the profiled range, each call
    after a marker kernel (see `marker`)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    torch.manual_seed(0)
    calls = []
    for case in cases:
        q, k, v = (torch.randn(1, HEADS, TOKENS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        for provider in providers:
            built = build(case, provider, TOKENS)
            if built is None:
                continue
            context, attention = built
            with context():
                for _ in range(2):  # compile, tune, warm
                    torch.autograd.grad(attention(q, k, v), (q, k, v), grad)
            calls.append((f"{case}/{provider}", context, attention, q, k, v, grad))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for label, context, attention, q, k, v, grad in calls:
        with context():
            marker(label)
            torch.autograd.grad(attention(q, k, v), (q, k, v), grad)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


def marker(label: str) -> None:
    """A short spin kernel (`spin_kernel`, used by nothing else here) before each profiled call:
    the summary labels the kernels after the n-th one with the n-th label printed here."""
    import torch

    torch.cuda._sleep(1000)
    print(f"{MARKER}{label}", file=sys.stderr, flush=True)


def build(case: str, provider: str, n: int, device: str = "cuda"):
    """(context, attention) of `provider` for `case`, built by the benchmarks that time them
    (packed.py for documents, kernel_speed.py otherwise); None where the provider has no such case."""
    import contextlib

    import torch

    if case == "packed":
        if provider not in ("ours", "flex"):
            return None
        from packed import build as packed_attention, doc_ids_of, document_lengths

        lengths = document_lengths(n, 128, 2048, seed=0)
        attention = packed_attention(provider, doc_ids_of(lengths, device), lengths, n, torch.device(device))
        return contextlib.nullcontext, attention
    if provider not in ("ours", "sdpa-cudnn"):
        return None
    from kernel_speed import Case, Shape, make_provider

    peer = make_provider(provider, Shape(B=1, H=HEADS, Hkv=HEADS, N=n, D=HEAD_DIM), torch.device(device))
    return peer.context, peer.build(Case(case))


# --- the report ---------------------------------------------------------------------------------


def summarise(raw: str, labels: list[str]) -> list[dict]:
    """One row per profiled kernel, labelled with the call it belongs to (after its marker)."""
    lines = [line for line in raw.splitlines() if line.startswith('"')]
    records = list(csv.reader(io.StringIO("\n".join(lines))))
    if len(records) < 3:
        return []
    header, calls, out = records[0], iter(labels), []
    label = "?"
    for record in records[2:]:  # records[1] holds the units
        value = dict(zip(header, record))
        name = value.get("Kernel Name", "")
        if "spin_kernel" in name:
            label = next(calls, "?")
            continue
        if not any(part in name for part in KERNELS_OF_INTEREST):
            continue  # torch's own small kernels around a call (fills, casts, the packed ids' scans)
        row = {"call": label, "kernel": _short(name)}
        for column, metric in COLUMNS.items():
            number = _number(value.get(metric))
            if number is not None and column == "us":
                number /= 1e3  # ns
            if number is not None and column == "smem KiB":
                number /= 1024
            row[column] = number
        stalls = {STALL.match(k).group(1): _number(v) for k, v in value.items() if STALL.match(k)}
        top = sorted(((v, k) for k, v in stalls.items() if v), reverse=True)[:3]
        row["top stalls (cycles/issue)"] = ", ".join(f"{k} {v:.2f}" for v, k in top)
        out.append(row)
    return out


def _number(text):
    if text is None:
        return None
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return None


def _short(name: str) -> str:
    return name if len(name) <= 60 else name[:57] + "..."


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Nsight Compute, one forward + backward per call (bf16, D=128, H=16, 16k tokens)")
    columns = ["call", "kernel", *COLUMNS, "top stalls (cycles/issue)"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(f"{row[c]:.1f}" if isinstance(row.get(c), float) else str(row.get(c) or "-") for c in columns))
    Console(width=250).print(table)


if __name__ == "__main__":
    raise SystemExit(main())
