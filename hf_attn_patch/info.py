"""`hf-attn-patch info`: what a bug report needs, in one paste.

Versions of everything we sit on, the GPU (or why the kernels run in Triton's interpreter), the
transformers range we test, and the families we patch.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

__all__ = ["collect_info", "format_info"]

_PACKAGES = ("torch", "triton", "transformers", "accelerate", "safetensors")


def collect_info() -> dict[str, str]:
    """Name -> value, in the order a report shows them. Never raises for a missing piece."""
    from . import __version__
    from ._compat import TESTED_TRANSFORMERS, transformers_in_tested_range

    info = {"hf-attn-patch": __version__, "python": f"{platform.python_version()} ({sys.executable})",
            "platform": platform.platform()}
    for name in _PACKAGES:
        info[name] = _version(name)
    info.update(_device())
    tested = "yes" if transformers_in_tested_range() else "NO: expect breakage, please report it"
    info["tested transformers"] = f"{TESTED_TRANSFORMERS} (installed one in range: {tested})"
    info["families"] = _families()
    return info


def format_info(info: dict[str, str] | None = None) -> str:
    info = collect_info() if info is None else info
    width = max(len(name) for name in info)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in info.items())


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _device() -> dict[str, str]:
    try:
        import torch
    except ImportError:
        return {"CUDA": "unknown (torch is not installed)", "kernels run": "nowhere (torch is not installed)"}
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        gpu = f"{torch.cuda.device_count()} x {', '.join(names)}"
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        cuda = f"{torch.version.cuda} (compute capability {capability})"
        runs = "in Triton's interpreter (TRITON_INTERPRET=1)" if interpreted else "compiled by Triton on the GPU"
    else:
        gpu = "none"
        cuda = f"{torch.version.cuda} (no GPU visible)" if torch.version.cuda else "none (CPU build of torch)"
        runs = ("in Triton's interpreter (TRITON_INTERPRET=1): correct, slow" if interpreted
                else "nowhere: no GPU; set TRITON_INTERPRET=1 to run them in Triton's interpreter")
    return {"CUDA": cuda, "GPU": gpu, "kernels run": runs}


def _families() -> str:
    try:
        from .models import FAMILIES
    except Exception as error:  # a broken transformers install is exactly what a report is for
        return f"unavailable ({type(error).__name__}: {error})"
    return ", ".join(family.name for family in FAMILIES.values())
