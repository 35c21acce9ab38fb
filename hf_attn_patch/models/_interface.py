"""Our entries in transformers' attention and mask interfaces.

Llama, Mistral and BERT (and Falcon from transformers 5.25) call attention through
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` and build their mask through
`ALL_MASK_ATTENTION_FUNCTIONS[...]`. Registering both under `ATTN_IMPLEMENTATION` and pointing a
model's config at that name moves its attention onto the kernels without copying modeling code.
Falcon up to 5.24 uses only the mask entry (its attention forward is swapped per instance), so
that it too stops building a (B, 1, Nq, Nk) mask.

The mask entry returns the 2-D key padding mask (bool, or None when nothing is padded), or for
packed sequences the (B, N) int32 document ids; never a (B, 1, Nq, Nk) mask. Mask patterns the
kernel cannot express (custom overlays) get transformers' own sdpa mask, and the attention entry
hands those calls to stock sdpa. A family whose modeling code adds something of its own into the
mask between the two entries (Falcon's ALiBi, from 5.25) registers a `MaskFold` saying how.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from transformers import masking_utils
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .._compat import packed_documents
from ._attention import (align_to_keys, attend, dense_mask, padding_or_documents, warn_once,
                         weights_over_keys)

# Deliberately free of "flash", "sdpa", "flex" and "paged": transformers switches behaviour on
# those substrings of the implementation name.
ATTN_IMPLEMENTATION = "hf_attn_patch"

# The keyword a family's attention module adds to the attention call when the caller asked for
# attention weights and the module does not pass `output_attentions` on itself (Falcon, 5.25).
OUTPUT_ATTENTIONS = "hf_attn_patch_output_attentions"

__all__ = ["ATTN_IMPLEMENTATION", "OUTPUT_ATTENTIONS", "MaskFold", "register", "register_mask_fold", "attention_forward",
           "key_padding_mask"]


def register() -> None:
    """Make `ATTN_IMPLEMENTATION` known to transformers (idempotent, global, harmless to others)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, key_padding_mask)


class MaskFold:
    """A family's modeling code that adds a bias into the mask between our two entries.

    applies(config): does this model do it?
    shape(padding, device): what our mask entry returns instead of the 2-D padding mask (or None),
        so that the family's arithmetic on it gives a tensor the attention entry can read back;
    unfold(module, mask): from what reached the attention entry, (the (B, n) padding mask, the
        (Hq,) ALiBi slopes for the kernel), or None when it is a dense mask after all.
    """

    def applies(self, config) -> bool:
        raise NotImplementedError

    def shape(self, padding: torch.Tensor | None, device) -> torch.Tensor:
        raise NotImplementedError

    def unfold(self, module: torch.nn.Module, mask: torch.Tensor):
        raise NotImplementedError


_MASK_FOLDS: list[MaskFold] = []


def register_mask_fold(fold: MaskFold) -> None:
    if fold not in _MASK_FOLDS:
        _MASK_FOLDS.append(fold)


def _fold_for(config) -> MaskFold | None:
    return next((fold for fold in _MASK_FOLDS if fold.applies(config)), None)


