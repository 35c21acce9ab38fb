"""Pooling methods: how a group of key/value heads becomes one head.

Two kinds of method are registered by name in `METHODS`.

A pooling method is a plain function:

    method(heads: KVHeads, num_groups: int, *, layer: int) -> KVHeads

It receives one layer's key and value projections split per head and returns `num_groups`
heads of the same head_dim. Query head `h` reads group `h // (num_query_heads // num_groups)`,
so groups are contiguous in query-head order. `layer` lets methods that keep per-layer state
find theirs; `mean` ignores it. Such a method sees no activations and touches only K and V.

A calibrated method (`needs_calibration = True`, see `calibrated.py`) is called with the whole
attention projection of a layer and statistics of the original model's activations:

    method(heads: AttentionHeads, num_groups: int, *, layer: int, statistics) -> AttentionHeads

and may also rewrite the query rows and the output projection's columns, e.g. to regroup heads
(a permutation) or to map each head into its group's shared subspace (absorbed into Q and O).
The converter runs the original model on calibration tokens before it writes anything.
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


@dataclass(frozen=True)
class AttentionHeads:
    """One layer's attention projections, split per head, for calibrated methods.

    query: (Hq, head_dim, hidden), query_bias: (Hq, head_dim) or None; kv: the key/value heads
    (Hkv of them); output: the output projection's weight (out, Hq, head_dim), its columns split
    per query head (its bias, untouched, is not here). Query head `h` reads KV head
    `h // (Hq // Hkv)`. `rotary`: keys are rotated by RoPE (transformers' rotate_half pairing,
    dims i and i + head_dim/2), so a transform of the key heads must commute with it.
    """

    query: torch.Tensor
    query_bias: torch.Tensor | None
    kv: KVHeads
    output: torch.Tensor
    rotary: bool


@dataclass(frozen=True)
class LayerStatistics:
    """What calibration measured at one layer's attention input x (the input of Q, K and V).

    second_moment: (hidden + 1, hidden + 1) float64, the mean of [x, 1] [x, 1]^T over the
    calibration tokens (the appended 1 carries the biases). tokens: how many tokens.
    """

    second_moment: torch.Tensor
    tokens: int


def needs_calibration(method: object) -> bool:
    """True for methods that read activations of the original model (and may rewrite Q and O)."""
    return bool(getattr(method, "needs_calibration", False))


METHODS: dict[str, PoolingMethod] = {"mean": mean_pool}


def _mean_of_groups(per_head: torch.Tensor | None, num_groups: int) -> torch.Tensor | None:
    if per_head is None:
        return None
    grouped = per_head.float().unflatten(0, (num_groups, per_head.shape[0] // num_groups))
    return grouped.mean(dim=1).to(per_head.dtype)


from .calibrated import CALIBRATED_METHODS  # noqa: E402  (it builds on the classes above)

METHODS.update(CALIBRATED_METHODS)
