"""Triton kernels of flash attention: a tiled online-softmax forward and a backward by
recomputation from the saved log-sum-exp (no Nq x Nk tensor is ever stored).

Every program works out, with a few scalar operations, which key blocks (forward, dQ) or query
blocks (dK/dV) its tile can see at all, and which of those it sees whole. Blocks it cannot see
(above the causal diagonal, outside the window, wholly padded) are never visited; blocks seen
whole run without any masking; only the boundary blocks pay for the mask (the `MASKED`
constexpr of the inner loops). Scores are kept in base 2: s * scale * log2(e), so the loops use
exp2, and the saved log-sum-exp is in base 2 too.

Window reach: a key j is visible to a query at position p when j - p <= right (right = 0 is
causal) and p - j <= left; HAS_LEFT / HAS_RIGHT say whether each bound exists.

Attention sinks (HAS_SINKS, only with a left bound): keys j < sinks are visible whatever the
left bound says. The forward and dQ programs visit the key blocks holding them besides the
window's; a dK/dV program whose block holds a sink key serves every later query. Sink logits
(HAS_SINK_LOGITS, forward only): a per-head logit joins each row's softmax denominator at the
end, so the saved log-sum-exp includes it and the backward kernels need nothing new.

Masked keys contribute exactly nothing, whatever K and V hold there (a padded or stale slot can
hold NaN, and p = 0 times NaN is NaN): a padded key's K and V load as zeros (HAS_PADDING only),
and so do those of keys that no query of the tile can see, in the boundary blocks only. Blocks
seen whole load as before.
"""

from __future__ import annotations

import functools
import os
import types

import torch
import triton
import triton.language as tl

from ._checks import interpreter_enabled
from ._launch import cdiv, launch, next_power_of_2

LOG2E = 1.4426950408889634


# --- launchers ----------------------------------------------------------------------------------


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) laid out as (B, N, H, D), so that `out.transpose(1, 2)` is contiguous:
    transformers' attention functions return that transpose, and it then costs no copy. One
    strided allocation, not an allocation and a transposed view: this runs in every decode call."""
    batch, heads, length, head_dim = q.shape
    return q.new_empty_strided((batch, heads, length, head_dim),
                               (length * heads * head_dim, head_dim, heads * head_dim, 1))


def forward(q, k, v, key_padding_mask, alibi_slopes, left, right, scale, doc_ids=None, sinks=0,
            sink_logits=None):
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    out = empty_output(q)
    lse = torch.empty((batch, q_heads, q_len), device=q.device, dtype=torch.float32)
    bounds = _padding_bounds(key_padding_mask)
    docs = document_bounds(doc_ids)
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)

    def grid(meta):
        return (cdiv(q_len, meta["BLOCK_M"]), batch * q_heads)

    static, switch_key = _switches(q, key_padding_mask, alibi_slopes, left, right, docs, sinks,
                                   has_sink_logits=sink_logits is not None)
    with _on_device(q):
        _launch_tuned(
            _fwd_kernel, grid,
            (q, k, v, out, lse, key_padding_mask, bounds, alibi_slopes, docs, sink_logits,
             *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
             q_len, k_len, q_heads, q_heads // kv_heads, scale * LOG2E, left, right, sinks,
             _bucket(q_len), _bucket(k_len)),
            static, switch_key,
        )
    return out, lse


def backward(grad_out, q, k, v, out, lse, key_padding_mask, alibi_slopes, left, right, scale,
             doc_ids=None, sinks=0, delta=None):
    """dq, dk, dv; delta (from `row_delta`) may be given when the caller needed it already."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if delta is None:
        delta = row_delta(out, grad_out)
    bounds = _padding_bounds(key_padding_mask)
    docs = document_bounds(doc_ids)
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    static, switch_key = _switches(q, key_padding_mask, alibi_slopes, left, right, docs, sinks)

    with _on_device(q):
        _launch_tuned(
            _bwd_dkdv_kernel, lambda meta: (cdiv(k_len, meta["BLOCK_N"]), batch * kv_heads),
            (q, k, v, grad_out, dk, dv, lse, delta, key_padding_mask, bounds, alibi_slopes, docs,
             *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
             *mask_strides,
             q_len, k_len, q_heads, kv_heads, q_heads // kv_heads, scale * LOG2E, scale, left, right, sinks,
             _bucket(q_len), _bucket(k_len)),
            static, switch_key,
        )
        _launch_tuned(
            _bwd_dq_kernel, lambda meta: (cdiv(q_len, meta["BLOCK_M"]), batch * q_heads),
            (q, k, v, grad_out, dq, lse, delta, key_padding_mask, bounds, alibi_slopes, docs,
             *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
             *mask_strides,
             q_len, k_len, q_heads, q_heads // kv_heads, scale * LOG2E, scale, left, right, sinks,
             _bucket(q_len), _bucket(k_len)),
            static, switch_key,
        )
    return dq, dk, dv


def row_delta(out, grad_out):
    """(B, H, N) float32 delta_i = sum_d O[i, d] * dO[i, d], the row term of the softmax gradient
    (and, with the saved log-sum-exp, all that the sink logits' gradient needs)."""
    batch, heads, length, head_dim = out.shape
    delta = torch.empty((batch, heads, length), device=out.device, dtype=torch.float32)
    with _on_device(out):
        launch(_bwd_delta_kernel, (cdiv(length, 64), batch * heads),
               (out, grad_out, delta, *out.stride(), *grad_out.stride(), length, heads),
               dict(HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), BLOCK_M=64))
    return delta


