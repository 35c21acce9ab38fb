"""Falcon in its three layouts: rotary + multi-query (Falcon-7B), rotary + grouped K/V with
`new_decoder_architecture` (Falcon-40B/180B), and ALiBi + multi-head (Falcon-RW).

How Falcon reaches the kernels depends on the transformers version (`_compat`):

* From 5.25 FalconAttention calls transformers' attention interface, as Llama does, and the
  config switch moves it onto our attention entry (the module's forward is only wrapped, to
  tell our entry when attention weights are asked for). FalconModel adds ALiBi into the mask
  before attention: it takes whatever our mask entry returned, turns it into an additive mask
  and fills in slope * position / sqrt(head_dim) where keys are visible. `ALIBI_IN_MASK` makes
  that work: our mask entry gives this family its padding as (B, 1, 1, n) (or (1, 1, 1, 1) with
  nothing padded), so the sum FalconModel forms is (B, H, 1, n), and the attention entry reads
  the padding back from it and runs the kernel with these ALiBi slopes. Masks with more than one
  query row (a caller's 4-D mask, packed ALiBi rows) stay dense and run on stock attention.
* Up to 5.24 Falcon does not call the interface, so each attention module's `forward` is
  swapped, per instance, for `_falcon_forward`; the config still points at our implementation
  so that FalconModel asks our mask entry for its mask (2-D, not (B, 1, Nq, Nk)).

Differences from the stock forward of 5.24 and before, on purpose:
* With `new_decoder_architecture`, stock Falcon broadcasts K/V to every query head before it
  caches them (128 heads a layer for Falcon-40B). Here the cache holds the KV groups only (8),
  and the kernel reads each group for its query heads. (5.25 caches the groups itself.)
* Fallbacks (output_attentions=True; ALiBi attention dropout in training; a caller's 4-D mask)
  compute eager attention in PyTorch on these same, grouped K/V rather than calling the stock
  forward, which could not read the grouped cache (and whose eager ALiBi branch in
  transformers 5.x adds the ALiBi bias twice). Rotary Falcon applies no attention dropout in
  stock transformers up to 5.24, and neither does the kernel path.

On every version: ALiBi slopes are those of `build_alibi_tensor` (bfloat16-rounded, as stock
rounds them), but the bias slope * (j - i) is formed in float32 inside the kernel, where stock
rounds the product slope * position to bfloat16; the two agree exactly while positions times
slopes are exact in bfloat16 and drift apart slightly on long sequences with non-power-of-two
slopes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.falcon.modeling_falcon import (
    FalconAttention,
    FalconPreTrainedModel,
    apply_rotary_pos_emb,
    build_alibi_tensor,
)

from .._compat import falcon_attention_classes, falcon_uses_attention_interface
from ._attention import align_to_keys, attend, dense_mask, padding_or_documents, warn_once, weights_over_keys
from ._family import Family, Undo, head_dim_problem
from ._interface import ATTN_IMPLEMENTATION, OUTPUT_ATTENTIONS, MaskFold, register_mask_fold

__all__ = ["FAMILY"]


# --- up to 5.24: the attention forward swapped per instance ---------------------------------------


def _patch_module(module: FalconAttention) -> Undo:
    """Swap this instance's forward for ours; return the callable that puts the old one back.

    Both are small objects, not closures, so that a patched model can be deep-copied and
    pickled (torch.save(model)): a copy's forward and undo then refer to the copy's module.
    """
    undo = _RestoreForward(module, "forward" in module.__dict__, module.__dict__.get("forward"))
    slopes = _AlibiSlopes(module) if module.config.alibi else None
    module.forward = _PatchedForward(module, slopes)
    return undo


class _PatchedForward:
    """The forward of one patched FalconAttention: its stock signature, our `_falcon_forward`."""

    def __init__(self, module: FalconAttention, slopes: "_AlibiSlopes | None"):
        self.module = module
        self.slopes = slopes

    def __call__(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                 use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
        return _falcon_forward(self.module, self.slopes, hidden_states, alibi, attention_mask, layer_past,
                               output_attentions, position_embeddings)


class _RestoreForward:
    """Undo of `_patch_module`: the instance's own forward as it was, or none."""

    def __init__(self, module: FalconAttention, had_own_forward: bool, previous):
        self.module = module
        self.had_own_forward = had_own_forward
        self.previous = previous

    def __call__(self) -> None:
        if self.had_own_forward:
            self.module.forward = self.previous
        else:
            del self.module.__dict__["forward"]


