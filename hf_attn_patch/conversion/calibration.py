"""Calibration for calibrated methods: token ids in, per-layer statistics of the original model out.

`prepare_calibration` checks and tokenizes what the caller passed, cheaply and before anything is
written. `collect_statistics` then loads the ORIGINAL model with transformers (the class in
config.json's `architectures`; float32 on a CPU, the checkpoint's dtype on CUDA), runs its base
model over the tokens in batches, and accumulates at each layer's attention input x (the input
of Q, K and V) the second moment of [x, 1] over the real (unpadded) tokens, in float64. That is
all the methods need: every head's key, value and query statistics follow from it and the
weights. Memory: the whole model plus (hidden + 1)^2 float64 per layer (0.5 GB for a 1B Llama,
4.3 GB for a 7B); time: one forward pass over the calibration tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch

from .errors import ConversionError
from .listing import unreadable
from .methods import LayerStatistics
from .plan import ConversionPlan

CalibrationInput = Union[None, str, os.PathLike, torch.Tensor, Sequence[Sequence[int]]]

MAX_FILE_SEQUENCE = 512  # tokens per line of a calibration text file, at most
_BATCH_TOKENS = 8192
# The module whose input is the attention input of layer `layer`, per family (module names).
_ATTENTION_INPUT = {
    "llama": r"layers\.(?P<layer>\d+)\.self_attn\.k_proj",
    "mistral": r"layers\.(?P<layer>\d+)\.self_attn\.k_proj",
    "bert": r"encoder\.layer\.(?P<layer>\d+)\.attention\.self\.key",
}


@dataclass(frozen=True)
class CalibrationTokens:
    sequences: tuple[torch.Tensor, ...]  # 1-D int64 each
    origin: str

    @property
    def tokens(self) -> int:
        return sum(len(sequence) for sequence in self.sequences)

    def summary(self) -> dict:
        return {"source": self.origin, "sequences": len(self.sequences), "tokens": self.tokens}


def prepare_calibration(calibration: CalibrationInput, source_dir: Path, config: dict) -> CalibrationTokens:
    """Token ids from a text file (one sequence per non-empty line), a 2-D tensor or lists of ints."""
    if calibration is None:
        raise ConversionError("calibration is None")
    if isinstance(calibration, (str, os.PathLike)):
        sequences, origin = _tokenize_file(Path(calibration), source_dir, config), f"text file {calibration}"
    elif isinstance(calibration, torch.Tensor):
        sequences, origin = _from_tensor(calibration), "token ids (tensor)"
    elif isinstance(calibration, Sequence) and not isinstance(calibration, (bytes, bytearray)):
        sequences, origin = _from_lists(calibration), "token ids (lists)"
    else:
        raise ConversionError(
            f"calibration must be a path to a text file, a (num_sequences, seq_len) tensor of token "
            f"ids or a list of lists of ints, got {type(calibration).__name__}"
        )
    vocab = config.get("vocab_size")
    limit = config.get("max_position_embeddings")
    for index, sequence in enumerate(sequences):
        if isinstance(vocab, int) and (int(sequence.min()) < 0 or int(sequence.max()) >= vocab):
            raise ConversionError(
                f"calibration sequence {index} holds token ids outside [0, {vocab}) (config.json's "
                "vocab_size); were they made with another tokenizer?"
            )
        if isinstance(limit, int) and len(sequence) > limit:
            raise ConversionError(
                f"calibration sequence {index} has {len(sequence)} tokens, more than the model's "
                f"max_position_embeddings {limit}; pass shorter sequences"
            )
    return CalibrationTokens(tuple(sequences), origin)


def collect_statistics(
    source_dir: Path, plan: ConversionPlan, tokens: CalibrationTokens
) -> dict[int, LayerStatistics]:
    """Run the original model over the tokens; layer -> second moment of its attention input."""
    import re

    from .verify import _model_class, _quiet_transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_class = _model_class(source_dir)
    try:
        with _quiet_transformers():
            model = model_class.from_pretrained(
                source_dir, dtype="auto" if device.type == "cuda" else torch.float32
            )
    except Exception as error:
        raise ConversionError(
            f"calibration needs the original model, which does not load with {model_class.__name__}: {error}"
        ) from error
    model.to(device).eval()
    pattern = re.compile(rf"(^|\.){_ATTENTION_INPUT[plan.family]}$")
    sums: dict[int, torch.Tensor] = {}
    real: dict[str, torch.Tensor] = {}

    def hook(layer: int):
        def accumulate(module, args, kwargs):
            x = (args[0] if args else kwargs["input"])[real["mask"]].double()  # (tokens, hidden)
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            sums[layer] = sums.get(layer, 0) + x.T @ x

        return accumulate

    handles = []
    for name, module in model.named_modules():
        if match := pattern.search(name):
            handles.append(module.register_forward_pre_hook(hook(int(match["layer"])), with_kwargs=True))
    try:
        if len(handles) != len(plan.layers):
            raise ConversionError(
                f"found {len(handles)} attention layers in the loaded {model_class.__name__}, the "
                f"checkpoint has {len(plan.layers)}; cannot calibrate this model"
            )
        base = getattr(model, "base_model", model)
        with torch.inference_mode():
            for ids, mask in _batches(tokens.sequences, device):
                real["mask"] = mask.bool()
                base(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    count = tokens.tokens
    return {layer: LayerStatistics((total / count).cpu(), count) for layer, total in sums.items()}


def _tokenize_file(path: Path, source_dir: Path, config: dict) -> list[torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"calibration file {str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise unreadable(path, "the calibration file", error) from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ConversionError(f"calibration file {str(path)!r} holds no text")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except Exception as error:
        raise ConversionError(
            f"a calibration text file needs the tokenizer saved in the source folder, and "
            f"{str(source_dir)!r} has none that loads ({type(error).__name__}: {error}); save the "
            "tokenizer there, or pass token ids (a (num_sequences, seq_len) LongTensor) instead"
        ) from error
    limit = min(MAX_FILE_SEQUENCE, config.get("max_position_embeddings") or MAX_FILE_SEQUENCE)
    encoded = tokenizer(lines, truncation=True, max_length=limit)["input_ids"]
    return [torch.tensor(ids, dtype=torch.long) for ids in encoded if ids]


def _from_tensor(ids: torch.Tensor) -> list[torch.Tensor]:
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ConversionError(
            f"calibration token ids must be a non-empty (num_sequences, seq_len) tensor, got shape {list(ids.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ConversionError(f"calibration token ids must be integers, got {ids.dtype}")
    return list(ids.long().cpu())


def _from_lists(ids: Sequence) -> list[torch.Tensor]:
    sequences = []
    for row in ids:
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not row:
            raise ConversionError("calibration token ids given as lists must be a list of non-empty lists of ints")
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in row):
            raise ConversionError("calibration token ids given as lists must hold ints only")
        sequences.append(torch.tensor(row, dtype=torch.long))
    if not sequences:
        raise ConversionError("calibration token ids are empty")
    return sequences


def _batches(sequences: Sequence[torch.Tensor], device: torch.device):
    """Right-padded batches of about _BATCH_TOKENS tokens, similar lengths together: (ids, mask)."""
    ordered = sorted(sequences, key=len)
    start = 0
    while start < len(ordered):
        stop = start + 1
        while stop < len(ordered) and len(ordered[stop]) * (stop - start + 1) <= _BATCH_TOKENS:
            stop += 1
        chunk = ordered[start:stop]
        width = max(len(sequence) for sequence in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, sequence in enumerate(chunk):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        yield ids.to(device), mask.to(device)
        start = stop
