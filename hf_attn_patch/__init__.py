"""hf-attn-patch: Hugging Face transformers attention on Triton kernels.

    from hf_attn_patch import patch_model
    patch_model(model)          # Llama, Mistral, Falcon, BERT
"""

__version__ = "0.1.0"

__all__ = ["patch_model", "unpatch_model", "patched", "is_patched"]


def __getattr__(name: str):
    # Imported on first use, so that `import hf_attn_patch.kernels` does not pull in transformers.
    if name in __all__:
        from . import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'hf_attn_patch' has no attribute {name!r}")
