"""Patched against unpatched, same weights, for every family and layout: one table, one set of tests.

Each case is a tiny model (2 layers, head dim 16, short sequences: the Triton interpreter is
slow). Logits and gradients are compared in float32 by relative Frobenius error, over real
(unpadded) tokens only: a padded query row sees no key, which the kernel answers with zeros and
stock attention with whatever its masking gives, and nothing downstream reads those rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from hf_attn_patch import is_patched, patch_model, unpatch_model
from hf_attn_patch.models import ATTN_IMPLEMENTATION

from .helpers import forbid_stock_attention, relative_error

VOCAB = 128
DECODER = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, pad_token_id=0)


@dataclass(frozen=True)
class Case:
    """One family/layout: how to build it, and whether it decodes (left padding, generate)."""

    name: str
    build: Callable[[], transformers.PreTrainedModel]
    decoder: bool = True
    tolerance: float = 1e-4  # float32, relative Frobenius error


def llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**DECODER, intermediate_size=128, num_key_value_heads=2))


def mistral() -> MistralForCausalLM:
    # A window shorter than prompt + generation, so that the window and the sliding cache both act.
    return MistralForCausalLM(MistralConfig(**DECODER, intermediate_size=128, num_key_value_heads=2, sliding_window=4))


def falcon_7b() -> FalconForCausalLM:
    return FalconForCausalLM(FalconConfig(**DECODER, multi_query=True, new_decoder_architecture=False,
                                          parallel_attn=True, bias=False, alibi=False))


def falcon_40b() -> FalconForCausalLM:
    return FalconForCausalLM(FalconConfig(**DECODER, new_decoder_architecture=True, num_kv_heads=2,
                                          parallel_attn=True, bias=False, alibi=False))


def falcon_rw() -> FalconForCausalLM:
    return FalconForCausalLM(FalconConfig(**DECODER, alibi=True, multi_query=False, new_decoder_architecture=False,
                                          parallel_attn=False, bias=True))


def bert() -> BertForMaskedLM:
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


CASES = [
    Case("llama-gqa", llama),
    Case("mistral-window", mistral),
    Case("falcon-7b-multi-query", falcon_7b),
    Case("falcon-40b-grouped-kv", falcon_40b),
    Case("falcon-rw-alibi", falcon_rw),
    Case("bert", bert, decoder=False),
]
DECODERS = [case for case in CASES if case.decoder]


def build(case: Case, device: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return case.build().to(device).eval()


def batch(device: str, decoder: bool = True, length: int = 7) -> dict[str, torch.Tensor]:
    """Two rows, the first padded by 5 (on the left for decoders, on the right for encoders).

    Heavy padding on purpose: with Mistral's window of 4, padding is still inside the window of
    the first decoding step, when the sliding cache has started to drop keys.
    """
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    if decoder:
        attention_mask[0, :5] = 0
    else:
        attention_mask[0, length - 5:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request) -> Case:
    return request.param


def test_logits_match(case, device):
    model, inputs = build(case, device), batch(device, case.decoder)
    real = inputs["attention_mask"].bool()
    expected = logits(model, inputs)
    patch_model(model)
    actual = logits(model, inputs)
    assert relative_error(actual[real], expected[real]) < case.tolerance


@pytest.mark.parametrize("case", DECODERS, ids=lambda case: case.name)
def test_greedy_generate_identical_on_left_padded_batch(case, device):
    model, inputs = build(case, device), batch(device)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model.generate(**inputs, **settings)
    patch_model(model)
    actual = model.generate(**inputs, **settings)
    assert torch.equal(actual, expected)


def test_training_loss_and_gradients_match(case, device):
    model, inputs = build(case, device), batch(device, case.decoder)
    model.train()
    real = inputs["attention_mask"].bool()
    if case.decoder:
        # The label at t is scored by the logits at t - 1: both must be real tokens.
        real[:, 1:] &= real[:, :-1].clone()
    labels = inputs["input_ids"].masked_fill(~real, -100)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    expected_loss, expected_grads = loss_and_grads()
    patch_model(model)
    actual_loss, actual_grads = loss_and_grads()
    assert relative_error(actual_loss, expected_loss) < case.tolerance
    assert actual_grads.keys() == expected_grads.keys()
    flat = lambda grads: torch.cat([grads[name].flatten() for name in sorted(grads)])  # noqa: E731
    assert relative_error(flat(actual_grads), flat(expected_grads)) < case.tolerance
    # Per parameter too, except those whose true gradient is ~0 (BERT's key bias: softmax
    # ignores a shift shared by a whole row), where only rounding noise is left to compare.
    largest = max(grad.norm() for grad in expected_grads.values())
    for name, grad in expected_grads.items():
        if grad.norm() > 1e-3 * largest:
            assert relative_error(actual_grads[name], grad) < case.tolerance, name


def test_training_under_bf16_autocast(case, device):
    """accelerate's bf16 mixed precision runs the model under autocast, where RoPE leaves q and k
    in float32 and v in bf16: the patched model must train there like stock SDPA does.

    The loss is over real tokens only, as everywhere in this file: under CUDA autocast stock sdpa
    answers a padded query row (which sees no key) like eager does, over the masked keys, and the
    kernel with zeros; on the H200 that alone moved a loss over all rows by 30%."""
    model, inputs = build(case, device), batch(device, case.decoder)
    real = inputs["attention_mask"].bool()
    model.train()

    def loss_and_grad():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(**inputs).logits[real].float().pow(2).mean()
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    expected_loss, expected_grad = loss_and_grad()
    patch_model(model)
    actual_loss, actual_grad = loss_and_grad()
    assert relative_error(actual_loss, expected_loss) < 2e-2
    assert relative_error(actual_grad, expected_grad) < 5e-2


def test_attend_casts_mixed_dtypes_under_autocast(device):
    """What the GPU showed with transformers 5.17 under bf16 autocast: RoPE's float32 cos/sin
    lift q and k to float32 while v stays bf16. attend casts them as SDPA's autocast does."""
    from hf_attn_patch.kernels import attention_reference
    from hf_attn_patch.models._attention import attend

    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 9, 16, generator=generator).to(device)
    k = torch.randn(2, 2, 9, 16, generator=generator).to(device)
    v = torch.randn(2, 2, 9, 16, generator=generator).to(device, torch.bfloat16)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = attend(torch.nn.Module(), q, k, v, causal=True)
    expected = attention_reference(q.bfloat16(), k.bfloat16(), v, causal=True).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), expected.float()) < 1e-2


def test_unpatch_restores_bit_identical_outputs(case, device):
    model, inputs = build(case, device), batch(device, case.decoder)
    before = logits(model, inputs)
    implementation = model.config._attn_implementation
    patch_model(model)
    assert is_patched(model) and model.config._attn_implementation == ATTN_IMPLEMENTATION
    logits(model, inputs)
    unpatch_model(model)
    assert not is_patched(model)
    assert model.config._attn_implementation == implementation
    assert all("forward" not in module.__dict__ for module in model.modules())
    assert torch.equal(logits(model, inputs), before)


def test_stock_attention_is_not_called(case, device, monkeypatch):
    """Every stock attention function and 4-D mask builder raises; the patched model still runs."""
    model, inputs = build(case, device), batch(device, case.decoder)
    patch_model(model)

    forbid_stock_attention(monkeypatch, ("llama", "mistral", "falcon", "bert"),
                           "stock attention or a (B, 1, Nq, Nk) mask was used on the patched path")

    logits(model, inputs)
    if case.decoder:
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
