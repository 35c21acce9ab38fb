"""Calibrated methods: choose the groups, and pool them, from the original model's activations.

Both work on one layer at a time from `LayerStatistics` (the second moment of the attention
input x, so every head's key/value/query statistics follow from the weights):

- `similarity`: which KV heads share a group is chosen by how alike their activations are
  (balanced clustering minimising the mean-pooling error sum_h E||f_h - mean(group)||^2 of K and
  V, each normalised by its energy), instead of contiguous groups. The heads are then permuted
  so that each group is contiguous again: the KV heads, their query heads (q rows and biases)
  and the output projection's columns move together, which changes nothing before pooling.
  Pooling is the plain mean.
- `pca`: the same regrouping (scored by the error of this pooling), then each group's heads are
  replaced by the best shared head in a least-squares sense, and each original head by a linear
  map of it, absorbed into the model where it changes nothing else: k_h ~ M_h k_g, so query head
  h's rows become M_h^T W_q (scores q^T k_h ~ (M_h^T q)^T k_g); v_h ~ N_h v_g, so its output
  columns become W_o N_h. The shared head and the maps are the top principal components of the
  group's stacked heads (Yu et al. 2024, "Effectively Compress KV Heads for LLM"), each head
  weighted by what its error costs: keys by the second moment of their queries (the expected
  squared score error), values by W_o^T W_o (the squared output error). With RoPE (Llama,
  Mistral) the key maps must commute with the rotation, so they are per-frequency 2x2 rotations
  and scalings (complex scalars on the pairs i, i + head_dim/2): one complex principal
  component per frequency. With one head per group both methods are exact (a permutation, an
  invertible map and its inverse).

Everything is computed in float64 and rounded once to the checkpoint's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .methods import AttentionHeads, KVHeads, LayerStatistics

_RELATIVE_RIDGE = 1e-6  # added to weighting matrices (times their mean eigenvalue) before roots and inverses
_PAIR_CHUNK = 64  # groups whose covariance blocks are gathered at once


@dataclass(frozen=True)
class CalibratedMethod:
    """A method that needs calibration statistics and may rewrite the query and output projections."""

    name: str
    pooling: str  # "mean" or "pca"
    regroup: bool
    summary: str
    needs_calibration: bool = True

    def __call__(
        self,
        heads: AttentionHeads,
        num_groups: int,
        *,
        layer: int,
        statistics: Mapping[int, LayerStatistics],
    ) -> AttentionHeads:
        return regroup_and_pool(
            heads, num_groups, statistics[layer].second_moment, pooling=self.pooling, regroup=self.regroup
        )


CALIBRATED_METHODS = {
    "similarity": CalibratedMethod(
        "similarity",
        pooling="mean",
        regroup=True,
        summary="groups chosen from activation similarity (then permuted contiguous), mean-pooled",
    ),
    "pca": CalibratedMethod(
        "pca",
        pooling="pca",
        regroup=True,
        summary="groups chosen from activations; each group pooled into its principal shared head, "
        "per-head maps absorbed into the query and output projections",
    ),
}


def regroup_and_pool(
    heads: AttentionHeads,
    num_groups: int,
    second_moment: torch.Tensor,
    *,
    pooling: str,
    regroup: bool,
    order: torch.Tensor | None = None,
) -> AttentionHeads:
    """Pool `heads` to num_groups KV heads; `order` (KV heads, group by group) overrides the grouping.

    The float64 linear algebra runs on CUDA when it is available (a 7B-shaped layer takes about
    a minute on two CPU cores), and the results come back to the CPU.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    moment = second_moment.to(device, torch.float64)
    num_kv = heads.kv.num_heads
    per_kv = heads.query.shape[0] // num_kv
    size = num_kv // num_groups
    query = _with_bias(heads.query, heads.query_bias, device)  # (Hq, D, hidden + 1)
    key = _with_bias(heads.kv.key, heads.kv.key_bias, device)  # (Hkv, D, hidden + 1)
    value = _with_bias(heads.kv.value, heads.kv.value_bias, device)
    output = heads.output.to(device, torch.float64)  # (out, Hq, D)

    parts = [
        _Part.build(key, moment, query, per_kv, heads.rotary, pooling, kind="key"),
        _Part.build(value, moment, output, per_kv, False, pooling, kind="value"),
    ]
    if order is None:
        order = torch.arange(num_kv)
        if regroup and size > 1 and num_groups > 1:
            order = _choose_groups(parts, num_kv, size)
    query_order = (order[:, None] * per_kv + torch.arange(per_kv)).flatten()
    query, output = query[query_order], output[:, query_order]
    key_part, value_part = (part.permuted(order) for part in parts)

    pooled_key, key_maps = key_part.pool(size)
    pooled_value, value_maps = value_part.pool(size)
    if key_maps is not None:  # k_h ~ M_h k_g: query rows become M_h^T W_q
        query = _apply_to_queries(key_maps, query, per_kv, heads.rotary)
    if value_maps is not None:  # v_h ~ N_h v_g: output columns become W_o N_h
        output = torch.einsum("ohd,hde->ohe", output, value_maps.repeat_interleave(per_kv, dim=0))

    query, output, pooled_key, pooled_value = (t.cpu() for t in (query, output, pooled_key, pooled_value))
    kv = heads.kv
    return AttentionHeads(
        query=query[..., :-1].to(heads.query.dtype),
        query_bias=None if heads.query_bias is None else query[..., -1].to(heads.query_bias.dtype),
        kv=KVHeads(
            key=pooled_key[..., :-1].to(kv.key.dtype),
            value=pooled_value[..., :-1].to(kv.value.dtype),
            key_bias=None if kv.key_bias is None else pooled_key[..., -1].to(kv.key_bias.dtype),
            value_bias=None if kv.value_bias is None else pooled_value[..., -1].to(kv.value_bias.dtype),
        ),
        output=output.to(heads.output.dtype),
        rotary=heads.rotary,
    )


