"""Streaming generation: `PagedKVCache(model, window=W, sinks=S)` keeps the first S positions and
the last W, gives every other block back, and the patched attention sees exactly those.

* The bookkeeping alone (allocator, then the cache's own per-step host work) runs 100k+ tokens
  in a pool of `streaming_blocks(W, S, block_size)` blocks (S + W + one block here), and the
  pages still hold the right sink and window tokens at the end.
* A tiny patched Llama generates a few hundred tokens through such a cache; its logits equal the
  stock model's (transformers' own attention, not our kernels) run over the whole sequence with
  a mask that lets each query see the sinks and its window: an independent check.
* The `gpu` test streams 100k+ tokens through a patched Llama with CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_attn_patch import patch_model, patched, unpatch_model
from hf_attn_patch.cache import BlockAllocator, CacheFullError, PagedKVCache, streaming_blocks
from hf_attn_patch.cache.allocator import EVICTED
from hf_attn_patch.kernels.reference import attention_reference
from tests.helpers import relative_error

LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1)


def tiny_llama(device, **overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).eval().to(device)


def test_pool_size_is_sinks_plus_window_plus_one_block():
    assert streaming_blocks(window=16, sinks=4, block_size=4) == (4 + 16) // 4 + 1
    assert streaming_blocks(window=1024, sinks=0, block_size=16) == 1024 // 16 + 1
    assert streaming_blocks(window=10, sinks=3, block_size=4) == 1 + 3 + 1  # rounded up to blocks


# --- bookkeeping ------------------------------------------------------------------------------------


def test_allocator_streams_100k_tokens_in_a_bounded_pool():
    """One token a step for 100k steps, two sequences: never more than the bound held, the
    sinks' blocks never change, everything between sinks and window given back."""
    window, sinks, block_size = 24, 4, 4
    bound = streaming_blocks(window, sinks, block_size)
    allocator = BlockAllocator(num_blocks=2 * bound, block_size=block_size)  # raises CacheFullError past it
    allocator.extend({"a": 30, "b": 1}, window=window, sinks=sinks)  # a prompt longer than both
    sink_blocks = {s: allocator.block_table(s)[0] for s in ("a", "b")}
    for step in range(100_000):
        allocator.extend({"a": 1, "b": 1}, window=window, sinks=sinks)
        if step % 9973 == 0:
            allocator.check_invariants()
            assert all(len(allocator.blocks_of(s)) <= bound for s in ("a", "b"))
    assert allocator.peak_blocks_used == 2 * bound
    for seq in ("a", "b"):
        table, length = allocator.block_table(seq), allocator.length(seq)
        first_window_block = (length - window) // block_size
        assert table[0] == sink_blocks[seq]
        assert all(b == EVICTED for b in table[1:first_window_block])
        assert all(b != EVICTED for b in table[first_window_block:])


