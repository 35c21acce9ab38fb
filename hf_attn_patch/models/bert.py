"""BERT (BertModel and its heads; padded batches).

BERT calls attention through transformers' attention interface, so the patch is the config
switch: the mask entry hands the kernel the 2-D padding mask, and the attention entry runs it
non-causal (or causal, for a BERT decoder, from the module's own `is_causal`).
"""

from __future__ import annotations

from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertCrossAttention,
    BertPreTrainedModel,
    BertSelfAttention,
)

from ._family import Family, head_dim_problem

__all__ = ["FAMILY"]


FAMILY = Family(
    name="BERT",
    model_classes=(BertPreTrainedModel,),
    attention_classes=(BertSelfAttention, BertCrossAttention),
    wrapper_classes=(BertAttention,),
    problem=lambda module: head_dim_problem(module, module.attention_head_size),
)
