"""CUDA-graph decode in plain `generate`: capture a patched model's decode forward once per batch
size, then replay it each step.

A decode step of a small model is bound by the host: ~700 kernel launches and the Python that
issues them. Replaying a captured CUDA graph issues them all in one call. What the graph reads
must sit at fixed addresses and change only in place, and what it runs must not depend on host
values that change from step to step. With a `PagedKVCache` that holds:

* the pages, the block table and the sequence lengths are the cache's own device tensors, updated
  in place by the host-side bookkeeping of each step (`PagedKVCache.begin_graph_step`), which runs
  before the replay, outside the graph;
* the paged decode kernel's grid depends only on the block table's full width, never on lengths;
* the step's inputs go into static buffers: the new token ids and their position (the cache's
  length so far, the same for every row, as transformers counts positions in `generate`); no
  attention mask is passed, since the paged cache stores no padding and tracks lengths itself;
* the host state the forward would update (each layer's length) is updated once per step by
  `PagedKVCache.end_graph_step`, since a replay runs no Python.

The first decode step of a batch size warms the forward up eagerly (Triton compiles there, not
under capture), captures it, then replays. Every step of the same batch size after that is one
replay. Without CUDA (Triton's interpreter on the CPU) the same static-buffer path runs eagerly
step by step, which is how CPU tests cover it.

Switched on by `patch_model(model, cuda_graphs=True)`; see docs/patching.md.
"""

from __future__ import annotations

import weakref

import torch

from .._compat import cache_keyword, output_with_cache
from .paged import PagedKVCache

__all__ = ["GraphedDecodeForward", "install_graphed_decode"]


def install_graphed_decode(model: torch.nn.Module):
    """Make `model.forward` replay graphs for decode steps; returns the (picklable) undo."""
    current = model.__dict__.get("forward")
    if isinstance(current, GraphedDecodeForward):
        return _Nothing()
    model.forward = GraphedDecodeForward(model, current)
    return _RestoreForward(model, current)


class GraphedDecodeForward:
    """Stands in for `model.forward`: decode steps over a `PagedKVCache` replay a CUDA graph;
    every other call goes to the model's own forward unchanged.

    Copies of the model (deepcopy, pickle) get a GraphedDecodeForward of their own, with no
    graphs: a graph holds the addresses of the model and cache it was captured with.
    """

    def __init__(self, model: torch.nn.Module, previous=None):
        self.model = model
        self.previous = previous  # an instance-level forward it replaced (a hook's), if any
        self._graphs: "weakref.WeakKeyDictionary[PagedKVCache, dict[int, _DecodeGraph]]" = (
            weakref.WeakKeyDictionary()
        )

    def eager(self, *args, **kwargs):
        """The model's own forward."""
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if args or not isinstance(cache, PagedKVCache) or not _is_plain_decode_step(cache, kwargs):
            return self.eager(*args, **kwargs)
        batch = kwargs["input_ids"].shape[0]
        graphs = self._graphs.setdefault(cache, {})
        cache.begin_graph_step(batch)  # may raise CacheFullError, with the cache as it was
        try:
            graph = graphs.get(batch)
            if graph is None:
                graph = graphs[batch] = _DecodeGraph(self.eager, cache, batch, cache_keyword(kwargs))
            logits = graph.run(kwargs["input_ids"], kwargs.get("position_ids"), cache.get_seq_length())
        finally:
            cache.end_graph_step()
        return output_with_cache(graph.output_type, logits, cache)

    def captured_batch_sizes(self, cache: PagedKVCache) -> list[int]:
        """Batch sizes with a captured graph for this cache (for tests and benchmarks)."""
        return sorted(b for b, g in self._graphs.get(cache, {}).items() if g.graph is not None)

    def __getstate__(self):
        return {"model": self.model, "previous": self.previous}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._graphs = weakref.WeakKeyDictionary()


class _RestoreForward:
    """Undo of install_graphed_decode (a class, not a closure, so a patched model pickles)."""

    def __init__(self, model, previous):
        self.model, self.previous = model, previous

    def __call__(self) -> None:
        if self.previous is None:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self.previous


class _Nothing:
    def __call__(self) -> None:
        pass


_PASSED_THROUGH = {"input_ids", "cache", "past_key_values", "attention_mask", "use_cache", "return_dict",
                   "logits_to_keep", "position_ids", "cache_position"}


def _is_plain_decode_step(cache: PagedKVCache, kwargs) -> bool:
    """One new token per row after a stored prompt, nothing asked beyond logits."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        return False
    if not set(kwargs) <= _PASSED_THROUGH or kwargs.get("use_cache") is False:
        return False  # inputs_embeds, output_attentions, labels, ...: the eager forward handles them
    return cache.holds_prompt()


class _DecodeGraph:
    """One batch size's static inputs, captured graph and output logits."""

    def __init__(self, forward, cache: PagedKVCache, batch: int, cache_keyword: str):
        device = cache.k_pages.device
        self.forward = forward
        self.cache = cache
        self.cache_keyword = cache_keyword
        self.input_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.output_type = None
        self._use_graph = device.type == "cuda"

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, position: int) -> torch.Tensor:
        self.input_ids.copy_(input_ids, non_blocking=True)
        if position_ids is None:  # what the model would compute: the cache's length, every row
            self.position_ids.fill_(position)
        else:
            self.position_ids.copy_(position_ids, non_blocking=True)
        if not self._use_graph:
            return self._forward().clone()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the static logits

    def _forward(self) -> torch.Tensor:
        with self.cache.graph_mode():
            out = self.forward(input_ids=self.input_ids, position_ids=self.position_ids,
                               **{self.cache_keyword: self.cache}, use_cache=True, return_dict=True)
        self.output_type = type(out)
        return out.logits

    def _capture(self) -> None:
        # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), as torch advises
        # before capture. Running the step's forward twice more is harmless: it writes the same
        # K/V into the same slots and reads the same pages.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_memory_pool(self.cache)):
            self.logits = self._forward()
        self.graph = graph


def _memory_pool(cache: PagedKVCache):
    """One memory pool per cache, shared by its batch sizes' graphs."""
    pool = getattr(cache, "_graph_pool", None)
    if pool is None:
        pool = cache._graph_pool = torch.cuda.graph_pool_handle()
    return pool