@dataclass(frozen=True)
class _Part:
    """Key or value heads (Hkv, D, hidden + 1) with what their error is weighted by.

    `features` are the heads in the units their error is measured in: the heads themselves for
    mean pooling; for PCA `weight @ head` (weight (Hkv, D, D): the square root of the queries'
    second moment for keys, of W_o^T W_o for values), or for rotary keys the complex pairs
    `k[i] + 1j k[i + D/2]` times a per-frequency scale (weight (Hkv, D/2)). `cov` is their
    second moment over the calibration data, between every two heads: (Hkv, D, Hkv, D), or
    (D/2, Hkv, Hkv) complex per frequency for rotary PCA; pooling errors are read from it.
    """

    heads: torch.Tensor
    pooling: str
    rotary: bool
    weight: torch.Tensor | None
    features: torch.Tensor
    cov: torch.Tensor

    @classmethod
    def build(cls, heads, moment, partner, per_kv, rotary, pooling, *, kind) -> "_Part":
        num_kv, dim = heads.shape[:2]
        if pooling == "mean":
            weight = None
        elif kind == "key" and rotary:
            # Per frequency: the mean over a KV head's query heads of E|q_i + 1j q_{i + D/2}|^2.
            q = _complex(partner).unflatten(0, (num_kv, per_kv))  # (Hkv, r, D/2, hidden + 1)
            energy = torch.einsum("hrdi,ij,hrdj->hd", q, moment.to(q.dtype), q.conj()).real / per_kv
            weight = (energy + _RELATIVE_RIDGE * energy.mean(dim=1, keepdim=True) + 1e-30).sqrt()
        elif kind == "key":
            q = partner.unflatten(0, (num_kv, per_kv))  # (Hkv, r, D, hidden + 1)
            weight = _sqrt_psd(torch.einsum("hrdi,ij,hrej->hde", q, moment, q) / per_kv)
        else:
            o = partner.unflatten(1, (num_kv, per_kv))  # (out, Hkv, r, D)
            weight = _sqrt_psd(torch.einsum("ohrd,ohre->hde", o, o))
        if weight is None:
            features = heads
        elif rotary:
            features = weight[..., None] * _complex(heads)
        else:
            features = weight @ heads
        flat = features.flatten(0, 1)
        cov = flat @ moment.to(flat.dtype) @ flat.conj().T
        if pooling != "mean" and rotary:  # (Hkv, D/2, Hkv, D/2) -> per frequency (D/2, Hkv, Hkv)
            cov = cov.view(num_kv, dim // 2, num_kv, dim // 2).diagonal(dim1=1, dim2=3).permute(2, 0, 1)
        else:
            cov = cov.view(num_kv, dim, num_kv, dim)
        return cls(heads, pooling, rotary, weight, features, cov)

    @property
    def complex_pairs(self) -> bool:
        return self.rotary and self.pooling != "mean"

    def permuted(self, order: torch.Tensor) -> "_Part":
        weight = None if self.weight is None else self.weight[order]
        cov = self.cov[:, order][:, :, order] if self.complex_pairs else self.cov[order][:, :, order]
        return _Part(self.heads[order], self.pooling, self.rotary, weight, self.features[order], cov)

    def energy(self) -> float:
        """Sum over heads of E||features||^2: what the pooling errors are normalised by."""
        if self.complex_pairs:
            return float(self.cov.diagonal(dim1=1, dim2=2).real.sum())
        return float(self.cov.diagonal(dim1=0, dim2=2).diagonal().sum())

    def group_cov(self, groups: torch.Tensor) -> torch.Tensor:
        """(k, n) head indices -> (k, n * D, n * D), or (k, D/2, n, n) for rotary PCA."""
        if self.complex_pairs:
            picked = self.cov[:, groups[:, :, None], groups[:, None, :]]  # (D/2, k, n, n)
            return picked.permute(1, 0, 2, 3)
        k, n = groups.shape
        dim = self.cov.shape[1]
        picked = self.cov.permute(0, 2, 1, 3)[groups[:, :, None], groups[:, None, :]]  # (k, n, n, D, D)
        return picked.permute(0, 1, 3, 2, 4).reshape(k, n * dim, n * dim)

    def group_residuals(self, groups: torch.Tensor) -> torch.Tensor:
        """(k, n) head indices -> (k,) pooling error of each group, in weighted units."""
        rows = []
        for chunk in groups.split(_PAIR_CHUNK):
            cov = self.group_cov(chunk)
            n = chunk.shape[1]
            if self.pooling == "mean":  # sum_a E||f_a||^2 - E||sum_a f_a||^2 / n
                rows.append(cov.diagonal(dim1=1, dim2=2).sum(-1) - _block_traces(cov, n).sum(dim=(1, 2)) / n)
            elif self.rotary:
                values = torch.linalg.eigvalsh(cov)
                rows.append((values.sum(-1) - values[..., -1]).sum(-1))
            else:
                values = torch.linalg.eigvalsh(cov)
                dim = cov.shape[1] // n
                rows.append(values[:, :-dim].sum(-1))  # all but the top head_dim components
        return torch.cat(rows)

    def pool(self, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Contiguous groups of `size` -> (pooled heads (G, D, hidden + 1), maps or None).

        Maps: (Hkv, D, D) with head_h ~ maps_h @ pooled_g, or for rotary keys complex (Hkv, D/2),
        one scalar per frequency pair.
        """
        num_kv, dim = self.heads.shape[:2]
        groups = num_kv // size
        if self.pooling == "mean":
            return self.heads.unflatten(0, (groups, size)).mean(dim=1), None
        members = torch.arange(num_kv).view(groups, size)
        features = self.features.unflatten(0, (groups, size))
        cov = self.group_cov(members)
        if self.rotary:  # per frequency, z~_a ~ u_a w with u the top eigenvector, w = u^H z~
            top = torch.linalg.eigh(cov).eigenvectors[..., -1]  # (G, D/2, n)
            shared = torch.einsum("gfa,gafi->gfi", top.conj(), features)
            scale = top.transpose(1, 2).flatten(0, 1) / self.weight  # z_a ~ (u_a / s_a) w
            return torch.cat([shared.real, shared.imag], dim=1), scale
        basis = torch.linalg.eigh(cov).eigenvectors[..., -dim:]  # (G, n * D, D)
        pooled = basis.transpose(1, 2) @ features.flatten(1, 2)
        maps = torch.linalg.solve(self.weight, basis.unflatten(1, (size, dim)).flatten(0, 1))  # W^-1 U_h
        return pooled, maps


def _choose_groups(parts: list[_Part], num_kv: int, size: int) -> torch.Tensor:
    """A balanced grouping of the KV heads minimising the pooling error; returns them group by group.

    Pair costs (the error of pooling each pair, per part normalised by its energy) drive a
    greedy start and a swap search; the result is kept only if its exact group error is below
    that of the contiguous groups, so regrouping never does worse on the calibration data.
    """
    scales = [1.0 / max(part.energy(), 1e-30) for part in parts]
    pairs = torch.combinations(torch.arange(num_kv), 2)
    pair_cost = torch.zeros(num_kv, num_kv, dtype=torch.float64)
    costs = sum(scale * part.group_residuals(pairs).cpu() for scale, part in zip(scales, parts))
    pair_cost[pairs[:, 0], pairs[:, 1]] = costs
    pair_cost = pair_cost + pair_cost.T

    contiguous = torch.arange(num_kv) // size
    candidates = [_swap_search(pair_cost, start, size) for start in (contiguous, _greedy(pair_cost, size))]
    best = min(candidates, key=lambda groups: _proxy(pair_cost, groups))

    def exact(groups: torch.Tensor) -> float:
        members = _members(groups, size)
        return float(sum(scale * part.group_residuals(members).sum() for scale, part in zip(scales, parts)))

    chosen = best if exact(best) < exact(contiguous) else contiguous
    return _members(chosen, size).flatten()


def _members(groups: torch.Tensor, size: int) -> torch.Tensor:
    """Group label per head -> (G, size) head indices, groups ordered by their first head."""
    rows = [torch.nonzero(groups == label).flatten() for label in groups.unique()]
    return torch.stack(sorted(rows, key=lambda row: int(row[0])))


def _proxy(pair_cost: torch.Tensor, groups: torch.Tensor) -> float:
    same = groups[:, None] == groups[None, :]
    return float(pair_cost[same].sum())


def _greedy(pair_cost: torch.Tensor, size: int) -> torch.Tensor:
    """Seed each group with the first free head, then add the free heads closest to the group."""
    num = pair_cost.shape[0]
    groups = torch.full((num,), -1)
    for label in range(num // size):
        free = torch.nonzero(groups < 0).flatten()
        members = [int(free[0])]
        groups[free[0]] = label
        for _ in range(size - 1):
            free = torch.nonzero(groups < 0).flatten()
            nearest = free[pair_cost[free][:, members].sum(dim=1).argmin()]
            members.append(int(nearest))
            groups[nearest] = label
    return groups


def _swap_search(pair_cost: torch.Tensor, groups: torch.Tensor, size: int) -> torch.Tensor:
    """Swap heads between groups while a swap lowers the summed within-group pair cost."""
    groups = groups.clone()
    num = pair_cost.shape[0]
    onehot = torch.zeros(num, num // size, dtype=pair_cost.dtype)
    for _ in range(8 * num):
        onehot.zero_()
        onehot[torch.arange(num), groups] = 1
        to_group = pair_cost @ onehot  # (head, group): summed cost to the group's members
        own = to_group.gather(1, groups[:, None])
        other = to_group[:, groups]  # [a, b]: cost of a to b's group
        delta = (other - own) + (other - own).T - 2 * pair_cost
        delta[groups[:, None] == groups[None, :]] = 0
        flat = int(delta.argmin())
        a, b = divmod(flat, num)
        if delta[a, b] >= -1e-12:
            break
        groups[a], groups[b] = groups[b].clone(), groups[a].clone()
    return groups


def _complex(rows: torch.Tensor) -> torch.Tensor:
    """(H, D, ...) real -> (H, D/2, ...) complex: dims i and i + D/2 (rotate_half's pairs) as one number."""
    half = rows.shape[1] // 2
    return rows[:, :half] + 1j * rows[:, half:]


def _block_traces(cov: torch.Tensor, n: int) -> torch.Tensor:
    """(k, n * D, n * D) -> (k, n, n): the trace of each D x D block."""
    k, rows = cov.shape[:2]
    return cov.view(k, n, rows // n, n, rows // n).diagonal(dim1=2, dim2=4).sum(-1)


def _apply_to_queries(maps: torch.Tensor, query: torch.Tensor, per_kv: int, rotary: bool) -> torch.Tensor:
    maps = maps.repeat_interleave(per_kv, dim=0)
    if rotary:  # per-frequency complex c: q_z -> conj(c) q_z
        turned = maps.conj()[..., None] * _complex(query)
        return torch.cat([turned.real, turned.imag], dim=1)
    return maps.transpose(1, 2) @ query


def _with_bias(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(H, D, hidden) and (H, D) -> (H, D, hidden + 1) float64, the bias as the last column."""
    weight = weight.to(device, torch.float64)
    column = torch.zeros_like(weight[..., 0]) if bias is None else bias.to(device, torch.float64)
    return torch.cat([weight, column[..., None]], dim=-1)


def _sqrt_psd(gram: torch.Tensor) -> torch.Tensor:
    """Symmetric square roots of (k, D, D) positive semi-definite matrices, ridged to be invertible."""
    gram = (gram + gram.transpose(1, 2)) / 2
    dim = gram.shape[-1]
    ridge = _RELATIVE_RIDGE * gram.diagonal(dim1=1, dim2=2).mean(-1) + 1e-30
    identity = torch.eye(dim, dtype=gram.dtype, device=gram.device)
    values, vectors = torch.linalg.eigh(gram + ridge[:, None, None] * identity)
    return (vectors * values.clamp_min(0).sqrt()[:, None, :]) @ vectors.transpose(1, 2)
