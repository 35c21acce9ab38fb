"""A user's mistake or a stale buffer never makes a kernel read outside its tensors or turn a
whole output into NaN (issue 13).

Out-of-range block tables and lengths are masked in the kernels and rejected by the value
checks where those are free; keys that no query sees (padding, slots before the window, unused
pool slots) contribute nothing whatever K and V hold; the autotuner never offers a config the
device cannot hold. The pages and tables here are views into larger tensors filled with NaN,
so a read past a view's end shows up as NaN instead of as a crash or a silent wrong number.
"""

from __future__ import annotations

import pytest
import torch

from hf_attn_patch.kernels import (
    SUPPORTED_HEAD_DIMS, _flash_triton, _paged_triton,
    paged_attention, write_to_pages,
)
from hf_attn_patch.kernels.reference import paged_attention_reference
from tests.helpers import relative_error
from tests.test_flash import kernel_and_reference, make_inputs
from tests.test_paged import make_paged_inputs

# Kernels only, no transformers: CI runs this file on one transformers release (see .ci/run).
pytestmark = pytest.mark.kernels

NAN = float("nan")


# --- paged_attention: tables and lengths out of range ---------------------------------------------


def pages_inside_nan(k_pages, v_pages, extra_blocks=4):
    """The same pages as views into pools whose extra blocks hold NaN."""
    views = []
    for pages in (k_pages, v_pages):
        pool = torch.full((pages.shape[0] + extra_blocks, *pages.shape[1:]), NAN, dtype=pages.dtype,
                          device=pages.device)
        pool[: pages.shape[0]] = pages
        views.append(pool[: pages.shape[0]])
    return views


def decode(q, k_pages, v_pages, block_table, seq_lens, partition_size, window=None):
    """paged_attention without the value checks, so the kernel itself meets the bad values;
    a partition_size forces the split path (partitions + merge) on tiny shapes."""
    if partition_size is None:
        return paged_attention(q, k_pages, v_pages, block_table, seq_lens, window=window, validate=False)
    left = -1 if window is None else window - 1
    return _paged_triton.decode(q, k_pages, v_pages, block_table, seq_lens, None, left,
                                q.shape[-1] ** -0.5, partition_size=partition_size)


@pytest.mark.parametrize("partition_size", [None, 16], ids=["single", "split"])
def test_table_entries_outside_the_pool_are_masked(partition_size, device):
    q, k_pages, v_pages, table, seq_lens = make_paged_inputs((40, 33), 4, 2, 32, torch.float32, device)
    k_pages, v_pages = pages_inside_nan(k_pages, v_pages)
    num_blocks = k_pages.shape[0]
    table[0, 1] = num_blocks + 1  # past the pool: NaN there
    table[1, 0] = -1  # EVICTED, yet inside the read range
    out = decode(q, k_pages, v_pages, table, seq_lens, partition_size)
    assert torch.isfinite(out).all()
    expected = paged_attention_reference(q, k_pages, v_pages, table, seq_lens)
    assert relative_error(out, expected) < 1e-4


@pytest.mark.parametrize("partition_size", [None, 16], ids=["single", "split"])
def test_seq_lens_past_the_table_are_masked(partition_size, device):
    """The table is a view whose next columns name a NaN block: reading past the width shows."""
    q, k_pages, v_pages, table, _ = make_paged_inputs((40, 40), 4, 2, 32, torch.float32, device)
    nan_block = k_pages.shape[0]
    k_pages, v_pages = (torch.cat([p, torch.full_like(p[:1], NAN)]) for p in (k_pages, v_pages))
    wide = torch.full((2, 8), nan_block, dtype=torch.int32, device=device)
    wide[:, :3] = table[:, :3]
    table = wide[:, :3]  # 48 positions per sequence
    seq_lens = torch.tensor([48 + 40, 1_000_000], dtype=torch.int32, device=device)
    out = decode(q, k_pages, v_pages, table, seq_lens, partition_size)
    assert torch.isfinite(out).all()
    expected = paged_attention_reference(q, k_pages, v_pages, table, seq_lens)
    assert relative_error(out, expected) < 1e-4
    # With a window beyond the table's end, no key is left: zeros.
    out = decode(q, k_pages, v_pages, table, seq_lens, partition_size, window=8)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(
    "seq_lens,edit,message",
    [
        ((49, 5), None, r"seq_lens\[0\] = 49"),
        ((-1, 5), None, r"seq_lens\[0\] = -1"),
        ((40, 5), (0, 2, 99), r"block_table\[0, 2\] = 99"),
        ((40, 5), (1, 0, -1), r"block_table\[1, 0\] = -1"),
    ],
    ids=["too-long", "negative", "past-the-pool", "evicted-but-read"],
)
def test_value_checks_name_the_bad_value(seq_lens, edit, message, device):
    q, k_pages, v_pages, table, _ = make_paged_inputs((40, 5), 4, 2, 32, torch.float32, device)
    table = table[:, :3]  # 48 positions per sequence
    if edit is not None:
        table[edit[0], edit[1]] = edit[2]
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=message):
        paged_attention(q, k_pages, v_pages, table, seq_lens, validate=True)
    if device == "cpu":  # CPU values cost no sync to read: checked by default
        with pytest.raises(ValueError, match=message):
            paged_attention(q, k_pages, v_pages, table, seq_lens)


