"""PagedKVCache used the wrong way: every mistake raises and says what to do, and a failed step
leaves the cache exactly as it was before the step, ready for reset() and a new prompt.

Tiny random Llama (two layers, fp32) as in test_cache_generate.py; pools of a few blocks so that
a prompt or a decode step runs out of them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from hf_attn_patch import patched
from hf_attn_patch.cache import CacheFullError, PagedKVCache
from hf_attn_patch.cache import paged as paged_module
from hf_attn_patch.cache.paged import CPU_POOL_BYTES, DEFAULT_MEMORY_FRACTION, default_pool_blocks

from .test_cache_generate import COMMON, generate, left_padded_prompts, tiny_falcon_multi_query, tiny_llama, tiny_mistral


def cache_state(cache: PagedKVCache) -> dict:
    """Everything a step can change: allocator, device tables, per-layer counts, step state."""
    def tensor(t):
        return None if t is None else t.cpu().clone()

    return {
        "allocator": copy.deepcopy(cache.allocator.__dict__),
        "block_table": tensor(cache.block_table),
        "seq_lens": tensor(cache.seq_lens),
        "seen": [layer.seen for layer in cache.layers],
        "pending": sorted(cache._pending_prompt),
        "pending_chunk": sorted(cache._pending_chunk),
        "unread": sorted(cache._unread),
        "active": list(cache._active),
        "step_slots": tensor(cache._step_slots),
        "table_columns": cache._table_columns,
    }


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[name] is not None and torch.equal(actual[name], value), name
        else:
            assert actual[name] == value, name


def tokens_with_fresh_cache(model, ids, mask, new_tokens, **cache_args):
    with patched(model):
        return generate(model, ids, mask, new_tokens, eos_token_id=None,
                        past_key_values=PagedKVCache(model, **cache_args))


# --- a failed step changes nothing ---------------------------------------------------------------


@pytest.mark.parametrize("rows", [2, None], ids=["max-batch-size", "batch-from-prompt"])
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_falcon_multi_query], ids=["llama", "falcon"])
def test_cache_full_in_the_prompt_leaves_the_cache_as_before(make_model, rows, device):
    """Issue 13: layer 0 used to count the prompt, layer 1 not, and the next prompt failed."""
    model = make_model().to(device)
    ids, mask = left_padded_prompts([40, 30], width=40)
    cache = PagedKVCache(model, max_batch_size=rows, num_blocks=8, block_size=4)
    before = cache_state(cache)
    with patched(model), pytest.raises(CacheFullError) as info:
        generate(model, ids, mask, 3, past_key_values=cache, eos_token_id=None)
    assert (info.value.blocks_needed, info.value.blocks_free) == (18, 8)
    assert_same_state(cache_state(cache), before)

    # Usable as it is, and after a reset, with the same tokens as a fresh cache.
    short_ids, short_mask = ids[:, -9:], mask[:, -9:]
    expected = tokens_with_fresh_cache(model, short_ids, short_mask, 4, num_blocks=8, block_size=4)
    for _ in range(2):
        with patched(model):
            got = generate(model, short_ids, short_mask, 4, past_key_values=cache, eos_token_id=None)
        assert torch.equal(got, expected)
        cache.reset()
    cache.allocator.check_invariants()


def test_cache_full_in_a_decode_step_leaves_the_cache_as_before(device):
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([8, 5], width=8)
    cache = PagedKVCache(model, max_batch_size=2, num_blocks=5, block_size=4)
    states = []  # the cache before every forward of generate
    handle = model.register_forward_pre_hook(lambda module, args: states.append(cache_state(cache)))
    try:
        with patched(model), pytest.raises(CacheFullError):
            generate(model, ids, mask, 10, past_key_values=cache, eos_token_id=None)
    finally:
        handle.remove()
    assert len(states) == 5  # the prompt and three steps fit; the fourth step did not
    assert_same_state(cache_state(cache), states[-1])

    cache.reset()
    expected = tokens_with_fresh_cache(model, ids, mask, 3, max_batch_size=2, num_blocks=5, block_size=4)
    with patched(model):
        assert torch.equal(generate(model, ids, mask, 3, past_key_values=cache, eos_token_id=None), expected)


def test_a_step_interrupted_in_a_later_layer_is_refused_until_reset(device):
    """An exception inside the model after layer 0 took its token: the next step says reset()."""
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([6, 4], width=6)
    cache = PagedKVCache(model, max_batch_size=2, num_blocks=8, block_size=4)
    calls = []

    def fail_at_the_second_decode_step(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = model.model.layers[0].mlp.register_forward_pre_hook(fail_at_the_second_decode_step)
    try:
        with patched(model), pytest.raises(KeyboardInterrupt):
            generate(model, ids, mask, 5, past_key_values=cache, eos_token_id=None)
    finally:
        handle.remove()
    step = torch.tensor([[5], [7]], device=model.device)
    with patched(model), pytest.raises(RuntimeError, match=r"stopped part-way.*reset\(\)"):
        model(input_ids=step, past_key_values=cache, use_cache=True)

    cache.reset()
    expected = tokens_with_fresh_cache(model, ids, mask, 5, max_batch_size=2, num_blocks=8, block_size=4)
    with patched(model):
        assert torch.equal(generate(model, ids, mask, 5, past_key_values=cache, eos_token_id=None), expected)


# --- a second prompt ------------------------------------------------------------------------------


def test_a_shorter_prompt_into_a_used_cache_says_reset_or_fresh_cache(device):
    """Issue 13: a shorter second prompt reached the model as zero tokens (a raw reshape error).
    The first generate leaves 6 + 3 = 9 positions in the cache; an input continues what a used
    cache holds (as with the default cache), so one of 4 positions brings nothing new."""
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([6, 4], width=6)
    cache = PagedKVCache(model, max_batch_size=2, num_blocks=8, block_size=4)
    with patched(model):
        generate(model, ids, mask, 4, past_key_values=cache, eos_token_id=None)
    before = cache_state(cache)
    second_ids, second_mask = left_padded_prompts([4, 2], width=4, seed=1)
    with patched(model), pytest.raises(ValueError, match=r"brings none beyond them.*cache\.reset\(\).*fresh"):
        generate(model, second_ids, second_mask, 2, past_key_values=cache, eos_token_id=None)
    assert_same_state(cache_state(cache), before)

    cache.reset()
    expected = tokens_with_fresh_cache(model, second_ids, second_mask, 2, num_blocks=8, block_size=4)
    with patched(model):
        got = generate(model, second_ids, second_mask, 2, past_key_values=cache, eos_token_id=None)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("width", [9, 12], ids=["as-long", "longer"])
def test_a_longer_input_into_a_used_cache_continues_it_as_the_default_cache_does(width, device):
    """An input at least as long as what the cache holds is taken as its continuation: its
    positions from the cache's length on are new (one at a time, or several in one step)."""
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([6, 4], width=6)
    second_ids, second_mask = left_padded_prompts([width, width - 2], width=width, seed=1)
    default = DynamicCache(config=model.config)
    generate(model, ids, mask, 4, past_key_values=default, eos_token_id=None)
    expected = generate(model, second_ids, second_mask, 2, past_key_values=default, eos_token_id=None)
    cache = PagedKVCache(model, max_batch_size=2, num_blocks=12, block_size=4)
    with patched(model):
        generate(model, ids, mask, 4, past_key_values=cache, eos_token_id=None)
        got = generate(model, second_ids, second_mask, 2, past_key_values=cache, eos_token_id=None)
    assert torch.equal(got, expected)
    cache.allocator.check_invariants()


