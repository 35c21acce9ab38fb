"""What a conversion will do, decided from config and headers alone, before anything is written.

A family turns (config, tensor headers, num_kv_heads) into a `ConversionPlan`: the new config
and one `LayerRewrite` per layer. A rewrite owns a few source tensors (the layer's key/value
projections, or Falcon's fused query_key_value) and writes tensors of the same names; every
other tensor is copied byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .errors import ConversionError
from .methods import PoolingMethod
from .source import FLOAT_DTYPES, TensorInfo

LoadTensor = Callable[[str], torch.Tensor]


class LayerRewrite(Protocol):
    layer: int

    @property
    def names(self) -> tuple[str, ...]: ...

    def output_shapes(self) -> dict[str, tuple[int, ...]]: ...

    def rewrite(self, load: LoadTensor, method: PoolingMethod) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class ConversionPlan:
    family: str
    layout: str
    num_query_heads: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int
    new_config: dict
    layers: tuple[LayerRewrite, ...]
    # False for GQA-BERT: stock transformers cannot build it, the patch layer loads it.
    stock_loadable: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    def config_changes(self, old_config: dict) -> dict[str, list]:
        keys = sorted(set(old_config) | set(self.new_config))
        return {
            key: [old_config.get(key), self.new_config.get(key)]
            for key in keys
            if old_config.get(key) != self.new_config.get(key)
        }

    def owners(self) -> dict[str, LayerRewrite]:
        """Tensor name -> the rewrite that owns it."""
        return {name: layer for layer in self.layers for name in layer.names}


def check_num_groups(num_kv_heads: object, current: int, num_query_heads: int) -> int:
    """G > 0, G <= the current KV heads and G divides them (so new groups merge whole old ones)."""
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int):
        raise ConversionError(f"num_kv_heads must be an int, got {num_kv_heads!r}")
    choices = [g for g in range(1, current + 1) if current % g == 0]
    if num_kv_heads <= 0 or num_kv_heads > current or current % num_kv_heads:
        raise ConversionError(
            f"cannot convert {current} KV heads ({num_query_heads} query heads) to {num_kv_heads}: "
            f"the new count must be positive and divide the current one so that each new group "
            f"merges whole groups; choose one of {choices}"
        )
    return num_kv_heads


def config_int(config: dict, key: str, default: int | None = None) -> int:
    """A positive int from config.json; `default` when the key is absent or null."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    return value


def find_prefix(tensors: dict[str, TensorInfo], pattern: str, example: str) -> str:
    """The name prefix in front of the layer stack (e.g. 'model.'), from names matching pattern.

    `pattern` must have a `prefix` group; exactly one prefix may occur.
    """
    compiled = re.compile(pattern)
    prefixes = {match["prefix"] for name in tensors if (match := compiled.match(name))}
    if not prefixes:
        raise ConversionError(
            f"found no tensor named like {example!r}; the weights do not match the family that "
            "config.json's model_type names"
        )
    if len(prefixes) > 1:
        raise ConversionError(
            f"the checkpoint holds several layer stacks ({sorted(prefixes)}); convert one model at a time"
        )
    return prefixes.pop()


def check_layer_count(tensors: dict[str, TensorInfo], pattern: str, num_layers: int) -> None:
    compiled = re.compile(pattern)
    found = {int(match["layer"]) for name in tensors if (match := compiled.match(name))}
    extra = sorted(found - set(range(num_layers)))
    if extra:
        raise ConversionError(
            f"config.json says {num_layers} layers but the weights hold layer {extra[0]}; config and "
            "weights disagree"
        )


def expect_tensor(
    tensors: dict[str, TensorInfo], name: str, shape: tuple[int, ...], *, floating: bool = False
) -> None:
    info = tensors.get(name)
    if info is None:
        raise ConversionError(f"tensor {name!r} is missing; the checkpoint is incomplete")
    if info.shape != shape:
        raise ConversionError(
            f"tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} from config.json; "
            "config and weights disagree"
        )
    if floating and info.dtype not in FLOAT_DTYPES:
        raise ConversionError(
            f"tensor {name!r} is {info.dtype}; only unquantized float weights "
            f"({', '.join(FLOAT_DTYPES)}) can be pooled"
        )
