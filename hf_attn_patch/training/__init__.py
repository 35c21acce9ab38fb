"""Uptraining with accelerate (issue 5; docs/uptraining.md).

    from hf_attn_patch.training import UptrainConfig, uptrain
    result = uptrain(UptrainConfig(model="llama-gqa4", output_dir="runs/gqa4", data="corpus.txt",
                                   teacher="llama-mha", max_steps=1000))

Fine-tunes a converted (GQA/MQA) checkpoint, or pre-trains a model given as an instance, with
the attention patched onto our flash kernel (forward and backward). Sits above the patch layer:
imports `patch_model` and the GQA-BERT loader, never the kernels.
"""

from .config import UptrainConfig, UptrainResult
from .data import SequenceOrder, load_token_ids, pack
from .distributed import end_of_run
from .objectives import hidden_distillation_loss, lm_loss, logit_distillation_loss
from .trainer import lr_at, uptrain

__all__ = ["UptrainConfig", "UptrainResult", "uptrain", "end_of_run", "lr_at", "load_token_ids", "pack",
           "SequenceOrder", "lm_loss", "logit_distillation_loss", "hidden_distillation_loss"]