def test_continuing_a_generation_with_its_own_output_still_works(device):
    """generate(output, cache) brings exactly one new token: that is a decode step, not a prompt."""
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([6, 4], width=6)
    expected = tokens_with_fresh_cache(model, ids, mask, 6, num_blocks=8, block_size=4)
    cache = PagedKVCache(model, num_blocks=8, block_size=4)
    with patched(model):
        first = generate(model, ids, mask, 3, past_key_values=cache, eos_token_id=None)
        first_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
        got = generate(model, first, first_mask, 3, past_key_values=cache, eos_token_id=None)
    assert torch.equal(got, expected)


def test_reset_inside_a_running_generate_is_refused(device, monkeypatch):
    """A reset from a stopping criterion would turn the next step into a one-token prompt. The
    cache tells by the step's positions, where transformers hands them to `update` (5.24 does;
    5.17 passes none, and there the test is skipped)."""
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([6, 4], width=6)
    cache = PagedKVCache(model, num_blocks=8, block_size=4)
    passed = []
    find_positions = paged_module.cache_update_positions
    monkeypatch.setattr(paged_module, "cache_update_positions",
                        lambda args, kwargs: passed.append(find_positions(args, kwargs)) or passed[-1])

    class ResetAfterTwoSteps:
        steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.steps += 1
            if self.steps == 2:
                cache.reset()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    try:
        with patched(model):
            generate(model, ids, mask, 5, past_key_values=cache, eos_token_id=None,
                     stopping_criteria=[ResetAfterTwoSteps()])
    except RuntimeError as error:
        assert "while a generation was running" in str(error) and "reset()" in str(error)
        assert cache.stats()["blocks_used"] == 0 and [layer.seen for layer in cache.layers] == [0, 0]
    else:
        assert all(p is None for p in passed), "positions were passed, yet the reset went unnoticed"
        pytest.skip("this transformers passes no positions to Cache.update: a reset inside generate is not seen")


