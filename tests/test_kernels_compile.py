"""The flash and paged-decode kernels compile for a Hopper GPU (sm_90), checked on a machine without one.

The CPU suite runs the kernels in Triton's interpreter, which accepts code the compiler refuses;
twice such code reached the H200 (tests/compile_kernels.py says how). This compiles every
compile-time option on and off, in a subprocess without TRITON_INTERPRET, with the installed
Triton (on the GPU image: 3.6; here: the version pip resolves).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Kernels only, no transformers: CI runs this file on one transformers release (see .ci/run).
pytestmark = pytest.mark.kernels

SCRIPT = Path(__file__).with_name("compile_kernels.py")


def test_flash_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=1200)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAILED"))]
    failed = [line for line in lines if line.startswith("FAILED")]
    assert not failed, "\n".join(failed)
    assert result.returncode == 0, result.stderr[-2000:]
    # 3 flash kernels x 6 variants, the document-bounds kernel; paged: 5 decode + 2 merge
    assert len(lines) == 18 + 1 + 7, result.stdout
