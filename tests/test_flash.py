"""flash_attention against the plain-PyTorch reference: forward and the three gradients.

On the CPU the real kernels run in Triton's interpreter, so shapes stay small; lengths are
chosen so that several blocks, partial blocks and skipped blocks all occur. The `gpu` tests
repeat the check at sizes where the tuned block sizes and the compiled code are exercised.
"""

from __future__ import annotations

import pytest
import torch

from hf_attn_patch.kernels import attention_reference, flash_attention
from tests.helpers import assert_compiled_matches_eager, relative_error

# Kernels only, no transformers: CI runs this file on one transformers release (see .ci/run).
pytestmark = pytest.mark.kernels

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def make_inputs(batch, q_heads, kv_heads, q_len, k_len, head_dim, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return (
        randn(batch, q_heads, q_len, head_dim),
        randn(batch, kv_heads, k_len, head_dim),
        randn(batch, kv_heads, k_len, head_dim),
    )


def left_padding_mask(batch, k_len, device, seed=0):
    """Each sequence starts after a random number of pad tokens; row 0 is unpadded."""
    generator = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, k_len - 1, (batch,), generator=generator)
    starts[0] = 0
    return (torch.arange(k_len)[None, :] >= starts[:, None]).to(device)


def random_holes_mask(batch, k_len, device, seed=0):
    generator = torch.Generator().manual_seed(seed + 2)
    mask = torch.rand(batch, k_len, generator=generator) > 0.3
    mask[:, -1] = True
    return mask.to(device=device, dtype=torch.int64)


def kernel_and_reference(kernel_inputs, reference_inputs, **options):
    """flash_attention on kernel_inputs and the reference on reference_inputs (q, k, v each),
    with one random upstream gradient: (out, grads, expected, expected_grads)."""
    leaves = [t.detach().clone().requires_grad_() for t in kernel_inputs]
    ref_leaves = [t.detach().clone().requires_grad_() for t in reference_inputs]
    out = flash_attention(*leaves, **options)
    expected = attention_reference(*ref_leaves, **options)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, ref_leaves, grad_out)
    return out, grads, expected, expected_grads


def check_against_reference(q, k, v, **options):
    """Run kernel and reference on the same inputs and upstream gradient; compare all four."""
    dtype = q.dtype
    out, grads, expected, expected_grads = kernel_and_reference((q, k, v), (q, k, v), **options)

    assert out.shape == expected.shape and out.dtype == dtype
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected, *expected_grads)):
        if not want.any():  # e.g. dq with a single key: the softmax is constant, dq is exactly 0
            assert got.abs().max() < 1e-5, f"{name}: expected zeros ({dtype}, {options})"
            continue
        error = relative_error(got, want)
        assert error < TOLERANCE[dtype], f"{name}: relative error {error:.2e} ({dtype}, {options})"


OPTIONS = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(window=9),
    "window_tuple": dict(window=(6, 3)),
    "window_tuple_causal": dict(window=(20, 5), causal=True),
    "left_padding_causal": dict(causal=True, key_padding_mask="left"),
    "holes": dict(key_padding_mask="holes"),
    "alibi_causal": dict(causal=True, alibi_slopes=True),
    "alibi_window_padding": dict(window=17, alibi_slopes=True, key_padding_mask="left"),
    "scale": dict(causal=True, scale=0.3),
}


def resolve(options, batch, q_heads, k_len, device):
    options = dict(options)
    if options.get("key_padding_mask") == "left":
        options["key_padding_mask"] = left_padding_mask(batch, k_len, device)
    elif options.get("key_padding_mask") == "holes":
        options["key_padding_mask"] = random_holes_mask(batch, k_len, device)
    if options.get("alibi_slopes"):
        options["alibi_slopes"] = torch.rand(q_heads, device=device) * 0.5
    return options


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_match_reference(name, dtype, device):
    batch, q_heads, kv_heads, length, head_dim = 2, 4, 2, 45, 32
    q, k, v = make_inputs(batch, q_heads, kv_heads, length, length, head_dim, dtype, device)
    check_against_reference(q, k, v, **resolve(OPTIONS[name], batch, q_heads, length, device))


@pytest.mark.parametrize(
    "q_len,k_len", [(1, 1), (1, 70), (7, 70), (33, 65), (64, 64), (70, 30)], ids=str
)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths_and_head_groups(q_len, k_len, heads, causal, device):
    q, k, v = make_inputs(2, *heads, q_len, k_len, 16, torch.float32, device, seed=q_len + k_len)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128, 256])
def test_head_dims(head_dim, device):
    q, k, v = make_inputs(1, 2, 1, 40, 40, head_dim, torch.float16, device, seed=head_dim)
    check_against_reference(q, k, v, causal=True, key_padding_mask=left_padding_mask(1, 40, device))


