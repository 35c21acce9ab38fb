"""CUDA-graph decode in plain `generate` (`patch_model(model, cuda_graphs=True)`).

Same tokens as the graph-free paged path, float32, for every family: prompts of different
lengths, left padding, a row that ends on EOS while the others go on. On the CPU the static-
buffer path runs eagerly step by step (no capture there); on the GPU it is captured once per
batch size and replayed.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from hf_attn_patch import patch_model, unpatch_model
from hf_attn_patch.cache import CacheFullError, PagedKVCache
from hf_attn_patch.cache.graphs import GraphedDecodeForward

from .test_cache_generate import MODELS, generate, left_padded_prompts, tiny_llama


def graphed(model) -> GraphedDecodeForward:
    forward = model.forward
    assert isinstance(forward, GraphedDecodeForward), "patch_model(cuda_graphs=True) installs the graphed forward"
    return forward


@pytest.mark.parametrize("make_model", MODELS)
def test_same_tokens_as_the_graph_free_paged_path(make_model, device):
    model = make_model().to(device)
    ids, mask = left_padded_prompts([7, 3, 5], width=7, seed=3)
    patch_model(model)
    plain = PagedKVCache(model, max_batch_size=3, num_blocks=24, block_size=4)
    expected = generate(model, ids, mask, 8, eos_token_id=None, past_key_values=plain)
    unpatch_model(model)

    patch_model(model, cuda_graphs=True)
    cache = PagedKVCache(model, max_batch_size=3, num_blocks=24, block_size=4)
    with mock.patch.object(graphed(model), "eager", wraps=graphed(model).eager) as eager:
        got = generate(model, ids, mask, 8, eos_token_id=None, past_key_values=cache)
    assert torch.equal(got, expected)
    assert cache.stats() == plain.stats()
    # The eager forward ran for the prompt; decode steps went through the static path, whose
    # own forward calls are the capture and its warm-up (GPU) or one per step (CPU).
    prompt_calls = [c for c in eager.call_args_list if c.kwargs["input_ids"].shape[1] > 1]
    assert len(prompt_calls) == 1
    if device == "cuda":
        assert graphed(model).captured_batch_sizes(cache) == [3]
        assert eager.call_count == 1 + 2  # prompt, warm-up, capture; 6 more steps replayed
    unpatch_model(model)
    assert not isinstance(model.forward, GraphedDecodeForward)


def test_a_row_that_ends_on_eos_while_others_go_on(device):
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([6, 2, 4], width=6, seed=5)
    patch_model(model)
    reference = generate(model, ids, mask, 6, eos_token_id=None,
                         past_key_values=PagedKVCache(model, max_batch_size=3, num_blocks=24, block_size=4))
    eos = int(reference[1, 6 + 2])  # row 1 emits this at its third step
    plain = PagedKVCache(model, max_batch_size=3, num_blocks=24, block_size=4)
    expected = generate(model, ids, mask, 6, eos_token_id=eos, pad_token_id=0, past_key_values=plain,
                        stopping_criteria=[plain.release_finished(eos)])
    unpatch_model(model)

    patch_model(model, cuda_graphs=True)
    cache = PagedKVCache(model, max_batch_size=3, num_blocks=24, block_size=4)
    got = generate(model, ids, mask, 6, eos_token_id=eos, pad_token_id=0, past_key_values=cache,
                   stopping_criteria=[cache.release_finished(eos)])
    assert torch.equal(got, expected)
    assert (got[1, 6 + 3:] == 0).all()  # padded after its EOS
    assert cache.stats() == plain.stats()  # its blocks went back at EOS, as without graphs
    unpatch_model(model)


def test_beam_search_replays_with_shared_blocks(device):
    """Beam search reorders the block table in place between replays and copies a shared block
    before the replay that writes into it: the tokens are those of the graph-free paged path."""
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([6, 3], width=6, seed=4)
    beams = dict(num_beams=3, eos_token_id=None)
    patch_model(model)
    plain = PagedKVCache(model, num_blocks=32, block_size=4)
    expected = generate(model, ids, mask, 7, past_key_values=plain, **beams)
    unpatch_model(model)

    patch_model(model, cuda_graphs=True)
    cache = PagedKVCache(model, num_blocks=32, block_size=4)
    got = generate(model, ids, mask, 7, past_key_values=cache, **beams)
    assert torch.equal(got, expected)
    assert cache.stats() == plain.stats()
    cache.allocator.check_invariants()
    if device == "cuda":
        assert graphed(model).captured_batch_sizes(cache) == [2 * 3]
    unpatch_model(model)


def test_batch_sizes_get_their_own_graph_and_a_new_prompt_reuses_nothing_stale(device):
    model = patch_model(tiny_llama().to(device), cuda_graphs=True)
    results = {}
    for batch in (2, 3, 2):
        ids, mask = left_padded_prompts([5, 3, 4][:batch], width=5, seed=batch)
        cache = PagedKVCache(model, max_batch_size=3, num_blocks=24, block_size=4)
        results.setdefault(batch, []).append(generate(model, ids, mask, 5, eos_token_id=None, past_key_values=cache))
        if device == "cuda":
            assert graphed(model).captured_batch_sizes(cache) == [batch]
    assert torch.equal(results[2][0], results[2][1])
    unpatch_model(model)
    patch_model(model)
    for batch in (2, 3):
        ids, mask = left_padded_prompts([5, 3, 4][:batch], width=5, seed=batch)
        cache = PagedKVCache(model, max_batch_size=3, num_blocks=24, block_size=4)
        assert torch.equal(generate(model, ids, mask, 5, eos_token_id=None, past_key_values=cache), results[batch][0])


def test_a_full_pool_in_a_graphed_step_leaves_the_cache_as_it_was(device):
    model = patch_model(tiny_llama().to(device), cuda_graphs=True)
    ids, mask = left_padded_prompts([4, 4], width=4, seed=7)
    cache = PagedKVCache(model, max_batch_size=2, num_blocks=4, block_size=4)  # 8 tokens a row
    with pytest.raises(CacheFullError):  # the fifth decode step writes a ninth token
        generate(model, ids, mask, 6, eos_token_id=None, past_key_values=cache)
    cache.allocator.check_invariants()
    assert {layer.seen for layer in cache.layers} == {8}  # the prompt and four decode steps
    assert cache.stats()["tokens"] == 2 * 8
    unpatch_model(model)


def test_other_calls_take_the_eager_forward(device):
    """Only plain decode steps over a PagedKVCache are graphed: the default cache, a prompt,
    output_attentions all go to the model's own forward."""
    model = patch_model(tiny_llama().to(device), cuda_graphs=True)
    ids, mask = left_padded_prompts([4, 2], width=4, seed=9)
    with mock.patch.object(graphed(model), "eager", wraps=graphed(model).eager) as eager:
        generate(model, ids, mask, 3, eos_token_id=None)  # DynamicCache
    assert eager.call_count == 3
    unpatch_model(model)


@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle"])
def test_copies_of_a_graphed_model_graph_on_their_own(copy_kind, device):
    import copy
    import pickle

    model = patch_model(tiny_llama().to(device), cuda_graphs=True)
    ids, mask = left_padded_prompts([5, 3], width=5, seed=11)
    expected = generate(model, ids, mask, 4, eos_token_id=None,
                        past_key_values=PagedKVCache(model, max_batch_size=2, num_blocks=16, block_size=4))
    twin = copy.deepcopy(model) if copy_kind == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert graphed(twin).model is twin and graphed(twin) is not graphed(model)
    cache = PagedKVCache(twin, max_batch_size=2, num_blocks=16, block_size=4)
    assert torch.equal(generate(twin, ids, mask, 4, eos_token_id=None, past_key_values=cache), expected)
    unpatch_model(twin)
    assert "forward" not in twin.__dict__
    assert isinstance(model.forward, GraphedDecodeForward)  # the original keeps its own
    unpatch_model(model)
