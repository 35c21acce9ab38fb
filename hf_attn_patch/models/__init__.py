"""Model families, one module each, and the registry the patch layer dispatches on.

A family module knows one transformers family and the kernels; families never import each
other. `FAMILIES` maps a name to the family's `Family` entry; `patch.py` knows only this.
"""

from ._family import Family
from ._interface import ATTN_IMPLEMENTATION, register
from .bert import FAMILY as BERT
from .falcon import FAMILY as FALCON
from .llama import FAMILY as LLAMA
from .mistral import FAMILY as MISTRAL

FAMILIES: dict[str, Family] = {"llama": LLAMA, "mistral": MISTRAL, "falcon": FALCON, "bert": BERT}

__all__ = ["ATTN_IMPLEMENTATION", "FAMILIES", "Family", "register"]
