"""paged_attention and write_to_pages against the plain-PyTorch reference.

On the CPU the kernels run in Triton's interpreter, so shapes stay tiny; the cases are chosen so
that shuffled block tables, partial last blocks, one-token and empty sequences, windows that
start mid-block, several partitions and the merge pass all occur. The `gpu` tests repeat the
check at real sizes and capture a decode step in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from hf_attn_patch.kernels import _paged_triton, paged_attention, write_to_pages
from hf_attn_patch.kernels._checks import window_reach
from hf_attn_patch.kernels.reference import paged_attention_reference
from tests.helpers import relative_error

# Kernels only, no transformers: CI runs this file on one transformers release (see .ci/run).
pytestmark = pytest.mark.kernels

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def make_paged_inputs(lengths, q_heads, kv_heads, head_dim, dtype, device, block_size=16, seed=0,
                      strided_pages=False):
    """Random q and pages; each sequence gets distinct physical blocks in shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    max_blocks = max(1, max(-(-n // block_size) for n in lengths)) + 1  # a spare column
    num_blocks = batch * max_blocks + 3

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if strided_pages:  # pages as a view into a wider pool: strides the kernel must honour
        k_pages = randn(num_blocks, block_size, kv_heads, 2 * head_dim)[..., :head_dim]
        v_pages = randn(num_blocks, block_size, kv_heads, 2 * head_dim)[..., head_dim:]
    else:
        k_pages = randn(num_blocks, block_size, kv_heads, head_dim)
        v_pages = randn(num_blocks, block_size, kv_heads, head_dim)
    physical = torch.randperm(num_blocks, generator=generator)[: batch * max_blocks]
    block_table = physical.view(batch, max_blocks).to(device=device, dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = randn(batch, q_heads, head_dim)
    return q, k_pages, v_pages, block_table, seq_lens


def alibi(q_heads, device):
    return torch.tensor([2.0 ** (-8 * (h + 1) / q_heads) for h in range(q_heads)], device=device)


def check(q, k_pages, v_pages, block_table, seq_lens, partition_size=None, **options):
    expected = paged_attention_reference(q, k_pages, v_pages, block_table, seq_lens, **options)
    if partition_size is None:
        out = paged_attention(q, k_pages, v_pages, block_table, seq_lens, **options)
    else:  # force the split path (flash-decoding partitions + merge) on tiny shapes
        left, _ = window_reach(True, options.get("window"))
        slopes = options.get("alibi_slopes")
        out = _paged_triton.decode(q, k_pages, v_pages, block_table, seq_lens, slopes, left,
                                   q.shape[-1] ** -0.5, partition_size=partition_size)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    error = relative_error(out, expected)
    assert error < TOLERANCE[q.dtype], f"relative error {error:.2e}"
    return out


# (lengths, q_heads, kv_heads, head_dim): GQA, MQA and MHA; lengths off the block size, one token.
SHAPES = [
    pytest.param((37, 1, 16, 50), 8, 2, 64, id="gqa4"),
    pytest.param((1, 29, 3), 4, 1, 32, id="mqa"),
    pytest.param((33, 17), 2, 2, 80, id="mha-d80"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lengths,q_heads,kv_heads,head_dim", SHAPES)
def test_matches_reference(lengths, q_heads, kv_heads, head_dim, dtype, device):
    inputs = make_paged_inputs(lengths, q_heads, kv_heads, head_dim, dtype, device)
    check(*inputs)


@pytest.mark.parametrize("window", [7, 20, (12, 3)])
def test_window(window, device):
    inputs = make_paged_inputs((45, 3, 20, 64), 4, 2, 32, torch.float32, device, seed=1)
    check(*inputs, window=window)


def test_alibi_with_window(device):
    inputs = make_paged_inputs((40, 9), 4, 2, 32, torch.float32, device, seed=2)
    check(*inputs, window=18, alibi_slopes=alibi(4, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partitions_and_merge(dtype, device):
    """Several partitions per sequence; with the window some lie wholly before it."""
    inputs = make_paged_inputs((150, 64, 1, 0, 97), 8, 2, 32, dtype, device, seed=3)
    check(*inputs, partition_size=64)
    check(*inputs, partition_size=64, window=70, alibi_slopes=alibi(8, device))


def test_strided_pages_and_block_size(device):
    inputs = make_paged_inputs((23, 8), 4, 2, 16, torch.float16, device, block_size=8, seed=4,
                               strided_pages=True)
    check(*inputs)


def test_empty_sequence_gives_zeros(device):
    q, k_pages, v_pages, block_table, _ = make_paged_inputs((5, 5), 4, 2, 32, torch.float32, device)
    out = paged_attention(q, k_pages, v_pages, block_table, torch.tensor([0, 5], dtype=torch.int32, device=device))
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_window_never_reads_evicted_blocks(device):
    """Blocks wholly before the window may have been given back: mark them -1, same output."""
    q, k_pages, v_pages, block_table, seq_lens = make_paged_inputs((60,), 4, 2, 32, torch.float32, device, seed=5)
    expected = paged_attention(q, k_pages, v_pages, block_table, seq_lens, window=20)
    evicted = block_table.clone()
    evicted[0, :2] = -1  # positions 0..31; the window covers 40..59
    out = paged_attention(q, k_pages, v_pages, evicted, seq_lens, window=20)
    assert torch.equal(out, expected)


def test_write_to_pages(device):
    generator = torch.Generator().manual_seed(6)
    batch, kv_heads, tokens, head_dim, block_size, num_blocks = 3, 2, 5, 32, 4, 10
    k_pages = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(device)
    v_pages = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(device)
    # Transformers' (B, Hkv, N, D) layout is a transposed view of the projection output.
    key = torch.randn(batch, tokens, kv_heads, head_dim, generator=generator).to(device).transpose(1, 2)
    value = torch.randn(batch, tokens, kv_heads, head_dim, generator=generator).to(device).transpose(1, 2)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[: batch * tokens].view(batch, tokens)
    slots[0, :2] = -1  # left padding takes no slot
    slots = slots.to(device)

    expected_k, expected_v = k_pages.clone(), v_pages.clone()
    written = slots >= 0
    expected_k.view(-1, kv_heads, head_dim)[slots[written]] = key.transpose(1, 2)[written]
    expected_v.view(-1, kv_heads, head_dim)[slots[written]] = value.transpose(1, 2)[written]

    write_to_pages(key, value, k_pages, v_pages, slots)
    assert torch.equal(k_pages, expected_k) and torch.equal(v_pages, expected_v)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(q=a["q"][:, :, None]), "3-D"),
        (lambda a: a.update(block_table=a["block_table"].float()), "int32"),
        (lambda a: a.update(seq_lens=a["seq_lens"][:1]), "seq_lens"),
        (lambda a: a.update(k_pages=a["k_pages"].half(), v_pages=a["v_pages"].half()), "dtype"),
        (lambda a: a.update(alibi_slopes=torch.ones(3)), "alibi_slopes"),
    ],
)
def test_bad_inputs_say_what_is_wrong(change, message, device):
    q, k_pages, v_pages, block_table, seq_lens = make_paged_inputs((5, 5), 4, 2, 32, torch.float32, device)
    args = dict(q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table, seq_lens=seq_lens)
    change(args)
    with pytest.raises(ValueError, match=message):
        paged_attention(**args)


def test_custom_ops_registered(device):
    """Schema, fake (meta) implementations and mutation annotations agree with the kernels."""
    q, k_pages, v_pages, block_table, seq_lens = make_paged_inputs((9, 1), 4, 2, 16, torch.float32, device)
    torch.library.opcheck(
        torch.ops.hf_attn_patch.paged_attention.default,
        (q, k_pages, v_pages, block_table, seq_lens, None, -1, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )
    key = torch.randn(2, 2, 1, 16, device=device)
    slots = torch.tensor([[3], [-1]], device=device)
    torch.library.opcheck(
        torch.ops.hf_attn_patch.write_to_pages.default,
        (key, key.clone(), k_pages, v_pages, slots),
        test_utils=("test_schema", "test_faketensor"),
    )


def decode_step(q, key, value, k_pages, v_pages, block_table, seq_lens, slots):
    write_to_pages(key, value, k_pages, v_pages, slots)
    return paged_attention(q, k_pages, v_pages, block_table, seq_lens, window=20)


def step_inputs(device, seed=4):
    q, k_pages, v_pages, block_table, seq_lens = make_paged_inputs((30, 9), 4, 2, 16, torch.float32, device,
                                                                   seed=seed)
    generator = torch.Generator().manual_seed(seed)
    key, value = (torch.randn(2, 2, 1, 16, generator=generator).to(device) for _ in range(2))
    slots = new_token_slots(block_table, seq_lens, k_pages.shape[1])
    return q, key, value, k_pages, v_pages, block_table, seq_lens, slots


def new_token_slots(block_table, seq_lens, block_size):
    """The new token's slot: position seq_lens - 1, in its sequence's block of the table."""
    position = (seq_lens - 1).long()
    physical = block_table.long().gather(1, (position // block_size)[:, None])[:, 0]
    return (physical * block_size + position % block_size)[:, None]


def test_eager_decode_launches_without_the_custom_ops(device, monkeypatch):
    """The ops' dispatch is host time twice per layer of a decode step: eager calls skip it."""

    def forbidden(*args, **kwargs):
        raise AssertionError("an eager decode step went through a custom op")

    for name in ("paged_attention", "write_to_pages"):
        monkeypatch.setattr(torch.ops.hf_attn_patch, name, forbidden)
    inputs = step_inputs(device)
    q, key, value, k_pages, v_pages, block_table, seq_lens, slots = inputs
    out = decode_step(*inputs)
    assert torch.equal(k_pages.view(-1, 2, 16)[slots[:, 0]], key[:, :, 0])  # the new token was written
    expected = paged_attention_reference(q, k_pages, v_pages, block_table, seq_lens, window=20)
    assert relative_error(out, expected) < TOLERANCE[torch.float32]


def test_compiled_decode_step_goes_through_the_custom_ops(device, monkeypatch):
    """Under torch.compile the ops (with their fake versions) are what the graph holds: one
    graph, the same pages and output as eager."""
    from hf_attn_patch.kernels import paged

    eager_inputs, compiled_inputs = step_inputs(device), step_inputs(device)
    expected = decode_step(*eager_inputs)
    choices = []
    through_custom_op = paged._through_custom_op

    def recording(*tensors):
        choices.append(through_custom_op(*tensors))
        return choices[-1]

    monkeypatch.setattr(paged, "_through_custom_op", recording)
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, backend="aot_eager", fullgraph=True)
    out = compiled(*compiled_inputs)
    assert choices == [True, True]  # write and decode, both while tracing
    assert torch.equal(out, expected)
    assert torch.equal(compiled_inputs[3], eager_inputs[3]) and torch.equal(compiled_inputs[4], eager_inputs[4])


# --- GPU: real sizes, compiled kernels, CUDA graphs -----------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_long_contexts(dtype, head_dim, device):
    lengths = (1, 777, 4096, 9000, 0, 2500)
    inputs = make_paged_inputs(lengths, 32, 8, head_dim, dtype, device)
    check(*inputs)
    check(*inputs, window=1000, alibi_slopes=alibi(32, device))


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(device):
    """Capture one decode step, change seq_lens in place, replay: no host sync in the step."""
    q, k_pages, v_pages, block_table, seq_lens = make_paged_inputs((3000, 40, 1), 32, 8, 128, torch.bfloat16, device)
    paged_attention(q, k_pages, v_pages, block_table, seq_lens)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(q, k_pages, v_pages, block_table, seq_lens)
    seq_lens.copy_(torch.tensor([2999, 41, 17], dtype=torch.int32))
    graph.replay()
    expected = paged_attention_reference(q, k_pages, v_pages, block_table, seq_lens)
    assert relative_error(out, expected) < 1e-2


@pytest.mark.gpu
def test_gpu_repeat_decode_calls_launch_directly(device):
    """The write, decode and merge kernels went through Triton's own launch (~100 us of host time
    each on the H200 machines' hosts, three per layer of a paged decode step): after their first
    call they take `_launch`'s direct path, and still match the reference as the lengths change."""
    from hf_attn_patch.kernels import _launch

    q, key, value, k_pages, v_pages, block_table, seq_lens, slots = step_inputs(device)
    decode_step(q, key, value, k_pages, v_pages, block_table, seq_lens, slots)  # compiles
    before = _launch.fast_launch_stats()
    for step in range(1, 6):
        key, value = torch.randn_like(key), torch.randn_like(value)
        seq_lens -= 1  # within the blocks the table holds
        slots = new_token_slots(block_table, seq_lens, k_pages.shape[1])
        out = decode_step(q, key, value, k_pages, v_pages, block_table, seq_lens, slots)
        expected = paged_attention_reference(q, k_pages, v_pages, block_table, seq_lens, window=20)
        assert relative_error(out, expected) < 1e-2, step
    after = _launch.fast_launch_stats()
    assert after["disabled"] is None
    assert after["fast"] - before["fast"] >= 10  # write + decode (+ merge) per step
    assert after["slow"] == before["slow"]
