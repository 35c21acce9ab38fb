"""The patch layer's contract: refusals, idempotence, restoring, saving, head classes, fallbacks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
    FalconConfig,
    FalconForSequenceClassification,
    FalconModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    MistralConfig,
    MistralModel,
)

from hf_attn_patch import is_patched, patch_model, patched, unpatch_model
from hf_attn_patch.models import ATTN_IMPLEMENTATION, _attention
from hf_attn_patch.patch import UnsupportedModelError

from .helpers import relative_error
from .test_patch import DECODER, VOCAB, batch, falcon_40b, falcon_7b, falcon_rw, llama

ONE_LAYER = {**DECODER, "num_hidden_layers": 1}
BERT_ONE_LAYER = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the one-time fallback warnings afresh."""
    monkeypatch.setattr(_attention, "_warned", set())


def tiny_gpt2() -> GPT2Model:
    return GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=32))


class MyLlama(LlamaForCausalLM):
    """A user's subclass: it belongs to the Llama family too."""


# --- head classes and subclasses ----------------------------------------------------------------

HEAD_CLASSES = [
    (LlamaModel, lambda: LlamaConfig(**ONE_LAYER, intermediate_size=128, num_key_value_heads=2), True),
    (LlamaForSequenceClassification, lambda: LlamaConfig(**ONE_LAYER, intermediate_size=128), True),
    (LlamaForTokenClassification, lambda: LlamaConfig(**ONE_LAYER, intermediate_size=128), True),
    (LlamaForQuestionAnswering, lambda: LlamaConfig(**ONE_LAYER, intermediate_size=128), True),
    (MyLlama, lambda: LlamaConfig(**ONE_LAYER, intermediate_size=128), True),
    (MistralModel, lambda: MistralConfig(**ONE_LAYER, intermediate_size=128, num_key_value_heads=2, sliding_window=3), True),
    (FalconModel, lambda: FalconConfig(**ONE_LAYER, new_decoder_architecture=True, num_kv_heads=2), True),
    (FalconForSequenceClassification, lambda: FalconConfig(**ONE_LAYER, alibi=True, multi_query=False), True),
    (BertModel, lambda: BertConfig(**BERT_ONE_LAYER), False),
    (BertForSequenceClassification, lambda: BertConfig(**BERT_ONE_LAYER), False),
    (BertForTokenClassification, lambda: BertConfig(**BERT_ONE_LAYER), False),
    (BertLMHeadModel, lambda: BertConfig(**BERT_ONE_LAYER, is_decoder=True), True),  # causal BERT
]


@pytest.mark.parametrize("model_class, config, decoder", HEAD_CLASSES, ids=[c[0].__name__ for c in HEAD_CLASSES])
def test_every_head_class_matches(model_class, config, decoder, device):
    torch.manual_seed(0)
    model = model_class(config()).to(device).eval()
    inputs = batch(device, decoder)
    with torch.no_grad():
        expected = model(**inputs)[0]
        patch_model(model)
        actual = model(**inputs)[0]
    if expected.dim() == 3:  # per token: compare real tokens only
        real = inputs["attention_mask"].bool()
        actual, expected = actual[real], expected[real]
    assert relative_error(actual, expected) < 1e-4


# --- refusing what cannot be patched ------------------------------------------------------------


def test_unsupported_model_raises_naming_families_and_stays_untouched():
    model = tiny_gpt2()
    implementation = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError) as error:
        patch_model(model)
    message = str(error.value)
    assert "GPT2Attention" in message and "Nothing was changed" in message
    for family in ("Llama", "Mistral", "Falcon", "BERT"):
        assert family in message
    assert model.config._attn_implementation == implementation
    assert not is_patched(model)


def test_mixed_model_is_checked_whole_before_anything_changes():
    torch.manual_seed(0)
    supported = llama()
    model = torch.nn.ModuleDict({"llama": supported, "gpt2": tiny_gpt2()})
    implementation = supported.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match="GPT2Attention"):
        patch_model(model)
    assert supported.config._attn_implementation == implementation
    assert not is_patched(model) and not is_patched(supported)


def test_unsupported_head_dim_is_refused_with_the_supported_ones():
    model = LlamaForCausalLM(LlamaConfig(**{**ONE_LAYER, "num_attention_heads": 8}, intermediate_size=128))
    with pytest.raises(UnsupportedModelError, match="head dim 8; the kernels support 16, 32, 64"):
        patch_model(model)
    assert not is_patched(model)


def test_bad_arguments_are_type_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument 'fused'"):
        patch_model(llama(), fused=True)
    with pytest.raises(TypeError, match="True or False"):
        patch_model(llama(), cuda_graphs="yes")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch_model("meta-llama/Llama-3.2-1B")


# --- idempotence and restoring ------------------------------------------------------------------


