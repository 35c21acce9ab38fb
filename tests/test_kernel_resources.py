"""benchmarks/kernel_resources.py reads loop lengths out of SASS text: which loops it counts."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# cuobjdump -sass's layout: /*address*/ instruction ; /* encoding */
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                          /* 0x00000a0000017a02 */
        /*0010*/                   LDGSTS.E.BYPASS.128 [R13], desc[UR34][R220.64] ; /* 0x0000000000000000 */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;    /* 0x0000000000000000 */
        /*0030*/              @!P2 BRA 0x10 ;                                      /* 0xffffffe80024a947 */
        /*0040*/                   FADD R1, R1, R2 ;                               /* 0x0000000000000000 */
        /*0050*/               @P0 BRA 0x40 ;                                      /* 0x0000000000000000 */
        /*0060*/                   BRA 0x80 ;                                      /* 0x0000000000000000 */
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;   /* 0x0000000000000000 */
        /*0080*/                   EXIT ;                                          /* 0x0000000000000000 */
"""


def test_counts_only_loops_that_issue_tensor_core_products(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # kernel_resources imports _common from there
    try:
        kernel_resources = importlib.import_module("kernel_resources")
        # The first loop (0x10-0x30, three instructions) holds an HGMMA; the second (0x40-0x50)
        # does not; the branch at 0x60 goes forward, so the HGMMA after it is in no loop.
        assert kernel_resources.matmul_loop_lengths(SASS) == [3]
    finally:  # the scripts' names must not stay importable (test_benchmark_scripts.py)
        for name in ("kernel_resources", "_common"):
            sys.modules.pop(name, None)
