"""Triton attention kernels and their plain-PyTorch reference. Knows nothing of transformers."""

from ._checks import SUPPORTED_HEAD_DIMS
from .flash import flash_attention
from .paged import paged_attention, write_to_pages
from .reference import attention_reference

__all__ = [
    "flash_attention", "paged_attention", "write_to_pages", "attention_reference", "SUPPORTED_HEAD_DIMS",
]
