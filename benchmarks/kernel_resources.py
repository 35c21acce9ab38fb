"""Registers, spills and shared memory of our flash kernels, compiled for a GPU without one.

A kernel that runs out of registers spills to local memory ("stack" below) and slows down;
whether a change adds or removes spills is known at compile time. So is the length of each loop
body that issues tensor-core products (one row's "loop instructions": SASS instructions per
iteration, in code order; the unmasked loop is the shortest), which shows a change's effect on
the work of an iteration without a GPU to time it. This compiles the forward,
dK/dV and dQ kernels exactly as `flash_attention` launches them (the arguments are built by
`_flash_triton.forward` / `backward` themselves; only the launch is replaced by Triton's
`warmup`), for each shipped config of each kernel, and reads the resource usage from the cubin
with the `cuobjdump` that ships in Triton's wheel. Without a CUDA device a stub driver stands in
and the target is given (`--arch`, default 90: H100 / H200); with one, its own target is used.

The figures are those of the installed Triton: the GPU image runs Triton 3.6, so install that
wheel (in a side environment if this one has another) for figures that match the GPU machine.
Not under TRITON_INTERPRET=1 (the kernels would be the interpreter's).

    python benchmarks/kernel_resources.py                        # D 128, N 16k, causal and not
    python benchmarks/kernel_resources.py --d 64 --n 1024 --modes causal
    python benchmarks/kernel_resources.py --modes window packed      # window 1024; packed documents
    python benchmarks/kernel_resources.py --configs first            # each kernel's first config only
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _common import RESULTS_DIR, environment, write_results  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 150)
SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}  # bytes a block may use, by arch
MODES = ("noncausal", "causal", "window", "packed")  # window: 1024 keys, causal; packed: documents, causal
WINDOW = 1024


class _StubDriver:
    """What `JITFunction.warmup` asks the driver for, on a machine with no GPU."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_all(d: int, n: int, heads: int, mode: str, first_config_only: bool = False) -> list[dict]:
    """One row per (kernel, config): resources of the binary `flash_attention` would launch."""
    from hf_attn_patch.kernels import _flash_triton

    q, k, v = (torch.zeros(1, heads, n, d, dtype=torch.bfloat16) for _ in range(3))
    calls = []  # (kernel, args, static) as _launch_tuned receives them

    def capture(kernel, grid, args, static, switch_key):
        calls.append((kernel, args, dict(static)))

    left = WINDOW - 1 if mode == "window" else -1
    right = -1 if mode == "noncausal" else 0
    doc_ids = torch.zeros(1, n, dtype=torch.int32) if mode == "packed" else None
    real_launch, real_bounds = _flash_triton._launch_tuned, _flash_triton.document_bounds
    _flash_triton._launch_tuned = capture
    # The document bounds come from a small kernel of their own: only their shape matters here.
    _flash_triton.document_bounds = lambda ids: None if ids is None else torch.zeros(*ids.shape, 2, dtype=torch.int32)
    try:
        out, lse = _flash_triton.forward(q, k, v, None, None, left, right, d**-0.5, doc_ids)
        delta = torch.zeros_like(lse)  # given, so that no row-delta kernel is launched
        _flash_triton.backward(q, q, k, v, q, lse, None, None, left, right, d**-0.5, doc_ids, delta=delta)
    finally:
        _flash_triton._launch_tuned, _flash_triton.document_bounds = real_launch, real_bounds
    blocks = {_flash_triton._fwd_kernel: ("fwd", _flash_triton._FWD_BLOCKS),
              _flash_triton._bwd_dkdv_kernel: ("dkdv", _flash_triton._DKDV_BLOCKS),
              _flash_triton._bwd_dq_kernel: ("dq", _flash_triton._DQ_BLOCKS)}
    rows = []
    for kernel, args, static in calls:
        name, configs = blocks[kernel]
        for block_m, block_n, warps, stages in configs[:1] if first_config_only else configs:
            row = dict(kernel=name, mode=mode, D=d, N=n, H=heads, config=f"{block_m}x{block_n} w{warps} s{stages}")
            try:
                compiled = kernel.fn.warmup(*args, grid=(1,), **static, BLOCK_M=block_m, BLOCK_N=block_n,
                                            num_warps=warps, num_stages=stages)
                row.update(resources(compiled))
            except Exception as exc:  # a config that does not compile is a row
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
    return rows


