"""The one error type of the conversion package."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message says why and what to do.

    Raised before anything is written whenever the problem can be seen in the source or the
    destination (bad `num_kv_heads`, unknown family, missing or misshapen tensors, pickle or
    corrupt files, an index that leaves out a shard, anything in the source that cannot be read,
    a destination folder that cannot be written), and after writing only when verification
    fails, in which case nothing is left behind either. Failures of the file system while
    writing (disk full, file too large) are OSErrors; they leave nothing behind as well.
    """
