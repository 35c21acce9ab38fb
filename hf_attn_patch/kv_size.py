"""How big is the KV cache, and how fast can a decode step be? (issue 16; `hf-attn-patch kv-size`)

    report = kv_size_report("path/to/llama", batch=8, seq=4096)   # or a config.json path

For the model as it is and for each GQA/MQA conversion of it (fewer KV heads), from the config
alone (no tensor is loaded):

- K/V bytes per token: 2 (K and V) x layers x KV heads x head dim x bytes per element, the shape
  `PagedKVCache` allocates (read by `KVShape.from_config`, Falcon's three layouts included);
  with a sliding window a sequence holds at most `window` tokens of K/V.
- the weights: from the safetensors headers when the folder has weights, else counted on a model
  built from the config on the meta device (no memory); a conversion removes K/V projection rows.
- what fits beside the weights in the GPU's memory, and the decode step's lower bound: every
  weight and the K/V of the whole batch read once per step at the GPU's peak bandwidth.

Every default and assumption is written into `KVSizeReport.notes`, so the output says it.
BERT (an encoder) keeps no KV cache: its rows show the K/V one forward pass computes, and
neither a fit nor a decode step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .cache.paged import KVShape

__all__ = [
    "GPU",
    "Weights",
    "Variant",
    "KVSizeReport",
    "kv_size_report",
    "load_config",
    "detect_gpu",
    "peak_bandwidth",
    "kv_head_choices",
    "format_bytes",
    "SUPPORTED_MODEL_TYPES",
    "DTYPE_BYTES",
    "SEQ_CAP",
    "ASSUMED_GPU",
]

GiB = 2**30
SUPPORTED_MODEL_TYPES = ("bert", "falcon", "llama", "mistral")
# --dtype names -> bytes per element; the long names are what config.json's torch_dtype holds.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
# The default --seq is max_position_embeddings, but 128k-context configs would then describe one
# sequence most deployments never serve; past this the default stops (and says so).
SEQ_CAP = 32_768
# The largest conversion target offered besides the model as it is: released GQA models ship
# with 8 KV heads or fewer (Llama 2 70B and 3, Mistral, Falcon-40B: 8), so larger counts are
# rarely what a user converts to.
MAX_GQA_CHOICE = 8


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bandwidth: float | None  # bytes per second, peak; None only from detect_gpu, for an unknown GPU
    source: str  # where the two figures come from, in words


# No GPU and no --gpu-memory/--bandwidth: the most common serving GPU, and say so.
ASSUMED_GPU = GPU("H100 80GB SXM", 80 * GiB, 3.35e12, "assumed")

# Peak memory bandwidth (TB/s) from the vendor's data sheets; first match on the lower-case
# torch.cuda.get_device_name wins, so the specific names come first.
_PEAK_BANDWIDTH_TB_S = (
    (("h200",), 4.8),
    (("h100", "nvl"), 3.9),
    (("h100", "pcie"), 2.0),
    (("h100",), 3.35),  # "NVIDIA H100 80GB HBM3": the SXM part
    (("a100", "80gb", "pcie"), 1.935),
    (("a100", "80gb"), 2.039),
    (("a100",), 1.555),  # the 40GB parts, SXM4 and PCIe
)


@dataclass(frozen=True)
class Weights:
    parameters: int
    bytes: int  # at the report's dtype (float tensors), as stored (any other)
    source: str


@dataclass(frozen=True)
class Variant:
    """The model with `kv_heads` KV heads. For an encoder the fit and decode fields are None;
    for a decoder `max_seq` None means any length fits (a sliding window bounds the K/V)."""

    kv_heads: int
    label: str  # "as is", "GQA-4", "MQA"
    batch: int
    kv_bytes_per_token: int
    kv_bytes: int  # the batch's K/V at --seq (each sequence capped at the window)
    weight_bytes: int
    fits: bool | None  # weights + kv_bytes within the GPU's memory
    max_tokens: int | None  # K/V tokens that fit beside the weights
    max_batch: int | None  # sequences of --seq tokens that fit
    max_seq: int | None  # longest sequence at --batch
    decode_step_s: float | None  # lower bound: (weights + kv_bytes) / bandwidth

    @property
    def tokens_per_s(self) -> float | None:
        """Upper bound on generated tokens per second: one per sequence per step."""
        return None if self.decode_step_s is None else self.batch / self.decode_step_s


@dataclass(frozen=True)
class KVSizeReport:
    name: str
    model_type: str
    encoder: bool  # no KV cache in generation
    num_query_heads: int
    shape: KVShape  # as the config says, before any conversion
    batch: int
    seq: int
    tokens_held: int  # per sequence: seq, or the sliding window when smaller
    dtype: str
    weights: Weights
    gpu: GPU | None  # None for an encoder: nothing is fitted or timed
    variants: tuple[Variant, ...]
    notes: tuple[str, ...]  # every default and assumption, in words


def kv_size_report(
    model: str | Path,
    *,
    batch: int = 1,
    seq: int | None = None,
    dtype: str | None = None,
    gpu_memory_gib: float | None = None,
    bandwidth_tb_s: float | None = None,
) -> KVSizeReport:
    """The report for a checkpoint folder (config.json, optional safetensors) or a config.json.

    seq defaults to max_position_embeddings capped at SEQ_CAP; dtype to the config's torch_dtype
    (else bf16); the GPU figures to the local GPU's, else ASSUMED_GPU. Raises ValueError for bad
    input, with a message that says what to pass instead.
    """
    batch = _positive_int("--batch", batch)
    seq = None if seq is None else _positive_int("--seq", seq)
    gpu_memory_gib = None if gpu_memory_gib is None else _positive_number("--gpu-memory", gpu_memory_gib)
    bandwidth_tb_s = None if bandwidth_tb_s is None else _positive_number("--bandwidth", bandwidth_tb_s)

    config, raw, folder, name = load_config(model)
    notes: list[str] = []
    shape = KVShape.from_config(config)
    encoder = raw["model_type"] == "bert" and not getattr(config, "is_decoder", False)

    seq, seq_note = _resolve_seq(seq, getattr(config, "max_position_embeddings", None))
    notes.append(seq_note)
    dtype, dtype_note = _resolve_dtype(dtype, raw)
    notes.append(dtype_note)
    weights = _checkpoint_weights(folder, DTYPE_BYTES[dtype]) if folder is not None else None
    if weights is None:
        weights = _estimated_weights(config, shape, encoder, DTYPE_BYTES[dtype], folder)
    notes.append(f"weights: {weights.source}")
    gpu = None if encoder else _resolve_gpu(gpu_memory_gib, bandwidth_tb_s)
    if gpu is not None:
        notes.append(f"GPU: {format_bytes(gpu.memory_bytes)}, {gpu.bandwidth / 1e12:g} TB/s: {gpu.source}")

    tokens_held = seq if shape.sliding_window is None else min(seq, shape.sliding_window)
    if shape.sliding_window is not None:
        notes.append(
            f"sliding window {shape.sliding_window:,}: a sequence keeps the K/V of its last "
            f"{shape.sliding_window:,} tokens at most, so the K/V stops growing there "
            "(PagedKVCache holds up to one block more, the one the window is moving through)"
        )
    choices, choice_note = kv_head_choices(config, shape)
    if choice_note:
        notes.append(choice_note)
    if len(choices) > 1:
        notes.append(
            "conversions: the K/V projections lose the rows of the heads merged away (hf-attn-patch "
            "convert --kv-heads G); nothing else in the weights changes. Quality needs uptraining: "
            "docs/conversion.md"
        )

    variants = tuple(
        _variant(config, shape, g, batch, tokens_held, DTYPE_BYTES[dtype], weights, gpu, encoder)
        for g in choices
    )
    if encoder:
        notes.append(
            "BERT is an encoder: it keeps no KV cache and has no decode step, so there is no fit or "
            "step bound. The K/V columns show what one forward pass of batch x seq computes over "
            "all layers (inference frees each layer's after use; training keeps them all for the "
            "backward)"
        )
    else:
        if weights.bytes >= gpu.memory_bytes:
            notes.append(
                f"the weights alone ({format_bytes(weights.bytes)}) do not fit in "
                f"{format_bytes(gpu.memory_bytes)}: nothing is left for K/V"
            )
        notes.append(
            "fits: K/V beside the weights in the whole GPU memory, with nothing kept for "
            "activations, the CUDA context or fragmentation (PagedKVCache takes half of the "
            "memory free by default for that reason): a ceiling, not a promise"
        )
        notes.append(
            "decode step >=: every weight and the K/V of batch x seq read once at peak bandwidth, "
            "nothing else; real steps are slower (our paged decode read 2.4-3.0 TB/s on an H100 "
            "whose peak is 3.35: docs/paging.md)"
        )
    return KVSizeReport(
        name=name,
        model_type=raw["model_type"],
        encoder=encoder,
        num_query_heads=config.num_attention_heads,
        shape=shape,
        batch=batch,
        seq=seq,
        tokens_held=tokens_held,
        dtype=dtype,
        weights=weights,
        gpu=gpu,
        variants=variants,
        notes=tuple(notes),
    )


def load_config(model: str | Path):
    """(transformers config, config.json as a dict, the checkpoint folder or None, a display name).

    `model` is a folder holding config.json or the path of a config file; the folder is where
    weights are looked for (the config file's folder too, when it is named config.json).
    """
    path = Path(model)
    if path.is_dir():
        folder, config_path = path, path / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{str(path)!r} has no config.json; pass a checkpoint folder or a config.json path")
    elif path.is_file():
        config_path = path
        folder = path.parent if path.name == "config.json" else None
    else:
        raise ValueError(f"{str(path)!r} does not exist; pass a checkpoint folder or a config.json path")
    try:
        raw = json.loads(config_path.read_text())
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} does not hold a JSON object; it is not a model config")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{config_path}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # A key left out would silently take the config class's default (a 7B shape): refuse instead.
    aliases = {"hidden_size": ("n_embed",)}  # Falcon's old name
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not any(k in raw for k in (key, *aliases.get(key, ()))):
            raise ValueError(f"{config_path} has no {key!r}; a {model_type} config needs it")

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as error:  # transformers' validation errors are not ValueErrors in every release
        raise ValueError(f"transformers refuses {config_path}: {error}") from None
    name = (folder or config_path.parent).resolve().name or str(config_path)
    return config, raw, folder, name


def kv_head_choices(config, shape: KVShape) -> tuple[tuple[int, ...], str | None]:
    """KV-head counts to show: as it is, then each count up to MAX_GQA_CHOICE that divides it
    (`convert` merges whole groups), down to MQA. Also a note when a layout limits the list."""
    current = shape.num_kv_heads
    smaller = [g for g in range(min(current - 1, MAX_GQA_CHOICE), 0, -1) if current % g == 0]
    if _sequential_multi_head_falcon(config) and current > 1:
        # conversion/families/falcon.py: transformers' Falcon holds G > 1 KV heads only in a
        # layout whose layers run attention and MLP in parallel; this one runs them in sequence.
        note = (
            "Falcon multi-head with parallel_attn=False (Falcon-RW): convert turns it into MQA "
            "only, so no GQA rows"
        )
        return (current, 1), note
    return (current, *smaller), None


def detect_gpu() -> GPU | None:
    """The first CUDA GPU's total memory and peak bandwidth (None without a GPU; its bandwidth
    is None when its name is not in the table)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(0)
    name = torch.cuda.get_device_name(0)
    count = torch.cuda.device_count()
    where = "cuda:0" + (f" (of {count} GPUs; one GPU's figures)" if count > 1 else "")
    source = f"the total of the {name} on {where} ({format_bytes(free)} free now)"
    return GPU(name, total, peak_bandwidth(name), source)


