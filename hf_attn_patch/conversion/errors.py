"""The one error type of the conversion package."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message says why and what to do.

    Raised before anything is written whenever the problem can be seen in the source (bad
    `num_kv_heads`, unknown family, missing or misshapen tensors, pickle or corrupt files), and
    after writing only when verification fails, in which case nothing is left behind either.
    """