def _kv(positions: torch.Tensor, heads: int, head_dim: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the tokens at these positions: a fixed function of (layer, position), so the
    expected contents of any slot can be recomputed without keeping 100k tokens."""
    angle = positions.double()[:, None, None] * torch.linspace(0.01, 1.0, heads * head_dim).view(1, heads, head_dim)
    k = torch.sin(angle + layer).float()
    v = torch.cos(0.7 * angle - layer).float()
    return k, v


def test_cache_streams_100k_tokens_and_keeps_the_right_ones(device):
    """PagedKVCache driven as a model drives it: a prompt through update/attend, then 100k decode
    steps of the cache's own host bookkeeping (`begin_graph_step`, what a graphed step runs),
    then a real decode step through update/attend and the kernel, whose output must equal
    attention over the expected sinks and window. Writing every token through the interpreter
    would take minutes: the steps check instead that no new token is given a slot in the sinks'
    block, and the last window's tokens are written where the device block table says."""
    window, sinks, block_size, prompt = 32, 4, 8, 40
    config = LlamaConfig(**{**LLAMA, "max_position_embeddings": 200_000})
    bound = streaming_blocks(window, sinks, block_size)
    cache = PagedKVCache(config, num_blocks=bound, block_size=block_size, window=window, sinks=sinks,
                         max_batch_size=1, device=device)
    layers, heads, head_dim = 2, cache.shape.num_kv_heads, cache.shape.head_dim
    q_heads = LLAMA["num_attention_heads"]

    def kv(positions, layer):
        k, v = _kv(positions, heads, head_dim, layer)
        return k.to(device), v.to(device)

    # The prompt: longer than sinks + window, so its middle is never stored.
    for layer in range(layers):
        k, v = kv(torch.arange(prompt), layer)
        key, value = (t.transpose(0, 1)[None] for t in (k, v))  # (1, Hkv, N, D)
        cache.update(key, value, layer)
        assert cache.attend(layer, None, key, None, scale=None, window=None, alibi_slopes=None) is None
    sink_block = int(cache.block_table[0, 0])
    sink_pages = cache.k_pages[:, sink_block].clone()

    total = prompt + 100_000
    for position in range(prompt, total):
        cache.begin_graph_step(1)
        block = int(cache.block_table[0, position // block_size])
        assert block != sink_block and 0 <= block < bound
        if position >= total - window:  # the tokens the last step will see
            for layer in range(layers):
                k, v = kv(torch.tensor([position]), layer)
                cache.k_pages[layer, block, position % block_size] = k[0]
                cache.v_pages[layer, block, position % block_size] = v[0]
        cache.end_graph_step()
    stats = cache.stats()
    assert stats["blocks_peak"] == bound == stats["blocks_total"] and stats["tokens"] == total
    assert torch.equal(cache.k_pages[:, sink_block], sink_pages)
    cache.allocator.check_invariants()

    # One more token through the cache's update/attend and the paged kernel.
    generator = torch.Generator().manual_seed(0)
    visible = torch.cat([torch.arange(sinks), torch.arange(total + 1 - window, total + 1)])
    for layer in range(layers):
        k, v = kv(torch.tensor([total]), layer)
        key, value = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        cache.update(key, value, layer)
        query = torch.randn(1, q_heads, 1, head_dim, generator=generator).to(device)
        out = cache.attend(layer, query, key, None, scale=None, window=None, alibi_slopes=None)
        k_all, v_all = kv(visible, layer)
        expected = attention_reference(query, k_all.transpose(0, 1)[None], v_all.transpose(0, 1)[None])
        assert relative_error(out, expected) < 1e-5
        # Without the sinks the answer differs: the check can fail.
        assert relative_error(out, attention_reference(
            query, k_all[sinks:].transpose(0, 1)[None], v_all[sinks:].transpose(0, 1)[None])) > 1e-3


def test_cache_arguments_are_checked():
    config = LlamaConfig(**LLAMA)
    for arguments, message in [
        (dict(sinks=4), "sinks=4 needs a window"),
        (dict(window=0), "window must be an integer >= 1"),
        (dict(window=8, sinks=-1), "sinks must be an integer >= 0"),
        (dict(window=8.5), "window must be an integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            PagedKVCache(config, num_blocks=4, **arguments)
    assert PagedKVCache(config, num_blocks=4).stats()["blocks_per_sequence"] is None


def test_window_narrower_of_cache_and_model():
    """A Mistral-style sliding window and a cache window: the narrower applies, with the cache's sinks."""
    cache = PagedKVCache(LlamaConfig(**LLAMA), num_blocks=4, window=16, sinks=2)
    assert cache.attention_window(None) == (16, 2)
    assert cache.attention_window(8) == (8, 2)
    assert cache.attention_window(64) == (16, 2)
    assert PagedKVCache(LlamaConfig(**LLAMA), num_blocks=4).attention_window(8) == (8, 0)


# --- a patched model --------------------------------------------------------------------------------


def streaming_mask(length: int, window: int, sinks: int) -> torch.Tensor:
    """(1, 1, N, N) additive mask: query i sees key j <= i when i - j < window or j < sinks."""
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    visible = (key <= query) & ((query - key < window) | (key < sinks))
    return torch.zeros(length, length).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]


def stock_logits(model, tokens: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """The unpatched model over the whole sequence, its own attention restricted by a 4-D mask."""
    mask = streaming_mask(tokens.shape[1], window, sinks).to(tokens.device)
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits


def generate_streaming(model, prompt, new_tokens, *, window, sinks, block_size, cuda_graphs):
    """Greedy generation, patched, through a streaming cache of streaming_blocks(...) blocks:
    (generate's output with its logits, the cache)."""
    cache = PagedKVCache(model, num_blocks=streaming_blocks(window, sinks, block_size), block_size=block_size,
                         window=window, sinks=sinks, max_seq_len=prompt.shape[1] + new_tokens)
    patch_model(model, cuda_graphs=cuda_graphs)
    try:
        out = model.generate(input_ids=prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             past_key_values=cache, output_logits=True, return_dict_in_generate=True)
    finally:
        unpatch_model(model)
    return out, cache


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_patched_llama_streams_like_the_masked_stock_model(cuda_graphs, device):
    """Greedy generation through a streaming cache (W=16, S=4, blocks of 4, a pool of S + W + one
    block for one sequence) against the stock model run over the generated sequence with the
    window + sinks mask: same tokens, same logits at every step. The prompt is longer than S + W
    (its attention runs on flash_attention(window, sinks), its middle is never stored); the
    window slides over some 30 blocks. Sizes keep the interpreter's time down (~0.25 s a step)."""
    window, sinks, block_size, prompt_len = 16, 4, 4, 23
    new_tokens = 120 if not cuda_graphs else 40
    model = tiny_llama(device)
    prompt = torch.randint(2, LLAMA["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    out, cache = generate_streaming(model, prompt, new_tokens, window=window, sinks=sinks, block_size=block_size,
                                    cuda_graphs=cuda_graphs)
    tokens = out.sequences
    assert tokens.shape[1] == prompt_len + new_tokens
    got = torch.stack(out.logits, dim=1)  # (1, new_tokens, V)
    assert cache.stats()["blocks_peak"] == cache.stats()["blocks_total"]

    expected = stock_logits(model, tokens[:, :-1], window, sinks)[:, prompt_len - 1:]
    assert relative_error(got, expected) < 1e-4
    assert torch.equal(got.argmax(-1), tokens[:, prompt_len:])
    # The reference is discriminating: without the sinks (or with full attention) it differs.
    assert relative_error(got, stock_logits(model, tokens[:, :-1], window, 0)[:, prompt_len - 1:]) > 1e-3
    assert relative_error(got, stock_logits(model, tokens[:, :-1], 10**9, 0)[:, prompt_len - 1:]) > 1e-3


def test_a_continued_conversation_streams_like_the_masked_stock_model(device):
    """A second turn of several tokens through a streaming cache (W=8, S=3, blocks of 4): its
    attention reads the sinks and the window back from the pages. The second turn's generated
    logits, and those of a further 6-token step, against the stock model over the whole
    conversation with the window + sinks mask."""
    window, sinks, block_size = 8, 3, 4
    model = tiny_llama(device)
    generator = torch.Generator().manual_seed(2)
    prompt, more, step = (torch.randint(2, LLAMA["vocab_size"], (1, n), generator=generator).to(device)
                          for n in (13, 7, 5))
    cache = PagedKVCache(model, num_blocks=32, block_size=block_size, window=window, sinks=sinks, max_seq_len=64)
    settings = dict(do_sample=False, eos_token_id=None, past_key_values=cache)
    with patched(model):
        first = model.generate(input_ids=prompt, max_new_tokens=6, **settings)
        turn = torch.cat([first, more], 1)
        out = model.generate(input_ids=turn, max_new_tokens=5, output_logits=True, return_dict_in_generate=True,
                             **settings)
        tokens = out.sequences
        chunk = torch.cat([tokens[:, -1:], step], 1)  # the cache holds all but the last token
        chunk_logits = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits
    expected = stock_logits(model, tokens[:, :-1], window, sinks)[:, turn.shape[1] - 1:]
    assert relative_error(torch.stack(out.logits, dim=1), expected) < 1e-4
    everything = torch.cat([tokens, step], 1)
    assert relative_error(chunk_logits, stock_logits(model, everything, window, sinks)[:, -6:]) < 1e-4
    # The reference is discriminating: without the sinks it differs.
    assert relative_error(chunk_logits, stock_logits(model, everything, window, 0)[:, -6:]) > 1e-3
    cache.allocator.check_invariants()
    assert cache.stats()["blocks_used"] <= streaming_blocks(window, sinks, block_size) + -(-6 // block_size)


def test_pool_one_block_short_is_full(device):
    """The bound is tight: one block fewer than streaming_blocks and the stream stops."""
    window, sinks, block_size = 16, 4, 4
    model = tiny_llama(device)
    prompt = torch.randint(2, LLAMA["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(2)).to(device)
    cache = PagedKVCache(model, num_blocks=streaming_blocks(window, sinks, block_size) - 1,
                         block_size=block_size, window=window, sinks=sinks)
    with patched(model), pytest.raises(CacheFullError):
        model.generate(input_ids=prompt, max_new_tokens=30, do_sample=False, eos_token_id=None,
                       past_key_values=cache)


def test_padded_prompt_longer_than_the_window_with_sinks_is_refused(device):
    """The prompt's attention would put a padded row's sinks on its padding: refused, clearly,
    before any block is taken."""
    model = tiny_llama(device)
    ids = torch.randint(2, LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cache = PagedKVCache(model, num_blocks=16, block_size=4, window=8, sinks=2)
    with patched(model), pytest.raises(ValueError, match="prompt row 1 has 2 padding positions and 10 tokens"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       eos_token_id=None, past_key_values=cache)
    assert cache.stats()["blocks_used"] == 0


@pytest.mark.gpu
def test_gpu_patched_llama_streams_100k_tokens_in_a_bounded_pool(device):
    """100k+ greedy tokens with CUDA graphs in a pool of S + W + one block; at the end the last
    steps' logits match the stock model over the same tokens with the window + sinks mask."""
    window, sinks, block_size, new_tokens = 256, 4, 16, 100_000
    model = tiny_llama(device, max_position_embeddings=200_000)
    prompt = torch.randint(2, LLAMA["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(4)).to(device)
    out, cache = generate_streaming(model, prompt, new_tokens, window=window, sinks=sinks, block_size=block_size,
                                    cuda_graphs=True)
    tokens = out.sequences
    assert tokens.shape[1] == 8 + new_tokens
    stats = cache.stats()
    assert stats["blocks_peak"] == stats["blocks_total"] == streaming_blocks(window, sinks, block_size)

    # The last 64 steps against the masked stock model, over the tokens they depend on: the
    # sinks and, per layer, one window further back (a key's upper-layer K/V come from its own
    # window below). Their positions are kept, so RoPE sees the true distances.
    last = 64
    start = tokens.shape[1] - 1 - last - LLAMA["num_hidden_layers"] * window
    keep = torch.cat([torch.arange(sinks), torch.arange(start, tokens.shape[1] - 1)])
    positions = keep[None].to(device)
    length = keep.numel()
    query = positions[0, :, None]
    key = positions[0, None, :]
    visible = (key <= query) & ((query - key < window) | (key < sinks))
    mask = torch.zeros(length, length, device=device).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = model(input_ids=tokens[:, keep.to(device)], position_ids=positions,
                         attention_mask=mask[None, None]).logits[:, -last:]
    got = torch.stack(out.logits[-last:], dim=1)
    assert relative_error(got, expected) < 1e-3
    assert torch.equal(got.argmax(-1), tokens[:, -last:])
