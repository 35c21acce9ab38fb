"""Separate key and value projections (Llama, Mistral, BERT): heads stacked along the rows.

For a calibrated method the rewrite also owns the layer's query projection (weight and bias) and
the output projection's weight, whose columns are per query head; they keep their shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConversionError
from .methods import AttentionHeads, KVHeads, PoolingMethod
from .plan import LoadTensor


@dataclass(frozen=True)
class SeparateKV:
    """One layer's `key`/`value` weights (heads * head_dim, hidden) and optional biases."""

    layer: int
    key: str
    value: str
    key_bias: str | None
    value_bias: str | None
    head_dim: int
    hidden_size: int
    num_groups: int
    # Set only for calibrated methods, which rewrite the query and output projections too.
    query: str | None = None
    query_bias: str | None = None
    output: str | None = None
    num_query_heads: int = 0
    rotary: bool = False

    @property
    def kv_names(self) -> tuple[str, ...]:
        return tuple(name for name in (self.key, self.value, self.key_bias, self.value_bias) if name)

    @property
    def names(self) -> tuple[str, ...]:
        names = (self.key, self.value, self.key_bias, self.value_bias, self.query, self.query_bias, self.output)
        return tuple(name for name in names if name)

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        rows = self.num_groups * self.head_dim
        shapes = {self.key: (rows, self.hidden_size), self.value: (rows, self.hidden_size)}
        shapes.update({bias: (rows,) for bias in (self.key_bias, self.value_bias) if bias})
        if self.output:
            query_rows = self.num_query_heads * self.head_dim
            shapes[self.query] = (query_rows, self.hidden_size)
            shapes[self.output] = (self.hidden_size, query_rows)
            if self.query_bias:
                shapes[self.query_bias] = (query_rows,)
        return shapes

    def rewrite(self, load: LoadTensor, method: PoolingMethod) -> dict[str, torch.Tensor]:
        if self.output:
            return self._rewrite_attention(load, method)
        heads = KVHeads(
            key=_split_heads(load(self.key), self.head_dim),
            value=_split_heads(load(self.value), self.head_dim),
            key_bias=_split_heads(load(self.key_bias), self.head_dim) if self.key_bias else None,
            value_bias=_split_heads(load(self.value_bias), self.head_dim) if self.value_bias else None,
        )
        pooled = check_pooled(method(heads, self.num_groups, layer=self.layer), heads, self.num_groups)
        out = {self.key: pooled.key.flatten(0, 1), self.value: pooled.value.flatten(0, 1)}
        if self.key_bias:
            out[self.key_bias] = pooled.key_bias.flatten(0, 1)
            out[self.value_bias] = pooled.value_bias.flatten(0, 1)
        return out

    def _rewrite_attention(self, load: LoadTensor, method: PoolingMethod) -> dict[str, torch.Tensor]:
        kv = KVHeads(
            key=_split_heads(load(self.key), self.head_dim),
            value=_split_heads(load(self.value), self.head_dim),
            key_bias=_split_heads(load(self.key_bias), self.head_dim) if self.key_bias else None,
            value_bias=_split_heads(load(self.value_bias), self.head_dim) if self.value_bias else None,
        )
        heads = AttentionHeads(
            query=_split_heads(load(self.query), self.head_dim),
            query_bias=_split_heads(load(self.query_bias), self.head_dim) if self.query_bias else None,
            kv=kv,
            output=load(self.output).unflatten(1, (self.num_query_heads, self.head_dim)),
            rotary=self.rotary,
        )
        result = method(heads, self.num_groups, layer=self.layer)
        pooled = check_pooled(result.kv, kv, self.num_groups)
        for part in ("query", "query_bias", "output"):
            before, after = getattr(heads, part), getattr(result, part)
            if (before is None) != (after is None) or (
                before is not None and (after.shape != before.shape or after.dtype != before.dtype)
            ):
                raise ConversionError(
                    f"calibrated method returned {part} with another shape or dtype than it had; "
                    "the method is broken"
                )
        out = {
            self.key: pooled.key.flatten(0, 1),
            self.value: pooled.value.flatten(0, 1),
            self.query: result.query.flatten(0, 1),
            self.output: result.output.flatten(1, 2),
        }
        if self.key_bias:
            out[self.key_bias] = pooled.key_bias.flatten(0, 1)
            out[self.value_bias] = pooled.value_bias.flatten(0, 1)
        if self.query_bias:
            out[self.query_bias] = result.query_bias.flatten(0, 1)
        return out


def check_pooled(pooled: KVHeads, heads: KVHeads, num_groups: int) -> KVHeads:
    """A method's result must have num_groups heads of the input's shapes and dtypes."""
    for part in ("key", "value", "key_bias", "value_bias"):
        before, after = getattr(heads, part), getattr(pooled, part)
        if before is None and after is None:
            continue
        expected = (num_groups, *before.shape[1:]) if before is not None else None
        if after is None or before is None or tuple(after.shape) != expected or after.dtype != before.dtype:
            got = None if after is None else f"{tuple(after.shape)} {after.dtype}"
            want = None if before is None else f"{expected} {before.dtype}"
            raise ConversionError(
                f"pooling method returned {part} as {got}, expected {want}; the method is broken"
            )
    return pooled


def _split_heads(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    return rows.unflatten(0, (rows.shape[0] // head_dim, head_dim))