# Each autotuned kernel's compile-time arguments (switches + chosen config) per tuning key
# (see `_launch_tuned`).
_CHOSEN_CONFIGS: dict[tuple, dict] = {}


def _launch_tuned(kernel, grid, args: tuple, static: dict, switch_key: tuple) -> None:
    """Launch an autotuned kernel; after its first launch for a tuning key, without the autotuner.

    Triton's `Autotuner.run` rebuilds dicts of all ~40 arguments on every call to find its
    cached choice: ~60 us of host time a launch on an H100 machine's host, paid by every layer
    of every decode step, which is launch-bound (benchmarks/host_overhead.py). The first launch
    goes through it (tuning, or its single config); later ones reuse its choice directly, and
    `_launch.launch` reuses the compiled kernel without Triton's own per-call bookkeeping.
    """
    # The autotuner's own key: Q_BUCKET and K_BUCKET (the last two arguments), the static
    # switches and the tensors' dtypes (both in switch_key).
    key = (kernel, args[-2], args[-1], switch_key)
    constexprs = _CHOSEN_CONFIGS.get(key)
    if constexprs is None:
        kernel[grid](*args, **static)
        _CHOSEN_CONFIGS[key] = {**static, **kernel.best_config.all_kwargs()}
    else:
        launch(kernel.fn, grid, args, constexprs)


def _switches(q, key_padding_mask, alibi_slopes, left, right, docs=None, sinks=0, *,
              has_sink_logits: bool | None = None) -> tuple:
    """(the compile-time switches, read-only; a key of them and of the dtypes the autotuner keys
    on) for a call. Each combination of switches is its own specialised kernel. has_sink_logits:
    whether the forward gets them (None for the backward kernels, which have no such switch).
    Built once per combination: the dict and its key would otherwise be rebuilt in every decode
    call."""
    return _switches_of(
        q.shape[-1], q.dtype,
        None if key_padding_mask is None else key_padding_mask.dtype,
        None if alibi_slopes is None else alibi_slopes.dtype,
        left >= 0, right >= 0, docs is not None,
        # Without a left bound every key is visible already: sinks change nothing.
        sinks > 0 and left >= 0,
        has_sink_logits,
    )


@functools.lru_cache(maxsize=None)
def _switches_of(head_dim, dtype, mask_dtype, alibi_dtype, has_left, has_right, has_docs, has_sinks,
                 has_sink_logits) -> tuple:
    static = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        HAS_LEFT=has_left,
        HAS_RIGHT=has_right,
        HAS_PADDING=mask_dtype is not None,
        HAS_ALIBI=alibi_dtype is not None,
        HAS_DOCS=has_docs,
        HAS_SINKS=has_sinks,
        # float32 inputs get true float32 dot products, not tf32.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    if has_sink_logits is not None:
        static["HAS_SINK_LOGITS"] = has_sink_logits
    # The dtypes the autotuner keys on (k, v, outputs and gradients share q's dtype). The dict
    # is shared by every call with these switches: read-only.
    return types.MappingProxyType(static), (*static.values(), dtype, mask_dtype, alibi_dtype)


def _padding_bounds(key_padding_mask):
    """(B, 2) int32: first real key and one past the last, so wholly padded blocks are skipped."""
    if key_padding_mask is None:
        return None
    batch, k_len = key_padding_mask.shape
    bounds = torch.empty((batch, 2), device=key_padding_mask.device, dtype=torch.int32)
    with _on_device(key_padding_mask):
        launch(_padding_bounds_kernel, (batch,), (key_padding_mask, bounds, *key_padding_mask.stride(), k_len),
               dict(BLOCK=1024))
    return bounds


def document_bounds(doc_ids):
    """(B, N, 2) int32: per position, the first position of its document and one past the
    last (a document is a run of equal ids). One small kernel on the device, no host sync: it
    runs in every packed forward and backward. The kernels read these at a tile's first and last
    rows to bound its key range, and per row to mask."""
    if doc_ids is None:
        return None
    batch, length = doc_ids.shape
    docs = torch.empty((batch, length, 2), device=doc_ids.device, dtype=torch.int32)
    with _on_device(doc_ids):
        launch(_document_bounds_kernel, (batch,), (doc_ids, docs, *doc_ids.stride(), length), dict(BLOCK=1024))
    return docs


def _bucket(n: int) -> int:
    """Autotuning key for a length: one tuning per power of two, not per length."""
    return next_power_of_2(n)


