"""transformers' continuous batching (generate_batch) of a patched model on our kernels: same
tokens as its stock paged path, on a tiny Llama and a tiny Mistral whose window is shorter than the sequences.

The batch config is tiny (16 tokens a step) so prompts are chunked and prompt chunks share
steps with decoding requests, the mixes the packed attention has to get right.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from hf_attn_patch import is_patched, patch_model
from hf_attn_patch.cache import continuous_batching
from hf_attn_patch.cache import batching as cb_module
from hf_attn_patch.cache.batching import varlen_decode_attention
from hf_attn_patch.kernels import attention_reference
from hf_attn_patch.models import ATTN_IMPLEMENTATION
from tests.helpers import relative_error

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, eos_token_id=1)


def make_model(kind):
    torch.manual_seed(0)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=5)).eval()
    return LlamaForCausalLM(LlamaConfig(**COMMON)).eval()


def run_batch(model, prompts, cuda_graphs=False):
    generation = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    config = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=16, use_cuda_graph=cuda_graphs)
    results = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=config)
    return {request: results[request].generated_tokens for request in results}


@pytest.mark.parametrize(
    "kind,cuda_graphs",
    [("llama", False), ("mistral", False),
     pytest.param("llama", True, marks=pytest.mark.gpu, id="llama-cuda-graphs")],
)
def test_generate_batch_matches_stock_paged_path(kind, cuda_graphs, device):
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 96, (n,), generator=generator).tolist() for n in (5, 11, 3)]
    stock = make_model(kind).to(device)
    stock.set_attn_implementation("sdpa")
    expected = run_batch(stock, prompts, cuda_graphs)

    model = patch_model(make_model(kind).to(device))
    with mock.patch.object(cb_module, "paged_attention", wraps=cb_module.paged_attention) as kernel:
        with continuous_batching(model):
            got = run_batch(model, prompts, cuda_graphs)
    assert kernel.call_count > 0, "continuous batching did not reach our kernel"
    assert got == expected
    assert is_patched(model) and model.config._attn_implementation == ATTN_IMPLEMENTATION  # restored


def test_varlen_decode_attention_matches_reference(device):
    """Packed sequences with prompt chunks (queries are the last keys) and decode tokens."""
    generator = torch.Generator().manual_seed(2)
    q_lens, k_lens = [3, 1, 1, 4], [7, 5, 1, 4]
    q = torch.randn(sum(q_lens) + 2, 4, 16, generator=generator).to(device)  # 2 padding tokens
    k = torch.randn(sum(k_lens), 2, 16, generator=generator).to(device)
    v = torch.randn(sum(k_lens), 2, 16, generator=generator).to(device)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    for window in (None, 3):
        out = varlen_decode_attention(q, k, v, cu_q, cu_k, max(k_lens), window=window)
        for s in range(len(q_lens)):
            qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1)[None]
            ks, vs = (t[cu_k[s]:cu_k[s + 1]].transpose(0, 1)[None] for t in (k, v))
            expected = attention_reference(qs, ks, vs, causal=True, window=window)[0].transpose(0, 1)
            assert relative_error(out[cu_q[s]:cu_q[s + 1]], expected) < 1e-4
        assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
