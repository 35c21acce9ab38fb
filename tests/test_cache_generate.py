"""PagedKVCache inside `generate`: same tokens as the default cache, and the block accounting.

Tiny random models (two layers, fp32) keep the interpreter fast; prompts are left-padded so
that padding, windows shorter than the sequences and sequences ending early all occur.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    DynamicCache,
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from hf_attn_patch import patched
from hf_attn_patch.cache import CacheFullError, PagedKVCache
from hf_attn_patch.cache.paged import KVShape

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, eos_token_id=1)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**COMMON)).eval()


def tiny_mistral(window=6):
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=window)).eval()


FALCON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, pad_token_id=0, eos_token_id=1)


def tiny_falcon_multi_query():  # Falcon-7B layout: rotary, one K/V head
    torch.manual_seed(0)
    return FalconForCausalLM(FalconConfig(**FALCON, multi_query=True, parallel_attn=True, bias=False)).eval()


def tiny_falcon_grouped():  # Falcon-40B layout: rotary, grouped K/V
    torch.manual_seed(0)
    return FalconForCausalLM(FalconConfig(**FALCON, new_decoder_architecture=True, num_kv_heads=2,
                                          parallel_attn=True, bias=False)).eval()


def tiny_falcon_alibi():  # Falcon-RW layout: ALiBi, one K/V head per query head
    torch.manual_seed(0)
    return FalconForCausalLM(FalconConfig(**FALCON, alibi=True, multi_query=False, parallel_attn=False,
                                          bias=True)).eval()


def left_padded_prompts(lengths, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, COMMON["vocab_size"], (len(lengths), width), generator=generator)
    mask = (torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def generate(model, ids, mask, new_tokens, **kwargs):
    """Greedy generate on the model's device; the tokens come back on the CPU."""
    ids, mask = ids.to(model.device), mask.to(model.device)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                          do_sample=False, **kwargs).cpu()


MODELS = [
    pytest.param(tiny_llama, id="llama"),
    pytest.param(tiny_mistral, id="mistral-window"),
    pytest.param(tiny_falcon_multi_query, id="falcon-multi-query"),
    pytest.param(tiny_falcon_grouped, id="falcon-grouped"),
    pytest.param(tiny_falcon_alibi, id="falcon-alibi"),
]


