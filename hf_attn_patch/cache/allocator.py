"""Block allocator for the paged KV cache: plain Python, no tensors, no kernels (as in vLLM).

The pool holds `num_blocks` physical blocks of `block_size` token slots. Each sequence owns a
block table, a list mapping its logical block i (tokens i * block_size ... (i + 1) * block_size - 1)
to a physical block. Blocks are taken when a sequence grows into a new logical block and go back
to the free list when the sequence is released.

With a sliding window of W tokens, a query at position p sees keys p - W + 1 ... p, and later
queries only move right; so once a logical block lies wholly before p - W + 1 it is never read
again, and it goes back to the pool. Its table entry becomes EVICTED (-1): logical indices never
shift, so the kernel keeps computing a token's block as t // block_size, and the window keeps
it from ever reading an evicted entry. Tokens that are outside the window already when they
arrive (the start of a long prompt) get no slot at all. Memory per sequence thus stops growing
at about W / block_size + 1 blocks.

With attention sinks (StreamingLLM) the first S positions stay visible beside the window: the
blocks holding them, the first ceil(S / block_size), are kept for the sequence's life, and only
the blocks between them and the window are given back. A sequence then never holds more than
`streaming_blocks(W, S, block_size)` = ceil(S / block_size) + ceil((W - 1) / block_size) + 1
blocks, however long it runs: (S + W) / block_size + 1 when both are multiples of the block size.

A step either succeeds for every sequence or changes nothing: `extend` works out every block it
needs first, and raises `CacheFullError` with the numbers (or ValueError for a sequence longer
than `max_seq_len`) before touching any state.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping

EVICTED = -1  # block-table entry whose block went back to the pool (or was never taken)


class CacheFullError(RuntimeError):
    """The pool has too few free blocks for the step; the allocator is left as it was."""

    def __init__(self, blocks_needed: int, blocks_free: int, blocks_total: int, block_size: int):
        self.blocks_needed = blocks_needed
        self.blocks_free = blocks_free
        self.blocks_total = blocks_total
        self.block_size = block_size
        super().__init__(
            f"paged KV cache is full: this step needs {blocks_needed} more blocks of {block_size} "
            f"tokens but only {blocks_free} of {blocks_total} are free. Build the cache with more "
            "blocks (num_blocks= or max_tokens=), release finished sequences, or run fewer or "
            "shorter sequences at once."
        )


@dataclass
class StepPlan:
    """What one `extend` did to one sequence: the slots of its new tokens and its table edits."""

    slots: list[int] = field(default_factory=list)  # flat slot per new token; -1 = not stored
    table_updates: list[tuple[int, int]] = field(default_factory=list)  # (logical index, physical or EVICTED)


class BlockAllocator:
    """Free list of physical blocks plus one block table and length per live sequence.

    max_seq_len: most tokens one sequence may reach (its block table's room); None for no limit.
    """

    def __init__(self, num_blocks: int, block_size: int, max_seq_len: int | None = None):
        num_blocks = checked_int("num_blocks", num_blocks)
        block_size = checked_int("block_size", block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_seq_len = None if max_seq_len is None else checked_int("max_seq_len", max_seq_len)
        # A stack: pop() hands out low block numbers first, which keeps tests readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}
        # Per sequence, the logical block up to which (from the sinks' end) everything has been
        # given back: windows only move right, so each step scans only what it newly evicts,
        # and a step costs the same at the millionth token as at the first.
        self._evicted_to: dict[Hashable, int] = {}
        self.peak_blocks_used = 0

    # --- queries -------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def sequences(self) -> list[Hashable]:
        return list(self._tables)

    def length(self, seq: Hashable) -> int:
        """Tokens the sequence has seen (evicted ones included); 0 for an unknown sequence."""
        return self._lengths.get(seq, 0)

    def block_table(self, seq: Hashable) -> list[int]:
        """Logical -> physical block for the sequence (a copy); EVICTED where given back."""
        return list(self._tables.get(seq, ()))

    def blocks_of(self, seq: Hashable) -> list[int]:
        """Physical blocks the sequence holds now."""
        return [b for b in self._tables.get(seq, ()) if b != EVICTED]

    # --- changes -------------------------------------------------------------------------------

    def extend(
        self, new_tokens: Mapping[Hashable, int], window: int | None = None, sinks: int = 0
    ) -> dict[Hashable, StepPlan]:
        """Append new_tokens[seq] tokens to each sequence (new sequences start empty).

        With a window, blocks wholly outside it after the step are given back first, and new
        tokens outside it get slot -1; with sinks too, the blocks of the first `sinks` positions
        are kept (a sequence keeps the same window and sinks for its life). All or nothing:
        raises CacheFullError, changing nothing, when the pool cannot hold the step, and
        ValueError when a sequence would pass max_seq_len.
        """
        sink_blocks = 0
        if window is not None:
            window = checked_int("window", window)
            sink_blocks = -(-checked_int("sinks", sinks, 0) // self.block_size)
        new_tokens = {  # the check (and its message) only for what is not already a plain count
            seq: n if type(n) is int and n >= 0 else checked_int(f"tokens added to sequence {seq!r}", n, 0)
            for seq, n in new_tokens.items()
        }

        # Plan everything first, so that a full pool leaves no partial step behind.
        needed = 0
        released = 0
        plans = {}
        for seq, count in new_tokens.items():
            table = self._tables.get(seq, [])
            old_len = self._lengths.get(seq, 0)
            first_kept = self._first_kept_block(old_len + count, window)
            scan_from = max(sink_blocks, self._evicted_to.get(seq, 0))
            evict = [i for i in range(scan_from, min(first_kept, len(table))) if table[i] != EVICTED]
            last_block = (old_len + count - 1) // self.block_size if old_len + count else -1
            grow = list(range(len(table), last_block + 1))
            take = [i for i in grow if i >= first_kept or i < sink_blocks]
            needed += len(take)
            released += len(evict)
            plans[seq] = (old_len, count, evict, grow, take, first_kept)
        if needed > len(self._free) + released:
            raise CacheFullError(needed - released, len(self._free), self.num_blocks, self.block_size)
        if self.max_seq_len is not None:
            for seq, (old_len, count, *_) in plans.items():
                if old_len + count > self.max_seq_len:
                    raise ValueError(
                        f"sequence {seq!r} would reach {old_len + count} tokens, more than max_seq_len="
                        f"{self.max_seq_len}; build the cache with a larger max_seq_len"
                    )

        # Give back first, for every sequence: blocks leaving one window can serve another.
        result = {seq: StepPlan() for seq in plans}
        for seq, (_, _, evict, *_) in plans.items():
            table = self._tables.setdefault(seq, [])
            for i in evict:
                self._free.append(table[i])
                table[i] = EVICTED
                result[seq].table_updates.append((i, EVICTED))
        for seq, (old_len, count, _, grow, take, first_kept) in plans.items():
            table, plan = self._tables[seq], result[seq]
            table.extend([EVICTED] * len(grow))
            for i in take:
                table[i] = self._free.pop()
                plan.table_updates.append((i, table[i]))
            for t in range(old_len, old_len + count):
                physical = table[t // self.block_size]
                plan.slots.append(EVICTED if physical == EVICTED else physical * self.block_size + t % self.block_size)
            self._lengths[seq] = old_len + count
            self._evicted_to[seq] = max(self._evicted_to.get(seq, 0), min(first_kept, len(table)))
        self.peak_blocks_used = max(self.peak_blocks_used, self.num_used)
        return result

    def release(self, seqs: Iterable[Hashable]) -> int:
        """Forget the sequences and return their blocks to the pool; returns blocks freed.

        Unknown (or already released) sequences are skipped: releasing twice frees nothing twice.
        """
        freed = 0
        for seq in seqs:
            for block in self._tables.pop(seq, ()):
                if block != EVICTED:
                    self._free.append(block)
                    freed += 1
            self._lengths.pop(seq, None)
            self._evicted_to.pop(seq, None)
        return freed

    def release_all(self) -> None:
        self.release(list(self._tables))

    def _first_kept_block(self, length: int, window: int | None) -> int:
        """First logical block a query at position length - 1 (or later) can still see."""
        if window is None:
            return 0
        return max(0, length - window) // self.block_size

    # --- consistency ---------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Every block is either free or held by exactly one table entry; raise if not."""
        held = [b for table in self._tables.values() for b in table if b != EVICTED]
        owners = held + self._free
        if sorted(owners) != list(range(self.num_blocks)):
            raise AssertionError(
                f"block accounting broken: {len(held)} held + {len(self._free)} free for "
                f"{self.num_blocks} blocks (duplicates or losses)"
            )
        for seq, table in self._tables.items():
            length = self._lengths[seq]
            if len(table) != -(-length // self.block_size):
                raise AssertionError(f"sequence {seq!r}: {len(table)} table entries for {length} tokens")


def streaming_blocks(window: int, sinks: int, block_size: int) -> int:
    """Most blocks one sequence holds with this window and these sinks, at any length.

    The sinks' blocks, plus the blocks that W consecutive positions can touch (the window
    [p - W + 1, p] starts mid-block in general): a new token's block is taken after the step's
    evictions, so this is also the peak within a step.
    """
    return -(-sinks // block_size) + -(-(window - 1) // block_size) + 1


def checked_int(name: str, value, minimum: int = 1) -> int:
    """value as an int >= minimum, or a ValueError naming it (bools, floats, strings refused)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # ints, numpy ints, 0-d integer tensors
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value