def _on_device(t: torch.Tensor):
    """Launch on t's GPU. Switching costs host time on every call: only when it is not current."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_DEVICE


class _NoDevice:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_DEVICE = _NoDevice()


# --- tuning -------------------------------------------------------------------------------------


# Safe on every GPU and head dim; used when autotuning is off (HF_ATTN_PATCH_AUTOTUNE=0), which
# the GPU tests set: they check results, and tuning every option combination costs minutes.
_UNTUNED = [(64, 64, 4, 2), (64, 32, 4, 2), (16, 64, 4, 2)]

# (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen from the winners of a full tuning sweep on
# an H100 (benchmarks/results, 2026-11-23). dK/dV's 32x128, last so that it is never the fallback
# of a shape it does not suit: packed documents' winner on the H200 (5% over 64x128 at D=128,
# bf16; tune_sweep.py --candidates backward, session 11 run G).
_FWD_BLOCKS = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (16, 64, 4, 3),
               (16, 128, 4, 3)]
_DKDV_BLOCKS = [(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 128, 8, 3)]
_DQ_BLOCKS = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (16, 64, 4, 2)]

# Room left for Triton's own shared-memory scratch (barriers, reductions): 512 bytes in the
# one failure measured (issue 13).
_SCRATCH_BYTES = 2048


def _autotune_enabled() -> bool:
    return os.environ.get("HF_ATTN_PATCH_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def set_autotuning(enabled: bool, candidates: dict[str, list[tuple]] | None = None) -> None:
    """Turn autotuning on or off for later launches, whatever HF_ATTN_PATCH_AUTOTUNE said at
    import (the GPU tests of the tuned configs turn it on). Forgets every choice made so far.

    candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples to tune over instead of the
    shipped ones, per kernel ("fwd", "dkdv", "dq"); for benchmarks/tune_sweep.py.
    """
    candidates = candidates or {}
    for name, kernel, blocks in (("fwd", _fwd_kernel, _FWD_BLOCKS), ("dkdv", _bwd_dkdv_kernel, _DKDV_BLOCKS),
                                 ("dq", _bwd_dq_kernel, _DQ_BLOCKS)):
        kernel.configs = _configs(candidates.get(name, blocks), tuned=enabled)
        kernel.cache.clear()
    _CHOSEN_CONFIGS.clear()


def _configs(blocks, tuned: bool | None = None):
    """Triton configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples, or the untuned
    ones when autotuning is off; one small config under the interpreter, where autotuning
    would only cost time."""
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if not (_autotune_enabled() if tuned is None else tuned):
        blocks = _UNTUNED
    return [_config(m, n, w, s) for m, n, w, s in blocks]


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps,
                         num_stages=num_stages)


# Rows of BLOCK_D columns each kernel keeps in shared memory, (held, streamed), from a config's
# BLOCK_M and BLOCK_N: held tiles stay for the whole loop, streamed ones are buffered once per
# pipeline stage.
def _fwd_tiles(m, n):
    return m, 2 * n  # Q held; K and V streamed


def _dkdv_tiles(m, n):
    return 2 * n, 2 * m  # K and V held; Q and dO streamed


def _dq_tiles(m, n):
    return 2 * m, 2 * n  # Q and dO held; K and V streamed


def shared_memory_estimate(config, tiles, block_d: int, element_size: int) -> int:
    """Bytes of shared memory a config asks for: the held tiles plus num_stages copies of the
    streamed ones. The failure of issue 13 (D=256, bfloat16) asked for 262656 bytes where this
    count gives 262144; the rest is Triton's scratch."""
    held, streamed = tiles(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])
    return (held + config.num_stages * streamed) * block_d * element_size


@functools.lru_cache(maxsize=None)
def _shared_memory_limit(device: torch.device) -> int | None:
    """Shared memory one program may use on the device (the number Triton checks at launch);
    None off the GPU, where the interpreter has no such limit."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _prune_configs(configs, named_args, *, tiles, **kwargs):
    """The configs the device can hold (shared memory) that suit the shape; if none suits the
    shape, the first that fits; if none fits, the smallest, shrunk until it fits. A config
    the device cannot hold is never offered: a lone survivor is launched without a trial."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    q = named_args["Q"]
    limit = _shared_memory_limit(q.device)

    def size(config):
        return shared_memory_estimate(config, tiles, block_d, q.element_size())

    def fits(config):
        return limit is None or size(config) + _SCRATCH_BYTES <= limit

    fitting = [c for c in configs if fits(c)]
    suited = [c for c in fitting if _suits_shape(c, block_d, named_args["q_len"], q.element_size())]
    if suited:
        return suited
    if fitting:
        return fitting[:1]
    return [_shrink(min(configs, key=size), fits)]