def _falcon_forward(module, slopes, hidden_states, alibi, attention_mask, layer_past, output_attentions,
                    position_embeddings):
    batch, q_len, _ = hidden_states.shape
    query, key, value = _split_heads(module, module.query_key_value(hidden_states))
    if alibi is None:
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)

    dense_given = attention_mask is not None and attention_mask.dim() != 2
    k_len = key.shape[2]
    doc_ids = None
    if not dense_given:
        # Packed sequences reach here as document ids where FalconModel passes position_ids to
        # create_causal_mask (5.24; 5.17 does not, and stock Falcon attends across documents).
        attention_mask, doc_ids = padding_or_documents(attention_mask)
        attention_mask, key, value = align_to_keys(attention_mask, key, value)
    alibi_slopes = slopes.on(query.device) if alibi is not None else None
    dropout = module.attention_dropout.p if (module.training and alibi is not None) else 0.0

    if dense_given or output_attentions or dropout > 0:
        out, weights = _eager_fallback(module, query, key, value, attention_mask, alibi_slopes, dropout,
                                       dense_given, output_attentions, doc_ids)
        weights = weights_over_keys(weights, k_len)
    else:
        out = attend(module, query, key, value, causal=True, key_padding_mask=attention_mask,
                     alibi_slopes=alibi_slopes, scale=module.inv_norm_factor, doc_ids=doc_ids)
        weights = None
    return module.dense(out.reshape(batch, q_len, module.num_heads * module.head_dim)), weights


def _split_heads(module: FalconAttention, fused: torch.Tensor):
    """query (B, H, N, D) and key/value (B, Hkv, N, D), K/V with the heads the checkpoint has."""
    batch, q_len, _ = fused.shape
    heads, head_dim = module.num_heads, module.head_dim
    if module.new_decoder_architecture:
        qkv = fused.view(batch, q_len, module.num_kv_heads, heads // module.num_kv_heads + 2, head_dim)
        query = qkv[:, :, :, :-2].reshape(batch, q_len, heads, head_dim)
        key, value = qkv[:, :, :, -2], qkv[:, :, :, -1]
    elif module.multi_query:
        qkv = fused.view(batch, q_len, heads + 2, head_dim)
        query, key, value = qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
    else:
        query, key, value = fused.view(batch, q_len, heads, 3, head_dim).unbind(3)
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


def _eager_fallback(module, query, key, value, attention_mask, alibi_slopes, dropout, dense_given,
                    output_attentions, doc_ids=None):
    if output_attentions:
        warn_once("output_attentions", "hf_attn_patch: output_attentions=True is computed with eager "
                  "attention in PyTorch (the kernel never forms the attention matrix); calls without "
                  "it stay on the kernel.")
    elif dropout > 0:
        warn_once("dropout", f"hf_attn_patch: attention dropout in training mode (p={dropout}) is not "
                  "implemented by the kernel; such calls run eager attention in PyTorch. Set the "
                  "config's attention_dropout to 0 to train on the kernel.")
    else:
        warn_once("dense_mask", "hf_attn_patch: a 4-D attention mask cannot be expressed by the "
                  "kernel; such calls run eager attention in PyTorch.")

    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)).float() * module.inv_norm_factor
    if dense_given:
        # FalconModel already folded ALiBi into a caller's 4-D mask.
        mask = attention_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        scores = scores + mask.float()
    else:
        scores = scores + dense_mask(query.shape[2], key, causal=True, window=None, key_padding_mask=attention_mask,
                                     dtype=torch.float32, doc_ids=doc_ids, alibi_slopes=alibi_slopes)
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=module.training).to(query.dtype)
    return (probs @ value).transpose(1, 2), (probs if output_attentions else None)


class _AlibiSlopes:
    """Per-head ALiBi slopes as the kernel takes them: stock's slopes times the score scale."""

    def __init__(self, module: FalconAttention):
        # build_alibi_tensor gives slope_h * position; at position 1 that is the slope, rounded
        # exactly as stock rounds it.
        slopes = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), module.num_heads, torch.float32)[:, 0, 1]
        self._by_device = {slopes.device: slopes * module.inv_norm_factor}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._by_device:
            self._by_device[device] = next(iter(self._by_device.values())).to(device)
        return self._by_device[device]


