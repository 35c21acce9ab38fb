"""MHA -> GQA/MQA checkpoint conversion over safetensors (issue 4; docs/conversion.md).

    from hf_attn_patch.conversion import convert_checkpoint
    report = convert_checkpoint("llama-mha", "llama-gqa8", num_kv_heads=8)

Streams shard by shard; imports safetensors, torch and (to verify, and to run the original model
for calibrated methods) transformers, never the kernels.
"""

from .convert import convert_checkpoint
from .errors import ConversionError
from .methods import METHODS, AttentionHeads, KVHeads, LayerStatistics, mean_pool, needs_calibration
from .report import ConversionReport

__all__ = [
    "convert_checkpoint",
    "ConversionError",
    "ConversionReport",
    "METHODS",
    "AttentionHeads",
    "KVHeads",
    "LayerStatistics",
    "mean_pool",
    "needs_calibration",
]
