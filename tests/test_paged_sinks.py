"""paged_attention with attention sinks (sinks=S) and sink logits, against the reference.

A streaming cache gives back the blocks between the sinks and the window, so the tables here
hold -1 there: the kernel must read the sinks' blocks and the window's, never those between.
Sink logits join each row's softmax denominator exactly once, also when the context is split
into partitions (the merge adds them, the partitions must not): `partition_size` forces that
split on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from hf_attn_patch.kernels import _paged_triton, paged_attention
from hf_attn_patch.kernels._checks import window_reach
from hf_attn_patch.kernels.reference import paged_attention_reference
from tests.helpers import relative_error
from tests.test_paged import TOLERANCE, alibi, make_paged_inputs

# Kernels only, no transformers: CI runs this file on one transformers release (see .ci/run).
pytestmark = pytest.mark.kernels


def run(q, k_pages, v_pages, block_table, seq_lens, partition_size=None, **options):
    """The kernel, through paged_attention (with the value checks) or forced into partitions."""
    if partition_size is None:
        return paged_attention(q, k_pages, v_pages, block_table, seq_lens, validate=True, **options)
    left, _ = window_reach(True, options.get("window"))
    return _paged_triton.decode(
        q, k_pages, v_pages, block_table, seq_lens, options.get("alibi_slopes"), left, q.shape[-1] ** -0.5,
        partition_size=partition_size, sinks=options.get("sinks", 0), sink_logits=options.get("sink_logits"),
    )


def check(inputs, partition_size=None, **options):
    expected = paged_attention_reference(*inputs, **options)
    out = run(*inputs, partition_size=partition_size, **options)
    q = inputs[0]
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    error = relative_error(out, expected)
    assert error < TOLERANCE[q.dtype], f"relative error {error:.2e}"
    return out


def every_block(dtype, device, seed=0):
    """GQA (8 query heads on 2 KV heads), block size 8, lengths 150, 95, 31, 4 and 0: with a
    window of 30 the last three see every key they have."""
    return make_paged_inputs((150, 95, 31, 4, 0), 8, 2, 32, dtype, device, block_size=8, seed=seed)


def streaming_inputs(dtype, device, seed=0):
    """`every_block`, where sequence 0 (150 tokens) has given back the blocks of positions
    16..111 and sequence 1 (95) those of 8..63, as a streaming cache with window 30 and 5 sinks
    would have."""
    q, k_pages, v_pages, table, seq_lens = every_block(dtype, device, seed)
    table[0, 2:14] = -1
    table[1, 1:8] = -1
    return q, k_pages, v_pages, table, seq_lens


@pytest.mark.parametrize("partition_size", [None, 32], ids=["single", "split"])
def test_window_and_sinks_skip_given_back_blocks(partition_size, device):
    inputs = streaming_inputs(torch.float32, device)
    out = check(inputs, partition_size, window=30, sinks=5)
    # The sinks matter here (the test can fail): without them the first rows differ.
    without = paged_attention_reference(*inputs, window=30)
    assert relative_error(out[:2], without[:2]) > 1e-2
    # Sinks over several partitions; sequence 2's sinks reach into its window: each key read once.
    check(every_block(torch.float32, device), partition_size, window=30, sinks=40)


@pytest.mark.parametrize("partition_size", [None, 32], ids=["single", "split"])
def test_sink_logits_added_once(partition_size, device):
    """With and without a window, with ALiBi: several partitions, one sink term per row."""
    inputs = streaming_inputs(torch.float32, device, seed=1)
    generator = torch.Generator().manual_seed(2)
    sink_logits = (torch.randn(8, generator=generator) * 2).to(device)
    slopes = alibi(8, device)
    out = check(inputs, partition_size, window=30, sinks=5, sink_logits=sink_logits, alibi_slopes=slopes)
    without = paged_attention_reference(*inputs, window=30, sinks=5, alibi_slopes=slopes)
    assert relative_error(out, without) > 1e-2
    check(every_block(torch.float32, device, seed=1), partition_size, sink_logits=sink_logits,
          alibi_slopes=slopes)  # no window: every key


def test_bfloat16_window_sinks_and_logits(device):
    inputs = streaming_inputs(torch.bfloat16, device, seed=3)
    sink_logits = torch.linspace(-2, 2, 8, device=device)
    check(inputs, 32, window=30, sinks=5, sink_logits=sink_logits)


def test_empty_rows_give_zeros_with_sink_logits(device):
    """A row that sees no key (length 0) returns zeros: all its mass goes to the sink."""
    inputs = streaming_inputs(torch.float32, device)
    out = check(inputs, 32, window=30, sinks=5, sink_logits=torch.zeros(8, device=device))
    assert torch.equal(out[4], torch.zeros_like(out[4]))


def test_validate_checks_the_sink_blocks(device):
    """-1 between the sinks and the window passes the value check; -1 where a sink lives fails."""
    q, k_pages, v_pages, table, seq_lens = streaming_inputs(torch.float32, device)
    paged_attention(q, k_pages, v_pages, table, seq_lens, window=30, sinks=5, validate=True)
    with pytest.raises(ValueError, match=r"block_table\[0, 2\] = -1"):  # sinks 0..19 need block 2
        paged_attention(q, k_pages, v_pages, table, seq_lens, window=30, sinks=20, validate=True)
    table[0, 0] = -1
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -1 .*after the sinks"):
        paged_attention(q, k_pages, v_pages, table, seq_lens, window=30, sinks=5, validate=True)


@pytest.mark.parametrize("options,message", [
    (dict(sinks=-1), "sinks must be an int >= 0"),
    (dict(sinks=2.0), "sinks must be an int >= 0"),
    (dict(sinks=True), "sinks must be an int >= 0"),
    (dict(sink_logits=torch.zeros(3)), r"sink_logits must .*shape \(num_q_heads,\) = \(8,\)"),
    (dict(sink_logits=torch.zeros(8, dtype=torch.int32)), "sink_logits must be floating point"),
    (dict(sink_logits=[0.0] * 8), "sink_logits must be a tensor"),
])
def test_bad_sink_arguments_say_what_is_wrong(options, message, device):
    q, k_pages, v_pages, table, seq_lens = streaming_inputs(torch.float32, device)
    with pytest.raises(ValueError, match=message):
        paged_attention(q, k_pages, v_pages, table, seq_lens, window=30, **options)


def test_custom_op_schema_with_sinks(device):
    q, k_pages, v_pages, table, seq_lens = make_paged_inputs((9, 1), 4, 2, 16, torch.float32, device)
    torch.library.opcheck(
        torch.ops.hf_attn_patch.paged_attention.default,
        (q, k_pages, v_pages, table, seq_lens, None, 3, 0.25, 2, torch.zeros(4, device=device)),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_streaming_shapes(dtype, device):
    """Real sizes: 8k-token sequences of which only the sinks and a 1k window are held."""
    lengths = (8192, 5000, 1025, 17)
    q, k_pages, v_pages, table, seq_lens = make_paged_inputs(lengths, 32, 8, 128, dtype, device, seed=7)
    window, sinks = 1024, 4
    for row, length in enumerate(lengths):  # what a streaming cache holds
        first_block = max(0, length - window) // 16
        table[row, 1:first_block] = -1
    sink_logits = torch.randn(32, device=device)
    check((q, k_pages, v_pages, table, seq_lens), window=window, sinks=sinks, sink_logits=sink_logits)
    check((q, k_pages, v_pages, table, seq_lens), 512, window=window, sinks=sinks, sink_logits=sink_logits)