# --- attention ----------------------------------------------------------------------------------


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AttentionInterface entry: q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> ((B, Nq, Hq, D), None)."""
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")

    alibi_slopes = None
    fold = _fold_for(module.config) if _MASK_FOLDS and isinstance(attention_mask, torch.Tensor) else None
    if fold is not None:
        unfolded = fold.unfold(module, attention_mask)
        if unfolded is not None:
            attention_mask, alibi_slopes = unfolded

    if not (attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2)):
        return _stock_with_dense_mask(module, query, key, value, attention_mask, scaling, dropout, kwargs)

    k_len = key.shape[2]
    attention_mask, doc_ids = padding_or_documents(attention_mask)
    if doc_ids is None and attention_mask is None and causal and torch.compiler.is_compiling():
        doc_ids = _documents_while_compiling(kwargs.get("position_ids"), query.shape[0], query.shape[2], k_len)
    attention_mask, key, value = align_to_keys(attention_mask, key, value)

    wants_weights = (kwargs.pop(OUTPUT_ATTENTIONS, False) or kwargs.get("output_attentions")
                     or getattr(module.config, "output_attentions", False))
    if wants_weights or (dropout > 0 and module.training):
        if wants_weights:
            warn_once(
                "output_attentions",
                "hf_attn_patch: output_attentions=True is computed with the stock eager attention "
                "(the kernel never forms the attention matrix); calls without it stay on the kernel.",
            )
        else:
            warn_once(
                "dropout",
                f"hf_attn_patch: attention dropout in training mode (p={dropout}) is not implemented by "
                "the kernel; such calls run on the stock eager attention. Set the config's attention "
                "dropout to 0 to train on the kernel.",
            )
        mask = dense_mask(
            query.shape[2], key, causal=causal, window=window, key_padding_mask=attention_mask, dtype=query.dtype,
            doc_ids=doc_ids, alibi_slopes=alibi_slopes,
        )
        out, weights = _stock_eager(module, query, key, value, mask, scaling, dropout, kwargs)
        return out, weights_over_keys(weights, k_len)

    out = attend(module, query, key, value, causal=causal, window=window, key_padding_mask=attention_mask,
                 alibi_slopes=alibi_slopes, scale=scaling, doc_ids=doc_ids)
    return out, None


def _documents_while_compiling(position_ids, batch: int, q_len: int, k_len: int) -> torch.Tensor | None:
    """Document ids from position_ids, for a call traced by torch.compile without a mask.

    While tracing, our mask entry cannot read transformers' packed-sequence ids (see _pattern) and
    returns None for packed and ordinary rows alike. transformers itself then always applies its
    packed-sequence rule (position_ids not rising by one start a document); so do we, with its
    own function: an ordinary row is one document, and the kernel's answer is the same for it.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or not q_len == k_len == position_ids.shape[1]:
        return None
    ids = masking_utils.find_packed_sequence_indices(position_ids.expand(batch, -1))
    return None if ids is None else ids.to(torch.int32)


def _stock_with_dense_mask(module, query, key, value, mask, scaling, dropout, kwargs):
    """A (B, 1, Nq, Nk) mask came in (the caller's own, or a custom mask pattern): stock attention."""
    warn_once(
        "dense_mask",
        "hf_attn_patch: a 4-D attention mask (the caller's own, or a custom mask pattern) cannot be "
        "expressed by the kernel; such calls run on the stock attention.",
    )
    if kwargs.get("output_attentions") or getattr(module.config, "output_attentions", False):
        if mask.dtype == torch.bool:
            blocked = torch.full((), torch.finfo(query.dtype).min, dtype=query.dtype, device=mask.device)
            mask = torch.where(mask, torch.zeros((), dtype=query.dtype, device=mask.device), blocked)
        return _stock_eager(module, query, key, value, mask, scaling, dropout, kwargs)
    module, key, value = _expanded(module, query, key, value)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _stock_eager(module, query, key, value, mask, scaling, dropout, kwargs):
    eager = _family_eager(module)
    module, key, value = _expanded(module, query, key, value)
    return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _expanded(module, query, key, value):
    """K/V with one head per query head, and the module as stock code should then see it.

    Stock attention functions differ on GQA: Llama's expand K/V by `module.num_key_value_groups`,
    BERT's never do (so GQA-BERT needs it done here). Expanding first and presenting groups of 1
    suits both.
    """
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return module, key, value
    return _OneGroup(module), key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