@pytest.mark.parametrize("make_model", MODELS)
def test_same_tokens_as_default_cache(make_model, device):
    model = make_model().to(device)
    ids, mask = left_padded_prompts([7, 3, 5], width=7)
    expected = generate(model, ids, mask, 8, eos_token_id=None)  # stock attention, default cache
    cache = PagedKVCache(model, max_batch_size=4, num_blocks=16, block_size=4)
    with patched(model):
        got = generate(model, ids, mask, 8, eos_token_id=None, past_key_values=cache)
    assert torch.equal(got, expected)

    stats = cache.stats()
    lengths = [7 + 7, 3 + 7, 5 + 7]  # prompt + generated tokens written (the last is not)
    window = getattr(model.config, "sliding_window", None)
    if window is None:  # every token held; whole blocks only; no padding stored
        assert stats["blocks_used"] == sum(-(-n // 4) for n in lengths)
    else:  # only the blocks the window still sees are held
        assert stats["blocks_used"] <= len(lengths) * (-(-window // 4) + 1)
    assert stats["tokens"] == sum(lengths)
    cache.allocator.check_invariants()


def test_left_padding_takes_no_pages(device):
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([9, 1, 4], width=9)
    cache = PagedKVCache(model, max_batch_size=3, num_blocks=8, block_size=4)
    with patched(model):
        generate(model, ids, mask, 1, past_key_values=cache, eos_token_id=None)  # the prompt only
    assert [len(cache.allocator.blocks_of(row)) for row in range(3)] == [3, 1, 1]
    assert cache.stats()["tokens"] == 9 + 1 + 4


def test_finished_sequences_give_blocks_back(device):
    """Rows that emit EOS at different steps release their blocks at that step; the tokens
    match the default cache with the same EOS."""
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([6, 4, 5], width=6, seed=1)
    free_run = generate(model, ids, mask, 8, eos_token_id=None)[:, 6:]
    # EOS = row 0's third token: row 0 ends at step 3, the others later (or never).
    eos = int(free_run[0, 2])
    expected = generate(model, ids, mask, 8, eos_token_id=eos, pad_token_id=0)
    finished_at = [next((i for i, t in enumerate(row.tolist()) if t == eos), None) for row in free_run]
    assert len(set(finished_at)) > 1, "the test needs rows finishing at different steps"

    cache = PagedKVCache(model, max_batch_size=3, num_blocks=20, block_size=2)
    seen = []

    class Watch:  # records the cache's blocks after every step, after the release
        def __call__(self, input_ids, scores, **kwargs):
            seen.append([len(cache.allocator.blocks_of(r)) for r in range(3)])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    with patched(model):
        got = generate(model, ids, mask, 8, eos_token_id=eos, pad_token_id=0, past_key_values=cache,
                       stopping_criteria=[cache.release_finished(eos), Watch()])
    assert torch.equal(got, expected)
    for row, step in enumerate(finished_at):
        if step is not None:  # from the step it emitted EOS on, the row holds nothing
            assert all(blocks[row] == 0 for blocks in seen[step:]), (row, seen)
            assert seen[step - 1][row] > 0 if step > 0 else True
    cache.allocator.check_invariants()
    assert cache.stats()["blocks_used"] == sum(seen[-1])


@pytest.mark.parametrize("make_model", MODELS)
def test_beam_search_same_tokens_as_default_cache_with_shared_blocks(make_model, device):
    """Beam search reorders the paged cache's block tables instead of copying K/V: the beams
    share their common blocks, and the tokens are the default cache's."""
    model = make_model().to(device)
    ids, mask = left_padded_prompts([7, 3], width=7, seed=2)
    beams = dict(num_beams=3, num_return_sequences=2, eos_token_id=None)
    expected = generate(model, ids, mask, 8, **beams)  # stock attention, default cache
    cache = PagedKVCache(model, num_blocks=40, block_size=4)
    reorders, shared = [], []
    original = cache.allocator.reorder

    def watch(sources):  # the blocks held after each reorder, against one copy per beam
        freed = original(sources)
        rows = cache.allocator.sequences()
        reorders.append((cache.stats()["blocks_used"], sum(len(cache.allocator.blocks_of(r)) for r in rows)))
        shared.append(cache.stats()["blocks_shared"])
        return freed

    cache.allocator.reorder = watch
    with patched(model):
        got = generate(model, ids, mask, 8, past_key_values=cache, **beams)
    assert torch.equal(got, expected)
    # The prompt's repeats (one per beam) share its blocks, then generate reorders the beams
    # after the prompt and after each decode step but the last.
    assert len(reorders) == 1 + 8
    assert reorders[0] == (2 + 1, 3 * (2 + 1))  # prompts of 7 and 3 tokens, stored once each
    assert shared[0] == 2 + 1 and all(n > 0 for n in shared)
    assert all(held < unshared for held, unshared in reorders)
    assert cache.stats()["blocks_peak"] < 3 * sum(-(-n // 4) for n in (7 + 8, 3 + 8))
    cache.allocator.check_invariants()


def test_repeated_prompts_share_their_blocks_when_sampling(device):
    """num_return_sequences repeats each prompt: the repeats hold no blocks of their own until
    they write, and sampling gives the default cache's tokens for the same seed."""
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([6, 2], width=6, seed=6)
    ids, mask = ids.to(device), mask.to(device)

    def sample(**kwargs):
        torch.manual_seed(1)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True,
                              num_return_sequences=3, eos_token_id=None, **kwargs).cpu()

    expected = sample()
    cache = PagedKVCache(model, num_blocks=40, block_size=4)
    with patched(model):
        got = sample(past_key_values=cache)
    assert torch.equal(got, expected)
    assert len({tuple(row) for row in got[:3, 6:].tolist()}) > 1, "the samples should differ"
    # Rows hold 6 + 4 and 2 + 4 tokens. The first prompt's full block stays shared by its three
    # rows; every block a row wrote into is its own (copied where it was shared).
    tables = [cache.allocator.block_table(row) for row in range(6)]
    assert len({table[0] for table in tables[:3]}) == 1 and len({table[0] for table in tables[3:]}) == 3
    assert cache.stats()["blocks_used"] == (1 + 3 + 3) + (3 + 3)
    cache.allocator.check_invariants()


def test_beam_search_reorder_checks_and_release_finished_refuses_beams(device):
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([5, 4], width=5)
    cache = PagedKVCache(model, num_blocks=16, block_size=4)
    cache.reorder_cache(torch.tensor([0, 0]))  # no prompt yet: nothing to reorder
    with patched(model):
        generate(model, ids, mask, 1, past_key_values=cache, eos_token_id=None)
    with pytest.raises(ValueError, match="3 beam indices for a batch of 2"):
        cache.reorder_cache(torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="row 2 is not in the current batch"):
        cache.reorder_cache(torch.tensor([0, 2]))
    cache.allocator.check_invariants()
    cache.release([1])
    cache.reorder_cache(torch.tensor([1, 0]))  # row 0 goes on as the released row: it ends
    assert cache.allocator.sequences() == [1] and cache.seq_lens.tolist() == [0, 5]
    cache.allocator.check_invariants()

    cache = PagedKVCache(model, num_blocks=16, block_size=4)
    with patched(model), pytest.raises(ValueError, match="it is for num_beams=1"):
        generate(model, ids, mask, 3, past_key_values=cache, num_beams=2, eos_token_id=1,
                 stopping_criteria=[cache.release_finished()])


@pytest.mark.parametrize("at_once", [2**24, 40], ids=["one-pass", "span-by-span"])
def test_repeated_rows_are_found_by_padding_and_first_layer_kv(at_once, monkeypatch):
    from hf_attn_patch.cache import paged

    monkeypatch.setattr(paged, "_COMPARED_AT_ONCE", at_once)
    key, value = torch.randn(5, 2, 30, 8), torch.randn(5, 2, 30, 8)
    for t in (key, value):
        t[1], t[2], t[4] = t[0], t[0], t[3]
    real = torch.ones(5, 30, dtype=torch.bool)
    assert paged._repeats_previous_row(key, value, real).tolist() == [False, True, True, False, True]
    value[2, 1, 29, 7] += 1e-6  # the last element of the last span
    real[4, 0] = False  # another padding
    assert paged._repeats_previous_row(key, value, real).tolist() == [False, True, False, False, False]


# --- steps of several new tokens: a continued conversation, assisted decoding -----------------------


@pytest.mark.parametrize("make_model", MODELS)
def test_a_continued_conversation_matches_the_default_cache(make_model, device):
    """A second turn appends several tokens to every row in one step: the cache stores them and
    attends over its pages. Tokens, and the logits of a further step of 5 tokens (longer than
    the Mistral window's reach into the cache would allow to skip), match the default cache."""
    model = make_model().to(device)
    ids, mask = left_padded_prompts([7, 3], width=7)
    more = torch.randint(2, COMMON["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))

    def two_turns(cache):
        first = generate(model, ids, mask, 4, eos_token_id=None, past_key_values=cache)
        turn = torch.cat([first, more], 1)
        turn_mask = torch.cat([mask, torch.ones(2, turn.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        second = generate(model, turn, turn_mask, 3, eos_token_id=None, past_key_values=cache)
        # One more step of 5 tokens, as a bare forward: its logits, not only the argmax.
        step = torch.randint(2, COMMON["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(2))
        full_mask = torch.ones(2, cache.get_seq_length() + 5, dtype=mask.dtype)
        full_mask[:, :mask.shape[1]] = mask
        logits = model(input_ids=step.to(device), attention_mask=full_mask.to(device), past_key_values=cache,
                       use_cache=True).logits
        return second, logits.float().cpu()

    expected, expected_logits = two_turns(DynamicCache(config=model.config))
    cache = PagedKVCache(model, num_blocks=32, block_size=4)
    with patched(model):
        got, logits = two_turns(cache)
    assert torch.equal(got, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == (7 + 4) + 6 + 2 + 5  # prompt, turn 1, more, turn 2 (written), step
    cache.allocator.check_invariants()


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_mistral], ids=["llama", "mistral-window"])
def test_assisted_decoding_gives_the_greedy_tokens(make_model, device):
    """Assisted decoding verifies an assistant's candidates in one step of several tokens and
    crops the rejected ones: the tokens are plain greedy decoding's."""
    model = make_model().to(device)
    torch.manual_seed(5)
    assistant = LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_hidden_layers": 1})).eval().to(device)
    ids, mask = left_padded_prompts([7], width=7)
    expected = generate(model, ids, mask, 14, eos_token_id=None)  # stock attention, default cache
    cache = PagedKVCache(model, num_blocks=32, block_size=4)
    crops = []
    original = cache.crop
    cache.crop = lambda n: (crops.append(n), original(n))[1]
    with patched(model):
        got = generate(model, ids, mask, 14, eos_token_id=None, past_key_values=cache, assistant_model=assistant)
    assert torch.equal(got, expected)
    assert any(n < 0 for n in crops), "the assistant's candidates should be rejected at times"
    assert cache.get_seq_length() == 7 + 13
    held = 7 + 13 if getattr(model.config, "sliding_window", None) is None else None
    if held is not None:  # rolled-back tokens hold no blocks
        assert cache.stats()["blocks_used"] == -(-held // 4)
    cache.allocator.check_invariants()


def test_steps_of_several_tokens_that_are_refused_change_nothing(device):
    model = tiny_llama().to(device)
    short_ids, short_mask = left_padded_prompts([5, 1], width=5)
    cache = PagedKVCache(model, window=8, sinks=3, num_blocks=16, block_size=4)
    with patched(model):
        generate(model, short_ids, short_mask, 2, past_key_values=cache, eos_token_id=None)
        seen = cache.get_seq_length()
        step = torch.randint(2, COMMON["vocab_size"], (2, 3), device=device)
        full_mask = torch.cat([short_mask.to(device), torch.ones(2, seen - 5 + 3, dtype=torch.long, device=device)], 1)
        with pytest.raises(NotImplementedError, match="row 1 holds 2 tokens, fewer than the sinks"):
            model(input_ids=step, attention_mask=full_mask, past_key_values=cache, use_cache=True)
    assert {layer.seen for layer in cache.layers} == {seen}

    ids, mask = left_padded_prompts([5, 4], width=5)
    full_mask = torch.cat([mask.to(device), torch.ones(2, seen - 5 + 3, dtype=mask.dtype, device=device)], 1)
    cache = PagedKVCache(model, num_blocks=16, block_size=4)
    with patched(model):
        generate(model, ids, mask, 2, past_key_values=cache, eos_token_id=None)
        before = copy.deepcopy(cache.allocator.__dict__)
        full_mask[1, -2] = 0  # padding after a new token of row 1
        with pytest.raises(ValueError, match="padding after a row's new tokens"):
            model(input_ids=step, attention_mask=full_mask, past_key_values=cache, use_cache=True)
        assert cache.allocator.__dict__ == before and {layer.seen for layer in cache.layers} == {seen}
        full_mask[1, -2] = 1  # the cache is usable as it is
        model(input_ids=step, attention_mask=full_mask, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == seen + 3
    before = copy.deepcopy(cache.allocator.__dict__)
    with pytest.raises(ValueError, match=r"crop\(-10\) removes 10 positions; the cache holds 9"):
        cache.crop(-10)
    with pytest.raises(ValueError, match="would remove padding positions"):  # row 1 holds 4 + 1 + 3
        cache.crop(-9)
    assert cache.allocator.__dict__ == before and cache.get_seq_length() == seen + 3
    cache.crop(-3)
    assert cache.get_seq_length() == seen and cache.allocator.length(0) == 5 + 1


def test_cache_full_error_leaves_the_cache_consistent(device):
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([8, 5], width=8)
    cache = PagedKVCache(model, max_batch_size=2, num_blocks=5, block_size=4)
    # Prompt: 2 + 2 blocks. Step 1 takes the last block (row 0's token 8); step 4 needs one
    # more for row 1's token 8 and fails.
    with patched(model), pytest.raises(CacheFullError) as info:
        generate(model, ids, mask, 10, past_key_values=cache, eos_token_id=None)
    error = info.value
    assert (error.blocks_needed, error.blocks_free, error.blocks_total) == (1, 0, 5)
    cache.allocator.check_invariants()
    assert cache.stats()["tokens"] == 8 + 5 + 3 * 2  # the step that did not fit left no trace
    cache.reset()
    assert cache.stats()["blocks_used"] == 0
    with patched(model):  # a reset cache serves a new prompt
        generate(model, ids[:1], mask[:1], 2, past_key_values=cache, eos_token_id=None)


def test_unpatched_model_is_refused(device):
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([3], width=3)
    cache = PagedKVCache(model, max_batch_size=1, num_blocks=4, block_size=4)
    with pytest.raises(RuntimeError, match="patch_model"):
        generate(model, ids, mask, 3, past_key_values=cache, eos_token_id=None)


def test_shapes_from_configs():
    from transformers import FalconConfig

    assert KVShape.from_config(LlamaConfig(**COMMON)) == KVShape(2, 2, 16, None)
    assert KVShape.from_config(MistralConfig(**COMMON, sliding_window=6)) == KVShape(2, 2, 16, 6)
    falcon = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    assert KVShape.from_config(FalconConfig(**falcon, multi_query=True)).num_kv_heads == 1
    assert KVShape.from_config(FalconConfig(**falcon, multi_query=False)).num_kv_heads == 4
    grouped = FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=2)
    assert KVShape.from_config(grouped).num_kv_heads == 2


def test_pool_size_and_stats():
    model = tiny_llama()
    cache = PagedKVCache(model, max_batch_size=2, max_tokens=100, block_size=16)
    stats = cache.stats()
    assert stats["blocks_total"] == 7 and stats["blocks_free"] == 7
    assert stats["bytes_per_block"] == 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, slots, heads, dim, fp32
    assert cache.k_pages.shape == (2, 7, 16, 2, 16)
    with pytest.raises(ValueError, match="at most one"):
        PagedKVCache(model, max_batch_size=2, num_blocks=7, max_tokens=100)
