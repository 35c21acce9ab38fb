"""`flash_attention`: the one attention call every model family ends in.

Semantics are those of `reference.attention_reference` (see DESIGN.md). This module checks the
inputs, turns the options into the kernel's two window bounds, and registers the Triton launch
as torch custom ops (forward and backward) so that a patched model runs under `torch.compile`
without graph breaks. The kernels themselves live in `_flash_triton.py`.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _flash_triton
from ._checks import check_attention_inputs, window_reach

__all__ = ["flash_attention"]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tiled (flash) attention with a backward pass, in Triton.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq % Hkv == 0 (GQA/MQA read the shared KV
    head, nothing is expanded). Query row i sits at key position Nk - Nq + i.
    causal: key j visible to query i when j <= pos(i).
    window: int W (the W most recent keys, the query's own included) or (left, right).
    key_padding_mask: (B, Nk), true/1 for real keys. alibi_slopes: (Hq,) float32.
    scale: defaults to D ** -0.5. Returns (B, Hq, Nq, D) in q's dtype; rows that see no key
    are zeros.
    doc_ids: (B, N) integer, packed documents (needs Nq == Nk): each run of equal ids in a row is
    one document, and a query sees keys of its own document only. Key blocks that share no
    document with a query block are skipped, so the work is that of the documents one by one.
    """
    check_attention_inputs(q, k, v, key_padding_mask=key_padding_mask, alibi_slopes=alibi_slopes,
                           doc_ids=doc_ids)
    left, right = window_reach(causal, window)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float32)
    if _needs_custom_op(q, k, v):
        out, _ = torch.ops.hf_attn_patch.flash_attention_forward(
            q, k, v, key_padding_mask, alibi_slopes, left, right, scale, doc_ids
        )
    else:
        out, _ = _flash_triton.forward(q, k, v, key_padding_mask, alibi_slopes, left, right, scale, doc_ids)
    return out


def _needs_custom_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The custom op is there for autograd and torch.compile (and tensor subclasses, fake
    tensors among them). Plain eager inference launches the kernel directly: the op's dispatch
    costs ~45 us of host time a call on the H100 machine, in a decode step bound by the host."""
    if torch.compiler.is_compiling():
        return True
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return True
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


# --- torch custom ops ---------------------------------------------------------------------------
# left/right are the window's reach (pos(i) - j <= left, j - pos(i) <= right); -1 = unbounded.
# doc_ids comes last, with a default, so that calls written before it keep working.


@torch.library.custom_op("hf_attn_patch::flash_attention_forward", mutates_args=())
def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor],
    left: int,
    right: int,
    scale: float,
    doc_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_triton.forward(q, k, v, key_padding_mask, alibi_slopes, left, right, scale, doc_ids)


@_forward.register_fake
def _forward_fake(q, k, v, key_padding_mask, alibi_slopes, left, right, scale, doc_ids=None):
    batch, heads, q_len, head_dim = q.shape
    return _flash_triton.empty_output(q), q.new_empty((batch, heads, q_len), dtype=torch.float32)


@torch.library.custom_op("hf_attn_patch::flash_attention_backward", mutates_args=())
def _backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor],
    left: int,
    right: int,
    scale: float,
    doc_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_triton.backward(
        grad_out, q, k, v, out, lse, key_padding_mask, alibi_slopes, left, right, scale, doc_ids
    )


@_backward.register_fake
def _backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, alibi_slopes, left, right, scale,
                   doc_ids=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, alibi_slopes, left, right, scale, doc_ids = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, alibi_slopes, doc_ids)
    ctx.window = (left, right)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask, alibi_slopes, doc_ids = ctx.saved_tensors
    left, right = ctx.window
    dq, dk, dv = torch.ops.hf_attn_patch.flash_attention_backward(
        grad_out, q, k, v, out, lse, key_padding_mask, alibi_slopes, left, right, ctx.scale, doc_ids
    )
    return dq, dk, dv, None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