def _suits_shape(config, block_d: int, q_len: int, element_size: int) -> bool:
    """Tiles that suit the head dim and dtype (register budget) and the query length (a 16-row
    tile for decode-sized queries)."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    tile = block_m * block_n
    if block_d >= 256 and tile > 64 * 64:
        return False
    if block_m == 32 and (block_d > 128 or element_size > 2):
        # dK/dV's 32x128 holds 128 keys' K, V and both accumulators: measured at 16-bit, D <= 128.
        return False
    if block_d < 256 and block_m > 16 and tile < 64 * 64:
        return False
    return (block_m <= 16) == (q_len <= 16)


def _shrink(config, fits):
    """Fewer stages, then halve the larger block (down to 16), until the config fits."""
    m, n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    smaller = config
    while not fits(smaller) and (stages > 1 or max(m, n) > 16):
        if stages > 1:
            stages -= 1
        elif n >= m:
            n //= 2
        else:
            m //= 2
        smaller = _config(m, n, config.num_warps, stages)
    return smaller


_FWD_CONFIGS = _configs(_FWD_BLOCKS)
_DKDV_CONFIGS = _configs(_DKDV_BLOCKS)
_DQ_CONFIGS = _configs(_DQ_BLOCKS)
_TUNING_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "HAS_PADDING",
               "HAS_ALIBI", "HAS_DOCS", "HAS_SINKS", "DOT_PRECISION"]
_FWD_TUNING_KEY = [*_TUNING_KEY, "HAS_SINK_LOGITS"]
_FWD_PRUNE = {"early_config_prune": functools.partial(_prune_configs, tiles=_fwd_tiles)}
_DKDV_PRUNE = {"early_config_prune": functools.partial(_prune_configs, tiles=_dkdv_tiles)}
_DQ_PRUNE = {"early_config_prune": functools.partial(_prune_configs, tiles=_dq_tiles)}


# --- shared pieces ------------------------------------------------------------------------------


# Triton's interpreter multiplies bfloat16 tiles as raw 16-bit integers (triton 3.9); there,
# and only there, dots of bfloat16 tiles go through float32, which gives the same products.
_UPCAST_BF16_DOTS = tl.constexpr(interpreter_enabled())


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    if _UPCAST_BF16_DOTS and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _block_ranges(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr, ALIGN_EMPTY: tl.constexpr = False):
    """Split the index range [lo, hi) into block-aligned parts: [start, full_start) and
    [full_end, hi) need masking, [full_start, full_end) lies inside [full_lo, full_hi). With lo
    and full_lo both 0, [start, full_start) is always empty."""
    hi = tl.maximum(hi, 0)
    lo = tl.minimum(tl.maximum(lo, 0), hi)
    full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), 0)
    start = (lo // BLOCK) * BLOCK
    full_start = tl.cdiv(full_lo, BLOCK) * BLOCK
    full_end = (full_hi // BLOCK) * BLOCK
    if full_end <= full_start:
        # No block is seen whole: all go to the last (masked) range, so that the first range is
        # empty whenever lo and full_lo are 0, and the forward and dQ can leave its loop out.
        full_start = start
        full_end = start
    if hi <= lo:
        if ALIGN_EMPTY:
            # Empty at a block boundary: the loops' starts stay multiples of BLOCK, so the
            # compiler can vectorise the loads their offsets address (dK/dV's lse and delta).
            full_start = start
            full_end = start
            hi = start
        else:
            start = hi
            full_start = hi
            full_end = hi
    return start, full_start, full_end, hi


@triton.jit
def _key_ranges(first_pos, last_pos, k_len, left, right, Bounds, b, docs,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr,
                HAS_DOCS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks seen by queries at positions [first_pos, last_pos] (see _block_ranges)."""
    lo = first_pos * 0
    hi = lo + k_len
    if HAS_PADDING:
        lo = tl.load(Bounds + 2 * b)
        hi = tl.load(Bounds + 2 * b + 1)
    full_lo = lo
    full_hi = hi
    if HAS_DOCS:
        # From the first row's document to the last row's; seen whole only inside one document.
        lo = tl.maximum(lo, tl.load(docs + 2 * first_pos))
        hi = tl.minimum(hi, tl.load(docs + 2 * last_pos + 1))
        full_lo = tl.maximum(full_lo, tl.load(docs + 2 * last_pos))
        full_hi = tl.minimum(full_hi, tl.load(docs + 2 * first_pos + 1))
    if HAS_LEFT:
        lo = tl.maximum(lo, first_pos - left)
        full_lo = tl.maximum(full_lo, last_pos - left)
    if HAS_RIGHT:
        hi = tl.minimum(hi, last_pos + right + 1)
        full_hi = tl.minimum(full_hi, first_pos + right + 1)
    return _block_ranges(lo, hi, full_lo, full_hi, BLOCK_N)


