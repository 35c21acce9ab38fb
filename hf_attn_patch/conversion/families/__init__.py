"""Family registry: config.json's model_type -> the function that plans its conversion."""

from __future__ import annotations

from ..errors import ConversionError
from ..plan import ConversionPlan
from ..source import TensorInfo
from .bert import plan_bert
from .falcon import plan_falcon
from .llama import plan_llama

FAMILIES = {"llama": plan_llama, "mistral": plan_llama, "falcon": plan_falcon, "bert": plan_bert}


def plan_conversion(
    config: dict, tensors: dict[str, TensorInfo], num_kv_heads: int, *, rewrite_attention: bool = False
) -> ConversionPlan:
    """rewrite_attention: plan for a calibrated method, which also rewrites Q and O of each layer."""
    model_type = config.get("model_type")
    planner = FAMILIES.get(model_type)
    if planner is None:
        raise ConversionError(
            f"unknown model family {model_type!r} (config.json's model_type); "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return planner(config, tensors, num_kv_heads, rewrite_attention=rewrite_attention)
