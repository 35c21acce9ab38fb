"""Conversion of MHA/GQA checkpoints to fewer KV heads (hf_attn_patch.conversion, issue 4).

Tiny random models of every family and Falcon layout are saved in many small shards, converted,
and checked three ways: the stored tensors (pooled heads are the means of their groups, every
other tensor byte-identical), the config and index, and the model itself (the converted model
computes what the original computes with each K/V head replaced by its group's mean). Then every
refusal, the failure paths (nothing left behind) and the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
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

from hf_attn_patch.cli import main as cli_main
from hf_attn_patch.conversion import METHODS, ConversionError, ConversionReport, KVHeads, convert_checkpoint
from hf_attn_patch.conversion import writer as conversion_writer

from .helpers import tree_hash

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SHARD_SIZE = "20KB"  # a 2-layer, hidden-64 model then spans 10-20 shards


TINY = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=64
)


def _llama(**kw):
    return LlamaConfig(**{**TINY, "intermediate_size": 96, **kw})


def _mistral(**kw):
    return MistralConfig(**{**TINY, "intermediate_size": 96, **kw})


def _falcon(**kw):
    return FalconConfig(**{**TINY, **kw})


def _bert(**kw):
    return BertConfig(**{**TINY, "intermediate_size": 96, **kw})


@dataclass(frozen=True)
class Case:
    model_class: type
    config: object
    groups: int
    dtype: torch.dtype = torch.float32


CASES = {
    "llama-mha-to-gqa": Case(LlamaForCausalLM, _llama(num_key_value_heads=8), 2),
    "llama-gqa-bias-bf16-to-mqa": Case(
        LlamaForCausalLM, _llama(num_key_value_heads=4, attention_bias=True), 1, torch.bfloat16
    ),
    "mistral-gqa-to-gqa": Case(MistralForCausalLM, _mistral(num_key_value_heads=4, sliding_window=4), 2),
    "falcon-grouped": Case(
        FalconForCausalLM, _falcon(new_decoder_architecture=True, num_kv_heads=4, bias=True), 2
    ),
    "falcon-multi-head-to-mqa": Case(
        FalconForCausalLM, _falcon(multi_query=False, parallel_attn=False, alibi=True), 1
    ),
    "falcon-multi-head-to-grouped": Case(
        FalconForCausalLM, _falcon(multi_query=False, parallel_attn=True, bias=True), 2
    ),
    "bert-to-gqa-bert": Case(BertForMaskedLM, _bert(), 2),
}


# --- building checkpoints -------------------------------------------------------------------


def _save(case: Case, folder: Path, seed: int = 0, max_shard_size: str = SHARD_SIZE) -> Path:
    torch.manual_seed(seed)
    model = case.model_class(case.config).to(case.dtype).eval()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    (folder / "tokenizer.json").write_text('{"stand-in": "copied unchanged"}')
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("nested files are copied too")
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Case name -> a saved checkpoint folder, built once per module and never written to."""
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = _save(CASES[name], tmp_path_factory.mktemp(name) / "src")
        return built[name]

    return get


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".converting-" in p.name or ".replaced-" in p.name)


# --- the expected math, written from transformers' layouts, independently of the converter ----


