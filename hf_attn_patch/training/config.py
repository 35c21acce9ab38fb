"""`UptrainConfig` (what to train, on what, how) and `UptrainResult` (what came out).

`UptrainConfig.check()` validates the fields that need no file or model: everything that can be
refused before any work is refused here or in `uptrain`'s first phase, with a ValueError.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch

__all__ = ["UptrainConfig", "UptrainResult", "MIXED_PRECISION", "SCHEDULES"]

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")

ModelSource = Union[str, os.PathLike, "torch.nn.Module"]
DataSource = Union[str, os.PathLike, torch.Tensor]


@dataclass
class UptrainConfig:
    """One uptraining (or pre-training) run. See docs/uptraining.md.

    model: a checkpoint folder, or a `transformers.PreTrainedModel` already built (a fresh
        random model to pre-train, say). Folders of GQA-BERT (config.json with
        `num_key_value_heads`, model_type bert) load through `load_gqa_bert`; other folders through
        the class in config.json's `architectures` (`AutoModelForCausalLM` / `AutoModel` otherwise).
    data: a text file (tokenized by `tokenizer`), a token file or a folder of token files
        (`.npy`, `.pt`, `.bin`; concatenated in name order), or a LongTensor of token ids: 2-D
        (num_sequences, seq_len) is taken as the sequences, 1-D is packed like a file's tokens.
    tokenizer: for text data: a tokenizer folder, "bytes" (UTF-8 bytes as ids 0..255), or None
        for the model folder's own tokenizer. A tokenizer found is saved with the final model.
    teacher: the original (unconverted) model, folder or instance, to distil from. Causal LMs:
        loss = (1 - distill_weight) * LM loss + distill_weight * T^2 * KL(teacher_T || student_T),
        T = distill_temperature. Encoders (no LM head): loss = mean over tokens of
        (1 - cos) + MSE between the student's and the teacher's last hidden states, plus
        (1 - cos) of their mean-pooled states; an encoder needs a teacher.
    batch_size: sequences per process per micro-step; one optimizer step sees
        batch_size * grad_accum * num_processes sequences.
    mixed_precision: "auto" is bf16 on CUDA and "no" on the CPU.
    resume: False, True (the latest checkpoint in output_dir/checkpoints, if any), or a
        checkpoint folder.
    save_every: save a resumable checkpoint every this many steps (0: never).
    packing: padding-free training of causal LMs. Documents end at the token id `doc_separator`
        (None: the model config's eos_token_id), kept as their last token; rows stay the
        stream's seq_len tokens, but position_ids restart after each separator and at each row,
        and a document attends only to itself (on the kernel: no mask is built). A document cut
        by a row's end continues in the next row from position 0. The first token of each
        document is not a target. The rows are the same with or without packing.
    """

    model: ModelSource
    output_dir: str | os.PathLike
    data: DataSource
    teacher: ModelSource | None = None
    tokenizer: str | os.PathLike | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1          # the schedule ends at lr * min_lr_ratio (cosine, linear)
    schedule: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.0          # on weight matrices and embeddings; biases and norms get none
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = True
    patch: bool = True
    zero_attention_dropout: bool = True  # the kernel has no dropout; p > 0 would fall back to stock attention
    save_every: int = 0
    save_total_limit: int | None = None  # keep only the newest this many checkpoints
    resume: bool | str | os.PathLike = False
    log_every: int = 10
    log_with: str | None = None        # an accelerate tracker ("tensorboard", "wandb", ...), optional
    shuffle: bool = True
    seed: int = 0
    token_dtype: str = "uint16"        # element type of raw .bin token files
    packing: bool = False              # documents apart in each row, by restarting position_ids
    doc_separator: int | None = None   # token id that ends a document (None: the model's eos_token_id)
    quiet: bool = False                # no log lines

    def check(self) -> None:
        """Refuse values that can be refused without reading any file (ValueError)."""
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UptrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "save_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"UptrainConfig.{name} must be an int >= 0, got {value!r}")
        if self.save_total_limit is not None and (not _is_int(self.save_total_limit) or self.save_total_limit < 1):
            raise ValueError(f"UptrainConfig.save_total_limit must be an int >= 1 or None, got {self.save_total_limit!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:  # numpy's seed range, which set_seed seeds
            raise ValueError(f"UptrainConfig.seed must be an int in [0, 2**32), got {self.seed!r}")
        # Finite first: NaN fails every comparison (so `x < 0` lets it through) and inf passes lower bounds.
        _check_number("lr", self.lr, "> 0", lambda value: value > 0)
        _check_number("min_lr_ratio", self.min_lr_ratio, "in [0, 1]", lambda value: 0 <= value <= 1)
        _check_number("weight_decay", self.weight_decay, ">= 0", lambda value: value >= 0)
        _check_number("distill_weight", self.distill_weight, "in [0, 1]", lambda value: 0 <= value <= 1)
        _check_number("distill_temperature", self.distill_temperature, "> 0", lambda value: value > 0)
        if self.max_grad_norm is not None:  # a negative norm would flip the sign of the gradients
            _check_number("max_grad_norm", self.max_grad_norm, ">= 0 (0: no clipping)", lambda value: value >= 0)
        betas = tuple(self.adam_betas) if isinstance(self.adam_betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(_is_float(beta) and 0 <= beta < 1 for beta in betas):
            raise ValueError(f"UptrainConfig.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        try:
            integer_tokens = np.issubdtype(np.dtype(self.token_dtype), np.integer)
        except TypeError:
            integer_tokens = False
        if not integer_tokens:
            raise ValueError(f"UptrainConfig.token_dtype must name a numpy integer type (uint16, int32, ...), "
                             f"got {self.token_dtype!r}")
        if self.doc_separator is not None and (not _is_int(self.doc_separator) or self.doc_separator < 0):
            raise ValueError(f"UptrainConfig.doc_separator must be a token id (int >= 0) or None, "
                             f"got {self.doc_separator!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"UptrainConfig.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"UptrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.data, torch.Tensor):
            if self.data.dtype.is_floating_point or self.data.dtype.is_complex or self.data.dtype == torch.bool:
                raise ValueError(f"UptrainConfig.data as a tensor must hold integer token ids, got {self.data.dtype}")
            if self.data.dim() not in (1, 2):
                raise ValueError(f"UptrainConfig.data as a tensor must be 1-D or (num_sequences, seq_len), "
                                 f"got shape {tuple(self.data.shape)}")
            if self.data.dim() == 2 and self.data.shape[1] != self.seq_len:
                raise ValueError(f"UptrainConfig.data has sequences of {self.data.shape[1]} tokens but seq_len is "
                                 f"{self.seq_len}; pass seq_len={self.data.shape[1]} or a 1-D tensor to pack")
        elif not isinstance(self.data, (str, os.PathLike)):
            raise ValueError(f"UptrainConfig.data must be a path or a LongTensor, got {type(self.data).__name__}")
        if self.resume not in (False, True) and not Path(self.resume).is_dir():
            raise ValueError(f"UptrainConfig.resume: no checkpoint folder {self.resume}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(name: str, value, allowed: str, ok) -> None:
    """`value` must be a finite number for which `ok(value)` holds; `allowed` says which, in words."""
    if not _is_float(value) or not ok(value):
        raise ValueError(f"UptrainConfig.{name} must be a finite number {allowed}, got {value!r}")


@dataclass
class UptrainResult:
    """What `uptrain` did.

    steps: optimizer steps done in all (a resumed run counts the steps before the resume).
    tokens_seen: tokens trained on, over all processes. losses: (step, loss) for every step,
    averaged over processes and micro-steps. final_dir: output_dir/final, written with
    save_pretrained from the unpatched model (plus the tokenizer, if any). seconds: wall time of
    this call. resumed_from: the checkpoint this run started from, if any. checkpoints: the
    checkpoint folders this run wrote.
    """

    steps: int
    tokens_seen: int
    losses: list[tuple[int, float]]
    final_dir: Path
    seconds: float
    resumed_from: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)
    objective: str = ""
