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

Beam search shares blocks instead of copying them (vLLM's copy-on-write). `reorder(sources)`
gives each sequence the table of another (`sources[seq]`), so several sequences hold the same
physical blocks; each block counts its holders and goes back to the pool when the last one lets
go. A full block never changes again, so sharing it is free for good. The one block a sequence
still fills is copied the first time the sequence writes into it while another holds it too: the
step's plan lists that copy (`StepPlan.copies`), and the cache copies the block's K/V before the
step writes. The last holder writes in place.

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
    copies: list[tuple[int, int]] = field(default_factory=list)  # (shared physical, its new copy), before writing


class BlockAllocator:
    """Free list of physical blocks plus one block table and length per live sequence; blocks
    shared by several tables (after `reorder`) count their holders.

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
        self._holders: list[int] = [0] * num_blocks  # table entries that point at each block
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

    @property
    def num_shared(self) -> int:
        """Blocks that more than one sequence holds (beams, repeated prompts)."""
        return sum(1 for holders in self._holders if holders > 1)

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
        self, new_tokens: Mapping[Hashable, int], window: int | None = None, sinks: int = 0,
        every_token_queries: bool = False,
    ) -> dict[Hashable, StepPlan]:
        """Append new_tokens[seq] tokens to each sequence (new sequences start empty).

        With a window, blocks wholly outside it after the step are given back first, and new
        tokens outside it get slot -1; with sinks too, the blocks of the first `sinks` positions
        are kept (a sequence keeps the same window and sinks for its life). A sequence that
        writes into a block another one holds gets its own copy (the plan's `copies`, which the
        caller applies before writing). every_token_queries: each new token's query attends
        over the pool in this step (several tokens after a prompt), so what the first one's
        window sees is kept, and every new token is stored; otherwise the window is the last
        token's (a prompt attends over its own K/V, not the pool). All or nothing:
        raises CacheFullError, changing nothing, when the pool cannot hold the step, and
        ValueError when a sequence would pass max_seq_len.
        """
        sink_blocks = 0
        if window is not None:
            window = checked_int("window", window)
            sink_blocks = -(-checked_int("sinks", sinks, 0) // self.block_size)
        quick = self._extend_within_blocks(new_tokens, window)
        if quick is not None:
            return quick
        new_tokens = {  # the check (and its message) only for what is not already a plain count
            seq: n if type(n) is int and n >= 0 else checked_int(f"tokens added to sequence {seq!r}", n, 0)
            for seq, n in new_tokens.items()
        }

        # Plan everything first, so that a full pool leaves no partial step behind: every
        # sequence's evictions, then each sequence's copy and new blocks, in the order they apply.
        let_go: dict[int, int] = {}  # physical block -> holders this step lets go of it
        plans = {}
        for seq, count in new_tokens.items():
            table = self._tables.get(seq, [])
            old_len = self._lengths.get(seq, 0)
            first_kept = self._first_kept_block(old_len + min(count, 1) if every_token_queries else old_len + count,
                                                window)
            scan_from = max(sink_blocks, self._evicted_to.get(seq, 0))
            evict = [i for i in range(scan_from, min(first_kept, len(table))) if table[i] != EVICTED]
            for i in evict:
                let_go[table[i]] = let_go.get(table[i], 0) + 1
            plans[seq] = (old_len, count, evict, first_kept)
        needed = 0
        for seq, (old_len, count, evict, first_kept) in plans.items():
            table = self._tables.get(seq, [])
            copy_at = self._shared_block_to_fill(table, old_len, count, evict, let_go)
            last_block = (old_len + count - 1) // self.block_size if old_len + count else -1
            grow = list(range(len(table), last_block + 1))
            take = [i for i in grow if i >= first_kept or i < sink_blocks]
            needed += len(take) + (copy_at is not None)
            plans[seq] = (old_len, count, evict, first_kept, copy_at, grow, take)
        freed = sum(1 for block, n in let_go.items() if self._holders[block] == n)
        if needed > len(self._free) + freed:
            raise CacheFullError(needed - freed, len(self._free), self.num_blocks, self.block_size)
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
                self._let_go(table[i])
                table[i] = EVICTED
                result[seq].table_updates.append((i, EVICTED))
        for seq, (old_len, count, _, first_kept, copy_at, grow, take) in plans.items():
            table, plan = self._tables[seq], result[seq]
            if copy_at is not None:  # take the copy before letting go: the shared block stays held
                shared, table[copy_at] = table[copy_at], self._take()
                self._let_go(shared)
                plan.copies.append((shared, table[copy_at]))
                plan.table_updates.append((copy_at, table[copy_at]))
            table.extend([EVICTED] * len(grow))
            for i in take:
                table[i] = self._take()
                plan.table_updates.append((i, table[i]))
            for t in range(old_len, old_len + count):
                physical = table[t // self.block_size]
                plan.slots.append(EVICTED if physical == EVICTED else physical * self.block_size + t % self.block_size)
            self._lengths[seq] = old_len + count
            self._evicted_to[seq] = max(self._evicted_to.get(seq, 0), min(first_kept, len(table)))
        self.peak_blocks_used = max(self.peak_blocks_used, self.num_used)
        return result

    def _extend_within_blocks(self, new_tokens: Mapping[Hashable, int], window: int | None) -> dict | None:
        """`extend` for the common decode step, or None when it is not one: every sequence gets
        one token, into the block it is filling and holds alone, with nothing to give back and
        no limit passed. Most steps are (15 of 16 with 16-token blocks), and a graphed decode
        step runs this on the host before every replay: the general plan costs several times
        more per sequence."""
        tables, lengths, holders, size = self._tables, self._lengths, self._holders, self.block_size
        slots = {}
        for seq, count in new_tokens.items():
            table = tables.get(seq)
            if count != 1 or type(count) is not int or table is None:
                return None
            length = lengths[seq]
            offset = length % size
            if not offset or (self.max_seq_len is not None and length >= self.max_seq_len):
                return None
            block = table[length // size]
            if block == EVICTED or holders[block] != 1:
                return None
            if window is not None and (length + 1 - window) // size > self._evicted_to.get(seq, 0):
                return None  # a block may leave the window
            slots[seq] = block * size + offset
        for seq in slots:
            lengths[seq] += 1
        return {seq: StepPlan(slots=[slot]) for seq, slot in slots.items()}

    def _shared_block_to_fill(self, table, old_len, count, evict, let_go) -> int | None:
        """The logical index of the partly filled block this step writes into, when another
        sequence still holds it after the holders planned so far let go (then it is copied, and
        this sequence lets go too, in `let_go`); else None. The last holder writes in place."""
        filling = old_len // self.block_size
        if not count or not old_len % self.block_size or filling in evict or table[filling] == EVICTED:
            return None
        block = table[filling]
        if self._holders[block] - let_go.get(block, 0) <= 1:
            return None
        let_go[block] = let_go.get(block, 0) + 1
        return filling

    def reorder(self, sources: Mapping[Hashable, Hashable]) -> int:
        """Each `seq` in `sources` goes on as sequence `sources[seq]` is now (beam search): it gets
        a copy of that one's table, length and window state, and shares its blocks; what `seq`
        held before is let go. A source that is not live (released or unknown) ends `seq`. Every
        source is read before anything changes, so sequences may swap. Takes no block and cannot
        fail; returns the blocks that went back to the pool.

        Runs before every beam search step: beams share most of their blocks (the prompt's, the
        common start of their continuations), so only the part of each table that differs from
        what the sequence held is counted again."""
        moves = {seq: source for seq, source in sources.items() if seq != source}  # staying put changes nothing
        states = {seq: (list(self._tables[source]), self._lengths[source], self._evicted_to.get(source, 0))
                  for seq, source in moves.items() if source in self._tables}
        kept = {seq: _common_prefix(self._tables.get(seq, ()), table) for seq, (table, _, _) in states.items()}
        for seq, (table, _, _) in states.items():  # every new holder first: swapped blocks stay held
            for block in table[kept[seq]:]:
                if block != EVICTED:
                    self._holders[block] += 1
        freed = self.release([seq for seq in moves if seq not in states])
        for seq, (table, length, evicted_to) in states.items():
            freed += self._let_go_of(self._tables.get(seq, [])[kept[seq]:])
            self._tables[seq], self._lengths[seq], self._evicted_to[seq] = table, length, evicted_to
        return freed

    def truncate(self, new_lengths: Mapping[Hashable, int], window: int | None = None, sinks: int = 0) -> int:
        """Forget each sequence's tokens from new_lengths[seq] on (assisted decoding's rollback):
        the blocks past its new end are let go. With a window, a sequence must still hold every
        block its next query sees ([new length - window + 1, new length), and the sinks'): a
        block given back already cannot be had back, so that is a ValueError, before any change.
        Returns the blocks that went back to the pool."""
        checked = {}
        for seq, length in new_lengths.items():
            length = checked_int(f"new length of sequence {seq!r}", length, 0)
            if length > self.length(seq):
                raise ValueError(f"sequence {seq!r} holds {self.length(seq)} tokens; it cannot be truncated to {length}")
            if window is not None and length:
                table = self._tables[seq]
                sink_blocks = -(-sinks // self.block_size)
                needed = range(max(0, length - window + 1) // self.block_size, (length - 1) // self.block_size + 1)
                if any(table[i] == EVICTED for i in [*range(min(sink_blocks, len(table))), *needed]):
                    raise ValueError(
                        f"sequence {seq!r} cannot go back to {length} tokens: blocks its window of {window} would "
                        "see again were given back to the pool already"
                    )
            checked[seq] = length
        freed = 0
        for seq, length in checked.items():
            table = self._tables.get(seq)
            if table is None:  # an unknown sequence, "truncated" to 0 tokens
                continue
            keep = -(-length // self.block_size)
            freed += self._let_go_of(table[keep:])
            del table[keep:]
            self._lengths[seq] = length
            self._evicted_to[seq] = min(self._evicted_to.get(seq, 0), keep)
        return freed

    def release(self, seqs: Iterable[Hashable]) -> int:
        """Forget the sequences and let go of their blocks; returns the blocks that went back to
        the pool (a block another sequence still holds stays).

        Unknown (or already released) sequences are skipped: releasing twice frees nothing twice.
        """
        freed = 0
        for seq in seqs:
            freed += self._let_go_of(self._tables.pop(seq, ()))
            self._lengths.pop(seq, None)
            self._evicted_to.pop(seq, None)
        return freed

    def _take(self) -> int:
        block = self._free.pop()
        self._holders[block] = 1
        return block

    def _let_go_of(self, entries) -> int:
        """`_let_go` for each held entry of a table (or part of one); returns the blocks freed."""
        return sum(self._let_go(block) for block in entries if block != EVICTED)

    def _let_go(self, block: int) -> bool:
        """One holder fewer; the last one gives the block back to the pool (returns True then)."""
        self._holders[block] -= 1
        if self._holders[block]:
            return False
        self._free.append(block)
        return True

    def release_all(self) -> None:
        self.release(list(self._tables))

    def _first_kept_block(self, length: int, window: int | None) -> int:
        """First logical block a query at position length - 1 (or later) can still see."""
        if window is None:
            return 0
        return max(0, length - window) // self.block_size

    # --- consistency ---------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Every block is either free (once) or held, and counts exactly the table entries that
        point at it; raise if not."""
        holders = [0] * self.num_blocks
        for table in self._tables.values():
            for block in table:
                if block != EVICTED:
                    holders[block] += 1
        held = [b for b in range(self.num_blocks) if holders[b]]
        if sorted(held + self._free) != list(range(self.num_blocks)):
            raise AssertionError(
                f"block accounting broken: {len(held)} held + {len(self._free)} free for "
                f"{self.num_blocks} blocks (duplicates or losses)"
            )
        if holders != self._holders:
            wrong = next(b for b in range(self.num_blocks) if holders[b] != self._holders[b])
            raise AssertionError(f"block {wrong} counts {self._holders[wrong]} holders, its tables {holders[wrong]}")
        for seq, table in self._tables.items():
            length = self._lengths[seq]
            if len(table) != -(-length // self.block_size):
                raise AssertionError(f"sequence {seq!r}: {len(table)} table entries for {length} tokens")


def _common_prefix(a, b) -> int:
    """Length of the longest common prefix of two block tables, by halving with slice
    comparisons (each runs in C; the tables of beams differ only near their ends)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


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
