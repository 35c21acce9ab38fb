"""`flash_attention`: the one attention call every model family ends in.

Semantics are those of `reference.attention_reference` (see DESIGN.md). This module checks the
inputs, turns the options into the kernel's two window bounds, and registers the Triton launch
as torch custom ops (forward and backward) so that a patched model runs under `torch.compile`
without graph breaks; eager calls skip the ops' dispatch (see `_launch.route`). The kernels themselves
live in `_flash_triton.py`.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _flash_triton
from ._checks import check_attention_inputs, check_sinks, window_reach
from ._launch import AUTOGRAD, CUSTOM_OP, route

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
    sinks: int = 0,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tiled (flash) attention with a backward pass, in Triton.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq % Hkv == 0 (GQA/MQA read the shared KV
    head, nothing is expanded). Query row i sits at key position Nk - Nq + i.
    causal: key j visible to query i when j <= pos(i).
    window: int W (the W most recent keys, the query's own included) or (left, right).
    key_padding_mask: (B, Nk), true/1 for real keys. alibi_slopes: (Hq,) float32.
    scale: > 0, defaults to D ** -0.5. Returns (B, Hq, Nq, D) in q's dtype; rows that see no key
    are zeros.
    doc_ids: (B, N) integer, packed documents (needs Nq == Nk): each run of equal ids in a row is
    one document, and a query sees keys of its own document only. Key blocks that share no
    document with a query block are skipped, so the work is that of the documents one by one.
    sinks: int S >= 0, attention sinks (StreamingLLM): keys at positions j < S stay visible
    whatever the window says (causality and padding still apply); with no window S changes
    nothing. The key blocks holding them are visited besides the window's, nothing else, so the
    work stays O(N * (W + S)). Not with doc_ids.
    sink_logits: (Hq,) floating point, a learned per-head logit in each row's softmax
    denominator (gpt-oss): out_i = sum_j exp(s_ij) v_j / (exp(sink_h) + sum_j exp(s_ij)),
    computed in float32; differentiable. Rows that see no key are still zeros.
    """
    check_attention_inputs(q, k, v, key_padding_mask=key_padding_mask, alibi_slopes=alibi_slopes,
                           doc_ids=doc_ids)
    check_sinks(q, sinks, sink_logits, doc_ids=doc_ids)
    left, right = window_reach(causal, window)
    if left < 0:
        sinks = 0  # no left bound: every key is visible already
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not 0.0 < scale < float("inf"):  # the forward takes each row's max of unscaled scores
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float32)
    if sink_logits is not None:
        sink_logits = sink_logits.to(torch.float32).contiguous()  # the kernel reads it at stride 1
    inputs = (q, k, v, key_padding_mask, alibi_slopes, left, right, scale, doc_ids, sinks, sink_logits)
    # Compiled code and tensor subclasses take the custom ops; eager training runs the same
    # forward and backward through a plain autograd.Function (through the ops a forward + backward
    # cost 1109 us of host time against 552 us on the H200 machine's host, enough to make a short
    # call host-bound: docs/patching.md); eager inference launches the kernel directly.
    path = route(q, k, v, sink_logits)
    if path is CUSTOM_OP:
        out, _ = torch.ops.hf_attn_patch.flash_attention_forward(*inputs)
    elif path is AUTOGRAD:
        out = _EagerFlashAttention.apply(*inputs)
    else:
        out, _ = _flash_triton.forward(*inputs)
    return out


# --- torch custom ops ---------------------------------------------------------------------------
# left/right are the window's reach (pos(i) - j <= left, j - pos(i) <= right); -1 = unbounded.
# Arguments added later (doc_ids, then sinks, sink_logits and delta) come last, with defaults, so
# that calls written before them keep working.


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
    sinks: int = 0,
    sink_logits: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_triton.forward(q, k, v, key_padding_mask, alibi_slopes, left, right, scale, doc_ids,
                                 sinks, sink_logits)


@_forward.register_fake
def _forward_fake(q, k, v, key_padding_mask, alibi_slopes, left, right, scale, doc_ids=None, sinks=0,
                  sink_logits=None):
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
    sinks: int = 0,
    delta: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_triton.backward(
        grad_out, q, k, v, out, lse, key_padding_mask, alibi_slopes, left, right, scale, doc_ids, sinks, delta
    )


@_backward.register_fake
def _backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, alibi_slopes, left, right, scale,
                   doc_ids=None, sinks=0, delta=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("hf_attn_patch::flash_attention_row_delta", mutates_args=())
def _row_delta(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    return _flash_triton.row_delta(out, grad_out)


@_row_delta.register_fake
def _row_delta_fake(out, grad_out):
    return out.new_empty(out.shape[:-1], dtype=torch.float32)


_SINK_LOGITS = 10  # index of sink_logits among the forward op's inputs


def _save_for_backward(ctx, inputs, out, lse):
    q, k, v, key_padding_mask, alibi_slopes, left, right, scale, doc_ids, sinks, sink_logits = inputs
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, alibi_slopes, doc_ids, sink_logits)
    ctx.window = (left, right)
    ctx.scale = scale
    ctx.sinks = sinks


def _gradients(ctx, grad_out, row_delta, backward):
    """The gradients of every forward input, with row_delta and backward either the custom ops
    (traced under torch.compile) or the Triton launches themselves (eager)."""
    q, k, v, out, lse, key_padding_mask, alibi_slopes, doc_ids, sink_logits = ctx.saved_tensors
    left, right = ctx.window
    delta = d_sink_logits = None
    if sink_logits is not None and ctx.needs_input_grad[_SINK_LOGITS]:
        # d sink_h = -sum over rows of p_sink * delta, with p_sink = exp(sink_h - lse) (lse is in
        # base 2 and includes the sink). delta is computed once and handed to the backward.
        delta = row_delta(out, grad_out)
        sink_probs = torch.exp2(sink_logits[None, :, None] * _flash_triton.LOG2E - lse)
        d_sink_logits = -(sink_probs * delta).sum(dim=(0, 2))
    dq, dk, dv = backward(grad_out, q, k, v, out, lse, key_padding_mask, alibi_slopes, left, right, ctx.scale,
                          doc_ids, ctx.sinks, delta)
    return dq, dk, dv, None, None, None, None, None, None, None, d_sink_logits


def _setup_context(ctx, inputs, output):
    out, lse = output
    _save_for_backward(ctx, inputs, out, lse)
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, grad_out, _grad_lse):
    return _gradients(ctx, grad_out, torch.ops.hf_attn_patch.flash_attention_row_delta,
                      torch.ops.hf_attn_patch.flash_attention_backward)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


class _EagerFlashAttention(torch.autograd.Function):
    """The custom ops' forward and backward for plain eager tensors, without their dispatch."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _flash_triton.forward(*inputs)
        _save_for_backward(ctx, inputs, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _gradients(ctx, grad_out, _flash_triton.row_delta, _flash_triton.backward)