def resources(compiled) -> dict:
    """Registers, stack and local bytes per thread (cuobjdump), shared bytes, key loops, and the
    instruction count of each loop body that issues tensor-core products."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(cuobjdump), "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage[:200]}")
    registers, stack, _, local = (int(x) for x in found.groups())
    return dict(registers=registers, stack_bytes=stack, local_bytes=local, shared_bytes=compiled.metadata.shared,
                loops=compiled.asm["ttgir"].count("scf.for"), loop_instructions=matmul_loop_lengths(sass), error=None)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BACKWARD_BRANCH = re.compile(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)")


def matmul_loop_lengths(sass: str) -> list[int]:
    """Instructions in each loop body (a backward branch and the code up to it) that holds a
    tensor-core product (HGMMA on sm_90, HMMA before), in code order."""
    instructions = [(int(address, 16), text) for address, text in _SASS_LINE.findall(sass)]
    lengths = []
    for address, text in instructions:
        branch = _BACKWARD_BRANCH.search(text)
        target = int(branch.group(1), 16) if branch else address
        if target >= address:
            continue
        body = [t for a, t in instructions if target <= a <= address]
        if any("HGMMA" in t or "HMMA" in t for t in body):
            lengths.append(len(body))
    return lengths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[:2]))
    parser.add_argument("--arch", type=int, default=90, help="compute capability without a GPU (90: H100/H200)")
    parser.add_argument("--configs", choices=("all", "first"), default="all",
                        help="every shipped config of each kernel, or the first of each (faster)")
    parser.add_argument("--out", type=Path, help=f"results folder (default: a temporary one; e.g. {RESULTS_DIR})")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels, the interpreter runs them")
    arch = args.arch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    else:
        triton.runtime.driver.set_active(_StubDriver(arch))
    console.print(f"triton {triton.__version__}, sm_{arch}{' (no GPU: stub driver)' if not torch.cuda.is_available() else ''}")
    rows = []
    for mode in args.modes:
        rows += compile_all(args.d, args.n, args.heads, mode, first_config_only=args.configs == "first")
    limit = SHARED_LIMIT.get(arch)
    table = Table(title=f"resources per thread / per block, D {args.d}, N {args.n}, bf16, triton {triton.__version__}")
    for column in ("kernel", "mode", "config", "registers", "spill (stack B)", "shared B", "loops",
                   "loop instructions", "note"):
        table.add_column(column, justify="right")
    for row in rows:
        mode = row["mode"]
        if row["error"]:
            table.add_row(row["kernel"], mode, row["config"], "", "", "", "", "", row["error"])
            continue
        notes = []
        if row["stack_bytes"] or row["local_bytes"]:
            notes.append("spills")
        if limit and row["shared_bytes"] > limit:
            notes.append(f"shared > {limit}: pruned at launch")
        table.add_row(row["kernel"], mode, row["config"], str(row["registers"]), str(row["stack_bytes"]),
                      str(row["shared_bytes"]), str(row["loops"]),
                      " ".join(str(n) for n in row["loop_instructions"]), ", ".join(notes))
    console.print(table)
    env = dict(environment(), arch=arch, triton=triton.__version__)
    out = args.out or Path(tempfile.mkdtemp(prefix="kernel-resources-"))
    console.print(f"rows appended to {write_results([dict(row, **env) for row in rows], out, 'kernel-resources')}")


if __name__ == "__main__":
    main()
