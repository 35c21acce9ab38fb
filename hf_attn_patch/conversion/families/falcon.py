"""Falcon: one fused `query_key_value` projection per layer, in three row layouts.

Read from transformers' FalconAttention._split_heads (the layout is the checkpoint format, so it
holds for every transformers 5.x):

- grouped (`new_decoder_architecture=True`, Falcon-40B/180B/2): rows are `num_kv_heads` groups,
  each [its H/G query heads, one key head, one value head], head_dim rows per head.
- multi_query (`multi_query=True`, Falcon-7B): [all H query heads, one key, one value].
- multi_head (`multi_query=False`, e.g. Falcon-RW): per head [query, key, value] interleaved.

Targets: a grouped model keeps its layout with fewer groups; a multi-head model becomes
multi_query for one KV head, or grouped for G > 1. transformers' Falcon holds G > 1 KV heads
only with `new_decoder_architecture=True`, whose decoder layer runs attention and MLP in
parallel; with `num_ln_in_parallel_attn=1` that layer is the old parallel layer exactly (one
`input_layernorm` feeding both), so a parallel multi-head model converts losslessly apart from
the pooling. A sequential one (`parallel_attn=False`) has no grouped equivalent and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConversionError
from ..methods import KVHeads, PoolingMethod
from ..plan import (
    ConversionPlan,
    LoadTensor,
    check_layer_count,
    check_num_groups,
    config_int,
    expect_tensor,
    find_prefix,
)
from ..projections import check_pooled
from ..source import TensorInfo

GROUPED, MULTI_QUERY, MULTI_HEAD = "grouped", "multi_query", "multi_head"
_QKV_PATTERN = r"^(?P<prefix>.*?)h\.(?P<layer>\d+)\.self_attention\.query_key_value\.weight$"


def plan_falcon(
    config: dict, tensors: dict[str, TensorInfo], num_kv_heads: int, *, rewrite_attention: bool = False
) -> ConversionPlan:
    if rewrite_attention:
        raise ConversionError(
            "calibrated methods (which regroup heads and rewrite the query and output projections) "
            "are not supported for Falcon's fused query_key_value layouts; use method='mean'"
        )
    num_heads = config_int(config, "num_attention_heads")
    num_layers = config_int(config, "num_hidden_layers")
    hidden = config_int(config, "hidden_size")
    if hidden % num_heads:
        raise ConversionError(
            f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {num_heads}"
        )
    source = _source_layout(config, num_heads, hidden // num_heads)
    groups = check_num_groups(num_kv_heads, source.num_kv_heads, num_heads)
    target = _target_layout(config, source, groups)
    prefix = find_prefix(tensors, _QKV_PATTERN, "transformer.h.0.self_attention.query_key_value.weight")
    check_layer_count(tensors, _QKV_PATTERN, num_layers)

    layers = []
    for layer in range(num_layers):
        weight = f"{prefix}h.{layer}.self_attention.query_key_value.weight"
        bias = f"{prefix}h.{layer}.self_attention.query_key_value.bias"
        expect_tensor(tensors, weight, (source.rows, hidden), floating=True)
        has_bias = bool(config.get("bias")) or bias in tensors
        if has_bias:
            expect_tensor(tensors, bias, (source.rows,), floating=True)
        layers.append(FusedQKV(layer, weight, bias if has_bias else None, source, target, hidden))
    return ConversionPlan(
        family="falcon",
        layout=source.kind if source == target else f"{source.kind} -> {target.kind}",
        num_query_heads=num_heads,
        kv_heads_before=source.num_kv_heads,
        kv_heads_after=groups,
        head_dim=source.head_dim,
        new_config=_new_config(config, source, target),
        layers=tuple(layers),
    )


@dataclass(frozen=True)
class FalconLayout:
    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows -> query (H, D, ...), key and value (Hkv, D, ...), heads in query order."""
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if self.kind == GROUPED:
            grouped = fused.unflatten(0, (kv_heads, heads // kv_heads + 2, dim))
            return grouped[:, :-2].flatten(0, 1), grouped[:, -2], grouped[:, -1]
        if self.kind == MULTI_QUERY:
            stacked = fused.unflatten(0, (heads + 2, dim))
            return stacked[:heads], stacked[heads : heads + 1], stacked[heads + 1 :]
        interleaved = fused.unflatten(0, (heads, 3, dim))
        return interleaved[:, 0], interleaved[:, 1], interleaved[:, 2]

    def join(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The inverse of split."""
        if self.kind == GROUPED:
            per_group = query.unflatten(0, (self.num_kv_heads, self.num_heads // self.num_kv_heads))
            return torch.cat([per_group, key.unsqueeze(1), value.unsqueeze(1)], dim=1).flatten(0, 2)
        if self.kind == MULTI_QUERY:
            return torch.cat([query, key, value]).flatten(0, 1)
        return torch.stack([query, key, value], dim=1).flatten(0, 2)


@dataclass(frozen=True)
class FusedQKV:
    """One layer's query_key_value weight (and bias), rewritten from one layout to another."""

    layer: int
    weight: str
    bias: str | None
    source: FalconLayout
    target: FalconLayout
    hidden_size: int

    @property
    def names(self) -> tuple[str, ...]:
        return (self.weight, self.bias) if self.bias else (self.weight,)

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {self.weight: (self.target.rows, self.hidden_size)}
        if self.bias:
            shapes[self.bias] = (self.target.rows,)
        return shapes

    def rewrite(self, load: LoadTensor, method: PoolingMethod) -> dict[str, torch.Tensor]:
        query, key, value = self.source.split(load(self.weight))
        query_bias = key_bias = value_bias = None
        if self.bias:
            query_bias, key_bias, value_bias = self.source.split(load(self.bias))
        heads = KVHeads(key, value, key_bias, value_bias)
        groups = self.target.num_kv_heads
        pooled = check_pooled(method(heads, groups, layer=self.layer), heads, groups)
        out = {self.weight: self.target.join(query, pooled.key, pooled.value)}
        if self.bias:
            out[self.bias] = self.target.join(query_bias, pooled.key_bias, pooled.value_bias)
        return out


def _source_layout(config: dict, num_heads: int, head_dim: int) -> FalconLayout:
    # FalconConfig's defaults: new_decoder_architecture=False, multi_query=True.
    if config.get("new_decoder_architecture", False):
        kv_heads = config_int(config, "num_kv_heads", default=num_heads)
        if num_heads % kv_heads:
            raise ConversionError(
                f"config.json: num_kv_heads {kv_heads} does not divide num_attention_heads {num_heads}"
            )
        return FalconLayout(GROUPED, num_heads, kv_heads, head_dim)
    if config.get("multi_query", True):
        return FalconLayout(MULTI_QUERY, num_heads, 1, head_dim)
    return FalconLayout(MULTI_HEAD, num_heads, num_heads, head_dim)


def _target_layout(config: dict, source: FalconLayout, groups: int) -> FalconLayout:
    if groups == source.num_kv_heads:
        return source
    if source.kind == GROUPED:
        return FalconLayout(GROUPED, source.num_heads, groups, source.head_dim)
    if groups == 1:
        return FalconLayout(MULTI_QUERY, source.num_heads, 1, source.head_dim)
    if not config.get("parallel_attn", True):
        raise ConversionError(
            f"this Falcon checkpoint is multi-head with parallel_attn=False (attention, then MLP, "
            f"as in Falcon-RW); transformers' Falcon can hold {groups} KV heads only with "
            "new_decoder_architecture=True, whose decoder layer always runs attention and MLP in "
            "parallel, so the converted model would compute something else. Convert to one KV "
            "head instead (--kv-heads 1, multi-query), which this layout supports"
        )
    return FalconLayout(GROUPED, source.num_heads, groups, source.head_dim)


def _new_config(config: dict, source: FalconLayout, target: FalconLayout) -> dict:
    new = {**config, "num_kv_heads": target.num_kv_heads}
    if target.kind == MULTI_QUERY:
        new["multi_query"] = True
    if target.kind == GROUPED and source.kind != GROUPED:
        # One shared layernorm, as the parallel multi-head layer had (see the module docstring).
        new.update(new_decoder_architecture=True, num_ln_in_parallel_attn=1, parallel_attn=True)
    return new