class _OneGroup:
    """A module as seen by stock attention after K/V were expanded: everything but the groups."""

    num_key_value_groups = 1

    def __init__(self, module: torch.nn.Module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def _family_eager(module: torch.nn.Module) -> Callable:
    """The `eager_attention_forward` of the modeling file that defines the module (or a base)."""
    for cls in type(module).__mro__:
        eager = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
    raise RuntimeError(f"no stock eager attention found for {type(module).__name__}")


# --- mask ---------------------------------------------------------------------------------------


def key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """AttentionMaskInterface entry: a (B, n) boolean mask of key positions [0, n), or None; for
    packed sequences (B, N) int32 document ids.

    transformers describes the keys as absolute positions [kv_offset, kv_offset + kv_length)
    and the queries as [q_offset, q_offset + q_length). The kernel puts the queries at the last
    keys, which is where they are with a dynamic or sliding-window cache; there n is the end of
    the keys and `align_to_keys` takes the mask's last Nk columns. A static cache has unwritten
    slots after the queries: a single decoding query keeps the static shape and masks them; a
    block of queries gets n = the end of the queries, and `align_to_keys` cuts K/V to n.

    The mask stays in absolute positions from 0 because generate() feeds what this returns
    back in as the 2-D attention mask when the cache is compileable; it must mean the same then.

    Packed sequences (transformers found position_ids restarting, with no attention mask and no
    cache): the ids it computed, one per document, go to the kernel as they are, on the device;
    causal (decoders) or bidirectional (encoders, from transformers 5.25) alike.

    A model with a `MaskFold` (Falcon with ALiBi, from 5.25) gets its padding in the fold's shape,
    and transformers' own mask where the fold cannot carry what the kernel needs (documents).
    """
    mask_args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    mask = _kernel_mask(**mask_args)
    fold = _fold_for(kwargs.get("config")) if _MASK_FOLDS else None
    if fold is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        return mask
    if mask is not None and mask.dtype == torch.int32:
        return _stock_mask(**mask_args)
    return fold.shape(mask, kwargs.get("device", "cpu"))


def _kernel_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs):
    """`key_padding_mask` for a model that takes our masks as they are."""
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
    # Under torch.compile the closures cannot be inspected (see _pattern).
    packed = None if torch.compiler.is_compiling() else packed_documents(mask_function)
    if packed is not None:
        doc_ids, base = packed
        if _pattern(base) is not None and attention_mask is None:
            return doc_ids.to(device=device, dtype=torch.int32).expand(batch_size, -1)
    pattern = _pattern(mask_function)
    if pattern is None:
        return _stock_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                           **kwargs)

    keys_end = kv_offset + kv_length
    padding = None
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, :keys_end]

    if pattern == "causal" and (isinstance(q_offset, torch.Tensor) or keys_end > q_offset + q_length):
        if q_length == 1:
            written = torch.arange(keys_end, device=device) <= q_offset
            return written.expand(batch_size, -1) if padding is None else padding & written
        if padding is None:
            padding = torch.ones(batch_size, keys_end, dtype=torch.bool, device=device)
        return padding[:, : int(q_offset) + q_length]

    if padding is not None and not torch.compiler.is_compiling() and bool(padding[:, kv_offset:].all()):
        return None
    return padding


def _stock_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs):
    """transformers' own (B, 1, Nq, Nk) sdpa mask, for patterns the kernel cannot express."""
    rest = {k: v for k, v in kwargs.items() if k not in ("allow_is_causal_skip", "allow_is_bidirectional_skip")}
    return masking_utils.sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **rest,
    )


_AND_CODE = masking_utils.and_masks(masking_utils.causal_mask_function).__code__
_SLIDING_CODE = masking_utils.sliding_window_overlay(1).__code__


def _pattern(mask_function: Callable | None) -> str | None:
    """'causal' or 'bidirectional' for the plain patterns, None for anything the kernel cannot do.

    The plain patterns are transformers' causal and bidirectional functions and the sliding
    window (an `and_masks` of causal and the window overlay; the window itself reaches the
    attention entry as its `sliding_window` argument). Anything else is None (packed sequences
    are recognised before, by `packed_documents`). Under torch.compile the closures cannot be
    inspected; there, as transformers itself cannot tell packed rows from ordinary ones while
    tracing, the plain pattern is assumed.
    """
    if mask_function is None or mask_function is masking_utils.causal_mask_function:
        return "causal"
    if mask_function is masking_utils.bidirectional_mask_function:
        return "bidirectional"
    if torch.compiler.is_compiling():
        return "causal"
    parts = _closure_value(mask_function, _AND_CODE, "mask_functions")
    if parts is not None and len(parts) == 2 and masking_utils.causal_mask_function in parts:
        overlay = parts[0] if parts[1] is masking_utils.causal_mask_function else parts[1]
        if getattr(overlay, "__code__", None) is _SLIDING_CODE:
            return "causal"
    return None


def _closure_value(function: Callable, code, name: str):
    """The value of free variable `name` in a closure built from `code`, else None."""
    if getattr(function, "__code__", None) is not code or function.__closure__ is None:
        return None
    return function.__closure__[code.co_freevars.index(name)].cell_contents
