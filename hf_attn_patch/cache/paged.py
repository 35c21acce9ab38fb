"""`PagedKVCache`: a transformers `Cache` whose K/V live in fixed-size blocks of one pool.

    cache = PagedKVCache(model)   # or max_batch_size=8, max_tokens=32_768, block_size=16
    model.generate(**inputs, past_key_values=cache,
                   stopping_criteria=[cache.release_finished()])   # optional: free blocks early

How a step flows (the model must be patched by `hf_attn_patch.patch_model`):

* Prompt. `update` keeps the prompt's K/V aside and returns them unchanged: the prompt's own
  attention runs on the flash kernel over those tensors. The patched attention function first
  finds the cache (`paged_cache_for`, hooks.py) and calls its `attend` with the padding mask, and
  the cache writes only the real tokens into pages, one launch per layer: left padding takes no
  pages.
* Several new tokens after the prompt (a continued conversation, assisted decoding's
  candidates; `crop` rolls rejected ones back). The hook plans the step at its first layer from
  the padding mask, writes each layer's tokens, and runs `flash_attention` over the row's keys
  gathered from the pages (`_attend_chunk`).
* Decode. At layer 0 the cache takes the step's blocks on the host (no device sync: it tracks
  every length itself), pushes the block-table edits and lengths to the device, then each layer
  writes the new token's K/V into its slot. `update` returns the new token's K/V; the attention
  function's hook call recognises them (by identity) and answers with `paged_attention`.

Beam search and repeated prompts. Rows of one repeated prompt (generate repeats it for each beam
and each of `num_return_sequences`) are stored once and share their blocks; `reorder_cache`
reorders block tables instead of copying K/V, and a shared block a row is still filling is copied
just before that row writes into it (copy-on-write, allocator.py).

A model that is not patched never calls the hook; the cache notices at the first decode step and
raises instead of letting an attention run over the lone new token.

Streaming (window + sinks). `PagedKVCache(model, window=W, sinks=S)`, for any model: the
patched attention then sees the first S positions and the W most recent ones (the prompt through
`flash_attention(window=W, sinks=S)`, each decode step through `paged_attention(window=W,
sinks=S)`), and every block wholly between the sinks and the window goes back to the pool as the
sequence grows, so `streaming_blocks(W, S, block_size)` blocks a sequence suffice however long it
runs (docs/paging.md, "Streaming"). By default W is the config's sliding window and S is 0.
Where the model has a sliding window of its own, the narrower of the two applies.

A step that fails (CacheFullError, a bad batch) leaves the cache as it was before the step: every
check runs before the first change, and a prompt that fails once blocks are being taken is undone.
A step interrupted from outside (an exception in a later layer) is refused at the next step, with
the advice to reset().
"""

from __future__ import annotations

import contextlib
import math
import operator
import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
from transformers import StoppingCriteria
from transformers.cache_utils import Cache, CacheLayerMixin

from .._compat import cache_update_positions
from ..kernels import flash_attention, paged_attention, write_to_pages
from ..kernels._checks import SUPPORTED_DTYPES
from .allocator import EVICTED, BlockAllocator, checked_int, streaming_blocks

__all__ = ["PagedKVCache", "KVShape", "DEFAULT_MEMORY_FRACTION", "CPU_POOL_BYTES", "default_pool_blocks"]

# The pool when no size is given. On a GPU a share of the memory free when the cache is built
# (after the weights), as serving engines size theirs; half, not vLLM's 0.9 of the whole GPU,
# because generate's own activations and the prompt's K/V (held aside for one step) need room
# that nothing here measures. On a CPU a small fixed pool: RAM is shared with everything else.
DEFAULT_MEMORY_FRACTION = 0.5
CPU_POOL_BYTES = 256 * 2**20

# Every live cache, so the attention hook can find the one that produced a key tensor.
LIVE_CACHES: "weakref.WeakSet[PagedKVCache]" = weakref.WeakSet()


