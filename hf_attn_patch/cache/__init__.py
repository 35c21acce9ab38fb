"""Paged KV cache for generate: block allocator, the `Cache`, and the attention hook."""

from .allocator import BlockAllocator, CacheFullError
from .hooks import paged_decode_or_none
from .paged import PagedKVCache

__all__ = ["BlockAllocator", "CacheFullError", "PagedKVCache", "paged_decode_or_none"]
