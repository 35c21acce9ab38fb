"""Do the shipped kernel configs leave speed on the table? Autotune over the shipped candidates,
then over a wider grid, on the shapes issues 14 and 15 measure, and compare (GPU only).

    python benchmarks/tune_sweep.py                 # packed 16k, causal and non-causal D128 16k
    python benchmarks/tune_sweep.py --cases packed  # one case
    python benchmarks/tune_sweep.py --candidates shipped backward   # narrow query tiles for dK/dV

For each candidate set and case: the seconds the first call took (tuning and compiling every
candidate of the forward and of both backward kernels), the forward and forward + backward time
after it (median, ms), the configs the autotuner chose, and every candidate's own time per kernel
(the autotuner's median), so a kernel's configs can be compared one by one. The shipped lists
(`_FWD_BLOCKS`, `_DKDV_BLOCKS`, `_DQ_BLOCKS` in hf_attn_patch/kernels/_flash_triton.py) came from
an H100 sweep; this says whether the GPU at hand prefers configs outside them. Rows are appended
to `<out>/tune-sweep-<date>-<device>.json`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _common import RESULTS_DIR, do_bench_median, environment, free_memory, write_results  # noqa: E402
from packed import doc_ids_of, document_lengths  # noqa: E402

from hf_attn_patch.kernels import _flash_triton, flash_attention  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages); configs the device cannot hold are pruned at launch.
WIDE = list(itertools.product((64, 128), (64, 128), (4, 8), (2, 3)))
# Smaller tiles on the side the backward kernels stream (dK/dV: query rows; dQ: key rows), which
# the offline compile (kernel_resources.py) shows free the registers the shipped ones spill.
BACKWARD = {
    "dkdv": [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3), (32, 128, 8, 4),
             (16, 128, 8, 3), (16, 128, 8, 4), (64, 64, 8, 3), (32, 64, 4, 3)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 4), (64, 64, 8, 3),
           (64, 64, 4, 3), (128, 128, 8, 2)],
}
CANDIDATES = {"shipped": None, "wide": {"fwd": WIDE, "dkdv": WIDE, "dq": WIDE}, "backward": BACKWARD}
CASES = ("packed", "causal", "non-causal")

console = Console(width=None if sys.stdout.isatty() else 150)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=["shipped", "wide"])
    parser.add_argument("--tokens", type=int, default=16 * 1024)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    env = environment()
    console.print(f"[bold]{env['device']}[/]  torch {env['torch']}  triton {env['triton']}")
    rows = []
    for candidates in args.candidates:
        _flash_triton.set_autotuning(True, CANDIDATES[candidates])
        for case in args.cases:
            row = dict(measure_case(case, args.tokens), candidates=candidates, **env)
            console.print(row)
            path = write_results([row], args.out, "tune-sweep")  # row by row: a run cut short keeps them
            rows.append(row)
            free_memory()
    print_table(rows)
    print_config_timings(rows)
    console.print(f"rows appended to {path}")


def measure_case(case: str, tokens: int) -> dict:
    torch.manual_seed(0)
    heads, head_dim = 16, 128
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    options = dict(causal=case != "non-causal")
    if case == "packed":
        options["doc_ids"] = doc_ids_of(document_lengths(tokens, 128, 2048, 0), q.device)

    def step():
        flash_attention(q, k, v, **options).backward(grad)
        q.grad = k.grad = v.grad = None

    names = {_flash_triton._fwd_kernel: "fwd", _flash_triton._bwd_dkdv_kernel: "dkdv",
             _flash_triton._bwd_dq_kernel: "dq"}
    for kernel in names:
        kernel.configs_timings = None  # the autotuner sets it when it tunes
    before = set(_flash_triton._CHOSEN_CONFIGS)
    torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - started
    timings = {name: {_short({**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}):
                      (ms[0] if isinstance(ms, (list, tuple)) else ms)
                      for config, ms in (kernel.configs_timings or {}).items()}
               for kernel, name in names.items()}
    chosen = {names[key[0]]: _short(config) for key, config in _flash_triton._CHOSEN_CONFIGS.items()
              if key not in before}
    with torch.no_grad():
        fwd_ms = do_bench_median(lambda: flash_attention(q, k, v, **options))
    return dict(case=case, tokens=tokens, H=heads, D=head_dim, first_call_s=first_call_s, fwd_ms=fwd_ms,
                fwd_bwd_ms=do_bench_median(step), chosen=chosen, config_ms=timings)


def _short(config: dict) -> str:
    return f"{config['BLOCK_M']}x{config['BLOCK_N']} w{config['num_warps']} s{config['num_stages']}"


def print_table(rows: list[dict]) -> None:
    table = Table(title="autotuning over the shipped configs vs a wider grid (bf16, H16, D128)")
    for column in ("case", "candidates", "first call s", "fwd ms", "fwd+bwd ms", "chosen (fwd / dkdv / dq)"):
        table.add_column(column)
    for row in rows:
        chosen = " / ".join(row["chosen"].get(name, "-") for name in ("fwd", "dkdv", "dq"))
        table.add_row(row["case"], row["candidates"], f"{row['first_call_s']:.1f}", f"{row['fwd_ms']:.3f}",
                      f"{row['fwd_bwd_ms']:.3f}", chosen)
    console.print(table)


def print_config_timings(rows: list[dict]) -> None:
    table = Table(title="each candidate's own time, per kernel (autotuner's median, ms; ratio to the best)")
    for column in ("case", "candidates", "kernel", "configs, fastest first"):
        table.add_column(column)
    for row in rows:
        for kernel, timings in row["config_ms"].items():
            if not timings:
                continue
            best = min(timings.values())
            ordered = sorted(timings.items(), key=lambda item: item[1])
            table.add_row(row["case"], row["candidates"], kernel,
                          ", ".join(f"{config} {ms:.3f} ({ms / best:.2f})" for config, ms in ordered))
    console.print(table)


if __name__ == "__main__":
    main()