def test_non_contiguous_inputs(device):
    batch, heads, length, head_dim = 2, 4, 37, 32
    # q as transformers hands it over (a transposed view), k and v as slices of a wider tensor.
    q = torch.randn(batch, length, heads, head_dim, device=device).transpose(1, 2)
    kv = torch.randn(batch, 2 * heads, length, 2 * head_dim, device=device)
    k, v = kv[:, :heads, :, :head_dim], kv[:, heads:, :, head_dim:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_reference(q, k, v, causal=True)


def test_rows_that_see_nothing_are_zero(device):
    q, k, v = make_inputs(2, 2, 2, 30, 20, 16, torch.float32, device)
    mask = torch.ones(2, 20, dtype=torch.bool, device=device)
    mask[1] = False  # the second sequence is all padding
    out = flash_attention(q, k, v, causal=True, key_padding_mask=mask)
    # causal with Nq > Nk: the first 10 queries stand before every key
    assert torch.equal(out[:, :, :10], torch.zeros_like(out[:, :, :10]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0, :, 10:].abs().sum() > 0
    check_against_reference(q, k, v, causal=True, key_padding_mask=mask)


def test_output_layout_makes_transpose_free(device):
    q, k, v = make_inputs(2, 4, 2, 17, 17, 16, torch.float32, device)
    out = flash_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


def test_repeat_launches_reuse_the_tuned_config_and_skip_the_custom_op(device, monkeypatch):
    """Eager inference launches the kernel directly, and after the autotuner's first choice for
    a tuning key, without the autotuner; every launch must still match the reference."""
    from hf_attn_patch.kernels import _flash_triton

    def no_custom_op(*args, **kwargs):
        raise AssertionError("eager inference went through the custom op")

    monkeypatch.setattr(torch.ops.hf_attn_patch, "flash_attention_forward", no_custom_op)
    monkeypatch.setattr(_flash_triton, "_CHOSEN_CONFIGS", {})
    mask = None
    for seed in range(3):  # same tuning key each time, fresh inputs (lengths 23..25: one bucket)
        q, k, v = make_inputs(2, 4, 2, 23 + seed, 23 + seed, 32, torch.float32, device, seed=seed)
        mask = left_padding_mask(2, 23 + seed, device, seed=seed)
        with torch.no_grad():
            out = flash_attention(q, k, v, causal=True, key_padding_mask=mask)
        expected = attention_reference(q, k, v, causal=True, key_padding_mask=mask)
        assert relative_error(out, expected) < TOLERANCE[torch.float32]
    assert len(_flash_triton._CHOSEN_CONFIGS) == 1  # one key, tuned once, reused twice


def test_eager_training_skips_the_custom_ops(device, monkeypatch):
    """Eager autograd runs the kernels through a plain autograd.Function: the ops' dispatch is
    host time on every call. The gradients are still the reference's."""

    def forbidden(*args, **kwargs):
        raise AssertionError("eager training went through a custom op")

    for name in ("flash_attention_forward", "flash_attention_backward"):
        monkeypatch.setattr(torch.ops.hf_attn_patch, name, forbidden)
    q, k, v = make_inputs(2, 4, 2, 30, 30, 16, torch.float32, device, seed=11)
    check_against_reference(q, k, v, causal=True, key_padding_mask=left_padding_mask(2, 30, device))


def test_custom_ops_give_the_eager_paths_results(device, monkeypatch):
    """torch.compile and tensor subclasses take the custom ops: the same kernels, the same bits."""
    from hf_attn_patch.kernels import flash

    q, k, v = make_inputs(2, 4, 2, 30, 30, 16, torch.float32, device, seed=12)
    grad_out = torch.randn_like(q)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*leaves, causal=True, window=9)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    eager = run()
    monkeypatch.setattr(flash, "route", lambda *tensors: flash.CUSTOM_OP)
    through_ops = run()
    assert all(torch.equal(a, b) for a, b in zip(eager, through_ops))


def test_compiles_without_graph_breaks(device):
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 4, 2, 24, 24, 16, torch.float32, device))

    def step(q, k, v):
        out = flash_attention(q, k, v, causal=True, window=8)
        return (out * out).sum()

    assert_compiled_matches_eager(step, (q, k, v))


BAD_INPUTS = {
    "batch": (dict(), lambda q, k, v: (q, k[:1], v[:1]), "batch mismatch"),
    "head_dim": (dict(), lambda q, k, v: (q, k[..., :8], v[..., :8]), "head dim mismatch"),
    "groups": (dict(), lambda q, k, v: (q[:, :3], k, v), "multiple of key/value heads"),
    "unsupported_head_dim": (
        dict(), lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), "head dim 8 is not supported"
    ),
    "mixed_dtypes": (dict(), lambda q, k, v: (q, k.half(), v), "dtype"),
    "mask_shape": (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), None, "key_padding_mask"),
    "slopes_shape": (dict(alibi_slopes=torch.ones(3)), None, "alibi_slopes"),
    "window": (dict(window=0), None, "window"),
    "scale": (dict(scale=-0.25), None, "scale must be a positive"),
    "integer_dtype": (dict(), lambda q, k, v: (q.long(), k.long(), v.long()), "not supported"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error(name, device):
    options, transform, message = BAD_INPUTS[name]
    q, k, v = make_inputs(2, 4, 2, 10, 10, 16, torch.float32, device)
    if transform is not None:
        q, k, v = transform(q, k, v)
    options = {key: value.to(device) if torch.is_tensor(value) else value for key, value in options.items()}
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **options)


def test_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_inputs(1, 2, 2, 8, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        flash_attention(q, k, v)


# --- on the GPU: tuned block sizes, compiled code, long sequences -------------------------------


GPU_CASES = [(name, torch.bfloat16) for name in OPTIONS] + [
    (name, dtype) for name in ("causal", "alibi_window_padding") for dtype in (torch.float16, torch.float32)
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype", GPU_CASES, ids=str)
def test_gpu_options_match_reference(name, dtype):
    batch, q_heads, kv_heads, length, head_dim = 2, 8, 2, 1000, 128
    q, k, v = make_inputs(batch, q_heads, kv_heads, length, length, head_dim, dtype, "cuda")
    options = resolve(OPTIONS[name], batch, q_heads, length, "cuda")
    if "window" in options and isinstance(options["window"], int):
        options["window"] = 300
    check_against_reference(q, k, v, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("q_len,k_len", [(1, 2049), (777, 1500)], ids=str)
def test_gpu_lengths_and_head_dims(head_dim, q_len, k_len):
    q, k, v = make_inputs(2, 8, 2, q_len, k_len, head_dim, torch.bfloat16, "cuda", seed=head_dim)
    check_against_reference(q, k, v, causal=True)