@triton.jit
def _sink_blocks(last_pos, k_len, right, sinks, Bounds, b, window_start,
                 HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr, BLOCK_N: tl.constexpr):
    """[start, end): the key blocks before the window's first block (window_start, from
    _key_ranges) that hold sink keys (j < sinks) some query up to last_pos may see. Always
    masked: the window's bound hides their other keys."""
    lo = last_pos * 0
    hi = tl.minimum(lo + sinks, k_len)
    if HAS_PADDING:
        lo = tl.load(Bounds + 2 * b)
        hi = tl.minimum(hi, tl.load(Bounds + 2 * b + 1))
    if HAS_RIGHT:
        hi = tl.minimum(hi, last_pos + right + 1)
    hi = tl.minimum(hi, window_start)  # the window's own blocks are visited anyway
    start = (lo // BLOCK_N) * BLOCK_N
    if hi <= lo:
        start = hi
    return start, hi


@triton.jit
def _query_ranges(first_key, last_key, q_len, shift, left, right, sinks, Bounds, b, docs,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr,
                  HAS_DOCS: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query blocks that see some key of the block [first_key, last_key] (see _block_ranges):
    the mirror of _key_ranges, for dK/dV."""
    lo = shift * 0
    hi = lo + q_len
    full_lo = lo
    full_hi = hi
    if HAS_RIGHT:
        lo = tl.maximum(lo, first_key - right - shift)
        full_lo = tl.maximum(full_lo, last_key - right - shift)
    if HAS_LEFT:
        reach_hi = last_key + left + 1 - shift
        full_reach_hi = first_key + left + 1 - shift
        if HAS_SINKS:
            # A (real) sink key is seen by every later query; the block is seen whole by a query
            # that sees its oldest key that is not a sink (all of them, if none is).
            sink_lo = first_key
            sink_hi = tl.minimum(last_key + 1, sinks)
            if HAS_PADDING:
                sink_lo = tl.maximum(sink_lo, tl.load(Bounds + 2 * b))
                sink_hi = tl.minimum(sink_hi, tl.load(Bounds + 2 * b + 1))
            reach_hi = tl.where(sink_lo < sink_hi, q_len, reach_hi)
            full_reach_hi = tl.where(last_key < sinks, q_len,
                                     tl.maximum(first_key, sinks) + left + 1 - shift)
        hi = tl.minimum(hi, reach_hi)
        full_hi = tl.minimum(full_hi, full_reach_hi)
    if HAS_DOCS:  # queries == keys here
        lo = tl.maximum(lo, tl.load(docs + 2 * first_key))
        hi = tl.minimum(hi, tl.load(docs + 2 * last_key + 1))
        full_lo = tl.maximum(full_lo, tl.load(docs + 2 * last_key))
        full_hi = tl.minimum(full_hi, tl.load(docs + 2 * first_key + 1))
    if HAS_PADDING:
        if (last_key < tl.load(Bounds + 2 * b)) | (first_key >= tl.load(Bounds + 2 * b + 1)):
            hi = lo
    return _block_ranges(lo, hi, full_lo, full_hi, BLOCK_M, True)


@triton.jit
def _key_query_bounds(offs_n, q_len, shift, left, right, sinks, key_first, key_end, HAS_LEFT: tl.constexpr,
                      HAS_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Per key, the query rows [lo, hi) that see it: the mirror of _row_key_bounds for dK/dV,
    whose keys stay put for the whole program, so this runs once per program. A sink key
    (j < sinks) is seen by every later query, whatever the window."""
    lo = offs_n * 0
    hi = lo + q_len
    if HAS_RIGHT:
        lo = tl.maximum(lo, offs_n - right - shift)
    if HAS_LEFT:
        reach = offs_n + left + 1 - shift
        if HAS_SINKS:
            reach = tl.where(offs_n < sinks, q_len, reach)
        hi = tl.minimum(hi, reach)
    if HAS_DOCS:  # query i sees key j when i lies in j's document (queries == keys here)
        lo = tl.maximum(lo, key_first)
        hi = tl.minimum(hi, key_end)
    return lo, hi


@triton.jit
def _head_dim_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # A compile-time all-true mask when the head dim is a power of two: no masked loads then.
    if HEAD_DIM == BLOCK_D:
        return tl.full([BLOCK_D], 1, tl.int1)
    return offs_d < HEAD_DIM


@triton.jit
def _row_key_bounds(pos, k_len, left, right, row_first, row_end, HAS_LEFT: tl.constexpr,
                    HAS_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Per query row, the keys [lo, hi) its window, causality, document and the sequence end
    allow (sinks aside). Once per tile: a masked step then compares each key with two bounds
    instead of recomputing distances and document tests per pair."""
    lo = pos * 0
    hi = lo + k_len
    if HAS_LEFT:
        lo = pos - left
    if HAS_RIGHT:
        hi = tl.minimum(hi, pos + right + 1)
    if HAS_DOCS:
        lo = tl.maximum(lo, row_first)
        hi = tl.minimum(hi, row_end)
    return lo, hi


@triton.jit
def _visible(lo, hi, offs_n, k_len, sinks, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_SINKS: tl.constexpr):
    """(rows, keys) mask of the pairs inside each row's [lo, hi) (from _row_key_bounds); sink keys
    (j < sinks) are exempt from lo. HAS_LO: whether lo can be above 0; HAS_HI: whether hi can be
    below k_len (else a per-key test)."""
    visible = (offs_n < k_len)[None, :]
    if HAS_HI:
        visible = offs_n[None, :] < hi[:, None]
    if HAS_LO:
        near = offs_n[None, :] >= lo[:, None]
        if HAS_SINKS:
            near = near | (offs_n < sinks)[None, :]
        visible = visible & near
    return visible


@triton.jit
def _kv_load_mask(offs_n, d_ok, first_pos, last_pos, k_len, left, right, sinks, docs,
                  MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_DOCS: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Which K/V elements of a key block to load; the others read as zeros. In a boundary
    block, only keys that some query of the tile (positions first_pos..last_pos) can see: a
    key none of them sees must not reach the dots even as p = 0 times its value."""
    if not MASKED:
        # The same shape as the masked branch: compiled Triton (3.6) refuses a function whose
        # returns differ in shape, even across a constexpr branch (the interpreter accepts it).
        return tl.broadcast_to(d_ok[None, :], (offs_n.shape[0], d_ok.shape[0]))
    seen = offs_n < k_len
    if HAS_LEFT:
        near = offs_n >= first_pos - left
        if HAS_SINKS:
            near = near | (offs_n < sinks)
        seen = seen & near
    if HAS_RIGHT:
        seen = seen & (offs_n <= last_pos + right)
    if HAS_DOCS:
        seen = seen & (offs_n >= tl.load(docs + 2 * first_pos)) & (offs_n < tl.load(docs + 2 * last_pos + 1))
    return seen[:, None] & d_ok[None, :]


@triton.jit
def _document_of(docs, offs, ok, HAS_DOCS: tl.constexpr):
    """Per position in offs, the first position of its document and one past its last (docs:
    this row's (N, 2) bounds). Without documents: offs twice, unused, of the same type."""
    # if/else, not an early return: compiled Triton generates the code after a return in a
    # constexpr branch too, and without documents `docs` is None there.
    if HAS_DOCS:
        first = tl.load(docs + 2 * offs, mask=ok, other=0)
        end = tl.load(docs + 2 * offs + 1, mask=ok, other=0)
    else:
        first = offs
        end = offs
    return first, end


@triton.jit
def _padding_bounds_kernel(Mask, Bounds, stride_mb, stride_mn, k_len, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    first = tl.full([], 0, tl.int32) + k_len
    last = tl.full([], -1, tl.int32)
    for start in range(0, k_len, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        keep = tl.load(Mask + b * stride_mb + offs * stride_mn, mask=offs < k_len, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(keep, offs, k_len), 0))
        last = tl.maximum(last, tl.max(tl.where(keep, offs, -1), 0))
    tl.store(Bounds + 2 * b, first)
    tl.store(Bounds + 2 * b + 1, last + 1)


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _smaller(a, b):
    return tl.minimum(a, b)


@triton.jit
def _document_bounds_kernel(Ids, Docs, stride_ib, stride_in, length, BLOCK: tl.constexpr):
    """One row of `document_bounds`: a running max of run starts from the left, then a running
    min of run ends from the right, BLOCK positions at a time, carried across blocks."""
    b = tl.program_id(0)
    row = Ids + b * stride_ib
    out = Docs + b * length * 2
    chunks = tl.cdiv(length, BLOCK)
    carry = tl.full([], 0, tl.int32)  # where the run that reaches into this block started
    for chunk in range(0, chunks):
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        ok = offs < length
        ids = tl.load(row + offs * stride_in, mask=ok, other=0)
        before = tl.load(row + (offs - 1) * stride_in, mask=ok & (offs > 0), other=0)
        starts = (offs == 0) | (ids != before)
        first = tl.maximum(tl.associative_scan(tl.where(starts, offs, 0), 0, _larger), carry)
        tl.store(out + 2 * offs, first.to(Docs.dtype.element_ty), mask=ok)
        carry = tl.max(tl.where(ok, first, 0), 0)
    carry = tl.full([], 0, tl.int32) + length  # where the run that reaches into this block ends
    for chunk_from_end in range(0, chunks):
        offs = (chunks - 1 - chunk_from_end) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < length
        ids = tl.load(row + offs * stride_in, mask=ok, other=0)
        after = tl.load(row + (offs + 1) * stride_in, mask=offs + 1 < length, other=0)
        ends = (offs + 1 >= length) | (ids != after)
        end = tl.minimum(tl.associative_scan(tl.where(ends, offs + 1, length), 0, _smaller, reverse=True), carry)
        tl.store(out + 2 * offs + 1, end.to(Docs.dtype.element_ty), mask=ok)
        carry = tl.min(tl.where(ok, end, length), 0)


# --- forward ------------------------------------------------------------------------------------


# The lengths are specialised (Triton compiles a length divisible by 16, and one equal to 1, apart):
# a multiple of 16 tells it that row offsets like (b * H + h) * q_len are aligned, so dK/dV loads
# its per-row lse and delta 8 bytes at a time, not 4 (sm_90 SASS: 16 loads an iteration, not 32;
# benchmarks/kernel_resources.py). At most one more compile per kernel for the other lengths.
@triton.autotune(configs=_FWD_CONFIGS, key=_FWD_TUNING_KEY, prune_configs_by=_FWD_PRUNE)
@triton.jit(do_not_specialize=["sinks", "Q_BUCKET", "K_BUCKET"])
def _fwd_kernel(
    Q, K, V, Out, Lse, Mask, Bounds, Slopes, Docs, SinkLogits,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    q_len, k_len, num_q_heads, group_size, qk_scale, left, right, sinks,
    Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_SINK_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if HAS_RIGHT:  # causal: the last query blocks see the most keys; start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    kv_h = h // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    row_ok = offs_m < q_len
    shift = k_len - q_len
    pos = offs_m + shift

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h) * 1.4426950408889634

    first_pos = pid_m * BLOCK_M + shift
    last_pos = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1 + shift
    # Without documents `docs` is never read, but it travels in argument tuples, which compiled
    # Triton builds only from typed values: any pointer will do (None would not compile).
    docs = Q
    if HAS_DOCS:
        docs = Docs + b * k_len * 2
    row_first, row_end = _document_of(docs, offs_m, row_ok, HAS_DOCS)
    row_lo, row_hi = _row_key_bounds(pos, k_len, left, right, row_first, row_end, HAS_LEFT, HAS_RIGHT, HAS_DOCS)
    start, full_start, full_end, end = _key_ranges(
        first_pos, last_pos, k_len, left, right, Bounds, b, docs,
        HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_DOCS, BLOCK_N
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    args = (q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            Mask, b * stride_mb, stride_mn, pos, first_pos, last_pos, offs_d, d_ok, k_len, left, right,
            sinks, slope, qk_scale, docs, row_lo, row_hi)
    if HAS_LEFT:
        if HAS_SINKS:
            sink_start, sink_end = _sink_blocks(last_pos, k_len, right, sinks, Bounds, b, start,
                                                HAS_RIGHT, HAS_PADDING, BLOCK_N)
            acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, *args, sink_start, sink_end, BLOCK_N, True,
                                       HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS,
                                       DOT_PRECISION)
    if HAS_LEFT or HAS_PADDING or HAS_DOCS:  # else the first masked range is empty (_block_ranges)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, *args, start, full_start, BLOCK_N, True, HAS_LEFT, HAS_RIGHT,
                                   HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, *args, full_start, full_end, BLOCK_N, False,
                               HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, *args, full_end, end, BLOCK_N, True,
                               HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS, DOT_PRECISION)

    # A row that saw no key: output zeros, and lse = +inf so the backward's exp2(s - lse) is 0.
    seen = l_i > 0.0
    if HAS_SINK_LOGITS:
        # One more score, with no value: it only adds to the denominator (and so to the lse).
        sink = tl.load(SinkLogits + h) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink)
        alpha = tl.where(seen, tl.math.exp2(m_i - m_new), 0.0)  # m_i = -inf where nothing was seen
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.math.exp2(sink - m_new)
        m_i = m_new
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(Lse + pid_bh * q_len + offs_m, lse, mask=row_ok)
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    Mask, mask_offset, stride_mn, pos, first_pos, last_pos, offs_d, d_ok, k_len, left, right,
    sinks, slope, qk_scale, docs, row_lo, row_hi,
    start, end, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = _kv_load_mask(offs_n, d_ok, first_pos, last_pos, k_len, left, right, sinks, docs,
                              MASKED, HAS_LEFT, HAS_RIGHT, HAS_DOCS, HAS_SINKS)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION)
        # Without ALiBi the scores stay unscaled: the row max is scaled once per row (qk_scale > 0
        # keeps the max where it is) and the exponent's scale and shift are one fused multiply-add,
        # one floating-point operation per score fewer in the loop that bounds the forward.
        score_scale = qk_scale
        if HAS_ALIBI:
            s = s * qk_scale + slope * (offs_n[None, :] - pos[:, None]).to(tl.float32)
            score_scale = 1.0
        if MASKED:
            visible = _visible(row_lo, row_hi, offs_n, k_len, sinks, HAS_LEFT or HAS_DOCS, HAS_RIGHT or HAS_DOCS,
                               HAS_SINKS)
            s = tl.where(visible, s, float("-inf"))
        if HAS_PADDING:
            keep = tl.load(Mask + mask_offset + offs_n * stride_mn, mask=offs_n < k_len, other=0) != 0
            s = tl.where(keep[None, :], s, float("-inf"))
            kv_ok = kv_ok & keep[:, None]  # NaN in K is harmless above (the where); in V it is not
        m_new = tl.maximum(m_i, tl.max(s, 1) * score_scale)
        # Rows with nothing visible yet keep m = -inf; subtract 0 instead so no NaN appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * score_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_ok, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# --- backward -----------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(
    Out, dOut, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    q_len, num_q_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d O[i, d] * dO[i, d], the row term of the softmax gradient."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(dOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm
                 + offs_d[None, :] * stride_dd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * q_len + offs_m, delta, mask=offs_m < q_len)


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNING_KEY, prune_configs_by=_DKDV_PRUNE)
@triton.jit(do_not_specialize=["sinks", "Q_BUCKET", "K_BUCKET"])
def _bwd_dkdv_kernel(
    Q, K, V, dOut, dK, dV, Lse, Delta, Mask, Bounds, Slopes, Docs,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn,
    q_len, k_len, num_q_heads, num_kv_heads, group_size, qk_scale, sm_scale, left, right, sinks,
    Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK and dV of one key block of one KV head, summed over every query head of its group."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    kv_h = pid_bh % num_kv_heads

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    kv_ok = (offs_n < k_len)[:, None] & d_ok[None, :]
    shift = k_len - q_len
    keep = offs_n < k_len
    if HAS_PADDING:
        keep = tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=offs_n < k_len, other=0) != 0
    # V of a key no query sees (padded, or older than every window) loads as zeros: its dS row
    # is then p * (0 - delta) = 0, not 0 * NaN. Once per program, not per step.
    v_ok = kv_ok & keep[:, None]
    if HAS_LEFT:
        seen = offs_n >= shift - left
        if HAS_SINKS:
            seen = seen | (offs_n < sinks)
        v_ok = v_ok & seen[:, None]
    k = tl.load(K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=v_ok, other=0.0)

    # Query positions that see some key of this block, and those that see all of it.
    first_key = pid_n * BLOCK_N
    last_key = tl.minimum(first_key + BLOCK_N, k_len) - 1
    # Without documents `docs` is never read, but it travels in argument tuples, which compiled
    # Triton builds only from typed values: any pointer will do (None would not compile).
    docs = Q
    if HAS_DOCS:
        docs = Docs + b * k_len * 2
    key_first, key_end = _document_of(docs, offs_n, offs_n < k_len, HAS_DOCS)
    query_lo, query_hi = _key_query_bounds(offs_n, q_len, shift, left, right, sinks, key_first, key_end,
                                           HAS_LEFT, HAS_RIGHT, HAS_DOCS, HAS_SINKS)
    start, full_start, full_end, end = _query_ranges(
        first_key, last_key, q_len, shift, left, right, sinks, Bounds, b, docs,
        HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_DOCS, HAS_SINKS, BLOCK_M
    )

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group_size):
        h = kv_h * group_size + g
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + h) * 1.4426950408889634
        row_base = (b * num_q_heads + h) * q_len
        args = (k, v, Q + b * stride_qb + h * stride_qh, stride_qm, stride_qd,
                dOut + b * stride_db + h * stride_dh, stride_dm, stride_dd,
                Lse + row_base, Delta + row_base, keep, offs_n, offs_d, d_ok,
                shift, q_len, slope, qk_scale, query_lo, query_hi)
        dk, dv = _dkdv_inner(dk, dv, *args, start, full_start, BLOCK_M, True,
                             HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS, DOT_PRECISION)
        dk, dv = _dkdv_inner(dk, dv, *args, full_start, full_end, BLOCK_M, False,
                             HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS, DOT_PRECISION)
        dk, dv = _dkdv_inner(dk, dv, *args, full_end, end, BLOCK_M, True,
                             HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS, DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(dK + b * stride_dkb + kv_h * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(dK.dtype.element_ty), mask=kv_ok)
    tl.store(dV + b * stride_dvb + kv_h * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(dV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, stride_qm, stride_qd, do_base, stride_dm, stride_dd,
    lse_base, delta_base, keep, offs_n, offs_d, d_ok, shift, q_len, slope, qk_scale, query_lo, query_hi,
    start, end, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Works on transposed tiles (keys x queries) so dK and dV accumulate with plain dots.
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # A full block's rows all exist: its loads take no row mask. (A runtime all-true mask,
        # offs_m >= 0, cost the full-block loop a predicate per element: Nsight Compute,
        # 2026-12-04, ALU pipe 28% here against 7% in dQ's loop.)
        row_ok = offs_m < q_len
        io_t_ok = tl.broadcast_to(d_ok[:, None], (offs_d.shape[0], BLOCK_M))
        io_ok = tl.broadcast_to(d_ok[None, :], (BLOCK_M, offs_d.shape[0]))
        if MASKED:
            io_t_ok = io_t_ok & row_ok[None, :]
            io_ok = io_ok & row_ok[:, None]
        q_t = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd, mask=io_t_ok, other=0.0)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = _dot(k, q_t, None, DOT_PRECISION) * qk_scale
        pos = offs_m + shift
        if HAS_ALIBI:
            s_t += slope * (offs_n[:, None] - pos[None, :]).to(tl.float32)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            # Per pair only the bounds that can differ by key; else a per-query test.
            visible = row_ok[None, :]
            if HAS_LEFT or HAS_DOCS:
                visible = offs_m[None, :] < query_hi[:, None]
            if HAS_RIGHT or HAS_DOCS:
                visible = visible & (offs_m[None, :] >= query_lo[:, None])
            p_t = tl.where(visible, p_t, 0.0)
        if HAS_PADDING:
            p_t = tl.where(keep[:, None], p_t, 0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd, mask=io_ok, other=0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, DOT_PRECISION)
        dp_t = _dot(v, tl.trans(do), None, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNING_KEY, prune_configs_by=_DQ_PRUNE)
@triton.jit(do_not_specialize=["sinks", "Q_BUCKET", "K_BUCKET"])
def _bwd_dq_kernel(
    Q, K, V, dOut, dQ, Lse, Delta, Mask, Bounds, Slopes, Docs,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mn,
    q_len, k_len, num_q_heads, group_size, qk_scale, sm_scale, left, right, sinks,
    Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ of one query block of one head, over the same key blocks as the forward."""
    pid_m = tl.program_id(0)
    if HAS_RIGHT:  # causal: as in the forward, the last query blocks see the most keys; start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    kv_h = h // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    row_ok = offs_m < q_len
    io_ok = row_ok[:, None] & d_ok[None, :]
    shift = k_len - q_len
    pos = offs_m + shift

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=io_ok, other=0.0)
    do = tl.load(dOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm
                 + offs_d[None, :] * stride_dd, mask=io_ok, other=0.0)
    lse = tl.load(Lse + pid_bh * q_len + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + pid_bh * q_len + offs_m, mask=row_ok, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h) * 1.4426950408889634

    first_pos = pid_m * BLOCK_M + shift
    last_pos = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1 + shift
    # Without documents `docs` is never read, but it travels in argument tuples, which compiled
    # Triton builds only from typed values: any pointer will do (None would not compile).
    docs = Q
    if HAS_DOCS:
        docs = Docs + b * k_len * 2
    row_first, row_end = _document_of(docs, offs_m, row_ok, HAS_DOCS)
    row_lo, row_hi = _row_key_bounds(pos, k_len, left, right, row_first, row_end, HAS_LEFT, HAS_RIGHT, HAS_DOCS)
    start, full_start, full_end, end = _key_ranges(
        first_pos, last_pos, k_len, left, right, Bounds, b, docs,
        HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_DOCS, BLOCK_N
    )

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    args = (q, do, lse, delta, K + b * stride_kb + kv_h * stride_kh, stride_kn, stride_kd,
            V + b * stride_vb + kv_h * stride_vh, stride_vn, stride_vd,
            Mask, b * stride_mb, stride_mn, pos, first_pos, last_pos, offs_d, d_ok, k_len, left, right,
            sinks, slope, qk_scale, docs, row_lo, row_hi)
    if HAS_LEFT:
        if HAS_SINKS:
            sink_start, sink_end = _sink_blocks(last_pos, k_len, right, sinks, Bounds, b, start,
                                                HAS_RIGHT, HAS_PADDING, BLOCK_N)
            dq = _dq_inner(dq, *args, sink_start, sink_end, BLOCK_N, True,
                           HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS, DOT_PRECISION)
    if HAS_LEFT or HAS_PADDING or HAS_DOCS:  # else the first masked range is empty (_block_ranges)
        dq = _dq_inner(dq, *args, start, full_start, BLOCK_N, True,
                       HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS, DOT_PRECISION)
    dq = _dq_inner(dq, *args, full_start, full_end, BLOCK_N, False,
                   HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS, DOT_PRECISION)
    dq = _dq_inner(dq, *args, full_end, end, BLOCK_N, True,
                   HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_ALIBI, HAS_DOCS, HAS_SINKS, DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(dQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(dQ.dtype.element_ty), mask=io_ok)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, stride_kn, stride_kd, v_base, stride_vn, stride_vd,
    Mask, mask_offset, stride_mn, pos, first_pos, last_pos, offs_d, d_ok, k_len, left, right,
    sinks, slope, qk_scale, docs, row_lo, row_hi,
    start, end, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = _kv_load_mask(offs_n, d_ok, first_pos, last_pos, k_len, left, right, sinks, docs,
                              MASKED, HAS_LEFT, HAS_RIGHT, HAS_DOCS, HAS_SINKS)
        if HAS_PADDING:
            # Here both matter: dP = dO V^T meets V, dQ += dS K meets K, each times p = 0.
            keep = tl.load(Mask + mask_offset + offs_n * stride_mn, mask=offs_n < k_len, other=0) != 0
            kv_ok = kv_ok & keep[:, None]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        if HAS_ALIBI:
            s += slope * (offs_n[None, :] - pos[:, None]).to(tl.float32)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = _visible(row_lo, row_hi, offs_n, k_len, sinks, HAS_LEFT or HAS_DOCS, HAS_RIGHT or HAS_DOCS,
                               HAS_SINKS)
            p = tl.where(visible, p, 0.0)
        if HAS_PADDING:
            p = tl.where(keep[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION)
    return dq
