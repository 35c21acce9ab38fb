"""Paged KV cache for generate (allocator, `PagedKVCache`, the attention hook) and the entry
that runs transformers' own continuous batching on our kernels."""

from .allocator import BlockAllocator, CacheFullError, streaming_blocks
from .batching import continuous_batching
from .hooks import paged_decode_or_none
from .paged import PagedKVCache

__all__ = ["BlockAllocator", "CacheFullError", "PagedKVCache", "continuous_batching", "paged_decode_or_none",
           "streaming_blocks"]