class KernelFalconAttention(FalconAttention):
    """What FalconDecoderLayer builds from a config that names our implementation.

    A patched model's config says `_attn_implementation = "hf_attn_patch"`, and Falcon picks its
    attention class by that name, so a model built from that config (or a copy of it) needs a
    class under it: this one runs the same forward as a patched module. Llama, Mistral and BERT
    need nothing alike, they look up the function at each call.
    """

    def forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
        if "_hf_attn_patch_slopes" not in self.__dict__:
            self._hf_attn_patch_slopes = _AlibiSlopes(self) if self.config.alibi else None
        return _falcon_forward(self, self._hf_attn_patch_slopes, hidden_states, alibi, attention_mask,
                               layer_past, output_attentions, position_embeddings)


# --- from 5.25: ALiBi comes added into the attention mask -----------------------------------------


class _AlibiInMask(MaskFold):
    """FalconModel (5.25) adds ALiBi into whatever our mask entry returns; take it back out."""

    def applies(self, config) -> bool:
        return getattr(config, "model_type", None) == "falcon" and bool(getattr(config, "alibi", False))

    def shape(self, padding: torch.Tensor | None, device) -> torch.Tensor:
        # FalconModel computes where(mask, 0, min) for a bool mask, then fills ALiBi (B, H, 1, n)
        # where that is not blocked: a (B, 1, 1, n) mask broadcasts into it, a (B, n) would not.
        if padding is None:
            return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        return padding[:, None, None, :]

    def unfold(self, module, mask: torch.Tensor):
        if mask.dim() != 4 or mask.shape[2] != 1 or not mask.is_floating_point():
            return None  # several query rows: a real 4-D mask, left to stock attention
        # Blocked keys hold finfo.min; visible ones slope * position / sqrt(head_dim) >= 0. One
        # query row: every visible key of it is a key the kernel's causal rule lets it see.
        padding = mask[:, 0, 0, :] > torch.finfo(mask.dtype).min / 2
        return padding, _slopes_for(module, mask.device)


ALIBI_IN_MASK = _AlibiInMask()

# (heads, scale, device) -> slopes; a plain dict, so that unpatching leaves the modules as they were.
_SLOPES: dict[tuple, torch.Tensor] = {}


def _slopes_for(module: FalconAttention, device: torch.device) -> torch.Tensor:
    key = (module.num_heads, module.inv_norm_factor, device)
    if key not in _SLOPES:
        _SLOPES[key] = _AlibiSlopes(module).on(device)
    return _SLOPES[key]


def _pass_output_attentions(module: FalconAttention) -> Undo:
    """From 5.25: wrap the stock forward so that a call asking for attention weights says so to
    our attention entry (stock keeps `output_attentions` to itself, and stock sdpa returns no
    weights; ours computes them in eager PyTorch, as for Llama)."""
    undo = _RestoreForward(module, "forward" in module.__dict__, module.__dict__.get("forward"))
    module.forward = _ForwardAskingForWeights(module, module.__dict__.get("forward"))
    return undo


class _ForwardAskingForWeights:
    def __init__(self, module: FalconAttention, previous):
        self.module = module
        self.previous = previous

    def __call__(self, *args, output_attentions=False, **kwargs):
        if output_attentions:
            kwargs[OUTPUT_ATTENTIONS] = True
        if self.previous is not None:
            return self.previous(*args, output_attentions=output_attentions, **kwargs)
        return type(self.module).forward(self.module, *args, output_attentions=output_attentions, **kwargs)


def register_attention_class() -> None:
    """Let Falcon run from a config that names our implementation (idempotent): up to 5.24 an
    attention class under that name, from 5.25 the ALiBi mask fold."""
    classes = falcon_attention_classes()
    if classes is not None:
        classes[ATTN_IMPLEMENTATION] = KernelFalconAttention
    else:
        register_mask_fold(ALIBI_IN_MASK)


FAMILY = Family(
    name="Falcon",
    model_classes=(FalconPreTrainedModel,),
    attention_classes=(FalconAttention,),
    problem=lambda module: head_dim_problem(module, module.head_dim),
    # From 5.25 the config switch moves attention, as for Llama; the forward only gets wrapped
    # to pass output_attentions on.
    patch_module=_pass_output_attentions if falcon_uses_attention_interface() else _patch_module,
)