@dataclass(frozen=True)
class KVShape:
    """What a model's config says about its K/V: layers, heads, head dim, sliding window."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None

    @classmethod
    def from_config(cls, config) -> "KVShape":
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if getattr(config, "model_type", None) == "falcon":
            # Falcon: grouped heads in the new (40B) architecture, one K/V head with multi_query.
            if config.new_decoder_architecture:
                kv_heads = config.num_kv_heads
            else:
                kv_heads = 1 if config.multi_query else heads
        else:
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if layer_types is not None and any(t != "sliding_attention" for t in layer_types):
            window = None  # a full-attention layer needs every block: nothing can be given back
        return cls(config.num_hidden_layers, kv_heads, head_dim, window)


class PagedKVCache(Cache):
    """Paged K/V for `generate`: blocks taken on demand, given back when a sequence ends or
    slides out of the window. See the module docstring for the flow of a step.

    Args:
        model: the (patched) model, or its config; gives layers, KV heads, head dim, window.
        max_batch_size: most sequences decoded at once; by default the first prompt's batch
            (the block table's rows are allocated once, then, and never move).
        num_blocks / max_tokens / memory_fraction: pool size, in blocks, in tokens, or as a
            fraction of the GPU memory free now (at most one of the three). By default
            DEFAULT_MEMORY_FRACTION of the free GPU memory, or CPU_POOL_BYTES on a CPU.
        block_size: tokens per block.
        dtype, device: of the pool; default to the model's parameters (float32 / CPU for a config).
        max_seq_len: longest sequence (sizes the block table); defaults to the config's
            max_position_embeddings. A streaming cache holds a bounded number of blocks, but its
            block table still has one int32 entry per block_size positions: give the length
            of the longest stream (200_000 positions of 16 cost 50 KB a row).
        window: attend to the W most recent positions and give back the blocks that leave them
            (streaming); defaults to the config's sliding_window (None: keep everything).
        sinks: with a window, the first S positions stay visible and stored too (StreamingLLM's
            attention sinks); default 0.
    """

    def __init__(
        self,
        model,
        *,
        max_batch_size: int | None = None,
        num_blocks: int | None = None,
        max_tokens: int | None = None,
        memory_fraction: float | None = None,
        block_size: int = 16,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        max_seq_len: int | None = None,
        window: int | None = None,
        sinks: int = 0,
    ):
        config = getattr(model, "config", model)
        if not hasattr(config, "num_hidden_layers"):
            raise TypeError(f"PagedKVCache takes the model (or its config), got {type(model).__name__}")
        self.shape = KVShape.from_config(config)
        self.window, self.sinks = _streaming_arguments(window, sinks, self.shape.sliding_window)
        block_size = checked_int("block_size", block_size)
        if max_batch_size is not None:
            max_batch_size = checked_int("max_batch_size", max_batch_size)
        if max_seq_len is not None:
            max_seq_len = checked_int("max_seq_len", max_seq_len)
        dtype, device = _pool_dtype_and_device(model, dtype, device)

        bytes_per_block = 2 * self.shape.num_layers * block_size * self.shape.num_kv_heads * self.shape.head_dim
        bytes_per_block *= dtype.itemsize
        num_blocks = _pool_blocks(num_blocks, max_tokens, memory_fraction, block_size, bytes_per_block, device)

        self.block_size = block_size
        pool_shape = (self.shape.num_layers, num_blocks, block_size, self.shape.num_kv_heads, self.shape.head_dim)
        self.k_pages = torch.empty(pool_shape, dtype=dtype, device=device)
        self.v_pages = torch.empty(pool_shape, dtype=dtype, device=device)

        max_seq_len = max_seq_len or getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
        if self.window is None:  # without a window a sequence never outgrows the pool
            max_seq_len = min(max_seq_len or num_blocks * block_size, num_blocks * block_size)
        self.max_seq_len = max_seq_len or num_blocks * block_size
        self.allocator = BlockAllocator(num_blocks, block_size, max_seq_len=self.max_seq_len)

        # Rows of the block table and lengths: fixed now, or by the first prompt's batch.
        self.batch_capacity: int | None = None  # not max_batch_size: transformers 5.17's Cache has that property
        self.block_table: torch.Tensor | None = None
        self.seq_lens: torch.Tensor | None = None
        if max_batch_size is not None:
            self._allocate_rows(max_batch_size)

        generation_config = getattr(model, "generation_config", None)
        self._eos_token_id = getattr(generation_config, "eos_token_id", None)

        super().__init__(layers=[_PagedLayer(self, i) for i in range(self.shape.num_layers)])
        self._clear_step_state()
        LIVE_CACHES.add(self)

    # --- the Cache API that generate and the models use --------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Prompt, or several new tokens after it (a continuation, assisted decoding's
        candidates): keep K/V for the hook, return them. Decode: write the token, return it.

        Extra arguments are what transformers passes along (the model's `kwargs=` in 5.24,
        nothing in 5.17); only the positions they may hold are read, at a prompt.
        Every check that can fail runs before this step changes anything.
        """
        layer = self._layer(layer_idx)
        if self._graph_mode:  # a graphed decode step: begin_graph_step did the bookkeeping and checks
            write_to_pages(key_states, value_states, self.k_pages[layer_idx], self.v_pages[layer_idx],
                           self._step_slots)
            self._unread[layer_idx] = key_states
            return key_states, value_states
        self._check_kv(key_states, layer_idx)
        tokens = key_states.shape[2]
        if layer_idx == 0:
            self._check_last_step_finished()
        if layer.seen == 0:
            if layer_idx == 0:
                self._check_prompt_batch(key_states.shape[0])
                self._prompt_positions = cache_update_positions(args, kwargs)
            self._pending_prompt[layer_idx] = (key_states, value_states)
            layer.seen += tokens
            return key_states, value_states

        if self._waiting(layer_idx):
            raise RuntimeError(_NOT_PATCHED.format(layer_idx=layer_idx))
        if tokens != 1:
            if layer_idx == 0:
                self._check_chunk(key_states.shape[0], tokens)
                self._chunk = None
            self._pending_chunk[layer_idx] = (key_states, value_states)
            layer.seen += tokens
            return key_states, value_states
        if layer_idx == 0:
            self._begin_decode_step(key_states.shape[0])
        write_to_pages(key_states, value_states, self.k_pages[layer_idx], self.v_pages[layer_idx], self._step_slots)
        self._unread[layer_idx] = key_states
        layer.seen += 1
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions processed so far (padding included), as for the default cache."""
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        seen = self.get_seq_length(layer_idx)
        # The model asks for its mask before any layer runs: the earliest point to refuse an
        # input no longer than what the cache holds (it would reach the model as zero tokens).
        if seen and isinstance(query_length, int) and query_length < 1:
            raise ValueError(self._not_a_continuation_message(seen))
        return seen + query_length, 0

    def reset(self) -> None:
        """Forget every sequence and give all blocks back; the cache can take a new prompt.

        Call it between `generate` calls, not inside one (from a stopping criterion or a
        streamer): `release(rows)` is the way to end sequences early."""
        self.allocator.release_all()
        if self.block_table is not None:
            self.seq_lens.zero_()
            self.block_table.fill_(EVICTED)
        for layer in self.layers:
            layer.seen = 0
        self._clear_step_state()

    def reorder_cache(self, beam_idx):
        """Beam search: batch row i goes on as row beam_idx[i] is now. No K/V moves: the rows'
        block tables are reordered and the rows share their blocks; the one block a row is
        still filling is copied when it next writes while shared (allocator.py). One host sync
        (the indices), where the default cache copies every layer's K/V of every beam."""
        if self.layers[0].seen == 0:
            return  # no prompt yet: nothing to reorder
        self._check_last_step_finished()
        sources = beam_idx.tolist() if isinstance(beam_idx, torch.Tensor) else list(beam_idx)
        batch = len(self._active)
        if len(sources) != batch:
            raise ValueError(f"reorder_cache got {len(sources)} beam indices for a batch of {batch}")
        sources = [self._row(source) for source in sources]
        # A row that goes on as an ended row ends too (its source's length on the device is 0).
        self.allocator.reorder({row: source for row, source in enumerate(sources) if self._active[source]})
        self.allocator.release([row for row, source in enumerate(sources) if not self._active[source]])
        self._active = [self._active[source] for source in sources]
        self._copy_rows(sources)

    def crop(self, max_length: int):
        """Assisted decoding's rollback: forget the last -max_length positions (max_length <= 0),
        or all but the first max_length (> 0), as the default cache does. Every row loses the
        same positions, the tokens it wrote last; blocks past the new ends are let go. A cache
        with a window cannot go back past blocks it gave back already: ValueError, nothing
        changed."""
        max_length = operator.index(max_length)  # transformers 5.17 passes a 0-d tensor
        seen = self.get_seq_length()
        remove = -max_length if max_length <= 0 else max(0, seen - max_length)
        if not seen or not remove:
            return
        self._check_last_step_finished()
        if remove > seen:
            raise ValueError(f"crop({max_length}) removes {remove} positions; the cache holds {seen}")
        rows = [row for row, active in enumerate(self._active) if active]
        if any(self.allocator.length(row) < remove for row in rows):
            raise ValueError(f"crop({max_length}) would remove padding positions of some row: a row holds fewer "
                             f"than {remove} tokens")
        self.allocator.truncate({row: self.allocator.length(row) - remove for row in rows},
                                window=self.window, sinks=self.sinks)
        for layer in self.layers:
            layer.seen -= remove
        self._push_to_device({}, len(self._active))

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("PagedKVCache cannot be expanded after the prompt; expand the inputs instead")

    def batch_select_indices(self, indices):
        raise NotImplementedError("PagedKVCache cannot select batch rows; use release(rows) to end sequences")

    # --- our API -------------------------------------------------------------------------------

    def release(self, rows: Iterable[int]) -> int:
        """End these batch rows: their blocks go back to the pool, later steps skip them.
        Returns the number of blocks freed; a row released before frees nothing again."""
        rows = sorted({self._row(r) for r in rows})
        rows = [r for r in rows if self._active[r]]
        for r in rows:
            self._active[r] = False
        if rows:
            self.seq_lens[rows] = 0
        return self.allocator.release(rows)

    def release_finished(self, eos_token_id: int | list[int] | None = None) -> StoppingCriteria:
        """A stopping criterion for `generate` that releases each row when it emits EOS (it
        never stops generation itself). eos_token_id defaults to the model's generation config."""
        return _ReleaseFinished(self, self._eos_token_id if eos_token_id is None else eos_token_id)

    def stats(self) -> dict:
        """Blocks total / used / free (and the peak since the cache was built, and how many
        several sequences share), their bytes,
        tokens seen, and the streaming settings with the blocks one sequence can hold at most
        (None without a window)."""
        a = self.allocator
        bytes_per_block = 2 * self.k_pages[:, 0].numel() * self.k_pages.element_size()  # K and V, all layers
        return {
            "block_size": self.block_size,
            "blocks_total": a.num_blocks,
            "blocks_used": a.num_used,
            "blocks_free": a.num_free,
            "blocks_peak": a.peak_blocks_used,
            "blocks_shared": a.num_shared,
            "bytes_per_block": bytes_per_block,
            "bytes_total": bytes_per_block * a.num_blocks,
            "bytes_used": bytes_per_block * a.num_used,
            "bytes_peak": bytes_per_block * a.peak_blocks_used,
            "sequences": len(a.sequences()),
            "tokens": sum(a.length(s) for s in a.sequences()),
            "window": self.window,
            "sinks": self.sinks,
            "blocks_per_sequence": self.blocks_per_sequence,
        }

    @property
    def blocks_per_sequence(self) -> int | None:
        """Most blocks one sequence ever holds: bounded with a window (the sinks' blocks plus
        the window's), None without one (a sequence keeps all of its blocks)."""
        if self.window is None:
            return None
        return streaming_blocks(self.window, self.sinks, self.block_size)

    def attention_window(self, window: int | tuple[int, int] | None) -> tuple[int | tuple[int, int] | None, int]:
        """(window, sinks) for an attention whose own window is `window`, over this cache.

        The cache gives back every block outside its window and sinks, so the attention may
        not reach further: the narrower of the two windows applies (the model's own where it
        is narrower, e.g. a Mistral layer under a wider cache window), with the cache's sinks.
        """
        if self.window is None:
            return window, 0
        if window is None:
            return self.window, self.sinks
        reach = window if isinstance(window, int) else window[0] + 1
        return (window if reach <= self.window else self.window), self.sinks

    # --- called by the attention hook -----------------------------------------------------------

    def owns(self, layer_idx, key) -> bool:
        """Did this cache's `update` return `key` for the layer, not yet consumed by the hook?"""
        pending = self._pending_prompt.get(layer_idx) or self._pending_chunk.get(layer_idx)
        return (pending is not None and pending[0] is key) or self._unread.get(layer_idx) is key

    def attend(self, layer_idx, query, key, attention_mask, *, scale, window, alibi_slopes, config=None):
        """The hook's work: store a prompt (returns None), or attend a step of one or several
        new tokens over the pages (returns out, (B, Hq, Nq, D)).
        window: the attention's own; the cache's applies where narrower (`attention_window`),
        with its sinks. config: the attention module's, checked against the cache's shape at
        the prompt."""
        window, sinks = self.attention_window(window)
        if layer_idx in self._pending_prompt:
            self._store_prompt(layer_idx, attention_mask, config, window)
            return None
        if layer_idx in self._pending_chunk:
            return self._attend_chunk(layer_idx, query, attention_mask, scale=scale, window=window, sinks=sinks,
                                      alibi_slopes=alibi_slopes)
        del self._unread[layer_idx]
        if query.shape[2] != 1:
            raise ValueError(f"paged decode takes one query per sequence, got {query.shape[2]}")
        batch = query.shape[0]
        out = paged_attention(
            query[:, :, 0],
            self.k_pages[layer_idx],
            self.v_pages[layer_idx],
            # Graphed steps read the full width: the grid must not change from step to step.
            self.block_table[:batch] if self._graph_mode else self.block_table[:batch, : self._table_columns],
            self.seq_lens[:batch],
            window=window,
            alibi_slopes=alibi_slopes,
            scale=scale,
            sinks=sinks,
        )
        return out[:, :, None]

    # --- graphed decode steps (cache/graphs.py) ------------------------------------------------

    def holds_prompt(self) -> bool:
        """A prompt is stored and the last step finished: the next step can be a graphed decode."""
        return (self.layers[0].seen > 0 and bool(self._active) and not self._anything_waiting()
                and len({layer.seen for layer in self.layers}) == 1)

    def begin_graph_step(self, batch: int) -> None:
        """The host side of one decode step, before its graph replays: take the blocks, push the
        block-table edits, lengths and slots into the device tensors the graph reads (in place,
        no sync). Raises CacheFullError with nothing changed when the pool is out of blocks."""
        self._check_last_step_finished()
        self._begin_decode_step(batch)

    def end_graph_step(self) -> None:
        """What the graphed forward would have counted on the host: one more position a layer."""
        self._unread.clear()
        for layer in self.layers:
            layer.seen += 1

    @contextlib.contextmanager
    def graph_mode(self):
        """Inside, `update` and the hook do only device work, on the step begin_graph_step set up."""
        self._graph_mode = True
        try:
            yield
        finally:
            self._graph_mode = False

    # --- checks ----------------------------------------------------------------------------------

    def _layer(self, layer_idx) -> "_PagedLayer":
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"layer {layer_idx} updated a PagedKVCache built for {len(self.layers)} layers; "
                "build the cache from the model that uses it"
            )
        return self.layers[layer_idx]

    def _check_kv(self, key_states, layer_idx):
        _, heads, _, head_dim = key_states.shape
        if (heads, head_dim) != (self.shape.num_kv_heads, self.shape.head_dim):
            raise ValueError(
                f"layer {layer_idx} gave K/V with {heads} heads of dim {head_dim}, but the cache was built "
                f"for {self.shape.num_kv_heads} heads of dim {self.shape.head_dim}; build the cache from the "
                "model that uses it"
            )
        if key_states.dtype != self.k_pages.dtype or key_states.device != self.k_pages.device:
            raise ValueError(
                f"layer {layer_idx} gave K/V as {key_states.dtype} on {key_states.device}, the cache holds "
                f"{self.k_pages.dtype} on {self.k_pages.device}; build it with the model's dtype and device"
            )

    def _check_model(self, config):
        """A cache serves the model it was built from: another one fails here, at its prompt's
        first layer, before any block is taken (not part-way through the step)."""
        shape = self.shape if config is None else KVShape.from_config(config)
        if shape != self.shape:
            raise ValueError(
                f"this PagedKVCache was built for {self.shape}, but the model using it has {shape}; "
                "build the cache from the model that uses it"
            )

    def _check_last_step_finished(self):
        """At layer 0: the last step reached every layer's cache and every attention read it."""
        if self._waiting(0):  # the first attention never asked us
            raise RuntimeError(_NOT_PATCHED.format(layer_idx=0))
        seen = {layer.seen for layer in self.layers}
        if len(seen) > 1 or self._anything_waiting():
            raise RuntimeError(
                f"PagedKVCache: the last step stopped part-way (its layers hold {min(seen)} to {max(seen)} "
                "positions): an exception inside the model, or a model with fewer layers than the "
                f"{len(self.layers)} this cache was built for. Call cache.reset() before the next prompt "
                "(and build the cache from the model that uses it)."
            )

    def _check_prompt_batch(self, batch):
        if self.batch_capacity is not None and batch > self.batch_capacity:
            raise ValueError(
                f"batch of {batch} sequences, but the cache holds rows for max_batch_size={self.batch_capacity} "
                "(given, or taken from its first prompt); build a cache with max_batch_size= the largest batch"
            )

    def _check_padded_sinks(self, lengths, tokens, window):
        """Sinks are a sequence's first S tokens, but the prompt's attention (flash_attention over
        the padded batch) puts them at the row's first S positions, padding included. The two
        agree while a row's window (the first layer's, as narrowed by `attention_window`) still
        reaches back to its first token; refuse a padded row longer than that rather than give
        its prompt other sinks than its decode steps."""
        if not self.sinks:
            return
        reach = window if isinstance(window, int) else window[0] + 1
        for row, length in enumerate(lengths):
            if length < tokens and length > reach:
                raise ValueError(
                    f"prompt row {row} has {tokens - length} padding positions and {length} tokens, more than "
                    f"the attention's window of {reach}: with sinks={self.sinks} its prompt would attend to "
                    "other sinks than its decode steps. Give such prompts one at a time (no padding), or a "
                    "window at least as long as the longest padded prompt."
                )

    def _not_a_continuation_message(self, seen):
        return (
            f"PagedKVCache holds {seen} positions already, and this input brings none beyond them. An "
            "input into a used cache continues what it holds (as with the default cache); for a new "
            "prompt call cache.reset() first, or use a fresh PagedKVCache."
        )

    def _check_chunk(self, batch, tokens):
        """At layer 0 of a step of several new tokens per row, before any change."""
        if batch != len(self._active):
            raise ValueError(f"a step of {tokens} tokens for {batch} sequences after a prompt of {len(self._active)}")
        short = [row for row, active in enumerate(self._active) if active and self.allocator.length(row) < self.sinks]
        if short:
            raise NotImplementedError(
                f"PagedKVCache(sinks={self.sinks}): row {short[0]} holds {self.allocator.length(short[0])} tokens, "
                f"fewer than the sinks, and this step brings {tokens} at once; a step of several tokens needs "
                "every row to hold its sinks already (one token at a time works)."
            )

    def _waiting(self, layer_idx) -> bool:
        """Has update handed the layer's K/V out without the hook having used them yet?"""
        return layer_idx in self._pending_prompt or layer_idx in self._pending_chunk or layer_idx in self._unread

    def _anything_waiting(self) -> bool:
        return bool(self._pending_prompt or self._pending_chunk or self._unread)

    def _row(self, row) -> int:
        """A batch row index as an int, or a ValueError that says what rows there are."""
        if isinstance(row, bool) or isinstance(row, torch.Tensor) and row.dtype == torch.bool:
            raise ValueError("release takes row indices, not a mask: pass mask.nonzero().flatten().tolist()")
        try:
            row = operator.index(row)
        except TypeError:
            raise ValueError(f"release takes integer row indices, got {row!r}") from None
        if not 0 <= row < len(self._active):
            batch = f"rows 0..{len(self._active) - 1}" if self._active else "no rows (no prompt yet)"
            raise ValueError(f"row {row} is not in the current batch, which has {batch}")
        return row

    # --- a step ----------------------------------------------------------------------------------

    def _clear_step_state(self):
        self._pending_prompt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending_chunk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._chunk: _ChunkStep | None = None
        self._unread: dict[int, torch.Tensor] = {}
        self._active: list[bool] = []
        self._step_slots: torch.Tensor | None = None
        self._table_columns = 1
        self._prompt_positions: torch.Tensor | None = None
        self._graph_mode = False

    def _store_prompt(self, layer_idx, attention_mask, config, window):
        key, value = self._pending_prompt.pop(layer_idx)
        if self._step_slots is None:  # first layer of the prompt: take the blocks
            rows_before, peak_before = (self.block_table, self.seq_lens), self.allocator.peak_blocks_used
            try:
                self._check_model(config)
                self._begin_prompt(key, value, attention_mask, window)
            except BaseException:
                self._undo_prompt(rows_before, peak_before)
                raise
        write_to_pages(key, value, self.k_pages[layer_idx], self.v_pages[layer_idx], self._step_slots)

    def _undo_prompt(self, rows_before, peak_before):
        """Back to the empty cache the prompt started from (a prompt only enters an empty one)."""
        self.reset()
        self.block_table, self.seq_lens = rows_before
        self.batch_capacity = None if self.block_table is None else self.block_table.shape[0]
        if self.block_table is not None:
            self.block_table.fill_(EVICTED)
            self.seq_lens.zero_()
        self.allocator.peak_blocks_used = peak_before

    def _begin_prompt(self, key, value, attention_mask, window):
        batch, tokens = key.shape[0], key.shape[2]
        real = _real_tokens(attention_mask, batch, tokens, self.k_pages.device)
        repeats = _repeats_previous_row(key, value, real)
        # One sync per prompt, none per decode step: every row's length, which rows repeat the
        # row before, and the largest position transformers gave (see below).
        summary = [real.sum(-1), repeats]
        positions, self._prompt_positions = self._prompt_positions, None
        if positions is not None and positions.numel():
            summary.append(positions.max().to(torch.int64).view(1))
        summary = torch.cat([part.to(torch.int64) for part in summary]).tolist()
        lengths, repeated = summary[:batch], summary[batch:2 * batch]
        if len(summary) > 2 * batch and (last := summary[-1]) >= tokens:
            raise RuntimeError(
                f"PagedKVCache is empty, but this step's tokens stand at positions up to {last}: the cache "
                "was reset (or swapped in) while a generation was running. Call cache.reset() only between "
                "generate calls; release(rows) ends sequences early."
            )
        self._check_padded_sinks(lengths, tokens, window)
        # generate repeats each prompt for its beams (and num_return_sequences): a repeated row
        # shares the blocks of the first row of its run, and writes nothing.
        origin = list(range(batch))
        for row in range(1, batch):
            if repeated[row]:
                origin[row] = origin[row - 1]
        plans = self.allocator.extend({row: lengths[row] for row in range(batch) if origin[row] == row},
                                      window=self.window, sinks=self.sinks)
        self.allocator.reorder({row: first for row, first in enumerate(origin) if first != row})
        if self.block_table is None:  # no max_batch_size given: the first prompt's batch is the capacity
            self._allocate_rows(batch)
        self._active = [True] * batch
        self._push_to_device(plans, batch)
        if origin != list(range(batch)):
            self._copy_rows(origin)
        # Slot of each real token: its index among the row's real tokens, through the table.
        slots, held = self._slots(real.long().cumsum(-1) - 1, self.block_table[:batch].long())
        self._step_slots = torch.where(real & held & ~repeats[:, None], slots, -1)

    def _begin_decode_step(self, batch):
        if batch != len(self._active):
            raise ValueError(f"decode step with {batch} sequences after a prompt of {len(self._active)}")
        new = {row: 1 for row in range(batch) if self._active[row]}
        # May raise CacheFullError (or ValueError past max_seq_len) before changing anything.
        plans = self.allocator.extend(new, window=self.window, sinks=self.sinks)
        self._copy_shared_blocks(plans)
        slots = [EVICTED] * batch
        for row, plan in plans.items():
            slots[row] = plan.slots[0]
        self._push_to_device(plans, batch)
        # Into the same buffer every step: a captured graph reads the slots from there.
        self._step_slots = self._decode_slots[:batch]
        self._step_slots.copy_(_host_to_device(slots, torch.int64, self.k_pages.device).view(batch, 1),
                               non_blocking=True)

    def _attend_chunk(self, layer_idx, query, attention_mask, *, scale, window, sinks, alibi_slopes):
        """A step of several new tokens per row (a continued conversation, assisted decoding's
        candidates): write them into their slots, then run flash_attention over each row's keys,
        gathered from the pages into a left-padded (B, Hkv, span, D) tensor, so that the queries
        stand at the end of their rows, as the kernel aligns them. With sinks, the gather starts
        with every row's first `sinks` positions, which the kernel keeps visible."""
        key, value = self._pending_chunk.pop(layer_idx)
        if self._chunk is None:  # the step's first layer plans it for all of them
            self._chunk = self._begin_chunk(key.shape[0], key.shape[2], attention_mask, alibi_slopes)
        step = self._chunk
        write_to_pages(key, value, self.k_pages[layer_idx], self.v_pages[layer_idx], step.slots)
        per_slot = (-1, self.shape.num_kv_heads, self.shape.head_dim)
        keys = self.k_pages[layer_idx].view(per_slot)[step.gather].transpose(1, 2)
        values = self.v_pages[layer_idx].view(per_slot)[step.gather].transpose(1, 2)
        return flash_attention(query, keys, values, causal=True, window=window, key_padding_mask=step.visible,
                               alibi_slopes=alibi_slopes, scale=scale, sinks=sinks)

    def _begin_chunk(self, batch, tokens, attention_mask, alibi_slopes) -> "_ChunkStep":
        """The host side of a step of `tokens` new tokens per row, at its first layer: take the
        blocks (copying shared ones about to be written), push the table edits and lengths, and
        work out every layer's slots and gather indices on the device. A row's padding must come
        before its new tokens; a released row takes none."""
        device = self.k_pages.device
        try:  # a refused step (a check, a full pool) leaves the cache as it was before it
            if self.sinks and alibi_slopes is not None:
                # The gathered sinks sit at other distances from the queries than their positions.
                raise NotImplementedError(f"PagedKVCache(sinks={self.sinks}) with ALiBi takes one new token per "
                                          "step after its prompt")
            real = _real_tokens(attention_mask, batch, tokens, device)
            real = real & _host_to_device(self._active, torch.bool, device)[:, None]
            # One sync: each row's count of new tokens, and whether a row has padding after a token.
            padding_inside = (real[:, :-1] & ~real[:, 1:]).any().view(1)
            summary = torch.cat([real.sum(-1), padding_inside.long()]).tolist()
            counts = summary[:batch]
            if summary[batch]:
                raise ValueError("a step of several new tokens has padding after a row's new tokens; "
                                 "PagedKVCache takes a row's padding before them (left padding)")
            plans = self.allocator.extend({row: counts[row] for row in range(batch) if self._active[row]},
                                          window=self.window, sinks=self.sinks, every_token_queries=True)
        except BaseException:
            self.layers[0].seen -= tokens
            self._pending_chunk.clear()
            raise
        self._copy_shared_blocks(plans)
        self._push_to_device(plans, batch)
        lengths = self.seq_lens[:batch].long()[:, None]  # after the step
        table = self.block_table[:batch].long()
        # Each new token's position among its row's tokens, and its slot through the table.
        slots, held = self._slots(lengths - real.sum(-1, keepdim=True) + real.long().cumsum(-1) - 1, table)
        slots = torch.where(real & held, slots, -1)
        # The keys the step's queries can see: each row's last `span` positions, the row's end
        # at the right; a window bounds the span.
        longest = max((self.allocator.length(row) for row in plans), default=1)
        span = longest if self.window is None else min(longest, tokens + self.window - 1)
        key_position = lengths - span + torch.arange(span, device=device)
        if self.sinks:  # every row holds its sinks (_check_chunk): they go first, once
            key_position = torch.cat([torch.arange(self.sinks, device=device).expand(batch, -1),
                                      torch.where(key_position >= self.sinks, key_position, -1)], 1)
        gather, held = self._slots(key_position, table)
        visible = held & (key_position < lengths)
        return _ChunkStep(slots, torch.where(visible, gather, 0), visible)

    def _slots(self, positions, table):
        """(slot, held): where each position (B, n) of its row's tokens sits in the pool,
        through the row's block table (B, width); not held where the position is negative or
        its block was given back."""
        physical = table.gather(1, positions.clamp_min(0) // self.block_size)
        return physical * self.block_size + positions % self.block_size, (positions >= 0) & (physical >= 0)

    def _copy_rows(self, sources: list[int]):
        """Row i of the device block table and lengths becomes row sources[i]'s, in place: a
        captured decode graph reads these tensors at their addresses."""
        batch = len(sources)
        index = _host_to_device(sources, torch.int64, self.block_table.device)
        self.block_table[:batch] = self.block_table[:batch].index_select(0, index)
        self.seq_lens[:batch] = self.seq_lens[:batch].index_select(0, index)

    def _copy_shared_blocks(self, plans):
        """Before a step writes: each block a row fills while another row shares it (after
        beam search's reorder_cache) gets its copy, every layer's K and V at once."""
        copies = [pair for plan in plans.values() for pair in plan.copies]
        if not copies:
            return
        shared, copy_of = _host_to_device(copies, torch.int64, self.k_pages.device).unbind(1)
        for pages in (self.k_pages, self.v_pages):
            pages.index_copy_(1, copy_of, pages.index_select(1, shared))

    def _allocate_rows(self, rows):
        # Allocated once: the tables keep their addresses for the cache's life (CUDA graphs rely on it).
        self.batch_capacity = rows
        width = math.ceil(self.max_seq_len / self.block_size)
        device = self.k_pages.device
        self.block_table = torch.full((rows, width), EVICTED, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self._decode_slots = torch.full((rows, 1), EVICTED, dtype=torch.int64, device=device)

    def _push_to_device(self, plans, batch):
        """Apply the step's block-table edits and lengths to the device copies (no sync)."""
        edits = [(row, i, b) for row, plan in plans.items() for i, b in plan.table_updates]
        if edits:
            rows, cols, blocks = _host_to_device(edits, torch.int64, self.block_table.device).unbind(1)
            self.block_table[rows, cols] = blocks.to(torch.int32)
        lengths = [self.allocator.length(row) if self._active[row] else 0 for row in range(batch)]
        self.seq_lens[:batch].copy_(_host_to_device(lengths, torch.int32, self.seq_lens.device), non_blocking=True)
        self._table_columns = max(1, math.ceil(max(lengths, default=0) / self.block_size))


_NOT_PATCHED = (
    "PagedKVCache: the attention of layer {layer_idx} did not read from the paged cache, so it would "
    "attend to the new token alone. Patch the model first (hf_attn_patch.patch_model(model)), or use "
    "the default cache."
)


@dataclass
class _ChunkStep:
    """A step of several new tokens per row, planned at its first layer for all of them."""

    slots: torch.Tensor  # (B, T) int64: the slot of each new token, -1 for padding
    gather: torch.Tensor  # (B, [sinks +] span) int64: slots of the keys the queries can see, rows right-aligned
    visible: torch.Tensor  # (B, [sinks +] span) bool: which of those hold a key


class _PagedLayer(CacheLayerMixin):
    """Per-layer view for transformers' bookkeeping; the pages live in the parent cache."""

    is_sliding = False
    is_compileable = False
    is_croppable = True  # PagedKVCache.crop (assisted decoding); transformers >= 5.24 asks the layers

    def __init__(self, cache: PagedKVCache, layer_idx: int):
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.seen = 0
        self.keys, self.values = cache.k_pages[layer_idx], cache.v_pages[layer_idx]
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self._cache.update(key_states, value_states, self.layer_idx, *args, **kwargs)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0


class _ReleaseFinished(StoppingCriteria):
    """Releases a row's blocks when its last token is EOS; never asks generate to stop."""

    def __init__(self, cache: PagedKVCache, eos_token_id):
        self.cache = cache
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids, scores, **kwargs):
        eos = self.eos_token_id
        if eos is None:
            raise ValueError("release_finished needs eos_token_id (the model's generation config has none)")
        if input_ids.shape[0] != len(self.cache._active):
            # Beam search asks about its candidates (2 per beam), not the cache's rows.
            raise ValueError(
                f"release_finished got {input_ids.shape[0]} sequences for a cache of {len(self.cache._active)} "
                "rows: it is for num_beams=1. Beam search needs no help: a beam it drops lets go of its "
                "blocks when the cache is reordered."
            )
        eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=input_ids.device)
        finished = torch.isin(input_ids[:, -1], eos).nonzero().flatten().tolist()
        self.cache.release(finished)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _streaming_arguments(window, sinks, config_window) -> tuple[int | None, int]:
    """The cache's (window, sinks): checked, the window defaulting to the config's."""
    if window is not None:
        window = checked_int("window", window)
    sinks = checked_int("sinks", sinks, 0)
    window = config_window if window is None else window
    if sinks and window is None:
        raise ValueError(
            f"sinks={sinks} needs a window: attention sinks are the first positions kept visible beside a "
            "sliding window, and this model's config has none. Give window= as well "
            "(e.g. PagedKVCache(model, window=1024, sinks=4))."
        )
    return window, sinks


