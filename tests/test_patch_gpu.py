"""On the GPU only: real head dims, bf16, prompts long enough to span many kernel blocks.

Too slow for Triton's interpreter; on a CPU machine they are reported as skipped.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from hf_attn_patch import patch_model

from .helpers import relative_error

pytestmark = pytest.mark.gpu

VOCAB = 1024
LENGTH = 640  # several 64/128-token blocks, and not a multiple of either
SHAPE = dict(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=4096,
             pad_token_id=0)  # head dim 64

MODELS = {
    "llama-gqa": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, intermediate_size=1024, num_key_value_heads=2)),
    "mistral-window": lambda: MistralForCausalLM(
        MistralConfig(**SHAPE, intermediate_size=1024, num_key_value_heads=2, sliding_window=200)),
    "falcon-40b-layout": lambda: FalconForCausalLM(FalconConfig(**SHAPE, new_decoder_architecture=True, num_kv_heads=2)),
    "falcon-rw-alibi": lambda: FalconForCausalLM(FalconConfig(**SHAPE, alibi=True, multi_query=False)),
    "bert": lambda: BertModel(BertConfig(**{k: v for k, v in SHAPE.items() if k != "pad_token_id"},
                                         intermediate_size=1024)),
}


def long_batch(decoder: bool, length: int = LENGTH) -> dict[str, torch.Tensor]:
    """Three rows: padded by a quarter, unpadded, padded by half (left for decoders)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (3, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in ((0, length // 4), (2, length // 2)):
        if decoder:
            attention_mask[row, :pad] = 0
        else:
            attention_mask[row, length - pad:] = 0
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0).cuda(), "attention_mask": attention_mask.cuda()}


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_error_is_no_worse_than_stock_bf16(name):
    """Against a float32 stock reference, patched bf16 errs no more than stock bf16 does."""
    torch.manual_seed(0)
    model = MODELS[name]().cuda().eval()
    inputs = long_batch(decoder=name != "bert")
    real = inputs["attention_mask"].bool()

    def output():
        with torch.no_grad():
            return model(**inputs)[0].float()[real]

    reference = output()
    model.to(torch.bfloat16)
    stock = output()
    patch_model(model)
    ours = output()
    stock_error, our_error = relative_error(stock, reference), relative_error(ours, reference)
    assert our_error <= 1.5 * stock_error + 1e-3, (our_error, stock_error)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window", "falcon-40b-layout"])
def test_float32_generate_identical_after_a_long_left_padded_prompt(name):
    torch.manual_seed(0)
    model = MODELS[name]().cuda().eval()
    inputs = long_batch(decoder=True, length=300)
    settings = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    expected = model.generate(**inputs, **settings)
    patch_model(model)
    assert torch.equal(model.generate(**inputs, **settings), expected)
