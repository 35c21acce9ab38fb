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


# --- shared blocks (beam search) ---------------------------------------------------------------


def test_reorder_shares_blocks_and_copies_the_one_being_filled():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    allocator.extend({"a": 6})  # a full block and one holding 2 of 4 tokens
    full, filling = allocator.block_table("a")
    assert allocator.reorder({"b": "a", "c": "a"}) == 0
    assert allocator.block_table("b") == allocator.block_table("c") == [full, filling]
    assert allocator.length("c") == 6 and allocator.num_used == 2
    allocator.check_invariants()

    plans = allocator.extend({"a": 1, "b": 1, "c": 1})
    # Two of the three holders copy the block they write into; the last one writes in place.
    assert [len(plans[s].copies) for s in "abc"] == [1, 1, 0]
    assert {plans[s].copies[0][0] for s in "ab"} == {filling}
    assert allocator.block_table("c") == [full, filling]
    for s in "ab":
        copy_of = plans[s].copies[0][1]
        assert allocator.block_table(s) == [full, copy_of]
        assert plans[s].table_updates == [(1, copy_of)]
        assert plans[s].slots == [copy_of * 4 + 2]
    assert allocator.num_used == 4  # the full block is still shared by all three
    allocator.check_invariants()

    plans = allocator.extend({"a": 2, "b": 2, "c": 2})  # each crosses into a block of its own
    assert all(not plan.copies for plan in plans.values())
    assert allocator.num_used == 7
    assert allocator.release(["a", "b"]) == 4  # their own blocks; the shared full one stays with c
    assert allocator.num_used == 3 and allocator.block_table("c")[0] == full
    allocator.check_invariants()


def test_reorder_lets_go_of_what_no_sequence_keeps():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    allocator.extend({0: 5, 1: 5, 2: 5})  # two blocks each
    # Beam search's first step: every beam goes on from beam 0; the copies of the prompt go back.
    assert allocator.reorder({0: 0, 1: 0, 2: 0}) == 4
    assert allocator.num_used == 2
    # Sequences swap: every source is read before anything changes.
    allocator.extend({0: 3, 1: 3, 2: 3})
    before = {s: allocator.block_table(s) for s in (0, 1, 2)}
    allocator.reorder({0: 1, 1: 0})
    assert (allocator.block_table(0), allocator.block_table(1)) == (before[1], before[0])
    allocator.check_invariants()
    # A source that is no longer live ends the sequence.
    allocator.release([2])
    allocator.reorder({1: 2})
    assert allocator.sequences() == [0]
    allocator.check_invariants()


def test_a_copy_needs_a_free_block_and_a_full_pool_changes_nothing():
    allocator = BlockAllocator(num_blocks=2, block_size=4)
    allocator.extend({"a": 3, "x": 1})
    allocator.reorder({"b": "a"})
    before = copy.deepcopy(allocator.__dict__)
    with pytest.raises(CacheFullError) as info:
        allocator.extend({"a": 1, "b": 1})  # one of them must copy the shared block
    assert info.value.blocks_needed == 1
    assert allocator.__dict__ == before
    allocator.release(["x"])
    plans = allocator.extend({"a": 1, "b": 1})
    assert len(plans["a"].copies) == 1 and not plans["b"].copies
    allocator.check_invariants()


def test_a_window_lets_go_of_shared_blocks_once_no_holder_sees_them():
    allocator = BlockAllocator(num_blocks=12, block_size=2)
    allocator.extend({"a": 5}, window=4)
    allocator.reorder({"b": "a"})
    for _ in range(6):
        allocator.extend({"a": 1, "b": 1}, window=4)
        allocator.check_invariants()
    # Each holds the blocks of its own last 4 positions; the shared old ones went back.
    assert allocator.num_used == len(set(allocator.blocks_of("a")) | set(allocator.blocks_of("b")))
    assert max(len(allocator.blocks_of(s)) for s in "ab") <= 3