# --- batch, rows, dtype, another model ------------------------------------------------------------


def test_batch_larger_than_max_batch_size_is_refused_before_any_change(device):
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([5, 4, 3], width=5)
    cache = PagedKVCache(model, max_batch_size=2, num_blocks=8, block_size=4)
    before = cache_state(cache)
    with patched(model), pytest.raises(ValueError, match="max_batch_size=2"):
        generate(model, ids, mask, 2, past_key_values=cache, eos_token_id=None)
    assert_same_state(cache_state(cache), before)


def test_batch_size_comes_from_the_first_prompt(device):
    model = tiny_llama().to(device)
    cache = PagedKVCache(model, num_blocks=16, block_size=4)
    assert cache.block_table is None and cache.batch_capacity is None
    for rows in (2, 1):
        ids, mask = left_padded_prompts([5, 4][:rows], width=5)
        expected = tokens_with_fresh_cache(model, ids, mask, 3, num_blocks=16, block_size=4)
        with patched(model):
            assert torch.equal(generate(model, ids, mask, 3, past_key_values=cache, eos_token_id=None), expected)
        assert cache.batch_capacity == 2 and cache.block_table.shape == (2, 16 * 4 // 4)  # max_seq_len: the pool
        cache.reset()
    ids, mask = left_padded_prompts([5, 4, 3], width=5)
    with patched(model), pytest.raises(ValueError, match=r"max_batch_size=2 \(given, or taken from its first prompt\)"):
        generate(model, ids, mask, 3, past_key_values=cache, eos_token_id=None)


def test_release_checks_its_rows_and_twice_frees_nothing(device):
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([8, 5], width=8)
    cache = PagedKVCache(model, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="no prompt yet"):
        cache.release([0])
    assert cache.release([]) == 0
    with patched(model):
        generate(model, ids, mask, 1, past_key_values=cache, eos_token_id=None)
    for bad, match in [([2], r"rows 0\.\.1"), ([-1], r"rows 0\.\.1"), ([True], "mask"),
                       (torch.tensor([True, False]), "mask"), ([0.0], "integer"), (["0"], "integer")]:
        before = cache_state(cache)
        with pytest.raises(ValueError, match=match):
            cache.release(bad)
        assert_same_state(cache_state(cache), before)
    assert cache.release(torch.tensor([1, 1])) == 2  # tensor rows, a duplicate
    assert cache.release([1]) == 0  # twice: nothing more
    assert cache.seq_lens.tolist() == [8, 0]
    cache.allocator.check_invariants()


def test_wrong_dtype_is_refused_before_any_change(device):
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([5, 4], width=5)
    cache = PagedKVCache(model, num_blocks=8, block_size=4, dtype=torch.bfloat16)
    before = cache_state(cache)
    with patched(model), pytest.raises(ValueError, match="model's dtype and device"):
        generate(model, ids, mask, 2, past_key_values=cache, eos_token_id=None)
    assert_same_state(cache_state(cache), before)


def test_cache_reused_with_another_model(device):
    """Built from one model, used by another (other KV heads, more or fewer layers, another
    window): refused at the prompt's first layer, before any block is taken."""
    ids, mask = left_padded_prompts([5, 4], width=5)
    for build_cache, config in [
        (tiny_llama, dict(num_key_value_heads=4)),
        (tiny_llama, dict(num_hidden_layers=3)),
        (tiny_llama, dict(num_hidden_layers=1)),
        (tiny_mistral, dict(sliding_window=8)),
    ]:
        cache = PagedKVCache(build_cache().to(device), num_blocks=8, block_size=4)  # on the device the other model runs on
        before = cache_state(cache)
        torch.manual_seed(0)
        kind = LlamaForCausalLM if build_cache is tiny_llama else MistralForCausalLM
        config_class = LlamaConfig if build_cache is tiny_llama else MistralConfig
        base = COMMON if build_cache is tiny_llama else {**COMMON, "sliding_window": 6}
        other = kind(config_class(**{**base, **config})).eval().to(device)
        with patched(other), pytest.raises(ValueError, match="build the cache from the model that uses it"):
            generate(other, ids, mask, 2, past_key_values=cache, eos_token_id=None)
        assert_same_state(cache_state(cache), before)


# --- construction ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    (dict(block_size=0), "block_size must be an integer >= 1"),
    (dict(block_size=-4), "block_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(block_size=True), "block_size"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(num_blocks=4.0), "num_blocks"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(max_batch_size="8"), "max_batch_size"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(num_blocks=4, max_tokens=64), "at most one"),
    (dict(max_tokens=64, memory_fraction=0.5), "at most one"),
    (dict(memory_fraction=0.0), r"memory_fraction must be a number in \(0, 1\]"),
    (dict(memory_fraction=1.5), "memory_fraction"),
    (dict(memory_fraction=0.5), "on cpu give num_blocks="),
    (dict(dtype=torch.float64), "dtype must be one the kernels support"),
    (dict(dtype=torch.int8), "dtype"),
    (dict(dtype="float16"), "dtype"),
    (dict(device="gpu"), "not a torch device"),
    (dict(device="meta"), "run on CUDA GPUs"),
])
def test_constructor_arguments_are_checked(arguments, message):
    with pytest.raises(ValueError, match=message):
        PagedKVCache(tiny_llama(), **arguments)