def peak_bandwidth(device_name: str) -> float | None:
    """Peak bytes/s of a GPU by its torch name (H100, H200, A100 parts), None if unknown."""
    lower = device_name.lower()
    for words, tb_s in _PEAK_BANDWIDTH_TB_S:
        if all(word in lower for word in words):
            return tb_s * 1e12
    return None


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


# --- one row ----------------------------------------------------------------------------------


def _variant(config, shape, kv_heads, batch, tokens_held, dtype_bytes, weights, gpu, encoder) -> Variant:
    per_token = 2 * shape.num_layers * kv_heads * shape.head_dim * dtype_bytes
    kv_bytes = batch * tokens_held * per_token
    weight_bytes = weights.bytes - _removed_kv_parameters(config, shape, kv_heads) * dtype_bytes
    if kv_heads == shape.num_kv_heads:
        label = "as is"
    else:
        label = "MQA" if kv_heads == 1 else f"GQA-{kv_heads}"
    if encoder:
        return Variant(kv_heads, label, batch, per_token, kv_bytes, weight_bytes, None, None, None, None, None)
    room = max(gpu.memory_bytes - weight_bytes, 0)
    max_tokens = room // per_token
    if shape.sliding_window is not None and batch * shape.sliding_window <= max_tokens:
        max_seq = None  # the window bounds every sequence's K/V: any length fits
    else:
        max_seq = max_tokens // batch
    return Variant(
        kv_heads=kv_heads,
        label=label,
        batch=batch,
        kv_bytes_per_token=per_token,
        kv_bytes=kv_bytes,
        weight_bytes=weight_bytes,
        fits=weight_bytes + kv_bytes <= gpu.memory_bytes,
        max_tokens=max_tokens,
        max_batch=max_tokens // tokens_held,
        max_seq=max_seq,
        decode_step_s=(weight_bytes + kv_bytes) / gpu.bandwidth,
    )


