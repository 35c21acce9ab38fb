"""Input checks shared by the kernels: every bad input is a ValueError before any launch."""

from __future__ import annotations

import os

import torch

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA GPUs, or on the CPU under Triton's interpreter; nowhere else."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if not interpreter_enabled():
            raise ValueError(
                "hf_attn_patch kernels got CPU tensors, but Triton's interpreter is off. "
                "Move the model to a CUDA GPU, or set TRITON_INTERPRET=1 in the environment "
                "before Python starts (slow; meant for tests and small demos)."
            )
        return
    raise ValueError(
        f"hf_attn_patch kernels run on CUDA GPUs (or the CPU with TRITON_INTERPRET=1), "
        f"not on {device.type}"
    )


def check_dtypes(q: torch.Tensor, *others: tuple[str, torch.Tensor]) -> None:
    """q's dtype must be supported and shared by the other named tensors."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    for name, t in others:
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; use one dtype for all")


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    doc_ids: torch.Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices for `flash_attention` (q: B,Hq,Nq,D; k, v: B,Hkv,Nk,D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq_len, head_dim), got {tuple(t.shape)}")
    batch, q_heads, q_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    kv_batch, kv_heads, k_len, kv_dim = k.shape
    if kv_batch != batch:
        raise ValueError(f"batch mismatch: q has {batch}, k/v have {kv_batch}")
    if kv_dim != head_dim:
        raise ValueError(f"head dim mismatch: q has {head_dim}, k/v have {kv_dim}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})"
        )
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if q_len == 0 or k_len == 0 or batch == 0:
        raise ValueError(f"empty attention: q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_dtypes(q, ("k", k), ("v", v))
    extra = []
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, k_len):
            raise ValueError(
                f"key_padding_mask must have shape (batch, k_len) = {(batch, k_len)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
            raise ValueError(
                "key_padding_mask must be bool or integer (1 = real token), "
                f"got {key_padding_mask.dtype}"
            )
        extra.append(key_padding_mask)
    if alibi_slopes is not None:
        if tuple(alibi_slopes.shape) != (q_heads,):
            raise ValueError(
                f"alibi_slopes must have shape (num_q_heads,) = ({q_heads},), "
                f"got {tuple(alibi_slopes.shape)}"
            )
        if not alibi_slopes.is_floating_point():
            raise ValueError(f"alibi_slopes must be floating point, got {alibi_slopes.dtype}")
        extra.append(alibi_slopes)
    if doc_ids is not None:
        if q_len != k_len:
            raise ValueError(
                f"doc_ids (packed documents) need as many queries as keys, got {q_len} and {k_len}; "
                "packed sequences are for training and prefill without a cache"
            )
        if tuple(doc_ids.shape) != (batch, k_len):
            raise ValueError(
                f"doc_ids must have shape (batch, seq_len) = {(batch, k_len)}, got {tuple(doc_ids.shape)}"
            )
        if doc_ids.is_floating_point() or doc_ids.is_complex() or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be integer document ids, got {doc_ids.dtype}")
        extra.append(doc_ids)
    check_device(q, k, v, *extra)


def window_reach(causal: bool, window: int | tuple[int, int] | None) -> tuple[int, int]:
    """The kernels' (left, right) bounds on pos(i) - j; -1 means unbounded on that side."""
    left, right = -1, -1
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, (int, tuple, list)):
            raise ValueError(f"window must be an int or a (left, right) tuple, got {window!r}")
        if isinstance(window, int):
            if window < 1:
                raise ValueError(f"window must be >= 1 (keys including the query's own), got {window}")
            left, right = window - 1, 0
        else:
            if len(window) != 2 or any(not isinstance(w, int) or w < 0 for w in window):
                raise ValueError(f"a window tuple must be two ints >= 0 (left, right), got {window!r}")
            left, right = int(window[0]), int(window[1])
    if causal:
        right = 0
    return left, right


def check_sinks(
    q: torch.Tensor,
    sinks: int,
    sink_logits: torch.Tensor | None,
    *,
    doc_ids: torch.Tensor | None = None,
) -> None:
    """Attention sinks: `sinks` an int >= 0, `sink_logits` (Hq,) floating point on q's device,
    q: (B, Hq, ...) with the query heads at dim 1; sinks are not combined with doc_ids."""
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0 (the number of leading keys kept visible), got {sinks!r}")
    if sinks > 0 and doc_ids is not None:
        raise ValueError(
            "sinks together with doc_ids (packed documents) is not supported: each document would "
            "need its own sinks; pass sinks=0 or run the documents unpacked"
        )
    if sink_logits is None:
        return
    q_heads = q.shape[1]
    if not isinstance(sink_logits, torch.Tensor):
        raise ValueError(f"sink_logits must be a tensor of shape (num_q_heads,), got {type(sink_logits).__name__}")
    if tuple(sink_logits.shape) != (q_heads,):
        raise ValueError(
            f"sink_logits must have shape (num_q_heads,) = ({q_heads},), got {tuple(sink_logits.shape)}"
        )
    if not sink_logits.is_floating_point():
        raise ValueError(f"sink_logits must be floating point, got {sink_logits.dtype}")
    check_device(q, sink_logits)
