"""Pooling methods: how a group of key/value heads becomes one head.

A method is a plain function registered by name in `METHODS`:

    method(heads: KVHeads, num_groups: int, *, layer: int) -> KVHeads

It receives one layer's key and value projections split per head and returns `num_groups`
heads of the same head_dim. Query head `h` reads group `h // (num_query_heads // num_groups)`,
so groups are contiguous in query-head order; a method that wants to regroup heads (for example
from calibration statistics) would also have to permute the query and output projections, which
needs a new field on its result and a planning pass in the converter (see docs/conversion.md).
`layer` lets methods that keep per-layer state (calibration data) find theirs; `mean` ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class KVHeads:
    """One layer's key and value projections, split per head.

    Weights are (heads, head_dim, hidden); biases (heads, head_dim) or None when the layer has
    none. Row `i * head_dim + j` of the original projection is `[i, j]` here.
    """

    key: torch.Tensor
    value: torch.Tensor
    key_bias: torch.Tensor | None = None
    value_bias: torch.Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.key.shape[0]

    @property
    def head_dim(self) -> int:
        return self.key.shape[1]


PoolingMethod = Callable[..., KVHeads]


def mean_pool(heads: KVHeads, num_groups: int, *, layer: int) -> KVHeads:
    """Each group's head is the mean of its contiguous original heads (Ainslie et al. 2023).

    The mean is taken in float32 and rounded once to the original dtype, so bf16 checkpoints do
    not lose precision in the sum.
    """
    return KVHeads(
        key=_mean_of_groups(heads.key, num_groups),
        value=_mean_of_groups(heads.value, num_groups),
        key_bias=_mean_of_groups(heads.key_bias, num_groups),
        value_bias=_mean_of_groups(heads.value_bias, num_groups),
    )


METHODS: dict[str, PoolingMethod] = {"mean": mean_pool}


def _mean_of_groups(per_head: torch.Tensor | None, num_groups: int) -> torch.Tensor | None:
    if per_head is None:
        return None
    grouped = per_head.float().unflatten(0, (num_groups, per_head.shape[0] // num_groups))
    return grouped.mean(dim=1).to(per_head.dtype)