def _repeats_previous_row(key, value, real) -> torch.Tensor:
    """(B,) bool: the row's padding and first layer's K and V equal the previous row's (row 0:
    False). Rows of one prompt that generate repeated give the same K/V in every layer; rows
    of different prompts differ in their first layer's K or V already. Compared a span of
    positions at a time, so the comparison never holds more than _COMPARED_AT_ONCE booleans."""
    batch, tokens = key.shape[0], key.shape[2]
    same = torch.zeros(batch, dtype=torch.bool, device=real.device)
    if batch == 1:
        return same
    repeats = (real[1:] == real[:-1]).all(-1)
    per_position = (batch - 1) * key.shape[1] * key.shape[3]
    span = max(1, _COMPARED_AT_ONCE // per_position)
    for start in range(0, tokens, span):
        for states in (key, value):
            part = states[:, :, start:start + span]
            repeats &= (part[1:] == part[:-1]).flatten(1).all(-1)
    same[1:] = repeats
    return same


_COMPARED_AT_ONCE = 2**24


def _real_tokens(attention_mask, batch, tokens, device) -> torch.Tensor:
    """(B, N) bool, true for real (non-padding) prompt tokens, from the mask the attention got.

    None means no padding; a 2-D mask is transformers' padding mask; a 4-D mask (bool, or
    additive float) is read on its last query row, which sees every real key of a causal prompt.
    """
    if attention_mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    if attention_mask.dim() == 2:
        return attention_mask[:, -tokens:].bool().to(device)
    if attention_mask.dim() == 4:
        last_row = attention_mask[:, 0, -1, -tokens:]
        visible = last_row if last_row.dtype == torch.bool else last_row == 0
        return visible.expand(batch, tokens).to(device)
    raise ValueError(f"cannot read padding from an attention mask of shape {tuple(attention_mask.shape)}")


# --- construction helpers -----------------------------------------------------------------------


def default_pool_blocks(device, bytes_per_block: int, memory_fraction: float | None = None) -> int:
    """Blocks of a pool built without a size: on a CUDA device `memory_fraction` (default
    DEFAULT_MEMORY_FRACTION) of its memory free now, elsewhere CPU_POOL_BYTES."""
    device = torch.device(device)
    if device.type == "cuda":
        fraction = DEFAULT_MEMORY_FRACTION if memory_fraction is None else memory_fraction
        free, _ = torch.cuda.mem_get_info(device)
        budget, source = int(free * fraction), f"{fraction} of the {free / 2**30:.2f} GiB free on {device}"
    else:
        if memory_fraction is not None:
            raise ValueError(
                f"memory_fraction sizes the pool from free GPU memory; on {device.type} give num_blocks= "
                f"or max_tokens= (or nothing, for {CPU_POOL_BYTES >> 20} MiB)"
            )
        budget, source = CPU_POOL_BYTES, f"the default {CPU_POOL_BYTES >> 20} MiB pool on {device.type}"
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise ValueError(f"{source} holds no block of {bytes_per_block} bytes; give num_blocks= or max_tokens=")
    return blocks


def _pool_blocks(num_blocks, max_tokens, memory_fraction, block_size, bytes_per_block, device) -> int:
    sizes = {"num_blocks": num_blocks, "max_tokens": max_tokens, "memory_fraction": memory_fraction}
    given = [name for name, value in sizes.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"give the pool size by at most one of num_blocks=, max_tokens=, memory_fraction=; got {given}")
    if num_blocks is not None:
        return checked_int("num_blocks", num_blocks)
    if max_tokens is not None:
        return math.ceil(checked_int("max_tokens", max_tokens) / block_size)
    if memory_fraction is not None and not (
        isinstance(memory_fraction, (int, float)) and not isinstance(memory_fraction, bool) and 0 < memory_fraction <= 1
    ):
        raise ValueError(f"memory_fraction must be a number in (0, 1], got {memory_fraction!r}")
    return default_pool_blocks(device, bytes_per_block, memory_fraction)


def _pool_dtype_and_device(model, dtype, device) -> tuple[torch.dtype, torch.device]:
    """The pool's dtype and device: given, or the model's (float32 / CPU for a config); checked."""
    parameters = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    if device is None and len({p.device for p in parameters}) > 1:
        raise ValueError(
            "the model's parameters are spread over several devices; PagedKVCache keeps one pool on "
            "one device: give device= (and keep every attention layer there)"
        )
    if dtype is None:
        dtype = parameters[0].dtype if parameters else torch.float32
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"dtype must be one the kernels support ({names}), got {dtype!r}")
    if device is None:
        device = parameters[0].device if parameters else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cuda', 'cuda:1', 'cpu')") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the paged kernels run on CUDA GPUs (or the CPU with TRITON_INTERPRET=1), not on {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available here")
    return dtype, device


def _host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without a host-device sync: a plain `.to("cuda")` from
    pageable memory waits for the copy; from pinned memory it is queued like a kernel (torch's
    pinned-memory allocator keeps the buffer until the copy has run)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
