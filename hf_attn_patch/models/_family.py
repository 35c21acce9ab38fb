"""What the patch layer needs to know about one model family: one `Family` per family module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kernels import SUPPORTED_HEAD_DIMS

Undo = Callable[[], None]


@dataclass(frozen=True)
class Family:
    """One registry entry.

    name: how errors and docs call the family.
    model_classes: the family's PreTrainedModel bases; subclasses belong to the family too.
    attention_classes: the modules whose attention runs on the kernels once patched.
    wrapper_classes: other modules with "Attention" in their class name that only hold those.
    problem: why one attention module cannot be patched (None when it can).
    patch_module: per-instance change beyond the config switch (Falcon swaps `forward`);
        returns the function that undoes it. None for families that use transformers'
        attention interface, for which pointing the config at our implementation is the patch.
    """

    name: str
    model_classes: tuple[type, ...]
    attention_classes: tuple[type, ...]
    problem: Callable[[torch.nn.Module], str | None]
    wrapper_classes: tuple[type, ...] = field(default=())
    patch_module: Callable[[torch.nn.Module], Undo] | None = None


def head_dim_problem(module: torch.nn.Module, head_dim: int) -> str | None:
    """The kernels compile for a fixed set of head dims; say which ones when a module has another."""
    if head_dim in SUPPORTED_HEAD_DIMS:
        return None
    dims = ", ".join(str(d) for d in SUPPORTED_HEAD_DIMS)
    return f"{type(module).__name__} has head dim {head_dim}; the kernels support {dims}"