def _removed_kv_parameters(config, shape: KVShape, kv_heads: int) -> int:
    """Parameters a conversion to kv_heads removes: the K and V projection rows (and biases) of
    the heads merged away, in every layer; Falcon's fused query_key_value loses the same rows."""
    has_bias = {
        "llama": getattr(config, "attention_bias", False),
        "falcon": getattr(config, "bias", False),
        "bert": True,  # BertSelfAttention's key and value are nn.Linear with bias
    }.get(config.model_type, False)
    per_row = config.hidden_size + (1 if has_bias else 0)
    return shape.num_layers * 2 * (shape.num_kv_heads - kv_heads) * shape.head_dim * per_row


# --- defaults -----------------------------------------------------------------------------------


def _resolve_seq(seq: int | None, max_positions: int | None) -> tuple[int, str]:
    if seq is not None:
        if max_positions and seq > max_positions:
            return seq, f"seq {seq:,} (--seq) is beyond the config's max_position_embeddings {max_positions:,}"
        return seq, f"seq {seq:,} (--seq)"
    if not max_positions:
        raise ValueError("the config has no max_position_embeddings; pass --seq")
    if max_positions > SEQ_CAP:
        return SEQ_CAP, (
            f"seq {SEQ_CAP:,}: the config's max_position_embeddings {max_positions:,}, capped at "
            f"{SEQ_CAP:,} for the default; pass --seq {max_positions} for the full length"
        )
    return max_positions, f"seq {max_positions:,}: the config's max_position_embeddings (pass --seq to change)"


