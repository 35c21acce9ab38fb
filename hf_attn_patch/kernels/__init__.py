"""Triton attention kernels and their plain-PyTorch reference. Knows nothing of transformers."""

from .flash import flash_attention
from .paged import paged_attention, write_to_pages
from .reference import attention_reference

__all__ = ["flash_attention", "attention_reference"]
