"""The patch layer: `patch_model`, `unpatch_model`, `patched`, `is_patched`.

It knows the family registry (`hf_attn_patch.models.FAMILIES`) and nothing of the kernels. A
patch is two kinds of change, both recorded so that `unpatch_model` puts back exactly what was
there:

* every config the model's attention reads gets `_attn_implementation` = our implementation
  (transformers' runtime field; it is not written by `save_pretrained`), which moves Llama,
  Mistral and BERT onto our attention function and makes every family ask our mask entry for a
  2-D padding mask instead of building a (B, 1, Nq, Nk) one;
* families that do not use transformers' attention interface (Falcon) also swap `forward` on
  each attention module instance.

The whole model is checked before anything changes: a model with any attention module outside
the supported families, or one the kernels cannot run, raises and stays untouched.

What a patch changed is kept on the model itself, not in a registry beside it: the model given to
`patch_model` holds its record, each patched attention module a flag. So a copy of a patched
model (`copy.deepcopy`, pickle, `torch.save(model)`) is a patched model in every sense: its record
names its own configs and modules, `is_patched` sees its flags, `unpatch_model` restores it, and
the original is untouched by either.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import PreTrainedModel

from .cache.graphs import install_graphed_decode
from .models import ATTN_IMPLEMENTATION, FAMILIES, Family, register

__all__ = ["patch_model", "unpatch_model", "patched", "is_patched", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model has attention that hf_attn_patch cannot run; nothing was changed."""


def patch_model(model: torch.nn.Module, *, cuda_graphs: bool = False) -> torch.nn.Module:
    """Run the attention of `model` (Llama, Mistral, Falcon, BERT) on our kernels, in place.

    cuda_graphs: decode steps of `generate` over a `PagedKVCache` replay a CUDA graph captured
    on the first step of each batch size (hf_attn_patch/cache/graphs.py); every other call runs
    as without it. Off by default: a graph holds memory, and its first step pays the capture.

    Returns the model. Patching a patched model does nothing (beyond switching cuda_graphs on
    when asked). Raises UnsupportedModelError, with the model untouched, if any attention module
    in it belongs to no supported family or has a shape the kernels do not support.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_model() takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"patch_model(cuda_graphs=...) takes True or False, got {cuda_graphs!r}")
    if (record := _record_of(model)) is not None:
        if cuda_graphs:
            record.undos.append(install_graphed_decode(model))
        return model

    targets, configs = _plan(model)
    if not targets and not configs:
        return model  # everything in it is already patched, through a model inside or around it
    register()
    record = _Record()
    try:
        for config in configs:
            record.configs.append((config, config._attn_implementation_internal))
            config._attn_implementation_internal = ATTN_IMPLEMENTATION
        for family, module in targets:
            if family.patch_module is not None:
                record.undos.append(family.patch_module(module))
            setattr(module, _PATCHED, True)
            record.modules.append(module)
        if cuda_graphs:
            record.undos.append(install_graphed_decode(model))
    except BaseException:
        _restore(record)
        raise
    setattr(model, _RECORD, record)
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Put back exactly what `patch_model` changed in `model` (and in models patched inside it)."""
    roots = [module for module in model.modules() if _record_of(module) is not None]
    if not roots:
        if is_patched(model):
            raise ValueError(
                f"this {type(model).__name__} was patched as part of a larger model; "
                "call unpatch_model on the model that was given to patch_model"
            )
        return model
    for root in reversed(roots):
        record = _record_of(root)
        delattr(root, _RECORD)
        _restore(record)
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, *, cuda_graphs: bool = False) -> Iterator[torch.nn.Module]:
    """`with patched(model): ...` runs the block patched and restores the model after it.

    A model that was patched before the block stays patched after it.
    """
    already = is_patched(model)
    patch_model(model, cuda_graphs=cuda_graphs)
    try:
        yield model
    finally:
        if not already:
            unpatch_model(model)


def is_patched(model: torch.nn.Module) -> bool:
    """True when some attention module of `model` runs on our kernels."""
    return any(_is_patched_module(module) for module in model.modules())


# --- bookkeeping --------------------------------------------------------------------------------


# Attribute names on the modules themselves; plain attributes, so copies carry them and
# state_dict / save_pretrained never see them.
_RECORD = "_hf_attn_patch_record"  # on the model given to patch_model: its _Record
_PATCHED = "_hf_attn_patch_patched"  # on each attention module it patched: True


@dataclass
class _Record:
    """What one patch_model call changed, in order. Everything in it is picklable and refers to
    the model's own objects, so a deep copy or an unpickled copy of the model gets a record of
    its own configs and modules (families' undos are picklable callables, not closures)."""

    configs: list[tuple[object, str | None]] = field(default_factory=list)
    undos: list = field(default_factory=list)
    modules: list[torch.nn.Module] = field(default_factory=list)

    def __setstate__(self, state):
        # An unpickled patched model (torch.load in a new process) names our implementation in
        # its configs: make sure transformers knows it.
        self.__dict__.update(state)
        register()


def _record_of(module: torch.nn.Module) -> _Record | None:
    return module.__dict__.get(_RECORD)


def _is_patched_module(module: torch.nn.Module) -> bool:
    return module.__dict__.get(_PATCHED, False)


def _restore(record: _Record) -> None:
    for undo in reversed(record.undos):
        undo()
    for module in record.modules:
        module.__dict__.pop(_PATCHED, None)
    for config, previous in reversed(record.configs):
        config._attn_implementation_internal = previous


def _plan(model: torch.nn.Module) -> tuple[list[tuple[Family, torch.nn.Module]], list[object]]:
    """Attention modules to patch and configs to switch; raises if any part is unsupported."""
    targets, problems, configs = [], [], {}
    found = False
    for module in model.modules():
        family = _family_of(module, "attention_classes")
        if family is None:
            if _looks_like_attention(module) and _family_of(module, "wrapper_classes") is None:
                problems.append(f"{type(module).__name__} (no supported family)")
            continue
        found = True
        problem = family.problem(module)
        if problem is not None:
            problems.append(problem)
            continue
        if not _is_patched_module(module):
            targets.append((family, module))
        configs[id(module.config)] = module.config
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and _family_of(module, "model_classes") is not None:
            configs[id(module.config)] = module.config

    supported = ", ".join(family.name for family in FAMILIES.values())
    if problems:
        counted = sorted({p: problems.count(p) for p in problems}.items())
        listed = "; ".join(p if n == 1 else f"{p} x{n}" for p, n in counted)
        raise UnsupportedModelError(
            f"cannot patch {type(model).__name__}: {listed}. hf_attn_patch supports the attention "
            f"of {supported} models (and their subclasses). Nothing was changed."
        )
    if not found:
        raise UnsupportedModelError(
            f"cannot patch {type(model).__name__}: it has no attention module of a supported family "
            f"({supported}). Nothing was changed."
        )
    pending = [c for c in configs.values() if c._attn_implementation_internal != ATTN_IMPLEMENTATION]
    return targets, pending


def _family_of(module: torch.nn.Module, kind: str) -> Family | None:
    for family in FAMILIES.values():
        if isinstance(module, getattr(family, kind)):
            return family
    return None


def _looks_like_attention(module: torch.nn.Module) -> bool:
    return "Attention" in type(module).__name__ or isinstance(module, torch.nn.MultiheadAttention)
