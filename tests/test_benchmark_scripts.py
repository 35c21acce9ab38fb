"""The benchmark scripts run with `benchmarks/` first on sys.path (that is how they import
`_common`), so a script named like an installed module replaces it for everything the script
imports. `benchmarks/kernels.py` did that to the hub `kernels` package, which transformers 5.25
imports: every benchmark that loads transformers failed with an ImportError there (session 9)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_no_benchmark_script_takes_an_installed_modules_name():
    assert str(BENCHMARKS) not in sys.path
    names = sorted(path.stem for path in BENCHMARKS.glob("*.py"))
    assert "generate" in names  # the folder is where we think
    shadowing = [name for name in names if name in sys.builtin_module_names or importlib.util.find_spec(name)]
    assert shadowing == [], f"rename these benchmark scripts: {shadowing}"
