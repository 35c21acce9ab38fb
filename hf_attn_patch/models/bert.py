"""BERT (BertModel and its heads; padded batches), and GQA-BERT checkpoints.

BERT calls attention through transformers' attention interface, so the patch is the config
switch: the mask entry hands the kernel the 2-D padding mask, and the attention entry runs it
non-causal (or causal, for a BERT decoder, from the module's own `is_causal`).

GQA-BERT is what `hf_attn_patch.conversion` makes of a BERT checkpoint (docs/conversion.md):
config.json gains `num_key_value_heads: G`, and each layer's `attention.self.key` / `value`
weights and biases have G * head_dim rows, KV head g shared by query heads g * H/G ...
(g + 1) * H/G - 1. Stock BertModel cannot hold those; `load_gqa_bert` builds the smaller
projections and loads the checkpoint with transformers' own `from_pretrained`.
"""

from __future__ import annotations

import os

import torch
import transformers
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertCrossAttention,
    BertModel,
    BertPreTrainedModel,
    BertSelfAttention,
)

from ._family import Family, head_dim_problem

__all__ = ["FAMILY", "load_gqa_bert"]


def load_gqa_bert(path: str | os.PathLike, model_class: type | None = None, **from_pretrained_kwargs):
    """Load a GQA-BERT checkpoint folder and return the model, patched.

    model_class: a BertPreTrainedModel class (BertModel, BertForSequenceClassification, ...);
    by default the first of config.json's `architectures` that transformers has, else BertModel.
    Other keyword arguments go to `from_pretrained` (dtype, device_map, ...).

    The model runs on our kernels, which read each KV head for its group without copying it.
    After `unpatch_model` it runs on stock sdpa, which expands K/V per call (each self-attention
    module gets `num_key_value_groups`, the field transformers' sdpa expands by).
    """
    from ..patch import patch_model  # the patch layer sits above the families

    config = transformers.BertConfig.from_pretrained(path)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is None:
        raise ValueError(
            f"{path}: config.json has no num_key_value_heads, so this is a plain BERT checkpoint; "
            "load it with from_pretrained (and patch_model it), or convert it first with "
            "hf_attn_patch.conversion.convert_checkpoint"
        )
    if kv_heads < 1 or config.num_attention_heads % kv_heads:
        raise ValueError(
            f"{path}: num_key_value_heads {kv_heads} must divide num_attention_heads {config.num_attention_heads}"
        )
    model_class = model_class or _architecture(config)
    if not (isinstance(model_class, type) and issubclass(model_class, BertPreTrainedModel)):
        raise TypeError(f"model_class must be a BERT model class (BertModel, BertFor...), got {model_class!r}")
    model = _with_grouped_key_value(model_class).from_pretrained(path, config=config, **from_pretrained_kwargs)
    return patch_model(model)


def _architecture(config) -> type:
    for name in config.architectures or ():
        candidate = getattr(transformers, name, None)
        if isinstance(candidate, type) and issubclass(candidate, BertPreTrainedModel):
            return candidate
    return BertModel


def _with_grouped_key_value(model_class: type) -> type:
    """model_class whose self-attention key/value projections have num_key_value_heads heads.

    A subclass made for the load, named like its base, so that save_pretrained records the
    base's architecture name and transformers' per-class checks read the base's module.
    """

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        for module in self.modules():
            if isinstance(module, BertSelfAttention):
                _group_key_value(module, config.num_key_value_heads)

    return type(model_class.__name__, (model_class,), {"__init__": __init__, "__module__": model_class.__module__})


def _group_key_value(module: BertSelfAttention, kv_heads: int) -> None:
    width = kv_heads * module.attention_head_size
    for name in ("key", "value"):
        full = getattr(module, name)
        grouped = torch.nn.Linear(full.in_features, width, bias=full.bias is not None,
                                  device=full.weight.device, dtype=full.weight.dtype)
        setattr(module, name, grouped)
    module.num_key_value_groups = module.num_attention_heads // kv_heads


FAMILY = Family(
    name="BERT",
    model_classes=(BertPreTrainedModel,),
    attention_classes=(BertSelfAttention, BertCrossAttention),
    wrapper_classes=(BertAttention,),
    problem=lambda module: head_dim_problem(module, module.attention_head_size),
)
