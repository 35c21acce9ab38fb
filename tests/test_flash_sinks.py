"""Attention sinks in flash_attention (issue 16): `sinks=S` keeps the first S keys visible beside
the window, `sink_logits` adds a learned per-head logit to each row's softmax denominator.

Forward and every gradient (dq, dk, dv, d sink_logits) against `attention_reference`. On the CPU
the interpreter runs 32 x 32 tiles: lengths of 70-160 give sink blocks, window blocks and skipped
blocks between them. Which blocks the kernels visit is checked directly (a probe kernel runs the
kernels' own range helpers), and with NaN/inf in every key that no query sees.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from hf_attn_patch.kernels import _flash_triton, attention_reference, flash_attention
from hf_attn_patch.kernels._checks import window_reach
from hf_attn_patch.kernels.reference import visibility
from tests.helpers import assert_compiled_matches_eager, relative_error
from tests.test_flash import TOLERANCE, left_padding_mask, make_inputs

# Kernels only, no transformers: CI runs this file on one transformers release (see .ci/run).
pytestmark = pytest.mark.kernels


def kernel_and_reference(q, k, v, sink_logits=None, kernel_kv=None, **options):
    """(out, grads, expected, expected_grads) with one upstream gradient; grads are those of q,
    k, v and, when given, sink_logits. kernel_kv: other K, V for the kernel only (NaN tests)."""
    inputs = [q, k, v] + ([sink_logits] if sink_logits is not None else [])
    kernel_inputs = list(inputs)
    if kernel_kv is not None:
        kernel_inputs[1:3] = kernel_kv
    leaves = [t.detach().clone().requires_grad_() for t in kernel_inputs]
    ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def call(fn, tensors):
        return fn(*tensors[:3], sink_logits=tensors[3] if len(tensors) > 3 else None, **options)

    out = call(flash_attention, leaves)
    expected = call(attention_reference, ref_leaves)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, ref_leaves, grad_out)
    return out, grads, expected, expected_grads


def check(q, k, v, sink_logits=None, **options):
    out, grads, expected, expected_grads = kernel_and_reference(q, k, v, sink_logits, **options)
    names = ("out", "dq", "dk", "dv", "d_sink_logits")
    assert out.dtype == q.dtype
    for name, got, want in zip(names, (out, *grads), (expected, *expected_grads)):
        assert got.dtype == want.dtype, name
        assert torch.isfinite(got).all(), f"{name} is not finite"
        error = relative_error(got, want)
        assert error < TOLERANCE[q.dtype], f"{name}: relative error {error:.2e} ({options})"


def random_sink_logits(q_heads, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed + 7)
    return torch.randn(q_heads, generator=generator).to(dtype)


# (q_len, k_len, options): lengths in tiles of 32.
CASES = {
    "causal-sinks-in-first-block": (70, 70, dict(causal=True, window=8, sinks=4)),
    "causal-sinks-beyond-first-block": (80, 80, dict(causal=True, window=8, sinks=40)),
    "causal-one-sink": (70, 70, dict(causal=True, window=8, sinks=1)),
    "causal-cache-sinks-past-window": (7, 100, dict(causal=True, window=16, sinks=50)),
    "tuple-window-sinks": (50, 100, dict(window=(6, 3), sinks=5)),
    "sink-logits-alone": (45, 70, dict(sink_logits=True)),
    "sink-logits-window-sinks": (70, 70, dict(causal=True, window=8, sinks=4, sink_logits=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, device):
    q_len, k_len, options = CASES[name]
    q, k, v = make_inputs(1, 4, 2, q_len, k_len, 16, torch.float32, device, seed=len(name))
    if options.pop("sink_logits", False):
        options["sink_logits"] = random_sink_logits(4).to(device)
    check(q, k, v, **options)


def test_sinks_with_padding_and_gqa(device):
    """Left padding: in padded rows the first positions are pad tokens, so their sinks hide."""
    q, k, v = make_inputs(2, 4, 1, 70, 70, 16, torch.float32, device, seed=3)
    mask = torch.ones(2, 70, dtype=torch.bool, device=device)
    mask[0, :37] = False  # every sink padded, and the first key block
    mask[1, :2] = False  # some sinks real, some not
    check(q, k, v, causal=True, window=10, sinks=4, key_padding_mask=mask,
          sink_logits=random_sink_logits(4).to(device))


def test_bf16_window_sinks_and_sink_logits(device):
    q, k, v = make_inputs(1, 4, 2, 70, 70, 32, torch.bfloat16, device, seed=5)
    check(q, k, v, causal=True, window=12, sinks=36, sink_logits=random_sink_logits(4, torch.bfloat16).to(device))


def test_rows_that_see_nothing_are_zero_with_sink_logits(device):
    """Causal with Nq > Nk (the first rows stand before every key) and a sequence that is all
    padding: zeros there, no NaN anywhere, and those rows add nothing to d sink_logits."""
    q, k, v = make_inputs(2, 2, 2, 30, 20, 16, torch.float32, device)
    mask = torch.ones(2, 20, dtype=torch.bool, device=device)
    mask[1] = False
    sink_logits = torch.tensor([0.5, 3.0], device=device)
    out = flash_attention(q, k, v, causal=True, key_padding_mask=mask, sink_logits=sink_logits)
    assert torch.equal(out[:, :, :10], torch.zeros_like(out[:, :, :10]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    check(q, k, v, causal=True, key_padding_mask=mask, sink_logits=sink_logits)


def test_sinks_without_a_window_change_nothing(device):
    q, k, v = make_inputs(1, 2, 2, 40, 40, 16, torch.float32, device)
    with torch.no_grad():  # the direct launch, not the custom op
        plain = flash_attention(q, k, v, causal=True)
        with_sinks = flash_attention(q, k, v, causal=True, sinks=7)
    assert torch.equal(plain, with_sinks)


def test_hidden_keys_with_nan_and_inf_contribute_nothing(device):
    """Queries at 148..159 with a window of 8 and 4 sinks see keys 0..3 and 141..159. K holds
    NaN and V inf at 4..140: in the sinks' block (masked) and in the blocks between (skipped).
    Output and gradients are finite and equal the reference on finite keys; the hidden keys'
    dK and dV are zeros."""
    q, k, v = make_inputs(1, 4, 2, 12, 160, 16, torch.float32, device, seed=11)
    hidden = torch.zeros(160, dtype=torch.bool, device=device)
    hidden[4:141] = True
    bad_k = k.masked_fill(hidden[None, None, :, None], float("nan"))
    bad_v = v.masked_fill(hidden[None, None, :, None], float("inf"))
    options = dict(causal=True, window=8, sinks=4, sink_logits=random_sink_logits(4).to(device))
    out, grads, expected, expected_grads = kernel_and_reference(q, k, v, kernel_kv=(bad_k, bad_v), **options)
    for name, got, want in zip(("out", "dq", "dk", "dv", "d_sink_logits"), (out, *grads), (expected, *expected_grads)):
        assert torch.isfinite(got).all(), f"{name} is not finite"
        assert relative_error(got, want) < 1e-4, name
    for name, grad in zip(("dk", "dv"), grads[1:3]):
        assert torch.equal(grad[:, :, hidden], torch.zeros_like(grad[:, :, hidden])), name


def test_compiles_without_graph_breaks(device):
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 4, 2, 40, 40, 16, torch.float32, device))
    sink_logits = random_sink_logits(4).to(device).requires_grad_()

    def step(q, k, v, sink_logits):
        out = flash_attention(q, k, v, causal=True, window=8, sinks=3, sink_logits=sink_logits)
        return (out * out).sum()

    torch._dynamo.reset()
    assert_compiled_matches_eager(step, (q, k, v, sink_logits))


BAD_INPUTS = {
    "negative_sinks": (dict(window=4, sinks=-1), "sinks must be an int >= 0"),
    "float_sinks": (dict(window=4, sinks=2.0), "sinks must be an int >= 0"),
    "bool_sinks": (dict(window=4, sinks=True), "sinks must be an int >= 0"),
    "sinks_with_doc_ids": (dict(causal=True, window=4, sinks=2, doc_ids=torch.zeros(2, 10, dtype=torch.int32)),
                           "not supported"),
    "sink_logits_shape": (dict(sink_logits=torch.zeros(2)), r"sink_logits must have shape \(num_q_heads,\)"),
    "sink_logits_dtype": (dict(sink_logits=torch.zeros(4, dtype=torch.int64)), "floating point"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error(name, device):
    options, message = BAD_INPUTS[name]
    q, k, v = make_inputs(2, 4, 2, 10, 10, 16, torch.float32, device)
    options = {key: value.to(device) if torch.is_tensor(value) else value for key, value in options.items()}
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **options)


# --- which blocks the kernels visit ---------------------------------------------------------------


@triton.jit
def _ranges_probe(KeyRanges, QueryRanges, Bounds, q_len, k_len, left, right, sinks,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr,
                  HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program i writes what the forward/dQ program of query block i visits (sink blocks, then
    the window's start, full_start, full_end, end) and what the dK/dV program of key block i
    visits (start, full_start, full_end, end), from the kernels' own helpers (batch row 0)."""
    i = tl.program_id(0)
    shift = k_len - q_len
    if i * BLOCK_M < q_len:
        first_pos = i * BLOCK_M + shift
        last_pos = tl.minimum(i * BLOCK_M + BLOCK_M, q_len) - 1 + shift
        start, full_start, full_end, end = _flash_triton._key_ranges(
            first_pos, last_pos, k_len, left, right, Bounds, 0, Bounds,
            HAS_LEFT, HAS_RIGHT, HAS_PADDING, False, BLOCK_N)
        sink_start, sink_end = _flash_triton._sink_blocks(last_pos, k_len, right, sinks, Bounds, 0, start,
                                                          HAS_RIGHT, HAS_PADDING, BLOCK_N)
        tl.store(KeyRanges + 6 * i, sink_start)
        tl.store(KeyRanges + 6 * i + 1, sink_end)
        tl.store(KeyRanges + 6 * i + 2, start)
        tl.store(KeyRanges + 6 * i + 3, full_start)
        tl.store(KeyRanges + 6 * i + 4, full_end)
        tl.store(KeyRanges + 6 * i + 5, end)
    if i * BLOCK_N < k_len:
        first_key = i * BLOCK_N
        last_key = tl.minimum(first_key + BLOCK_N, k_len) - 1
        start, full_start, full_end, end = _flash_triton._query_ranges(
            first_key, last_key, q_len, shift, left, right, sinks, Bounds, 0, Bounds,
            HAS_LEFT, HAS_RIGHT, HAS_PADDING, False, HAS_SINKS, BLOCK_M)
        tl.store(QueryRanges + 4 * i, start)
        tl.store(QueryRanges + 4 * i + 1, full_start)
        tl.store(QueryRanges + 4 * i + 2, full_end)
        tl.store(QueryRanges + 4 * i + 3, end)


