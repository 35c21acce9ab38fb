"""Training objectives: next-token loss, logit distillation (causal LMs), hidden-state distillation (encoders).

Each takes a batch of token ids and returns one scalar loss tensor (no host sync). Losses are
computed in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import packed_positions

__all__ = ["lm_loss", "logit_distillation_loss", "hidden_distillation_loss", "Objective", "objective_name"]


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy: logits (B, N, V) at position i predict input_ids[:, i + 1].

    With packed documents (position_ids restarting), the first token of a document is no target:
    the previous document's last token cannot see it coming.
    """
    targets = input_ids[:, 1:]
    if position_ids is not None:
        targets = targets.masked_fill(position_ids[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())


def logit_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over token positions.

    The T^2 factor (Hinton et al., 2015) keeps the gradient scale independent of T.
    """
    vocab = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, vocab).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, vocab).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between last hidden states (B, N, H), student vs teacher; 0 when they agree.

    Mean over (real) tokens of (1 - cos) + MSE, plus the mean over sequences of (1 - cos) of the
    mean-pooled states: an encoder is mostly used through that pooled sentence embedding, and
    matching it directly is what moves its similarity to the teacher's (docs/uptraining.md).
    """
    s, t = student.float(), teacher.float()
    mask = torch.ones(s.shape[:2], device=s.device) if attention_mask is None else attention_mask.to(s.dtype)
    per_token = (1 - F.cosine_similarity(s, t, dim=-1)) + (s - t).pow(2).mean(-1)
    tokens = (per_token * mask).sum() / mask.sum().clamp_min(1)
    counts = mask.sum(1, keepdim=True).clamp_min(1)
    pooled_s, pooled_t = (s * mask[..., None]).sum(1) / counts, (t * mask[..., None]).sum(1) / counts
    return tokens + (1 - F.cosine_similarity(pooled_s, pooled_t, dim=-1)).mean()


def objective_name(kind: str, has_teacher: bool, distill_weight: float) -> str:
    """The objective's name, known before any model is loaded (a resumed run must keep it)."""
    if kind == "causal_lm":
        if not has_teacher or distill_weight == 0:
            return "lm"
        return "distill-kl" if distill_weight == 1 else f"lm+distill-kl (w={distill_weight})"
    return "distill-hidden"


class Objective:
    """The loss of one micro-batch for a student (and optional teacher)."""

    def __init__(self, kind: str, *, teacher=None, distill_weight: float = 0.5, temperature: float = 1.0,
                 autocast=None, student_is_base: bool = True, teacher_is_base: bool = True,
                 doc_separator: int | None = None):
        self.kind, self.teacher = kind, teacher
        self.doc_separator = doc_separator  # packing: documents end at this token id
        self.weight, self.temperature = distill_weight, temperature
        self.autocast = autocast
        self.student_is_base, self.teacher_is_base = student_is_base, teacher_is_base

    @property
    def name(self) -> str:
        return objective_name(self.kind, self.teacher is not None, self.weight)

    def __call__(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "causal_lm":
            packed = {}
            if self.doc_separator is not None:
                packed["position_ids"] = packed_positions(input_ids, self.doc_separator)
            logits = model(input_ids=input_ids, use_cache=False, **packed).logits
            if self.teacher is None or self.weight == 0:
                return lm_loss(logits, input_ids, packed.get("position_ids"))
            teacher_logits = self._teacher(input_ids, **packed).logits
            kl = logit_distillation_loss(logits, teacher_logits, self.temperature)
            if self.weight == 1:
                return kl
            return (1 - self.weight) * lm_loss(logits, input_ids, packed.get("position_ids")) + self.weight * kl
        student = _last_hidden(model(input_ids=input_ids, output_hidden_states=not self.student_is_base),
                               self.student_is_base)
        teacher = _last_hidden(self._teacher(input_ids, output_hidden_states=not self.teacher_is_base),
                               self.teacher_is_base)
        return hidden_distillation_loss(student, teacher)

    @torch.no_grad()
    def _teacher(self, input_ids, **kwargs):
        if self.kind == "causal_lm":
            kwargs.setdefault("use_cache", False)
        with self.autocast():
            return self.teacher(input_ids=input_ids, **kwargs)


def _last_hidden(output, is_base: bool) -> torch.Tensor:
    return output.last_hidden_state if is_base else output.hidden_states[-1]