def _resolve_dtype(dtype: str | None, raw: dict) -> tuple[str, str]:
    if dtype is not None:
        name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
        if name not in DTYPE_BYTES:
            raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        return name, f"dtype {name} for weights and K/V (--dtype)"
    declared = raw.get("dtype") or raw.get("torch_dtype")  # transformers 5 writes "dtype"
    name = _DTYPE_ALIASES.get(str(declared).lower()) if declared else None
    if name is None:
        said = f"names {declared!r}, not one of bf16/fp16/fp32" if declared else "names no dtype"
        return "bf16", f"dtype bf16 for weights and K/V: the config {said} (pass --dtype)"
    return name, f"dtype {name} for weights and K/V: the config's torch_dtype (pass --dtype to change)"


def _resolve_gpu(gpu_memory_gib: float | None, bandwidth_tb_s: float | None) -> GPU:
    """The GPU figures: given, else the local GPU's, else ASSUMED_GPU's; `source` says which."""
    local = None if gpu_memory_gib is not None and bandwidth_tb_s is not None else detect_gpu()
    if local is None and gpu_memory_gib is None and bandwidth_tb_s is None:
        return GPU(ASSUMED_GPU.name, ASSUMED_GPU.memory_bytes, ASSUMED_GPU.bandwidth,
                   f"no GPU here, so an {ASSUMED_GPU.name} is assumed; pass --gpu-memory and --bandwidth for yours")
    sources = []
    if gpu_memory_gib is not None:
        memory = int(gpu_memory_gib * GiB)
        sources.append("memory from --gpu-memory")
    elif local is not None:
        memory = local.memory_bytes
        sources.append(f"memory: {local.source}")
    else:
        memory = ASSUMED_GPU.memory_bytes
        sources.append(f"memory: no GPU here, an {ASSUMED_GPU.name}'s is assumed (pass --gpu-memory)")
    if bandwidth_tb_s is not None:
        bandwidth = bandwidth_tb_s * 1e12
        sources.append("bandwidth from --bandwidth")
    elif local is not None and local.bandwidth is not None:
        bandwidth = local.bandwidth
        sources.append(f"bandwidth: the data-sheet peak of the {local.name}")
    else:
        bandwidth = ASSUMED_GPU.bandwidth
        why = "no GPU here" if local is None else f"the {local.name} is not in our table"
        sources.append(f"bandwidth: {why}, an {ASSUMED_GPU.name}'s is assumed (pass --bandwidth)")
    name = local.name if local is not None else "given"
    return GPU(name, memory, bandwidth, "; ".join(sources))


