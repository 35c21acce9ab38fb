"""Llama (every head class: the bare model, CausalLM, sequence/token classification, QA).

Llama calls attention through transformers' attention interface, so pointing the config at our
implementation is the whole patch; nothing on the modules changes.
"""

from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaAttention, LlamaPreTrainedModel

from ._family import Family, head_dim_problem

FAMILY = Family(
    name="Llama",
    model_classes=(LlamaPreTrainedModel,),
    attention_classes=(LlamaAttention,),
    problem=lambda module: head_dim_problem(module, module.head_dim),
)
