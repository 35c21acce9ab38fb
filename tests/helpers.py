"""Small helpers shared by the tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import transformers
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error ||actual - expected|| / ||expected||, computed in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_compiled_matches_eager(step, leaves: tuple[torch.Tensor, ...]) -> None:
    """step(*leaves) -> a scalar loss, under torch.compile(fullgraph=True) (a graph break fails)
    and eagerly: the same loss and the same gradients for every leaf."""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref_loss = step(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    assert relative_error(loss, ref_loss) < 1e-6
    for got, want in zip(grads, ref_grads):
        assert relative_error(got, want) < 1e-6


def tree_hash(folder: Path) -> str:
    """SHA-256 of a folder's relative paths and file contents: proves a tree was not touched."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def forbid_stock_attention(monkeypatch, families: tuple[str, ...], message: str) -> None:
    """Make every stock attention function and 4-D mask builder raise AssertionError(message)."""

    def forbidden(*args, **kwargs):
        raise AssertionError(message)

    for name in ("sdpa", "flex_attention", "flash_attention_2", "paged|eager"):
        monkeypatch.setitem(AttentionInterface._global_mapping, name, forbidden)
    for name in ("sdpa", "eager", "flex_attention", "flash_attention_2"):
        monkeypatch.setitem(AttentionMaskInterface._global_mapping, name, forbidden)
    monkeypatch.setattr(transformers.masking_utils, "sdpa_mask", forbidden)
    monkeypatch.setattr(transformers.masking_utils, "eager_mask", forbidden)
    for family in families:
        modeling = getattr(getattr(transformers.models, family), f"modeling_{family}")
        if hasattr(modeling, "eager_attention_forward"):  # Falcon has one from transformers 5.25
            monkeypatch.setattr(modeling, "eager_attention_forward", forbidden)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
