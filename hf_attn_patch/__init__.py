"""hf-attn-patch: Hugging Face transformers attention on Triton kernels.

    from hf_attn_patch import patch_model
    patch_model(model)          # Llama, Mistral, Falcon, BERT
"""

__version__ = "0.1.0"