# --- weights ------------------------------------------------------------------------------------


def _checkpoint_weights(folder: Path, dtype_bytes: int) -> Weights | None:
    """From the safetensors headers (never the tensors), or None when the folder holds none."""
    from .conversion.source import FLOAT_DTYPES, INDEX_NAME, SINGLE_FILE_NAME, read_source

    if not ((folder / SINGLE_FILE_NAME).is_file() or (folder / INDEX_NAME).is_file()):
        return None
    source = read_source(folder)  # header only; refuses a stale index or a corrupt shard
    parameters = total = 0
    stored = set()
    for info in source.tensors.values():
        count = math.prod(info.shape)
        parameters += count
        # from_pretrained(dtype=...) casts float weights; quantized ones stay as they are.
        total += count * dtype_bytes if info.dtype in FLOAT_DTYPES else info.nbytes
        stored.add(info.dtype)
    shards = len(source.shards)
    text = (
        f"{_count(parameters)} parameters read from the safetensors headers "
        f"({shards} file{'s' * (shards > 1)}, stored {'/'.join(sorted(stored))}), "
        f"floats counted at {dtype_bytes} bytes"
    )
    return Weights(parameters, total, text)


def _estimated_weights(config, shape: KVShape, encoder: bool, dtype_bytes: int, folder: Path | None) -> Weights:
    """Counted on the model built from the config on the meta device: exact for the stock
    classes, no memory taken, nothing loaded."""
    import torch
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

    declared = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
    with torch.device("meta"):
        if isinstance(declared, type) and issubclass(declared, PreTrainedModel):
            model = declared(config)
        else:
            model = (AutoModel if encoder else AutoModelForCausalLM).from_config(config)
    parameters = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    if config.model_type == "bert":
        # Stock BERT builds every head's K/V projection; a converted (GQA) BERT has fewer.
        full = dataclasses.replace(shape, num_kv_heads=config.num_attention_heads)
        parameters -= _removed_kv_parameters(config, full, shape.num_kv_heads)
    where = "no safetensors in the folder" if folder is not None else "a config file alone"
    text = (
        f"{_count(parameters)} parameters, estimated ({where}): counted on "
        f"{type(model).__name__} built from the config, at {dtype_bytes} bytes each"
    )
    return Weights(parameters, parameters * dtype_bytes, text)


def _count(parameters: int) -> str:
    if parameters >= 10**9:
        return f"{parameters / 1e9:.2f} B"
    return f"{parameters / 1e6:.1f} M" if parameters >= 10**6 else f"{parameters:,}"


def _sequential_multi_head_falcon(config) -> bool:
    return (
        config.model_type == "falcon"
        and not config.new_decoder_architecture
        and not config.multi_query
        and not config.parallel_attn
    )


def _positive_int(flag: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    return value


def _positive_number(flag: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{flag} must be a positive number, got {value!r}")
    return float(value)
