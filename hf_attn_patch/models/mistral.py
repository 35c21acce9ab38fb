"""Mistral: Llama's layout plus a sliding window.

The attention interface hands `config.sliding_window` to our attention function, which passes
it to the kernel as its window (the W most recent keys, the query's own included: the same
meaning). The patch is the config switch, as for Llama.
"""

from __future__ import annotations

from transformers.models.mistral.modeling_mistral import MistralAttention, MistralPreTrainedModel

from ._family import Family, head_dim_problem

FAMILY = Family(
    name="Mistral",
    model_classes=(MistralPreTrainedModel,),
    attention_classes=(MistralAttention,),
    problem=lambda module: head_dim_problem(module, module.head_dim),
)