@pytest.mark.parametrize("build", [llama, falcon_40b], ids=["llama", "falcon"])
def test_patching_twice_is_a_no_op(build):
    model = build()
    implementation = model.config._attn_implementation
    assert patch_model(patch_model(model)) is model
    assert is_patched(model)
    unpatch_model(model)
    assert not is_patched(model)
    assert model.config._attn_implementation == implementation
    assert all("forward" not in module.__dict__ for module in model.modules())


def test_unpatching_an_unpatched_model_is_a_no_op():
    model = llama()
    assert unpatch_model(model) is model and not is_patched(model)


def test_unpatching_a_part_of_a_patched_model_names_what_to_do():
    model = llama()
    patch_model(model)
    with pytest.raises(ValueError, match="call unpatch_model on the model that was given to patch_model"):
        unpatch_model(model.model)
    unpatch_model(model)


def test_patched_context_manager_restores_even_on_error():
    model = falcon_7b()
    with patched(model) as inside:
        assert inside is model and is_patched(model)
    assert not is_patched(model)
    with pytest.raises(RuntimeError, match="boom"):
        with patched(model):
            raise RuntimeError("boom")
    assert not is_patched(model)
    assert all("forward" not in module.__dict__ for module in model.modules())


def test_patched_context_leaves_an_already_patched_model_patched():
    model = llama()
    patch_model(model)
    with patched(model):
        pass
    assert is_patched(model)


@pytest.mark.parametrize("build", [llama, falcon_40b], ids=["llama", "falcon"])
def test_save_pretrained_of_a_patched_model_loads_into_stock_transformers(build, tmp_path, device):
    torch.manual_seed(0)
    model = build().to(device).eval()
    inputs = batch(device)
    with torch.no_grad():
        expected = model(**inputs).logits
    patch_model(model)
    model.save_pretrained(tmp_path)
    assert ATTN_IMPLEMENTATION not in (tmp_path / "config.json").read_text()
    json.loads((tmp_path / "config.json").read_text())

    loaded = type(model).from_pretrained(tmp_path).to(device).eval()
    assert loaded.config._attn_implementation != ATTN_IMPLEMENTATION and not is_patched(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


# --- fallbacks ----------------------------------------------------------------------------------


def test_output_attentions_falls_back_to_stock_eager_once_with_a_warning(device):
    torch.manual_seed(0)
    model = llama().to(device).eval()
    inputs = batch(device)
    real = inputs["attention_mask"].bool()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(**inputs, output_attentions=True)
    model.set_attn_implementation("sdpa")
    patch_model(model)
    with pytest.warns(UserWarning, match="output_attentions=True is computed with the stock eager"), torch.no_grad():
        actual = model(**inputs, output_attentions=True)
    assert relative_error(actual.logits[real], expected.logits[real]) < 1e-4
    assert len(actual.attentions) == len(expected.attentions)
    for got, want in zip(actual.attentions, expected.attentions):
        assert got.shape == want.shape
        assert relative_error(got.transpose(1, 2)[real], want.transpose(1, 2)[real]) < 1e-4


def test_falcon_output_attentions_falls_back_with_a_warning(device):
    torch.manual_seed(0)
    model = falcon_7b().to(device).eval()
    inputs = batch(device)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**inputs).logits
    patch_model(model)
    with pytest.warns(UserWarning, match="output_attentions=True"), torch.no_grad():
        actual = model(**inputs, output_attentions=True)
    assert relative_error(actual.logits[real], expected[real]) < 1e-4
    heads, length = model.config.num_attention_heads, inputs["input_ids"].shape[1]
    assert [tuple(a.shape) for a in actual.attentions] == [(2, heads, length, length)] * 2
    rows = actual.attentions[0].transpose(1, 2)[real]  # (real tokens, heads, keys)
    assert torch.allclose(rows.sum(-1), torch.ones(rows.shape[:2], device=device))


@pytest.mark.parametrize("build, field", [(llama, "attention_dropout"), (falcon_rw, "attention_dropout")],
                         ids=["llama", "falcon-rw"])
def test_attention_dropout_in_training_falls_back_with_a_warning(build, field, device):
    torch.manual_seed(0)
    model = build()
    setattr(model.config, field, 0.5)
    model = type(model)(model.config).to(device)  # rebuilt, so the modules read the dropout
    inputs = batch(device)
    patch_model(model)
    model.train()
    with pytest.warns(UserWarning, match="attention dropout in training mode"):
        model(**inputs).logits.sum().backward()
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        patched_logits = model(**inputs).logits
        unpatch_model(model)
        stock_logits = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert relative_error(patched_logits[real], stock_logits[real]) < 1e-4


def test_packed_sequences_match_stock_without_a_fallback_warning(device):
    """Several sequences in one row (position_ids restart, no mask): stock's answer, now from the
    kernel with document ids (tests/test_packed.py covers them in depth), not the sdpa fallback."""
    torch.manual_seed(0)
    model = llama().to(device).eval()
    input_ids = torch.randint(1, VOCAB, (1, 7), device=device)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
    with torch.no_grad():
        expected = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        patch_model(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            actual = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    assert relative_error(actual, expected) < 1e-4
