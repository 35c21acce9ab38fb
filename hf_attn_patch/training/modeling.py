"""Which model a config names, what it is trained for, and loading it (student or teacher).

A model is described from its config alone (`describe_model`), so that a run that cannot work
(an encoder without a teacher, a vocabulary the data overflows, ...) is refused before any
weights are read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

__all__ = ["ModelSpec", "describe_model", "load_model", "load_tokenizer", "zero_attention_dropout",
           "enable_gradient_checkpointing", "CAUSAL", "ENCODER"]

CAUSAL, ENCODER = "causal_lm", "encoder"


@dataclass
class ModelSpec:
    source: object              # a folder (Path) or a PreTrainedModel
    config: PretrainedConfig
    kind: str                   # CAUSAL or ENCODER
    gqa_bert: bool

    @property
    def name(self) -> str:
        return os.fspath(self.source) if isinstance(self.source, Path) else type(self.source).__name__

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.config, "vocab_size", None)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)


def describe_model(source, role: str = "model") -> ModelSpec:
    """Read what `source` is (folder or instance) without loading weights."""
    if isinstance(source, PreTrainedModel):
        causal = type(source).__name__ in _causal_class_names() or bool(getattr(source.config, "is_decoder", False)
                                                                          and source.get_output_embeddings() is not None)
        return ModelSpec(source, source.config, CAUSAL if causal else ENCODER,
                         gqa_bert=source.config.model_type == "bert"
                         and getattr(source.config, "num_key_value_heads", None) is not None)
    if isinstance(source, torch.nn.Module):
        raise ValueError(f"UptrainConfig.{role} must be a transformers PreTrainedModel or a folder, "
                         f"got {type(source).__name__}")
    path = Path(source)
    if not (path / "config.json").is_file():
        raise ValueError(f"UptrainConfig.{role}: {path} is not a model folder (no config.json)")
    raw = json.loads((path / "config.json").read_text())
    gqa_bert = raw.get("model_type") == "bert" and raw.get("num_key_value_heads") is not None
    if gqa_bert:
        config = transformers.BertConfig.from_pretrained(path)
    else:
        config = AutoConfig.from_pretrained(path)
    architectures = raw.get("architectures") or []
    if architectures:
        causal = any(name in _causal_class_names() for name in architectures)
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = config.model_type != "bert" and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return ModelSpec(path, config, CAUSAL if causal else ENCODER, gqa_bert)


def load_model(spec: ModelSpec, dtype: torch.dtype) -> PreTrainedModel:
    """The model of `spec`, on the CPU, in `dtype` (instances are returned as they are)."""
    if isinstance(spec.source, PreTrainedModel):
        return spec.source
    path = spec.source
    if spec.gqa_bert:
        from ..models.bert import load_gqa_bert  # returns the model patched; the caller decides

        return load_gqa_bert(path, dtype=dtype)
    model_class = None
    for name in spec.config.architectures or ():
        candidate = getattr(transformers, name, None)
        if isinstance(candidate, type) and issubclass(candidate, PreTrainedModel):
            model_class = candidate
            break
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM if spec.kind == CAUSAL else transformers.AutoModel
    return model_class.from_pretrained(path, dtype=dtype)


def load_tokenizer(tokenizer, spec: ModelSpec, *, required: bool):
    """A transformers tokenizer, "bytes", or None. `required`: the data is text."""
    if tokenizer == "bytes":
        return "bytes"
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    if isinstance(spec.source, Path):
        try:
            return AutoTokenizer.from_pretrained(spec.source)
        except Exception as error:  # no tokenizer files in the folder: fine unless the data is text
            if required:
                raise ValueError(f"UptrainConfig.data is text but {spec.source} has no tokenizer ({error}); "
                                 "pass tokenizer= (a tokenizer folder, or 'bytes')") from None
            return None
    if required:
        raise ValueError("UptrainConfig.data is text and the model is an instance: pass tokenizer= "
                         "(a tokenizer folder, or 'bytes' for UTF-8 bytes)")
    return None


def zero_attention_dropout(model: torch.nn.Module):
    """Set attention-probability dropout to 0 on every attention module; returns an undo.

    The kernel implements no dropout, so a module with p > 0 in training mode falls back to stock
    attention (docs/patching.md). Only the modules change, not the config: the saved checkpoint
    keeps its dropout settings.
    """
    undo = []
    for module in model.modules():
        if "Attention" not in type(module).__name__:
            continue
        for name in ("dropout", "attention_dropout", "attn_dropout"):
            value = getattr(module, name, None)
            if isinstance(value, torch.nn.Dropout) and value.p > 0:
                undo.append((value, "p", value.p))
                value.p = 0.0
            elif isinstance(value, float) and not isinstance(value, bool) and value > 0:
                undo.append((module, name, value))
                setattr(module, name, 0.0)

    def restore():
        for owner, name, value in reversed(undo):
            setattr(owner, name, value)

    return restore


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant checkpointing (works with DDP and with inputs that need no grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # transformers >= 5.2x
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_gradient_checkpointing(model: PreTrainedModel) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


_CAUSAL_NAMES: set[str] | None = None


def _causal_class_names() -> set[str]:
    global _CAUSAL_NAMES
    if _CAUSAL_NAMES is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        names = set()
        for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            names.update([value] if isinstance(value, str) else value)
        _CAUSAL_NAMES = names
    return _CAUSAL_NAMES
