"""Compile the flash and paged-decode kernels for a Hopper GPU on a machine without one (run by
test_kernels_compile.py).

Triton's interpreter, which runs the kernels in the CPU tests, accepts code that the compiler
refuses (a helper whose returns differ in shape, a None carried in an argument tuple, code after
an early return that only the interpreter skips). Compiling to sm_90 needs no GPU: this runs the
same front end, optimiser and ptxas as a launch on the H200 would, for a set of variants that
together switch every compile-time option on and off. Prints one line per variant; exit 1 if any
failed. Must run with TRITON_INTERPRET unset (the kernels are defined at import).

    python tests/compile_kernels.py [--all]
"""

from __future__ import annotations

import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
    sys.exit("run with TRITON_INTERPRET unset: the kernels must be defined for the compiler")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_attn_patch.kernels import _flash_triton, _paged_triton  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")
_FLOAT_SCALARS = {"qk_scale", "scale", "sm_scale", "scale_log2"}
_FLOAT32_TENSORS = {"Lse", "Delta", "Slopes", "SinkLogits",
                    "Alibi_slopes", "Sink_logits", "Part_max", "Part_sum", "Part_out"}  # paged decode
_INT_TENSORS = {"Mask": "*i8", "Bounds": "*i32", "Docs": "*i32", "Ids": "*i32", "Block_table": "*i32", "Seq_lens": "*i32"}


def _kernel(name: str):
    """The jit function behind a kernel name of either module (through the autotuner)."""
    fn = getattr(_flash_triton, name, None) or getattr(_paged_triton, name)
    return fn if isinstance(fn, triton.runtime.JITFunction) else fn.fn


def compile_variant(kernel_name: str, options: dict, dtype: str = "bf16") -> None:
    """Compile one kernel for sm_90 with these compile-time options (absent tensors are None)."""
    fn = _kernel(kernel_name)
    # An optional tensor is None when its kernel has the switch for it and the switch is off.
    switches = {"Mask": "HAS_PADDING", "Bounds": "HAS_PADDING", "Slopes": "HAS_ALIBI", "Docs": "HAS_DOCS",
                "SinkLogits": "HAS_SINK_LOGITS"}
    absent = {name: switch in fn.arg_names and not options.get(switch) for name, switch in switches.items()}
    signature, constexprs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in options or absent.get(name):
            signature[name] = "constexpr"
            constexprs[(index,)] = None if absent.get(name) else options[name]
        elif name in _INT_TENSORS:
            signature[name] = _INT_TENSORS[name]
        elif name in _FLOAT32_TENSORS:
            signature[name] = "*fp32"
        elif name[0].isupper() or (name[0] == "d" and name[1:2].isupper()):  # Q, Out, dOut, dQ, ...
            signature[name] = f"*{dtype}"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=HOPPER)


def variants(everything: bool):
    """(kernel, options, dtype): each switch on and off at least once, in a few combinations."""
    switches = ("HAS_LEFT", "HAS_RIGHT", "HAS_PADDING", "HAS_ALIBI", "HAS_DOCS", "HAS_SINKS", "HAS_SINK_LOGITS")
    if everything:
        combos = [dict(zip(switches, bits)) for bits in itertools.product((False, True), repeat=len(switches))]
    else:
        off = dict.fromkeys(switches, False)
        combos = [off, dict.fromkeys(switches, True),
                  {**off, "HAS_RIGHT": True, "HAS_DOCS": True, "HAS_SINK_LOGITS": True},
                  {**off, "HAS_LEFT": True, "HAS_PADDING": True},
                  # a causal sliding window with sinks (StreamingLLM, gpt-oss)
                  {**off, "HAS_LEFT": True, "HAS_RIGHT": True, "HAS_SINKS": True, "HAS_SINK_LOGITS": True}]
    bf16 = (128, 128, 64, 64, "bf16", "tf32")
    fp32 = (80, 128, 16, 64, "fp32", "ieee")  # true float32 dots, a head dim padded to 128, decode tiles
    shaped = [(combo, bf16) for combo in combos]
    shaped += [(combo, fp32) for combo in combos] if everything else [(dict.fromkeys(switches, True), fp32)]
    for kernel in KERNELS:
        for combo, (head_dim, block_d, block_m, block_n, dtype, precision) in shaped:
            options = dict(combo, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                           DOT_PRECISION=precision)
            yield kernel, options, dtype
    yield "_document_bounds_kernel", dict(BLOCK=1024), "bf16"  # packed rows' bounds (scans)
    yield from paged_variants(everything)


def paged_variants(everything: bool):
    """The paged decode kernels: one partition or several (+ merge), ALiBi, sinks, sink logits."""
    switches = ("SINGLE_PARTITION", "HAS_ALIBI", "HAS_SINKS", "HAS_SINK_LOGITS")
    off = dict.fromkeys(switches, False)
    if everything:
        combos = [dict(zip(switches, bits)) for bits in itertools.product((False, True), repeat=len(switches))]
    else:
        combos = [{**off, "SINGLE_PARTITION": True}, dict.fromkeys(switches, True),
                  {**off, "HAS_SINKS": True, "HAS_SINK_LOGITS": True}, {**off, "HAS_ALIBI": True}]
    shape = dict(GROUP=4, GROUP_ROWS=16, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_N=64)
    for combo in combos:
        yield "_decode_partition_kernel", dict(combo, IEEE_DOT=False, **shape), "bf16"
    fp32 = dict(GROUP=8, GROUP_ROWS=16, HEAD_DIM=80, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_N=64)
    yield "_decode_partition_kernel", dict(dict.fromkeys(switches, True), IEEE_DOT=True, **fp32), "fp32"
    merges = itertools.product((False, True), repeat=2) if everything else ((False, False), (True, True))
    for sinks, logits in merges:
        yield "_merge_partitions_kernel", dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_P=32, HAS_SINKS=sinks,
                                               HAS_SINK_LOGITS=logits), "bf16"


def main(argv: list[str]) -> int:
    failed = 0
    for kernel, options, dtype in variants("--all" in argv):
        fn = _kernel(kernel)
        options = {k: v for k, v in options.items() if k in fn.arg_names}
        label = f"{kernel} {dtype} " + " ".join(f"{k}={v}" for k, v in options.items())
        start = time.perf_counter()
        try:
            compile_variant(kernel, options, dtype)
            print(f"ok     {label} ({time.perf_counter() - start:.1f} s)", flush=True)
        except Exception as error:  # report every variant, then fail
            failed += 1
            lines = str(error).strip().splitlines()
            print(f"FAILED {label}: {type(error).__name__}: {' | '.join(lines[-4:])}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
