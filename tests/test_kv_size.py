"""`hf-attn-patch kv-size` (issue 16): KV bytes, fit and decode bound, checked by hand and
against what PagedKVCache allocates.

Configs are the public shapes of real models, written with transformers' config classes; no
weights are loaded (the weight estimate builds the model on the meta device). Every expected
figure is computed in the test from the formula

    K/V bytes per token = 2 (K and V) x layers x KV heads x head dim x bytes per element
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, FalconConfig, LlamaConfig, MistralConfig

from hf_attn_patch import cli, kv_size
from hf_attn_patch.cache import PagedKVCache
from hf_attn_patch.kv_size import GPU, kv_size_report

GiB = 2**30
H100 = {"gpu_memory_gib": 80, "bandwidth_tb_s": 3.35}  # the assumed GPU, given explicitly

# Public config numbers of the models named.
LLAMA_3_8B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, intermediate_size=14336, max_position_embeddings=8192,
    tie_word_embeddings=False, torch_dtype="bfloat16",
)
MISTRAL_7B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=32000, intermediate_size=14336, max_position_embeddings=32768, sliding_window=4096,
)
FALCON_7B = dict(  # rotary, multi-query: one KV head
    hidden_size=4544, num_hidden_layers=32, num_attention_heads=71, vocab_size=65024,
    multi_query=True, parallel_attn=True, new_decoder_architecture=False, alibi=False,
)
FALCON_40B = dict(  # new_decoder_architecture: grouped, num_kv_heads
    hidden_size=8192, num_hidden_layers=60, num_attention_heads=128, num_kv_heads=8, vocab_size=65024,
    new_decoder_architecture=True, multi_query=False, parallel_attn=True, alibi=False,
)
FALCON_RW_1B = dict(  # ALiBi, multi-head: every head has K/V; attention then MLP (sequential)
    hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, vocab_size=50304,
    multi_query=False, parallel_attn=False, new_decoder_architecture=False, alibi=True, bias=True,
)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def _save(tmp_path: Path, config_class, fields: dict, name: str = "model") -> Path:
    folder = tmp_path / name
    config_class(**fields).save_pretrained(folder)
    return folder


def _row(report, kv_heads):
    return next(v for v in report.variants if v.kv_heads == kv_heads)


# --- hand-computed figures ------------------------------------------------------------------------


def test_llama_3_8b_by_hand(tmp_path):
    report = kv_size_report(_save(tmp_path, LlamaConfig, LLAMA_3_8B), **H100)
    assert (report.dtype, report.batch, report.seq) == ("bf16", 1, 8192)  # torch_dtype, default, max positions
    assert [v.kv_heads for v in report.variants] == [8, 4, 2, 1]
    as_is = _row(report, 8)
    assert as_is.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072  # 128 KiB
    assert as_is.kv_bytes == 8192 * 131_072 == GiB

    # embeddings and the untied lm_head: 2 x 128256 x 4096; per layer q and o 4096 x 4096 each,
    # k and v 4096 x 1024 each, the MLP 3 x 4096 x 14336, two RMSNorms of 4096; a final norm.
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    parameters = 2 * 128256 * 4096 + 32 * per_layer + 4096
    assert parameters == 8_030_261_248 == report.weights.parameters  # "8B"
    weights = parameters * 2
    assert as_is.weight_bytes == report.weights.bytes == weights == 16_060_522_496
    assert "estimated" in report.weights.source

    room = 80 * GiB - weights  # 69,838,823,424 bytes beside the weights
    assert as_is.max_tokens == room // 131_072 == 532_827
    assert as_is.max_batch == 532_827 // 8192 == 65
    assert as_is.max_seq == 532_827  # batch 1
    assert as_is.fits
    assert as_is.decode_step_s == pytest.approx((weights + GiB) / 3.35e12)  # 5.115 ms
    assert as_is.tokens_per_s == pytest.approx(1 / as_is.decode_step_s)

    gqa4 = _row(report, 4)
    assert gqa4.kv_bytes_per_token == 2 * 32 * 4 * 128 * 2 == 65_536
    # Converting 8 -> 4 KV heads drops 4 heads' rows of k_proj and v_proj in every layer.
    assert gqa4.weight_bytes == weights - 32 * 2 * (8 - 4) * 128 * 4096 * 2
    mqa = _row(report, 1)
    assert (mqa.label, mqa.kv_bytes_per_token) == ("MQA", 2 * 32 * 1 * 128 * 2)


def test_mistral_window_stops_the_growth(tmp_path):
    folder = _save(tmp_path, MistralConfig, MISTRAL_7B)
    report = kv_size_report(folder, batch=2, **H100)
    assert report.seq == 32768 and report.shape.sliding_window == 4096
    as_is = _row(report, 8)
    assert as_is.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    # Each sequence keeps 4096 tokens of K/V, not 32768: 2 x 4096 x 128 KiB = 1 GiB.
    assert report.tokens_held == 4096 and as_is.kv_bytes == 2 * 4096 * 131_072 == GiB
    assert as_is.max_seq is None  # two windows fit: any length does
    assert as_is.max_batch == as_is.max_tokens // 4096
    assert any("sliding window 4,096" in note for note in report.notes)

    shorter = kv_size_report(folder, batch=2, seq=1000, **H100)
    assert _row(shorter, 8).kv_bytes == 2 * 1000 * 131_072  # below the window: what is there

    # A window larger than what fits: the longest sequence is what the memory holds.
    small = kv_size_report(folder, batch=2, gpu_memory_gib=14, bandwidth_tb_s=1)  # 13.49 GiB of weights
    row = _row(small, 8)
    assert row.max_tokens < 2 * 4096 and row.max_seq == row.max_tokens // 2


def test_long_context_default_is_capped_and_says_so(tmp_path):
    report = kv_size_report(_save(tmp_path, MistralConfig, {**MISTRAL_7B, "max_position_embeddings": 131072}), **H100)
    assert report.seq == kv_size.SEQ_CAP == 32768
    assert any("131,072" in note and "capped" in note for note in report.notes)


@pytest.mark.parametrize(
    "fields, kv_heads, per_token, choices",
    [
        (FALCON_7B, 1, 2 * 32 * 1 * 64 * 2, [1]),  # 71 query heads of 4544 / 71 = 64, one K/V head
        (FALCON_40B, 8, 2 * 60 * 8 * 64 * 2, [8, 4, 2, 1]),  # 128 heads of 64, 8 groups
        (FALCON_RW_1B, 32, 2 * 24 * 32 * 64 * 2, [32, 1]),  # 32 heads of 64; convert offers MQA only
        ({**FALCON_RW_1B, "parallel_attn": True}, 32, 2 * 24 * 32 * 64 * 2, [32, 8, 4, 2, 1]),
    ],
    ids=["rotary-multi-query", "new-decoder-architecture", "alibi-multi-head", "multi-head-parallel"],
)
def test_falcon_layouts_by_hand(tmp_path, fields, kv_heads, per_token, choices):
    report = kv_size_report(_save(tmp_path, FalconConfig, fields), seq=2048, **H100)
    assert report.shape.num_kv_heads == kv_heads
    assert [v.kv_heads for v in report.variants] == choices
    assert _row(report, kv_heads).kv_bytes_per_token == per_token
    assert _row(report, kv_heads).kv_bytes == 2048 * per_token
    if choices == [32, 1]:
        assert any("parallel_attn=False" in note for note in report.notes)


def test_falcon_conversion_shrinks_the_fused_projection(tmp_path):
    report = kv_size_report(_save(tmp_path, FalconConfig, FALCON_RW_1B), **H100)
    # query_key_value loses 31 K and 31 V heads of 64 rows, each row 2048 weights + a bias.
    removed = 24 * 2 * 31 * 64 * (2048 + 1)
    assert _row(report, 1).weight_bytes == _row(report, 32).weight_bytes - removed * 2


def test_bert_has_no_kv_cache(tmp_path):
    report = kv_size_report(_save(tmp_path, BertConfig, BERT_BASE), batch=8)
    assert report.encoder and report.gpu is None
    assert report.seq == 512 and report.dtype == "bf16"  # max positions; the config names no dtype
    assert [v.kv_heads for v in report.variants] == [12, 6, 4, 3, 2, 1]
    as_is = _row(report, 12)
    assert as_is.kv_bytes_per_token == 2 * 12 * 12 * 64 * 2 == 36_864
    assert as_is.kv_bytes == 8 * 512 * 36_864  # what one forward pass computes: 144 MiB
    assert (as_is.fits, as_is.max_tokens, as_is.decode_step_s) == (None, None, None)
    # GQA-4 BERT: key and value (768 x 768 + bias each) keep 4 of 12 heads.
    removed = 12 * 2 * 8 * 64 * (768 + 1)
    assert _row(report, 4).weight_bytes == as_is.weight_bytes - removed * 2
    assert any("no KV cache" in note for note in report.notes)
    # The converted config (what `convert --kv-heads 4` writes) is estimated the same.
    converted = kv_size_report(_save(tmp_path, BertConfig, {**BERT_BASE, "num_key_value_heads": 4}, "gqa4"))
    assert converted.weights.bytes == _row(report, 4).weight_bytes
    assert converted.variants[0].kv_bytes_per_token == 2 * 12 * 4 * 64 * 2


def test_dtype_flag_and_aliases(tmp_path):
    folder = _save(tmp_path, LlamaConfig, LLAMA_3_8B)
    fp32 = kv_size_report(folder, dtype="float32", **H100)
    assert fp32.dtype == "fp32" and _row(fp32, 8).kv_bytes_per_token == 2 * 32 * 8 * 128 * 4
    assert fp32.weights.bytes == 8_030_261_248 * 4


# --- against PagedKVCache and against transformers ----------------------------------------------


@pytest.mark.parametrize(
    "config_class, fields, converted",
    [
        (LlamaConfig, LLAMA_3_8B, lambda g: {"num_key_value_heads": g}),
        (MistralConfig, MISTRAL_7B, lambda g: {"num_key_value_heads": g}),
        (FalconConfig, FALCON_7B, None),
        (FalconConfig, FALCON_40B, lambda g: {"num_kv_heads": g}),
        (FalconConfig, {**FALCON_RW_1B, "parallel_attn": True},
         lambda g: {"multi_query": True} if g == 1 else
         {"new_decoder_architecture": True, "num_kv_heads": g, "num_ln_in_parallel_attn": 1}),
        (BertConfig, BERT_BASE, None),
    ],
    ids=["llama", "mistral", "falcon-multi-query", "falcon-grouped", "falcon-multi-head", "bert"],
)
def test_bytes_per_token_match_what_paged_cache_allocates(tmp_path, config_class, fields, converted):
    report = kv_size_report(_save(tmp_path, config_class, fields), seq=64, **H100)
    for variant in report.variants:
        if variant.label != "as is" and converted is None:
            continue
        config = config_class(**{**fields, **({} if variant.label == "as is" else converted(variant.kv_heads))})
        cache = PagedKVCache(config, num_blocks=1, block_size=16, dtype=torch.bfloat16, device="cpu")
        assert cache.stats()["bytes_per_block"] // 16 == variant.kv_bytes_per_token, variant.label
        assert (cache.k_pages.nbytes + cache.v_pages.nbytes) // 16 == variant.kv_bytes_per_token


def test_converted_weights_match_the_converted_config(tmp_path):
    """The weights of a conversion row equal those of the converted model built by transformers."""
    report = kv_size_report(_save(tmp_path, LlamaConfig, LLAMA_3_8B), **H100)
    converted = kv_size_report(_save(tmp_path, LlamaConfig, {**LLAMA_3_8B, "num_key_value_heads": 2}, "gqa2"), **H100)
    assert _row(report, 2).weight_bytes == converted.weights.bytes


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True),
        FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, bias=True),
        BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128),
    ],
    ids=["llama-tied", "falcon", "bert"],
)
def test_weights_from_safetensors_headers_and_the_estimate_agree(tmp_path, config):
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    model = (AutoModel if config.model_type == "bert" else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(tmp_path / "ckpt")  # float32 safetensors
    stored = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    unique = sum(p.numel() for p in model.parameters())

    from_headers = kv_size_report(tmp_path / "ckpt", dtype="bf16", **H100)
    assert "safetensors headers" in from_headers.weights.source and "F32" in from_headers.weights.source
    assert from_headers.weights.bytes == from_headers.weights.parameters * 2  # F32 floats counted at bf16
    assert from_headers.weights.parameters in (unique, stored)  # tied embeddings are stored once

    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "config.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
    estimated = kv_size_report(tmp_path / "alone" / "config.json", dtype="bf16", **H100)
    assert "estimated" in estimated.weights.source
    assert estimated.weights.parameters == from_headers.weights.parameters == unique


# --- the GPU --------------------------------------------------------------------------------------


def test_no_gpu_assumes_an_h100_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(kv_size, "detect_gpu", lambda: None)
    report = kv_size_report(_save(tmp_path, LlamaConfig, LLAMA_3_8B))
    assert (report.gpu.memory_bytes, report.gpu.bandwidth) == (80 * GiB, 3.35e12)
    assert any("H100" in note and "assumed" in note and "--gpu-memory" in note for note in report.notes)


def test_local_gpu_figures_and_an_unknown_name(tmp_path, monkeypatch):
    folder = _save(tmp_path, LlamaConfig, LLAMA_3_8B)
    h200 = GPU("NVIDIA H200", 140 * GiB, kv_size.peak_bandwidth("NVIDIA H200"), "the total of the NVIDIA H200")
    monkeypatch.setattr(kv_size, "detect_gpu", lambda: h200)
    report = kv_size_report(folder)
    assert (report.gpu.memory_bytes, report.gpu.bandwidth) == (140 * GiB, 4.8e12)
    assert kv_size_report(folder, gpu_memory_gib=40).gpu.memory_bytes == 40 * GiB  # one flag overrides one figure

    monkeypatch.setattr(kv_size, "detect_gpu", lambda: GPU("NVIDIA L4", 22 * GiB, None, "the total of the L4"))
    report = kv_size_report(folder)
    assert report.gpu.memory_bytes == 22 * GiB and report.gpu.bandwidth == 3.35e12
    assert any("not in our table" in note and "--bandwidth" in note for note in report.notes)


@pytest.mark.parametrize(
    "name, tb_s",
    [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9), ("NVIDIA H200", 4.8),
     ("NVIDIA A100-SXM4-80GB", 2.039), ("NVIDIA A100 80GB PCIe", 1.935), ("NVIDIA A100-SXM4-40GB", 1.555),
     ("NVIDIA GeForce RTX 4090", None)],
)
def test_peak_bandwidth_table(name, tb_s):
    assert kv_size.peak_bandwidth(name) == (None if tb_s is None else pytest.approx(tb_s * 1e12))


# --- the command line -------------------------------------------------------------------------------


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hf_attn_patch", "kv-size", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_end_to_end(tmp_path):
    folder = _save(tmp_path, LlamaConfig, LLAMA_3_8B, "llama-3-8b")
    done = _cli(folder, "--gpu-memory", 80, "--bandwidth", 3.35)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "llama-3-8b: llama, 32 layers, 32 query heads of dim 128, 8 KV heads" in out
    for row in ("8 (as is)", "4 (GQA-4)", "2 (GQA-2)", "1 (MQA)"):
        assert row in out
    # The hand-computed figures of test_llama_3_8b_by_hand, as printed.
    for figure in ("128.00 KiB", "1.00 GiB", "14.96 GiB", "532,827", "5.11 ms"):
        assert figure in out
    for assumption in ("max_position_embeddings", "torch_dtype", "estimated", "--gpu-memory", "peak bandwidth"):
        assert assumption in out


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    done = _cli(tmp_path / "missing")
    assert done.returncode == cli.EXIT_REFUSED and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("hf-attn-patch kv-size: error: ")
    assert "does not exist" in done.stderr


def _write(tmp_path: Path, config: dict | str) -> Path:
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "config, flags, message",
    [
        ({"model_type": "gpt2", "n_layer": 12}, [], "model_type 'gpt2' is not supported; supported: bert, falcon, llama, mistral"),
        ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}, [], "has no 'num_hidden_layers'"),
        ("{not json", [], "is not valid JSON"),
        (None, ["--batch", "0"], "--batch must be a positive integer, got 0"),
        (None, ["--seq", "-5"], "--seq must be a positive integer, got -5"),
        (None, ["--gpu-memory", "-1"], "--gpu-memory must be a positive number, got -1.0"),
        (None, ["--bandwidth", "0"], "--bandwidth must be a positive number, got 0.0"),
        (None, ["--bandwidth", "inf"], "--bandwidth must be a positive number, got inf"),
        (None, ["--dtype", "int4"], "--dtype 'int4' is not one of bf16, fp16, fp32"),
    ],
)
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, config, flags, message):
    if config is None:
        folder = _save(tmp_path, LlamaConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    else:
        folder = _write(tmp_path, config)
    assert cli.main(["kv-size", str(folder), *flags]) == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert err.startswith("hf-attn-patch kv-size: error: ") and err.count("\n") == 1
    assert message in err


def test_folder_without_config_is_refused(tmp_path, capsys):
    assert cli.main(["kv-size", str(tmp_path)]) == cli.EXIT_REFUSED
    assert "has no config.json" in capsys.readouterr().err