@pytest.mark.parametrize("seed", range(6))
def test_random_beams_read_their_own_tokens(seed):
    """Sequences grow, reorder (with repeats and swaps), slide and end at random, against a
    model of the pool's slots: copies are applied, then each step's tokens written; every token a
    sequence still holds must read back as its own."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    window, sinks = rng.choice([(None, 0), (6, 0), (7, 3)])
    allocator = BlockAllocator(num_blocks=48, block_size=block_size)
    pool: list = [None] * (48 * block_size)
    tokens: dict[int, list] = {}  # what each sequence has seen, as (origin, position) labels
    for step in range(200):
        live = allocator.sequences()
        action = rng.random()
        if action < 0.1 or not live:
            seq = step
            request = {seq: rng.randint(1, 9)}
            tokens[seq] = []
        elif action < 0.35:
            targets = rng.sample(range(step - 20, step + 1), k=rng.randint(1, 4))
            sources = {t: rng.choice(live) for t in targets}
            allocator.reorder(sources)
            tokens = {**{s: v for s, v in tokens.items() if s not in sources},
                      **{t: list(tokens[src]) for t, src in sources.items()}}
            request = {}
        elif action < 0.4:
            ended = rng.sample(live, k=1)
            allocator.release(ended)
            tokens.pop(ended[0])
            request = {}
        elif action < 0.5:  # assisted decoding's rollback
            cut = {s: max(0, allocator.length(s) - rng.randint(0, 3)) for s in rng.sample(live, k=1)}
            before = copy.deepcopy(allocator.__dict__)
            try:
                allocator.truncate(cut, window=window, sinks=sinks)
            except ValueError:
                assert window is not None and allocator.__dict__ == before
            else:
                for s, length in cut.items():
                    del tokens[s][length:]
            request = {}
        else:
            request = {s: 1 for s in live}
        # Some steps bring several tokens whose queries all read the pool (a continuation).
        several = bool(request) and rng.random() < 0.3
        if several:
            request = {s: rng.randint(1, 4) for s in request}
        first_query = {s: allocator.length(s) for s in request}
        before = copy.deepcopy(allocator.__dict__)
        try:
            plans = allocator.extend(request, window=window, sinks=sinks, every_token_queries=several)
        except CacheFullError:
            assert allocator.__dict__ == before
            allocator.release(rng.sample(allocator.sequences(), k=1))
            tokens = {s: tokens[s] for s in allocator.sequences()}
            continue
        for plan in plans.values():
            for shared, copy_of in plan.copies:
                pool[copy_of * block_size:(copy_of + 1) * block_size] = pool[shared * block_size:(shared + 1) * block_size]
        for seq, plan in plans.items():
            for slot in plan.slots:
                label = (seq, step, len(tokens[seq]))
                tokens[seq].append(label)
                if slot != EVICTED:
                    pool[slot] = label
        allocator.check_invariants()
        assert set(tokens) == set(allocator.sequences())
        for seq in allocator.sequences():
            table, length = allocator.block_table(seq), allocator.length(seq)
            assert length == len(tokens[seq])
            # Held: what the next query sees, and after a step of several tokens what its first saw.
            seen_from = length - window + 1 if window else 0
            if several and seq in first_query:
                seen_from = first_query[seq] - window + 1 if window else 0
            for t in range(length):
                visible = t >= seen_from or t < sinks
                physical = table[t // block_size]
                if visible:
                    assert physical != EVICTED
                if physical != EVICTED and visible:
                    assert pool[physical * block_size + t % block_size] == tokens[seq][t]


# --- rolling back (assisted decoding) and steps whose every token queries --------------------------


def test_truncate_lets_go_of_blocks_past_the_new_end():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    allocator.extend({"a": 10})
    allocator.reorder({"b": "a"})
    assert allocator.truncate({"a": 5}) == 0  # a's third block is b's too
    assert allocator.block_table("a") == allocator.block_table("b")[:2] and allocator.length("a") == 5
    assert allocator.truncate({"b": 6}) == 1  # now nobody holds the third block
    allocator.check_invariants()
    # Both hold the second block, a up to position 4 and b up to 5: a writes its position 5
    # into a copy; b, the last holder then, writes its position 6 in place.
    plans = allocator.extend({"a": 1, "b": 1})
    assert len(plans["a"].copies) == 1 and not plans["b"].copies
    allocator.check_invariants()
    before = copy.deepcopy(allocator.__dict__)
    with pytest.raises(ValueError, match="holds 6 tokens; it cannot be truncated to 7"):
        allocator.truncate({"b": 2, "a": 7})
    assert allocator.__dict__ == before


def test_a_window_truncates_only_to_what_it_still_holds():
    allocator = BlockAllocator(num_blocks=8, block_size=2)
    allocator.extend({"s": 10}, window=4)  # keeps positions 6..9 (blocks 3, 4)
    allocator.truncate({"s": 9}, window=4)  # the next query at 9 sees 6..9: held
    before = copy.deepcopy(allocator.__dict__)
    with pytest.raises(ValueError, match="given back to the pool already"):
        allocator.truncate({"s": 7}, window=4)  # would see 4, 5 again
    assert allocator.__dict__ == before


def test_a_step_whose_every_token_queries_keeps_the_first_ones_window():
    """A prompt attends over its own K/V, so only what its last token's window sees is stored;
    a step of several tokens after it attends over the pool, so its first token's window stays."""
    allocator = BlockAllocator(num_blocks=16, block_size=2)
    allocator.extend({"p": 3, "s": 3})
    prompt_like = allocator.extend({"p": 6}, window=4)["p"]
    assert prompt_like.slots[:1] == [EVICTED]  # positions 3..8: the last query sees 5..8
    step = allocator.extend({"s": 6}, window=4, every_token_queries=True)["s"]
    assert EVICTED not in step.slots  # position 3 sees 0..3: everything stays
    assert allocator.blocks_of("s") == [b for b in allocator.block_table("s") if b != EVICTED]
    assert len(allocator.blocks_of("s")) == 5
    allocator.extend({"s": 1}, window=4)  # the next one-token step catches up: position 9 sees 6..9
    assert len(allocator.blocks_of("s")) == 2
    allocator.check_invariants()