def test_value_checks_accept_evicted_blocks_before_the_window(device):
    q, k_pages, v_pages, table, seq_lens = make_paged_inputs((60,), 4, 2, 32, torch.float32, device)
    table[0, :2] = -1  # positions 0..31; a window of 20 reads 40..59
    paged_attention(q, k_pages, v_pages, table, seq_lens, window=20, validate=True)
    with pytest.raises(ValueError, match="given back"):
        paged_attention(q, k_pages, v_pages, table, seq_lens, window=30, validate=True)


@pytest.mark.parametrize("partition_size", [None, 16], ids=["single", "split"])
def test_non_finite_pool_slots_no_query_reads_are_harmless(partition_size, device):
    """A fresh torch.empty pool can hold anything: NaN everywhere but the slots of real tokens
    in the window, an EVICTED block before it, the partial last block's tail unused."""
    lengths = (45, 37, 1)
    q, k_pages, v_pages, table, seq_lens = make_paged_inputs(lengths, 4, 2, 32, torch.float32, device)
    window, block_size = 20, k_pages.shape[1]
    clean_k, clean_v = k_pages.clone(), v_pages.clone()
    k_pages.fill_(NAN)
    v_pages.fill_(NAN)
    for b, length in enumerate(lengths):
        for t in range(max(0, length - window), length):
            block, slot = table[b, t // block_size], t % block_size
            k_pages[block, slot] = clean_k[block, slot]
            v_pages[block, slot] = clean_v[block, slot]
    table[0, 0] = -1  # positions 0..15, before the window (25..44)
    out = decode(q, k_pages, v_pages, table, seq_lens, partition_size, window=window)
    assert torch.isfinite(out).all()
    expected = paged_attention_reference(q, clean_k, clean_v, table, seq_lens, window=window)
    assert relative_error(out, expected) < 1e-4


def test_write_to_pages_never_writes_past_the_pool(device):
    """The pages are the first 4 blocks of an 8-block buffer: a slot past them must not land
    in the other 4."""
    buffers = [torch.full((8, 4, 2, 16), NAN, device=device) for _ in range(2)]
    k_pages, v_pages = (b[:4] for b in buffers)
    key = torch.randn(1, 2, 2, 16, device=device)
    slots = torch.tensor([[3, 4 * 4 + 1]], device=device)  # 4 blocks of 4 slots: the second is past
    with pytest.raises(ValueError, match=r"slot_mapping\[0, 1\] = 17"):
        write_to_pages(key, key, k_pages, v_pages, slots, validate=True)
    write_to_pages(key, key, k_pages, v_pages, slots, validate=False)
    assert torch.equal(k_pages[0, 3], key[0, :, 0])
    assert all(b[4:].isnan().all() for b in buffers)


# --- flash_attention: keys no query sees hold NaN ---------------------------------------------------


def check_nan_keys_contribute_nothing(q, k, v, hidden, **options):
    """NaN in K and V where `hidden` (B, Nk) is true: the output and the gradients are finite
    and match the reference on finite values there; the hidden keys' dK and dV are zeros."""
    nan_k = k.masked_fill(hidden[:, None, :, None], NAN)
    nan_v = v.masked_fill(hidden[:, None, :, None], NAN)
    out, grads, expected, expected_grads = kernel_and_reference((q, nan_k, nan_v), (q, k, v), **options)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected, *expected_grads)):
        assert torch.isfinite(got).all(), f"{name} is not finite"
        assert relative_error(got, want) < 1e-4, name
    for name, grad in zip(("dk", "dv"), grads[1:]):
        assert torch.equal(grad.transpose(1, 2)[hidden], torch.zeros_like(grad.transpose(1, 2)[hidden])), name


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padded_keys_with_nan_contribute_nothing(causal, device):
    q, k, v = make_inputs(2, 4, 2, 40, 40, 16, torch.float32, device)
    mask = torch.ones(2, 40, dtype=torch.bool, device=device)
    mask[0, :5] = False  # left padding
    mask[1, 3:36:4] = False  # holes, in every key block
    check_nan_keys_contribute_nothing(q, k, v, ~mask, causal=causal, key_padding_mask=mask)


