"""Caches and compilation: static caches, torch.compile without graph breaks, Falcon's grouped cache."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import FalconConfig, FalconForCausalLM
from transformers.generation.configuration_utils import CompileConfig

from hf_attn_patch import patch_model
from hf_attn_patch._compat import falcon_uses_attention_interface

from .helpers import relative_error
from .test_patch import batch, llama, mistral

GREEDY = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("build", [llama, mistral], ids=["llama", "mistral-window"])
def test_static_cache_generate_identical(build, device):
    """Static caches put the queries before unwritten slots; the mask entry must line them up."""
    torch.manual_seed(0)
    model, inputs = build().to(device).eval(), batch(device)
    expected = model.generate(**inputs, cache_implementation="static", **GREEDY)
    patch_model(model)
    actual = model.generate(**inputs, cache_implementation="static", **GREEDY)
    assert torch.equal(actual, expected)


def compile_config() -> CompileConfig:
    # aot_eager: no C++ toolchain needed on CPU; the kernels are custom ops with fake versions.
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None, dynamic=False)
    config._compile_all_devices = True  # generate compiles only on accelerators otherwise
    return config


def test_compiled_static_cache_decode_is_one_graph(device):
    """generate() compiles the decode step (fullgraph) with a static cache, as it does on GPUs."""
    torch.manual_seed(0)
    model, inputs = llama().to(device).eval(), batch(device)
    expected = model.generate(**inputs, cache_implementation="static", **GREEDY)
    patch_model(model)
    torch._dynamo.reset()
    counters.clear()
    actual = model.generate(**inputs, cache_implementation="static", compile_config=compile_config(), **GREEDY)
    assert torch.equal(actual, expected)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_torch_compile_fullgraph_forward_and_training(device):
    torch.manual_seed(0)
    model, inputs = llama().to(device), batch(device)
    real = inputs["attention_mask"].bool()
    patch_model(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = compiled(**inputs).logits
    assert relative_error(actual[real], expected[real]) < 1e-5

    # Training without a mask and without a cache: while tracing, transformers wraps the mask
    # pattern for packed sequences; the patched path must still trace as one graph.
    model.train()
    ids = inputs["input_ids"]
    loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    eager_loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert relative_error(loss.detach(), eager_loss.detach()) < 1e-5
    assert not counters["graph_break"]


def test_falcon_40b_layout_caches_only_the_kv_groups(device):
    """Falcon-40B's head counts (128 query heads, 8 KV groups, head dim 64) in one layer.

    Stock transformers up to 5.24 caches K/V for every query head (5.25 caches the groups); the
    patched path always caches the groups. Elements per token per layer: stock 2 * 128 * 64 (up
    to 5.24), patched 2 * 8 * 64 (see docs/patching.md for the bytes of the full 60-layer model).
    """
    config = FalconConfig(vocab_size=64, hidden_size=128 * 64, num_attention_heads=128, num_kv_heads=8,
                          new_decoder_architecture=True, num_hidden_layers=1, ffn_hidden_size=64,
                          parallel_attn=True, bias=False, alibi=False)
    torch.manual_seed(0)
    model = FalconForCausalLM(config).to(device).eval()
    input_ids = torch.randint(1, 64, (1, 4), device=device)

    def elements_per_token(output) -> int:
        layer = output.past_key_values.layers[0]
        return (layer.keys.numel() + layer.values.numel()) // input_ids.numel()

    with torch.no_grad():
        stock = model(input_ids, use_cache=True)
        patch_model(model)
        ours = model(input_ids, use_cache=True)
    stock_heads = 8 if falcon_uses_attention_interface() else 128
    assert elements_per_token(stock) == 2 * stock_heads * 64
    assert elements_per_token(ours) == 2 * 8 * 64
    assert relative_error(ours.logits, stock.logits) < 1e-4