@pytest.mark.parametrize("seed", range(4))
def test_the_quick_decode_step_plans_what_the_general_one_does(seed):
    """`extend` takes a shortcut for one token into a block a sequence fills alone: the same
    random workload with and without it gives the same plans and the same state."""
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 16])
    window, sinks = rng.choice([(None, 0), (5, 0), (9, 2)])
    quick = BlockAllocator(num_blocks=64, block_size=block_size, max_seq_len=rng.choice([None, 40]))
    general = copy.deepcopy(quick)
    shortcuts = []

    def counted(new_tokens, window, shortcut=quick._extend_within_blocks):
        plans = shortcut(new_tokens, window)
        shortcuts.append(plans is not None)
        return plans

    quick._extend_within_blocks = counted
    general._extend_within_blocks = lambda new_tokens, window: None

    def state(allocator):
        return {k: v for k, v in allocator.__dict__.items() if k != "_extend_within_blocks"}

    for step in range(300):
        live = quick.sequences()
        action = rng.random()
        if action < 0.1 or not live:
            request = {step: rng.randint(1, 9)}
        elif action < 0.2:
            sources = {rng.choice(live): rng.choice(live) for _ in range(2)}
            assert quick.reorder(sources) == general.reorder(sources)
            request = {}
        elif action < 0.25:
            ended = rng.sample(live, k=1)
            assert quick.release(ended) == general.release(ended)
            request = {}
        else:
            request = {s: 1 for s in live}
        outcomes = []
        for allocator in (quick, general):
            try:
                outcomes.append(allocator.extend(request, window=window, sinks=sinks))
            except (CacheFullError, ValueError) as error:
                outcomes.append(type(error))
        assert outcomes[0] == outcomes[1]
        assert state(quick) == state(general)
        if outcomes[0] in (CacheFullError, ValueError):
            ended = rng.sample(live, k=1)
            quick.release(ended)
            general.release(ended)
    quick.check_invariants()
    assert sum(shortcuts) >= 30, "the shortcut should serve many of the steps"