def visited_blocks(ranges, block):
    """Block indices a loop `for s in range(start, end, block)` visits, checking alignment."""
    blocks = []
    for start, end in ranges:
        for s in range(start, end, block):
            assert s % block == 0, f"unaligned block start {s}"
            blocks.append(s // block)
    assert len(blocks) == len(set(blocks)), f"a block is visited twice: {blocks}"
    return set(blocks)


PROBES = {
    "causal-window": (40, 300, dict(causal=True, window=20, sinks=4)),
    "sinks-past-window": (100, 100, dict(causal=True, window=8, sinks=45)),
    "tuple-window": (64, 200, dict(window=(10, 40), sinks=20)),
    "left-padding": (50, 200, dict(causal=True, window=30, sinks=6, padding=70)),
    "padded-sinks": (50, 200, dict(causal=True, window=30, sinks=6, padding=3)),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_kernels_visit_exactly_the_blocks_with_visible_keys(name, device):
    """Per query block, the key blocks visited (sinks' and window's) are exactly those holding
    a key some row of the block sees; per key block, the same for query blocks (dK/dV). Blocks
    run without masking are seen whole. Lengths are not multiples of the tiles (16 x 32).
    The probe's tensors live on the test device: on a GPU machine it is compiled like the kernels."""
    q_len, k_len, options = PROBES[name]
    options = dict(options)
    padding = options.pop("padding", 0)
    block_m, block_n = 16, 32
    left, right = window_reach(options.get("causal", False), options["window"])
    real = torch.arange(k_len) >= padding
    bounds = torch.tensor([[padding, k_len]], dtype=torch.int32)
    distance = (torch.arange(q_len) + k_len - q_len)[:, None] - torch.arange(k_len)[None, :]
    seen = visibility(distance, causal=options.get("causal", False), window=options["window"],
                      sinks=options["sinks"], key_pos=torch.arange(k_len))
    q_blocks, k_blocks = triton.cdiv(q_len, block_m), triton.cdiv(k_len, block_n)
    key_ranges = torch.full((q_blocks, 6), -1, dtype=torch.int32)
    query_ranges = torch.full((k_blocks, 4), -1, dtype=torch.int32)
    key_ranges, query_ranges, bounds = key_ranges.to(device), query_ranges.to(device), bounds.to(device)
    _ranges_probe[(max(q_blocks, k_blocks),)](
        key_ranges, query_ranges, bounds, q_len, k_len, left, right, options["sinks"],
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_PADDING=padding > 0, HAS_SINKS=True,
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
    needed = (seen & real[None, :]).float()
    # (query blocks, key blocks): does some pair of the two blocks see each other?
    pairs = torch.nn.functional.pad(needed, (0, k_blocks * block_n - k_len, 0, q_blocks * block_m - q_len))
    pairs = pairs.view(q_blocks, block_m, k_blocks, block_n).amax(dim=(1, 3)) > 0
    for i, (sink_start, sink_end, start, full_start, full_end, end) in enumerate(key_ranges.tolist()):
        visited = visited_blocks([(sink_start, sink_end), (start, full_start), (full_start, full_end),
                                  (full_end, end)], block_n)
        assert visited == set(pairs[i].nonzero().flatten().tolist()), f"query block {i}"
        rows = seen[i * block_m:(i + 1) * block_m]
        for j in visited_blocks([(full_start, full_end)], block_n):
            assert rows[:, j * block_n:(j + 1) * block_n].all(), f"query block {i}: key block {j} is not whole"
    for j, (start, full_start, full_end, end) in enumerate(query_ranges.tolist()):
        visited = visited_blocks([(start, full_start), (full_start, full_end), (full_end, end)], block_m)
        assert visited == set(pairs[:, j].nonzero().flatten().tolist()), f"key block {j}"
        keys = seen[:, j * block_n:min((j + 1) * block_n, k_len)]
        for i in visited_blocks([(full_start, full_end)], block_m):
            assert keys[i * block_m:(i + 1) * block_m].all(), f"key block {j}: query block {i} is not whole"


# --- on the GPU: tuned tiles, compiled code -------------------------------------------------------


GPU_CASES = {
    "causal-window-sinks": (1000, 1000, dict(causal=True, window=256, sinks=4)),
    "sinks-past-the-first-blocks": (1000, 1000, dict(causal=True, window=100, sinks=300)),
    "tuple-window-sinks": (700, 1500, dict(window=(128, 64), sinks=16)),
    "padding-gqa-sinks-logits": (1000, 1000, dict(causal=True, window=256, sinks=4, padding=True, sink_logits=True)),
    "sink-logits-alone": (1000, 1000, dict(causal=True, sink_logits=True)),
    "decode-window-sinks-logits": (1, 2049, dict(causal=True, window=512, sinks=4, sink_logits=True)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_matches_reference(name, dtype):
    q_len, k_len, options = GPU_CASES[name]
    options = dict(options)
    q, k, v = make_inputs(2, 8, 2, q_len, k_len, 128, dtype, "cuda", seed=len(name))
    if options.pop("padding", False):
        options["key_padding_mask"] = left_padding_mask(2, k_len, "cuda")
    if options.pop("sink_logits", False):
        options["sink_logits"] = random_sink_logits(8, dtype).cuda()
    check(q, k, v, **options)


@pytest.mark.gpu
def test_gpu_hidden_keys_with_nan_contribute_nothing():
    q, k, v = make_inputs(1, 8, 2, 300, 4000, 128, torch.bfloat16, "cuda", seed=2)
    hidden = torch.zeros(4000, dtype=torch.bool, device="cuda")
    hidden[4:4000 - 300 - 255] = True  # the queries (3700..3999) see keys 0..3 and 3445..3999
    bad_k = k.masked_fill(hidden[None, None, :, None], float("nan"))
    bad_v = v.masked_fill(hidden[None, None, :, None], float("inf"))
    options = dict(causal=True, window=256, sinks=4, sink_logits=random_sink_logits(8).cuda())
    out, grads, expected, expected_grads = kernel_and_reference(q, k, v, kernel_kv=(bad_k, bad_v), **options)
    for name, got, want in zip(("out", "dq", "dk", "dv", "d_sink_logits"), (out, *grads), (expected, *expected_grads)):
        assert torch.isfinite(got).all(), f"{name} is not finite"
        assert relative_error(got, want) < TOLERANCE[torch.bfloat16], name
