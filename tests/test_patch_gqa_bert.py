"""GQA-BERT: a checkpoint from hf_attn_patch.conversion, loaded by models.bert.load_gqa_bert."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from hf_attn_patch import is_patched, unpatch_model
from hf_attn_patch.conversion import convert_checkpoint
from hf_attn_patch.models import _attention
from hf_attn_patch.models.bert import load_gqa_bert

from .helpers import relative_error
from .test_patch import batch

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny MHA BertForSequenceClassification and its GQA conversion (KV heads 4 -> 2)."""
    root = tmp_path_factory.mktemp("gqa-bert")
    config = BertConfig(vocab_size=128, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=2, num_attention_heads=HEADS,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(root / "mha")
    convert_checkpoint(root / "mha", root / "gqa", num_kv_heads=KV_HEADS)
    return root / "mha", root / "gqa"


def expanded_stock_model(gqa_dir, model_class):
    """The same function in stock transformers: each pooled KV head repeated over its group."""
    model = load_gqa_bert(gqa_dir, model_class)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for name, tensor in state.items():
        if ".attention.self.key." in name or ".attention.self.value." in name:
            heads = tensor.unflatten(0, (KV_HEADS, HEAD_DIM))
            state[name] = heads.repeat_interleave(HEADS // KV_HEADS, dim=0).flatten(0, 1)
    config = BertConfig.from_pretrained(gqa_dir)
    del config.num_key_value_heads
    stock = model_class(config)
    stock.load_state_dict(state)
    return stock.eval()


@pytest.mark.parametrize("model_class", [BertForSequenceClassification, BertModel])
def test_gqa_bert_loads_patched_and_computes_the_expanded_model(checkpoints, model_class, device):
    _, gqa_dir = checkpoints
    model = load_gqa_bert(gqa_dir, model_class).to(device).eval()
    assert is_patched(model) and type(model).__name__ == model_class.__name__
    attention = model.base_model.encoder.layer[0].attention.self
    assert attention.key.weight.shape == (KV_HEADS * HEAD_DIM, HEADS * HEAD_DIM)

    inputs = batch(device, decoder=False)
    real = inputs["attention_mask"].bool()
    stock = expanded_stock_model(gqa_dir, model_class).to(device)
    with torch.no_grad():
        actual, expected = model(**inputs)[0], stock(**inputs)[0]
        if actual.dim() == 3:
            actual, expected = actual[real], expected[real]
        assert relative_error(actual, expected) < 1e-4

        # Unpatched, stock sdpa runs it too, expanding K/V by num_key_value_groups.
        unpatch_model(model)
        unpatched = model(**inputs)[0]
        if unpatched.dim() == 3:
            unpatched = unpatched[real]
        assert relative_error(unpatched, expected) < 1e-4


def test_default_class_comes_from_the_checkpoint_architectures(checkpoints):
    _, gqa_dir = checkpoints
    assert type(load_gqa_bert(gqa_dir)).__name__ == "BertForSequenceClassification"


def test_plain_bert_checkpoint_is_refused_with_what_to_do(checkpoints):
    mha_dir, _ = checkpoints
    with pytest.raises(ValueError, match="no num_key_value_heads.*convert it first"):
        load_gqa_bert(mha_dir)


def test_saved_gqa_bert_loads_back(checkpoints, tmp_path, device):
    _, gqa_dir = checkpoints
    model = load_gqa_bert(gqa_dir).to(device).eval()
    model.save_pretrained(tmp_path)
    config = BertConfig.from_pretrained(tmp_path)
    assert config.architectures == ["BertForSequenceClassification"] and config.num_key_value_heads == KV_HEADS
    inputs = batch(device, decoder=False)
    with torch.no_grad():
        assert torch.equal(load_gqa_bert(tmp_path).to(device).eval()(**inputs).logits, model(**inputs).logits)


def test_gqa_bert_output_attentions_falls_back_to_eager(checkpoints, device, monkeypatch):
    """Stock BERT's eager attention does not expand K/V; the fallback does it first."""
    monkeypatch.setattr(_attention, "_warned", set())
    _, gqa_dir = checkpoints
    model = load_gqa_bert(gqa_dir, BertModel).to(device).eval()
    inputs = batch(device, decoder=False)
    with pytest.warns(UserWarning, match="output_attentions"), torch.no_grad():
        output = model(**inputs, output_attentions=True)
    length = inputs["input_ids"].shape[1]
    assert [tuple(a.shape) for a in output.attentions] == [(2, HEADS, length, length)] * 2