def _group_mean(heads: torch.Tensor, groups: int) -> torch.Tensor:
    """(Hkv, ...) -> (groups, ...): mean of contiguous heads in float32, rounded once."""
    return heads.float().reshape(groups, heads.shape[0] // groups, *heads.shape[1:]).mean(1).to(heads.dtype)


def _falcon_rows(layout: str, heads: int, kv_heads: int, dim: int) -> dict[str, list[list[int]]]:
    """Row indices of every query, key and value head in a fused query_key_value."""

    def span(start_head):
        return list(range(start_head * dim, (start_head + 1) * dim))

    if layout == "grouped":
        per = heads // kv_heads
        return {
            "q": [span(h // per * (per + 2) + h % per) for h in range(heads)],
            "k": [span(g * (per + 2) + per) for g in range(kv_heads)],
            "v": [span(g * (per + 2) + per + 1) for g in range(kv_heads)],
        }
    if layout == "multi_query":
        return {"q": [span(h) for h in range(heads)], "k": [span(heads)], "v": [span(heads + 1)]}
    return {
        "q": [span(3 * h) for h in range(heads)],
        "k": [span(3 * h + 1) for h in range(heads)],
        "v": [span(3 * h + 2) for h in range(heads)],
    }


def _falcon_layout(config: dict) -> tuple[str, int]:
    if config.get("new_decoder_architecture"):
        return "grouped", config["num_kv_heads"]
    if config.get("multi_query", True):
        return "multi_query", 1
    return "multi_head", config["num_attention_heads"]


def _kv_parts(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name of each K/V part ('<tensor>|k' for Falcon) -> its heads, (Hkv, D, ...)."""
    family, heads = config["model_type"], config["num_attention_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    parts = {}
    if family == "falcon":
        layout, kv_heads = _falcon_layout(config)
        rows = _falcon_rows(layout, heads, kv_heads, dim)
        for name, tensor in tensors.items():
            if "query_key_value" in name:
                for part in ("q", "k", "v"):
                    parts[f"{name}|{part}"] = torch.stack([tensor[r] for r in rows[part]])
        return parts
    key_names = ("k_proj", "v_proj") if family in ("llama", "mistral") else ("self.key", "self.value")
    for name, tensor in tensors.items():
        if any(f"{key}." in name for key in key_names):
            parts[name] = tensor.unflatten(0, (tensor.shape[0] // dim, dim))
    return parts


def _reference_state(config: dict, tensors: dict[str, torch.Tensor], groups: int) -> dict[str, torch.Tensor]:
    """The source weights with every K/V head replaced by its group's mean, in the source layout."""
    reference = dict(tensors)
    for part, heads in _kv_parts(config, tensors).items():
        if part.endswith("|q"):
            continue
        expanded = _group_mean(heads, groups).repeat_interleave(heads.shape[0] // groups, dim=0)
        if "|" in part:
            name, which = part.split("|")
            layout, kv_heads = _falcon_layout(config)
            dim = config["hidden_size"] // config["num_attention_heads"]
            rows = _falcon_rows(layout, config["num_attention_heads"], kv_heads, dim)[which]
            fused = reference[name].clone()
            for head, head_rows in enumerate(rows):
                fused[head_rows] = expanded[head]
            reference[name] = fused
        else:
            reference[part] = expanded.flatten(0, 1)
    return reference


def _write_checkpoint(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    return folder


def _logits(model_class, folder: Path) -> torch.Tensor:
    model = model_class.from_pretrained(folder).eval()
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=input_ids)[0].float()


def _expand_gqa_bert(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A GQA-BERT checkpoint as a stock BERT: each stored K/V head repeated over its group."""
    groups, heads = config["num_key_value_heads"], config["num_attention_heads"]
    expanded = {
        name: tensor.unflatten(0, (groups, -1)).repeat_interleave(heads // groups, dim=0).flatten(0, 1)
        if (".self.key." in name or ".self.value." in name)
        else tensor
        for name, tensor in tensors.items()
    }
    return {k: v for k, v in config.items() if k != "num_key_value_heads"}, expanded


# --- conversions of every family and layout -----------------------------------------------------


@pytest.fixture
def converted(sources, tmp_path):
    """Convert a case; returns (case, source folder, destination folder, report)."""

    def run(name: str, **options):
        case, source = CASES[name], sources(name)
        destination = tmp_path / "dst"
        report = convert_checkpoint(source, destination, num_kv_heads=case.groups, **options)
        return case, source, destination, report

    return run


@pytest.mark.parametrize("name", CASES)
def test_pooled_heads_are_group_means_and_the_rest_is_untouched(converted, name):
    case, source, destination, report = converted(name)
    config = json.loads((source / "config.json").read_text())
    before, after = _read_all(source), _read_all(destination)

    assert before.keys() == after.keys()
    parts_before, parts_after = (
        _kv_parts(config, before),
        _kv_parts(json.loads((destination / "config.json").read_text()), after),
    )
    assert parts_before.keys() == parts_after.keys() and parts_before
    for part, heads in parts_before.items():
        expected = heads if part.endswith("|q") else _group_mean(heads, case.groups)
        assert parts_after[part].dtype == heads.dtype == case.dtype
        assert torch.equal(parts_after[part], expected), part
    kv_names = {part.split("|")[0] for part in parts_before}
    for name_ in before.keys() - kv_names:
        assert before[name_].dtype == after[name_].dtype
        assert torch.equal(
            before[name_].reshape(-1).view(torch.uint8), after[name_].reshape(-1).view(torch.uint8)
        ), name_
    assert report.tensors_rewritten == len(kv_names) and report.tensors_copied == len(before) - len(kv_names)


EXPECTED_CONFIG_CHANGES = {
    "llama-mha-to-gqa": {"num_key_value_heads": [8, 2]},
    "llama-gqa-bias-bf16-to-mqa": {"num_key_value_heads": [4, 1]},
    "mistral-gqa-to-gqa": {"num_key_value_heads": [4, 2]},
    "falcon-grouped": {"num_kv_heads": [4, 2]},
    "falcon-multi-head-to-mqa": {"multi_query": [False, True], "num_kv_heads": [8, 1]},
    "falcon-multi-head-to-grouped": {
        "new_decoder_architecture": [False, True],
        "num_kv_heads": [8, 2],
        "num_ln_in_parallel_attn": [None, 1],
    },
    "bert-to-gqa-bert": {"num_key_value_heads": [None, 2]},
}


@pytest.mark.parametrize("name", CASES)
def test_config_index_and_other_files(converted, name):
    case, source, destination, report = converted(name)
    old, new = (json.loads((folder / "config.json").read_text()) for folder in (source, destination))
    changed = {
        key: [old.get(key), new.get(key)] for key in old.keys() | new.keys() if old.get(key) != new.get(key)
    }
    assert changed == EXPECTED_CONFIG_CHANGES[name] == report.config_changes

    old_index, new_index = (
        json.loads((f / "model.safetensors.index.json").read_text()) for f in (source, destination)
    )
    assert new_index["weight_map"] == old_index["weight_map"]
    shards = sorted(set(new_index["weight_map"].values()))
    assert len(shards) >= 4 and report.shards == len(shards)
    assert sorted(p.name for p in destination.glob("*.safetensors")) == shards
    written = _read_all(destination)
    assert new_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert new_index["metadata"]["total_size"] == report.bytes_written < report.bytes_read

    for relative in ("tokenizer.json", "extra/notes.txt", "generation_config.json"):
        if (source / relative).exists():
            assert (destination / relative).read_bytes() == (source / relative).read_bytes()
    saved = json.loads((destination / "conversion_report.json").read_text())
    assert saved == report.to_dict() and saved["kv_heads_after"] == case.groups


@pytest.mark.parametrize("name", CASES)
def test_converted_model_computes_the_group_mean_model(converted, tmp_path, name):
    """Converted model == original architecture with each K/V head replaced by its group mean."""
    case, source, destination, report = converted(name)
    config = json.loads((source / "config.json").read_text())
    reference = _write_checkpoint(
        tmp_path / "reference", config, _reference_state(config, _read_all(source), case.groups)
    )
    if name.startswith("bert"):
        assert not report.stock_loadable and report.notes
        stock_config, expanded = _expand_gqa_bert(
            json.loads((destination / "config.json").read_text()), _read_all(destination)
        )
        destination = _write_checkpoint(tmp_path / "expanded", stock_config, expanded)
    else:
        assert report.stock_loadable
    assert report.verification == "full" and "forward pass" in report.verified

    expected, actual = _logits(case.model_class, reference), _logits(case.model_class, destination)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, atol=TOLERANCE[case.dtype], rtol=TOLERANCE[case.dtype])


def test_source_tree_is_never_modified(sources, tmp_path):
    source = sources("falcon-multi-head-to-grouped")
    before = tree_hash(source)
    convert_checkpoint(source, tmp_path / "a", num_kv_heads=2)
    convert_checkpoint(source, tmp_path / "a", num_kv_heads=1, overwrite=True)
    assert tree_hash(source) == before


def test_gqa_bert_checkpoint_layout(converted):
    """What the patch layer's GQA-BERT loader receives (documented in docs/conversion.md)."""
    case, source, destination, report = converted("bert-to-gqa-bert")
    config = json.loads((destination / "config.json").read_text())
    tensors = _read_all(destination)
    assert (
        config["model_type"] == "bert"
        and config["num_key_value_heads"] == 2
        and config["num_attention_heads"] == 8
    )
    for layer in range(2):
        base = f"bert.encoder.layer.{layer}.attention.self."
        assert tensors[base + "query.weight"].shape == (64, 64)
        for proj in ("key", "value"):
            assert tensors[f"{base}{proj}.weight"].shape == (2 * 8, 64)
            assert tensors[f"{base}{proj}.bias"].shape == (2 * 8,)
    with pytest.raises(Exception, match="size mismatch|ignore_mismatched_sizes"):
        BertForMaskedLM.from_pretrained(destination)


# --- options: methods, verification, symlinks, other weight files ----------------------------


def test_a_registered_method_is_used(sources, tmp_path, monkeypatch):
    def first_head(heads: KVHeads, num_groups: int, *, layer: int) -> KVHeads:
        step = heads.num_heads // num_groups
        pick = lambda t: None if t is None else t[::step].clone()  # noqa: E731
        return KVHeads(pick(heads.key), pick(heads.value), pick(heads.key_bias), pick(heads.value_bias))

    monkeypatch.setitem(METHODS, "first", first_head)
    source = sources("llama-mha-to-gqa")
    report = convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2, method="first")
    key = "model.layers.1.self_attn.k_proj.weight"
    original, pooled = _read_all(source)[key], _read_all(tmp_path / "dst")[key]
    assert report.method == "first"
    assert torch.equal(pooled, original.unflatten(0, (8, 8))[::4].flatten(0, 1))


def test_a_broken_method_is_refused_and_leaves_nothing(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "broken", lambda heads, num_groups, *, layer: heads)
    with pytest.raises(ConversionError, match="pooling method returned key"):
        convert_checkpoint(sources("llama-mha-to-gqa"), tmp_path / "dst", num_kv_heads=2, method="broken")
    assert not (tmp_path / "dst").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("mode, phrase", [("shapes", "headers re-read"), ("off", "not verified")])
def test_verification_modes(sources, tmp_path, mode, phrase):
    report = convert_checkpoint(sources("llama-mha-to-gqa"), tmp_path / "dst", num_kv_heads=4, verify=mode)
    assert report.verification == mode and phrase in report.verified


def test_symlinked_source_files_are_copied_as_files(sources, tmp_path):
    """As in a Hugging Face cache snapshot, where every file is a link into blobs/."""
    source, linked = sources("llama-mha-to-gqa"), tmp_path / "snapshot"
    linked.mkdir()
    for path in source.iterdir():
        if path.is_file():
            (linked / path.name).symlink_to(path)
    convert_checkpoint(linked, tmp_path / "dst", num_kv_heads=2)
    assert not any(p.is_symlink() for p in (tmp_path / "dst").iterdir())
    assert (tmp_path / "dst" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_other_weight_files_are_left_out_and_listed(tmp_path):
    source = _save(CASES["llama-mha-to-gqa"], tmp_path / "src", max_shard_size="10MB")
    (source / "pytorch_model.bin").write_bytes(b"stale pickle, never read")
    (source / ".gitattributes").write_text("*.safetensors filter=lfs")
    report = convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2)
    assert report.shards == 1 and (tmp_path / "dst" / "model.safetensors").is_file()
    assert {"pytorch_model.bin", ".gitattributes"} <= set(report.skipped_files)
    assert not (tmp_path / "dst" / "pytorch_model.bin").exists()


# --- refusals: all before the first byte is written -------------------------------------------


def _single_file_llama(tmp_path: Path, edit_tensors=None, edit_config=None) -> Path:
    source = _save(CASES["llama-mha-to-gqa"], tmp_path / "src", max_shard_size="10MB")
    if edit_tensors:
        tensors = load_file(source / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((source / "config.json").read_text())
        edit_config(config)
        (source / "config.json").write_text(json.dumps(config))
    return source


def _assert_refused(source: Path, destination: Path, match: str, **options):
    options.setdefault("num_kv_heads", 2)
    with pytest.raises(ConversionError, match=match):
        convert_checkpoint(source, destination, **options)
    assert not destination.exists() or options.get("overwrite") is not None
    assert _leftovers(destination.parent) == []


@pytest.mark.parametrize("groups", [0, -2, 3, 16, True, 2.0])
def test_refuses_bad_group_counts(sources, tmp_path, groups):
    _assert_refused(
        sources("llama-mha-to-gqa"),
        tmp_path / "dst",
        r"choose one of \[1, 2, 4, 8\]|must be an int",
        num_kv_heads=groups,
    )


def test_refuses_more_groups_than_a_gqa_source_has(sources, tmp_path):
    _assert_refused(sources("mistral-gqa-to-gqa"), tmp_path / "dst", r"4 KV heads .* to 8", num_kv_heads=8)


def test_refuses_grouped_falcon_from_a_sequential_multi_head_falcon(sources, tmp_path):
    _assert_refused(
        sources("falcon-multi-head-to-mqa"), tmp_path / "dst", "parallel_attn=False.*--kv-heads 1"
    )


def test_refuses_unknown_family(tmp_path):
    source = _single_file_llama(tmp_path, edit_config=lambda c: c.update(model_type="gpt2"))
    _assert_refused(
        source, tmp_path / "dst", "unknown model family 'gpt2'.*supported: bert, falcon, llama, mistral"
    )


def test_refuses_unknown_method(sources, tmp_path):
    _assert_refused(sources("llama-mha-to-gqa"), tmp_path / "dst", "unknown method 'median'", method="median")


def test_refuses_missing_tensor(tmp_path):
    source = _single_file_llama(
        tmp_path, edit_tensors=lambda t: t.pop("model.layers.1.self_attn.v_proj.weight")
    )
    _assert_refused(source, tmp_path / "dst", "'model.layers.1.self_attn.v_proj.weight' is missing")


def test_refuses_wrong_shape(tmp_path):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(48, 64)

    _assert_refused(
        _single_file_llama(tmp_path, edit_tensors=shrink),
        tmp_path / "dst",
        r"has shape \[48, 64\], expected \[64, 64\]",
    )


def test_refuses_config_and_weights_that_disagree(tmp_path):
    source = _single_file_llama(tmp_path, edit_config=lambda c: c.update(num_key_value_heads=4))
    _assert_refused(source, tmp_path / "dst", "num_key_value_heads=4 but .* holds 8 heads")


def test_refuses_extra_layers(tmp_path):
    source = _single_file_llama(tmp_path, edit_config=lambda c: c.update(num_hidden_layers=1))
    _assert_refused(source, tmp_path / "dst", "says 1 layers but the weights hold layer 1")


def test_refuses_quantized_kv(tmp_path):
    def quantize(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64, dtype=torch.int8)

    _assert_refused(
        _single_file_llama(tmp_path, edit_tensors=quantize), tmp_path / "dst", "is I8; only unquantized"
    )


def test_refuses_pickle_checkpoints_without_loading_them(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(_llama().to_dict()))
    (source / "pytorch_model.bin").write_bytes(b"a pickle would run code when loaded")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    _assert_refused(source, tmp_path / "dst", "only pickle weights .*torch.load")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_refuses_corrupt_shards(sources, tmp_path, damage):
    source = tmp_path / "src"
    source.mkdir()
    for path in sources("llama-mha-to-gqa").iterdir():
        if path.is_file():
            (source / path.name).write_bytes(path.read_bytes())
    shard = source / "model-00003-of-00016.safetensors"
    assert shard.exists()
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if damage == "truncate" else b"\xff" * 8 + data[8:])
    _assert_refused(
        source, tmp_path / "dst", "shard 'model-00003-of-00016.safetensors' is corrupt or truncated"
    )


def test_refuses_index_naming_a_missing_shard(sources, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for path in sources("llama-mha-to-gqa").iterdir():
        if path.is_file() and path.name != "model-00002-of-00016.safetensors":
            (source / path.name).write_bytes(path.read_bytes())
    _assert_refused(
        source, tmp_path / "dst", "names shard 'model-00002-of-00016.safetensors', which is missing"
    )


def test_refuses_existing_destination_without_overwrite(sources, tmp_path):
    destination = tmp_path / "dst"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists; pass overwrite=True"):
        convert_checkpoint(sources("llama-mha-to-gqa"), destination, num_kv_heads=2)
    assert [p.name for p in destination.iterdir()] == ["keep.txt"] and _leftovers(tmp_path) == []

    convert_checkpoint(sources("llama-mha-to-gqa"), destination, num_kv_heads=2, overwrite=True)
    assert not (destination / "keep.txt").exists() and (destination / "config.json").exists()
    assert _leftovers(tmp_path) == []


def test_refuses_destination_inside_source(sources, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    _assert_refused(source, source / "converted", "nested with it")
    _assert_refused(source, source, "is the source", overwrite=True)


# --- failures after writing started leave nothing behind ------------------------------------


def _fail_after_first_shard(monkeypatch):
    real_save = conversion_writer.save_file
    calls = []

    def save_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError("simulated: disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(conversion_writer, "save_file", save_then_fail)
    return calls


def test_failure_mid_write_leaves_nothing(sources, tmp_path, monkeypatch):
    calls = _fail_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        convert_checkpoint(sources("falcon-grouped"), tmp_path / "dst", num_kv_heads=2)
    assert len(calls) == 2 and not (tmp_path / "dst").exists() and list(tmp_path.iterdir()) == []


def test_failure_mid_write_keeps_the_old_destination(sources, tmp_path, monkeypatch):
    first = convert_checkpoint(sources("llama-mha-to-gqa"), tmp_path / "dst", num_kv_heads=4)
    before = tree_hash(tmp_path / "dst")
    _fail_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        convert_checkpoint(sources("llama-mha-to-gqa"), tmp_path / "dst", num_kv_heads=1, overwrite=True)
    assert tree_hash(tmp_path / "dst") == before and first.kv_heads_after == 4
    assert _leftovers(tmp_path) == []


def test_failed_verification_leaves_nothing(sources, tmp_path, monkeypatch):
    from hf_attn_patch.conversion import verify

    def broken_forward(model):
        raise ConversionError("simulated: forward pass gives NaN")

    monkeypatch.setattr(verify, "_run_forward", broken_forward)
    with pytest.raises(ConversionError, match="simulated"):
        convert_checkpoint(sources("llama-mha-to-gqa"), tmp_path / "dst", num_kv_heads=2)
    assert list(tmp_path.iterdir()) == []


# --- command line ---------------------------------------------------------------------------


def test_cli_converts_and_prints_the_report(sources, tmp_path, capsys):
    code = cli_main(["convert", str(sources("falcon-grouped")), str(tmp_path / "dst"), "--kv-heads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "4 -> 1 KV heads" in out and "forward pass" in out
    assert (
        ConversionReport(
            **json.loads((tmp_path / "dst" / "conversion_report.json").read_text())
        ).kv_heads_after
        == 1
    )


def test_cli_refusals_exit_non_zero(sources, tmp_path, capsys):
    code = cli_main(["convert", str(sources("llama-mha-to-gqa")), str(tmp_path / "dst"), "--kv-heads", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "error: cannot convert 8 KV heads" in err and not (tmp_path / "dst").exists()


def test_python_dash_m_entry_point(sources, tmp_path):
    command = [
        sys.executable,
        "-m",
        "hf_attn_patch",
        "convert",
        str(sources("llama-mha-to-gqa")),
        str(tmp_path / "dst"),
        "--kv-heads",
        "2",
        "--verify",
        "off",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    assert done.returncode == 0, done.stderr
    assert "8 -> 2 KV heads" in done.stdout
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 2 and "already exists" in refused.stderr


def test_conversion_imports_neither_kernels_nor_transformers():
    """Layering (DESIGN.md): transformers is imported only to verify, the kernels never."""
    code = (
        "import sys, hf_attn_patch.conversion; "
        "layers = ('hf_attn_patch.kernels', 'transformers', 'triton'); "
        "print(sorted(m for m in sys.modules if m.startswith(layers)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- converted models run on our kernels ------------------------------------------------------

NEEDS_KERNELS = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="patch_model needs CUDA or TRITON_INTERPRET=1 on a CPU (./run test sets it)",
)
# Head dim 16, the smallest the kernels take. GQA-BERT is missing until the patch layer loads it.
PATCH_CASES = {
    "llama-mha-to-gqa": Case(LlamaForCausalLM, _llama(num_key_value_heads=4, num_attention_heads=4), 2),
    "mistral-window-to-mqa": Case(
        MistralForCausalLM, _mistral(num_key_value_heads=4, num_attention_heads=4, sliding_window=4), 1
    ),
    "falcon-multi-head-to-grouped": Case(
        FalconForCausalLM, _falcon(multi_query=False, parallel_attn=True, num_attention_heads=4), 2
    ),
    "falcon-grouped-to-mqa": Case(
        FalconForCausalLM, _falcon(new_decoder_architecture=True, num_kv_heads=4, num_attention_heads=4), 1
    ),
}


@NEEDS_KERNELS
@pytest.mark.parametrize("name", PATCH_CASES)
def test_converted_model_patched_matches_unpatched(tmp_path, name):
    from hf_attn_patch import patch_model

    from .helpers import relative_error

    case = PATCH_CASES[name]
    convert_checkpoint(_save(case, tmp_path / "src"), tmp_path / "dst", num_kv_heads=case.groups)
    model = case.model_class.from_pretrained(tmp_path / "dst").eval()
    input_ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        patch_model(model)
        actual = model(input_ids=input_ids).logits
    assert relative_error(actual, expected) < 1e-4


def test_bert_without_pooler_converts_and_verifies(tmp_path):
    """A BertModel saved without its pooler (add_pooling_layer=False) lacks pooler.* in the source
    as well: verification must not call the converted checkpoint incomplete for it."""
    from transformers import BertModel

    torch.manual_seed(0)
    source = tmp_path / "bert-no-pooler"
    BertModel(_bert(), add_pooling_layer=False).save_pretrained(source)
    assert not any(name.startswith("pooler.") for name in load_file(source / "model.safetensors"))
    report = convert_checkpoint(source, tmp_path / "gqa", num_kv_heads=2, verify="full")
    assert "forward pass" in report.verified