@pytest.mark.parametrize("window", [8, (8, 2)], ids=["causal", "both-ways"])
def test_keys_before_every_window_with_nan_contribute_nothing(window, device):
    """A stale cache: queries at 48..59 never see keys before 41 (window 8) or 40 (left reach
    8); those hold NaN, some in the same key block as keys the queries do see."""
    q, k, v = make_inputs(1, 4, 2, 12, 60, 16, torch.float32, device)
    first_seen = 48 - (window - 1 if isinstance(window, int) else window[0])
    hidden = torch.zeros(1, 60, dtype=torch.bool, device=device)
    hidden[0, 20:first_seen] = True
    check_nan_keys_contribute_nothing(q, k, v, hidden, window=window)


# --- autotuning: never a config the device cannot hold ----------------------------------------------


H200_SHARED_MEMORY = 232448
KERNELS = {
    "fwd": (_flash_triton._fwd_tiles, _flash_triton._FWD_BLOCKS),
    "dkdv": (_flash_triton._dkdv_tiles, _flash_triton._DKDV_BLOCKS),
    "dq": (_flash_triton._dq_tiles, _flash_triton._DQ_BLOCKS),
}


def prune(kernel, blocks, head_dim, dtype, q_len):
    tiles, _ = KERNELS[kernel]
    configs = [_flash_triton._config(*b) for b in blocks]
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    named_args = {"Q": torch.empty(0, dtype=dtype), "q_len": q_len}
    return _flash_triton._prune_configs(configs, named_args, tiles=tiles, HEAD_DIM=head_dim, BLOCK_D=block_d)


def test_shared_memory_estimate_matches_the_measured_failure():
    """Issue 13: Triton asked for 262656 bytes (D=256, bf16) in the backward."""
    config = _flash_triton._config(64, 128, 8, 2)
    assert _flash_triton.shared_memory_estimate(config, _flash_triton._dkdv_tiles, 256, 2) == 262144


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("tuned", [True, False], ids=["tuned", "untuned"])
def test_pruning_keeps_only_configs_the_device_holds(kernel, tuned, monkeypatch):
    monkeypatch.setattr(_flash_triton, "_shared_memory_limit", lambda device: H200_SHARED_MEMORY)
    tiles, blocks = KERNELS[kernel]
    blocks = blocks if tuned else _flash_triton._UNTUNED
    for head_dim in SUPPORTED_HEAD_DIMS:
        for dtype in (torch.bfloat16, torch.float32):
            for q_len in (1, 300):
                kept = prune(kernel, blocks, head_dim, dtype, q_len)
                block_d = max(16, 1 << (head_dim - 1).bit_length())
                assert kept, (head_dim, dtype, q_len)
                for config in kept:
                    size = _flash_triton.shared_memory_estimate(config, tiles, block_d, dtype.itemsize)
                    assert size + _flash_triton._SCRATCH_BYTES <= H200_SHARED_MEMORY, (head_dim, dtype, q_len, str(config))


def test_pruning_keeps_the_tuned_choices_where_they_fit(monkeypatch):
    """The limit takes away only what does not fit: at D=128 every tuned config stays."""
    monkeypatch.setattr(_flash_triton, "_shared_memory_limit", lambda device: H200_SHARED_MEMORY)
    kept = prune("dkdv", _flash_triton._DKDV_BLOCKS, 128, torch.bfloat16, 300)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in kept] == [
        (64, 128, 2), (64, 128, 3), (64, 64, 3), (32, 128, 3)
    ]


@pytest.mark.parametrize("head_dim,dtype", [(128, torch.float32), (256, torch.bfloat16), (64, torch.float32)], ids=str)
def test_narrow_dkdv_tile_only_where_it_was_measured(head_dim, dtype, monkeypatch):
    """dK/dV's 32x128 (best for packed bf16 at D=128) holds 128 keys' K, V and accumulators: not
    offered for float32 or D=256, where those registers are not there, not even as the fallback."""
    monkeypatch.setattr(_flash_triton, "_shared_memory_limit", lambda device: H200_SHARED_MEMORY)
    kept = prune("dkdv", _flash_triton._DKDV_BLOCKS, head_dim, dtype, 300)
    assert kept and all(c.kwargs["BLOCK_M"] != 32 for c in kept), [str(c) for c in kept]


def test_pruning_shrinks_a_config_when_none_fits(monkeypatch):
    """float32 at D=256 on a device with 100 KiB: no tuned dK/dV config fits."""
    monkeypatch.setattr(_flash_triton, "_shared_memory_limit", lambda device: 100 * 1024)
    (config,) = prune("dkdv", _flash_triton._DKDV_BLOCKS, 256, torch.float32, 300)
    size = _flash_triton.shared_memory_estimate(config, _flash_triton._dkdv_tiles, 256, 4)
    assert size + _flash_triton._SCRATCH_BYTES <= 100 * 1024
    assert min(config.kwargs.values()) >= 16


def test_no_limit_off_the_gpu():
    """Under the interpreter nothing is pruned for shared memory (there is no such limit)."""
    assert _flash_triton._shared_memory_limit(torch.device("cpu")) is None
