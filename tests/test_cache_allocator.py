"""BlockAllocator on its own, without tensors or a model: accounting, windows, a full pool."""

from __future__ import annotations

import copy
import random

import pytest

from hf_attn_patch.cache import BlockAllocator, CacheFullError
from hf_attn_patch.cache.allocator import EVICTED


def live_slots(allocator, window=None):
    """Every stored token's slot, per sequence, recomputed from the block tables."""
    slots = {}
    for seq in allocator.sequences():
        table, length = allocator.block_table(seq), allocator.length(seq)
        for t in range(length):
            physical = table[t // allocator.block_size]
            if physical != EVICTED:
                slots[(seq, t)] = physical * allocator.block_size + t % allocator.block_size
    return slots


def test_blocks_taken_on_demand_and_returned():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    slots = []
    for step in range(9):  # a 9-token sequence: blocks at tokens 0, 4 and 8
        plan = allocator.extend({"a": 1})["a"]
        slots += plan.slots
        assert allocator.num_used == step // 4 + 1
        assert len(plan.table_updates) == (1 if step % 4 == 0 else 0)
    assert len(set(slots)) == 9
    assert slots == [allocator.block_table("a")[t // 4] * 4 + t % 4 for t in range(9)]
    assert allocator.release(["a"]) == 3
    assert allocator.num_free == 8 and allocator.sequences() == []
    allocator.check_invariants()


def test_prompt_takes_whole_blocks_and_zero_tokens_take_none():
    allocator = BlockAllocator(num_blocks=10, block_size=4)
    plans = allocator.extend({0: 10, 1: 0, 2: 4})
    assert len(plans[0].slots) == 10 and plans[1].slots == [] and len(plans[2].slots) == 4
    assert [len(allocator.blocks_of(s)) for s in (0, 1, 2)] == [3, 0, 1]
    allocator.check_invariants()


def test_cache_full_error_changes_nothing():
    allocator = BlockAllocator(num_blocks=5, block_size=4)
    allocator.extend({"a": 8, "b": 7})  # 4 blocks used
    before = copy.deepcopy(allocator.__dict__)
    with pytest.raises(CacheFullError) as info:
        allocator.extend({"a": 1, "b": 1, "c": 5})  # a needs 1, b none, c needs 2
    error = info.value
    assert (error.blocks_needed, error.blocks_free, error.blocks_total) == (3, 1, 5)
    assert isinstance(error, RuntimeError) and "3 more blocks" in str(error) and "1 of 5" in str(error)
    assert allocator.__dict__ == before
    allocator.check_invariants()
    allocator.extend({"a": 1})  # what fits still works
    allocator.check_invariants()


def test_window_gives_blocks_back_and_memory_stops_growing():
    block_size, window = 4, 10
    allocator = BlockAllocator(num_blocks=5, block_size=block_size)
    held = []
    for _ in range(100):
        allocator.extend({"s": 1}, window=window)
        held.append(len(allocator.blocks_of("s")))
        allocator.check_invariants()
    assert max(held) <= -(-window // block_size) + 1
    table = allocator.block_table("s")
    first_visible = allocator.length("s") - window
    # Every block a query can still see is held; everything wholly before it is evicted.
    assert all(b == EVICTED for b in table[: first_visible // block_size])
    assert all(b != EVICTED for b in table[first_visible // block_size:])


def test_window_prompt_stores_only_what_the_window_can_see():
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    plan = allocator.extend({"s": 30}, window=6)["s"]  # the last query sees tokens 24..29
    assert plan.slots[:24] == [EVICTED] * 24
    assert all(s != EVICTED for s in plan.slots[24:])
    assert len(allocator.blocks_of("s")) == 2  # logical blocks 6 and 7
    allocator.check_invariants()


def test_evicted_blocks_are_reused_in_the_same_step():
    """A full pool still serves a windowed step whose own evictions pay for it."""
    allocator = BlockAllocator(num_blocks=3, block_size=2)
    allocator.extend({"s": 6}, window=4)  # blocks 1 and 2 held (tokens 2..5)
    assert allocator.num_used == 2
    allocator.extend({"t": 2})  # the pool is now full
    with pytest.raises(CacheFullError):  # token 6's query still sees tokens 3..6 in block 1
        allocator.extend({"s": 1}, window=4)
    plan = allocator.extend({"s": 2}, window=4)["s"]  # tokens 6, 7: block 1 goes, block 3 comes
    assert EVICTED not in plan.slots and allocator.num_free == 0
    allocator.check_invariants()


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_keeps_every_invariant(seed):
    """Sequences join, grow, slide and finish at random; no slot is ever shared."""
    rng = random.Random(seed)
    allocator = BlockAllocator(num_blocks=40, block_size=rng.choice([1, 3, 4, 16]))
    window = rng.choice([None, 5, 17])
    next_id = 0
    for _ in range(300):
        action = rng.random()
        live = allocator.sequences()
        if action < 0.15 or not live:
            request = {next_id: rng.randint(0, 30)}
            next_id += 1
        elif action < 0.25:
            allocator.release(rng.sample(live, k=rng.randint(1, len(live))))
            request = {}
        else:
            request = {s: 1 for s in live}
        before = copy.deepcopy(allocator.__dict__)
        try:
            plans = allocator.extend(request, window=window)
        except CacheFullError:
            assert allocator.__dict__ == before
            continue
        allocator.check_invariants()
        slots = live_slots(allocator)
        assert len(set(slots.values())) == len(slots)  # no two live tokens share a slot
        for seq, plan in plans.items():  # the step's slots are the tables' slots
            start = allocator.length(seq) - len(plan.slots)
            for i, slot in enumerate(plan.slots):
                assert slot == slots.get((seq, start + i), EVICTED)
        assert allocator.peak_blocks_used >= allocator.num_used


@pytest.mark.parametrize("num_blocks, block_size, max_seq_len", [
    (0, 4, None), (4, 0, None), (-1, 4, None), (2.5, 4, None), ("4", 4, None), (4, True, None), (4, 4, 0),
])
def test_constructor_arguments_are_checked(num_blocks, block_size, max_seq_len):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        BlockAllocator(num_blocks, block_size, max_seq_len=max_seq_len)


@pytest.mark.parametrize("count", [-1, 1.5, True, "2", None])
def test_bad_token_counts_are_refused_before_any_change(count):
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    allocator.extend({"a": 3})
    before = copy.deepcopy(allocator.__dict__)
    with pytest.raises(ValueError, match="tokens added to sequence 'b' must be an integer >= 0"):
        allocator.extend({"a": 1, "b": count})
    assert allocator.__dict__ == before


def test_integer_like_counts_are_taken():
    import numpy as np
    import torch

    allocator = BlockAllocator(num_blocks=4, block_size=4)
    allocator.extend({"a": np.int64(5), "b": torch.tensor(2)})
    assert (allocator.length("a"), allocator.length("b")) == (5, 2)
    assert all(type(n) is int for n in allocator._lengths.values())


def test_max_seq_len_is_a_value_error_that_changes_nothing():
    allocator = BlockAllocator(num_blocks=8, block_size=4, max_seq_len=10)
    allocator.extend({"a": 9, "b": 2})
    before = copy.deepcopy(allocator.__dict__)
    with pytest.raises(ValueError, match="sequence 'a' would reach 11 tokens, more than max_seq_len=10"):
        allocator.extend({"a": 2, "b": 1})
    assert allocator.__dict__ == before
    with pytest.raises(CacheFullError):  # a full pool is reported first: that is what can be fixed by releasing
        allocator.extend({"a": 2, "c": 30})
    allocator.extend({"a": 1})  # exactly max_seq_len fits
    assert allocator.length("a") == 10


def test_release_twice_or_unknown_frees_nothing_more():
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    allocator.extend({"a": 5, "b": 1})
    assert allocator.release(["a", "a"]) == 2
    assert allocator.release(["a", "nobody"]) == 0
    assert allocator.num_free == 3 and allocator.sequences() == ["b"]
    allocator.check_invariants()
    allocator.release_all()
    allocator.release_all()
    assert allocator.num_free == 4