def test_constructor_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="takes the model"):
        PagedKVCache(42)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused():
    with pytest.raises(ValueError, match="CUDA is not available"):
        PagedKVCache(tiny_llama(), device="cuda", num_blocks=4)


# --- no sizes given ---------------------------------------------------------------------------------


def test_no_sizes_on_the_cpu_takes_the_fixed_pool_and_the_prompts_batch(device):
    if device != "cpu":
        pytest.skip("the CPU default")
    model = tiny_llama()
    cache = PagedKVCache(model)
    bytes_per_block = 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, block_size 16, KV heads, head dim, fp32
    assert cache.stats()["bytes_per_block"] == bytes_per_block
    assert cache.allocator.num_blocks == CPU_POOL_BYTES // bytes_per_block
    assert cache.block_table is None  # rows come with the first prompt

    ids, mask = left_padded_prompts([7, 3, 5], width=7)
    expected = generate(model, ids, mask, 4, eos_token_id=None)  # stock attention, default cache
    with patched(model):
        assert torch.equal(generate(model, ids, mask, 4, past_key_values=cache, eos_token_id=None), expected)
    assert cache.block_table.shape == (3, 128 // 16)  # max_position_embeddings / block_size
    assert cache.seq_lens.shape == (3,)


def test_gpu_default_is_a_fraction_of_free_memory(monkeypatch):
    """The GPU branch's arithmetic, with torch.cuda.mem_get_info made up."""
    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return 10 * 2**30, 80 * 2**30  # free, total

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    block = 2**20
    assert default_pool_blocks("cuda:1", block) == int(DEFAULT_MEMORY_FRACTION * 10 * 1024)
    assert asked == [torch.device("cuda", 1)]
    assert default_pool_blocks("cuda", block, memory_fraction=0.25) == 2560
    assert default_pool_blocks("cuda", 3 * 2**20 + 1, memory_fraction=0.9) == int(0.9 * 10 * 2**30) // (3 * 2**20 + 1)
    with pytest.raises(ValueError, match="holds no block"):
        default_pool_blocks("cuda", 2**40)
    assert default_pool_blocks("cpu", block) == CPU_POOL_BYTES // block


def test_gpu_default_through_the_constructor(monkeypatch):
    """The constructor's bytes per block and fraction reach the GPU sizing (pool made on the CPU)."""
    calls = []

    def sizing(device, bytes_per_block, memory_fraction=None):
        calls.append((bytes_per_block, memory_fraction))
        return 3

    monkeypatch.setattr(paged_module, "default_pool_blocks", sizing)
    cache = PagedKVCache(tiny_llama(), block_size=8)
    assert calls == [(2 * 2 * 8 * 2 * 16 * 4, None)] and cache.allocator.num_blocks == 3
    PagedKVCache(tiny_llama(), dtype=torch.float16, memory_fraction=0.3)
    assert calls[-1] == (2 * 2 * 16 * 2 * 16 * 2, 0.3)


def test_pool_too_small_is_still_cache_full_error(device):
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompts([7, 3], width=7)
    cache = PagedKVCache(model, max_tokens=8, block_size=4)
    with patched(model), pytest.raises(CacheFullError):
        generate(model, ids, mask, 2, past_key_values=cache, eos_token_id=None)
