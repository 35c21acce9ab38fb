"""Model families, one module each, and the registry the patch layer dispatches on.

A family module knows one transformers family and the kernels; families never import each
other. `FAMILIES` maps a name to the family's `Family` entry; `patch.py` knows only this.
"""

from ._family import Family
from .._compat import warn_if_untested_transformers
from ._interface import ATTN_IMPLEMENTATION
from ._interface import register as _register_interfaces
from .bert import FAMILY as BERT
from .falcon import FAMILY as FALCON
from .falcon import register_attention_class as _register_falcon_class
from .llama import FAMILY as LLAMA
from .mistral import FAMILY as MISTRAL

FAMILIES: dict[str, Family] = {"llama": LLAMA, "mistral": MISTRAL, "falcon": FALCON, "bert": BERT}

__all__ = ["ATTN_IMPLEMENTATION", "FAMILIES", "Family", "register"]


def register() -> None:
    """Make our implementation known to transformers (idempotent, global, harmless to others)."""
    warn_if_untested_transformers()
    _register_interfaces()
    _register_falcon_class()
