"""Calibrated conversion methods ("similarity", "pca"; hf_attn_patch.conversion.calibrated, issue 5).

Tiny random models, on a CPU in float32: with one KV head per group the methods must compute
exactly what the original computes (their permutations and per-head maps are bookkeeping only);
on models whose heads are near-copies in a non-contiguous pattern they must beat mean-pooling by
a wide margin; and the calibration input, the refusals, the report and the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from hf_attn_patch.cli import main as cli_main
from hf_attn_patch.conversion import METHODS, ConversionError, convert_checkpoint
from hf_attn_patch.conversion import calibrated, convert
from hf_attn_patch.conversion import writer as conversion_writer
from hf_attn_patch.conversion.methods import needs_calibration

from .helpers import relative_error, tree_hash

CALIBRATED = ["similarity", "pca"]
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=64)
# (model class, config, num_kv_heads the source holds); head_dim 16 everywhere.
MODELS = {
    "llama-mha-bias": (LlamaForCausalLM, LlamaConfig(**TINY, num_attention_heads=4, attention_bias=True)),
    "mistral-gqa": (MistralForCausalLM, MistralConfig(**TINY, num_attention_heads=8, head_dim=8, num_key_value_heads=4)),
    "bert": (BertModel, BertConfig(**TINY, num_attention_heads=4)),
}
CALIBRATION = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
INPUTS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
WORDS = "the a cat dog sat on mat ran far and then slept in sun house tree".split()


def _save(name: str, folder: Path, *, near_copies: bool = False, tokenizer: bool = False) -> Path:
    model_class, config = MODELS[name]
    torch.manual_seed(0)
    model = model_class(config).eval()
    if near_copies:
        _make_near_copies(model)
    model.save_pretrained(folder, max_shard_size="20KB")  # K, Q, V and O of a layer land in different shards
    if tokenizer:
        vocab = folder / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
        BertTokenizer(str(vocab)).save_pretrained(folder)
    return folder


def _make_near_copies(model) -> None:
    """KV heads 2 and 3 become near-copies of heads 0 and 1: the best groups are {0, 2} and {1, 3}."""
    generator = torch.Generator().manual_seed(3)
    for name, module in model.named_modules():
        if name.endswith(("k_proj", "v_proj", "attention.self.key", "attention.self.value")):
            for tensor in (module.weight, module.bias):
                if tensor is None:
                    continue
                heads = tensor.data.unflatten(0, (4, -1))
                noise = torch.randn(heads[:2].shape, generator=generator) * 0.02 * heads.std()
                heads[2:] = heads[:2] + noise


def _outputs(name: str, folder: Path) -> torch.Tensor:
    model_class, _ = MODELS[name]
    config = json.loads((folder / "config.json").read_text())
    if name == "bert" and config.get("num_key_value_heads", 4) != config["num_attention_heads"]:
        folder = _expanded_bert(folder, config)
    model = model_class.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=INPUTS)[0]


def _expanded_bert(folder: Path, config: dict) -> Path:
    """GQA-BERT -> the stock BERT computing the same function (each KV head repeated over its group)."""
    groups, heads = config.pop("num_key_value_heads"), config["num_attention_heads"]
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    for key in tensors:
        if ".attention.self.key." in key or ".attention.self.value." in key:
            per_head = tensors[key].unflatten(0, (groups, -1))
            tensors[key] = per_head.repeat_interleave(heads // groups, dim=0).flatten(0, 1).contiguous()
    expanded = folder.parent / f"{folder.name}-expanded"
    expanded.mkdir()
    (expanded / "config.json").write_text(json.dumps(config))
    save_file(tensors, expanded / "model.safetensors", metadata={"format": "pt"})
    return expanded


def _kv_heads(name: str) -> int:
    config = MODELS[name][1]
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".converting-" in p.name or ".replaced-" in p.name)


# --- registry --------------------------------------------------------------------------------


def test_calibrated_methods_are_registered_and_say_they_need_calibration():
    assert not needs_calibration(METHODS["mean"])
    for name in CALIBRATED:
        assert needs_calibration(METHODS[name]) and METHODS[name].summary


# --- exact bookkeeping -----------------------------------------------------------------------


@pytest.mark.parametrize("method", CALIBRATED)
@pytest.mark.parametrize("name", MODELS)
def test_one_head_per_group_reproduces_the_original(tmp_path, name, method):
    source = _save(name, tmp_path / "src")
    groups = _kv_heads(name)
    report = convert_checkpoint(source, tmp_path / "dst", num_kv_heads=groups, method=method, calibration=CALIBRATION)
    assert report.method == method and report.kv_heads_after == groups
    assert relative_error(_outputs(name, tmp_path / "dst"), _outputs(name, source)) < 1e-4


@pytest.mark.parametrize("pooling", ["mean", "pca"])
@pytest.mark.parametrize("name", MODELS)
def test_permuted_heads_and_absorbed_maps_reproduce_the_original(tmp_path, monkeypatch, name, pooling):
    """A forced non-trivial regrouping (KV heads reversed) with one head per group changes nothing."""

    def reversed_heads(heads, num_groups, *, layer, statistics):
        order = torch.arange(heads.kv.num_heads).flip(0)
        return calibrated.regroup_and_pool(
            heads, num_groups, statistics[layer].second_moment, pooling=pooling, regroup=True, order=order
        )

    reversed_heads.needs_calibration = True
    monkeypatch.setitem(METHODS, "reversed", reversed_heads)
    source = _save(name, tmp_path / "src")
    groups = _kv_heads(name)
    convert_checkpoint(source, tmp_path / "dst", num_kv_heads=groups, method="reversed", calibration=CALIBRATION)
    before, after = _read_all(source), _read_all(tmp_path / "dst")
    query = next(key for key in before if key.endswith(("q_proj.weight", "self.query.weight")))
    assert not torch.equal(after[query], before[query])  # the query heads did move
    assert relative_error(_outputs(name, tmp_path / "dst"), _outputs(name, source)) < 1e-4


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


# --- better than mean on structured heads ----------------------------------------------------


@pytest.mark.parametrize("name", ["llama-mha-bias", "bert"])
def test_non_contiguous_near_copies_beat_mean_pooling(tmp_path, name):
    source = _save(name, tmp_path / "src", near_copies=True)
    original = _outputs(name, source)
    errors = {}
    for method in ["mean", *CALIBRATED]:
        convert_checkpoint(source, tmp_path / method, num_kv_heads=2, method=method, calibration=CALIBRATION)
        errors[method] = relative_error(_outputs(name, tmp_path / method), original)
    for method in CALIBRATED:
        assert errors[method] < 0.2 * errors["mean"], errors
    # similarity pooled heads {0, 2} into KV head 0: its key rows are their mean
    prefix = "model.layers.0.self_attn.k_proj" if name != "bert" else "encoder.layer.0.attention.self.key"
    heads = _read_all(source)[prefix + ".weight"].unflatten(0, (4, -1))
    pooled = _read_all(tmp_path / "similarity")[prefix + ".weight"].unflatten(0, (2, -1))
    torch.testing.assert_close(pooled[0], (heads[0] + heads[2]) / 2)


def test_mean_ignores_calibration(tmp_path):
    source = _save("llama-mha-bias", tmp_path / "src")
    report = convert_checkpoint(source, tmp_path / "a", num_kv_heads=2, calibration=CALIBRATION)
    convert_checkpoint(source, tmp_path / "b", num_kv_heads=2)
    first, second = _read_all(tmp_path / "a"), _read_all(tmp_path / "b")
    assert report.calibration is None and all(torch.equal(first[k], second[k]) for k in first)


# --- calibration input, report, command line ---------------------------------------------------


def test_calibration_file_and_report(tmp_path):
    source = _save("bert", tmp_path / "src", tokenizer=True)
    text = tmp_path / "calibration.txt"
    text.write_text("the cat sat on the mat\n\n  the dog ran far  \nand then slept in the sun\n")
    digest = tree_hash(source)
    report = convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2, method="pca", calibration=text)
    assert report.calibration["sequences"] == 3
    assert report.calibration["tokens"] == 6 + 4 + 6 + 3 * 2  # words, then [CLS] and [SEP] per line
    assert str(text) in report.calibration["source"]
    saved = json.loads((tmp_path / "dst" / "conversion_report.json").read_text())
    assert saved["method"] == "pca" and saved["calibration"]["tokens"] == report.calibration["tokens"]
    assert "calibration: 22 tokens in 3 sequences" in report.summary()
    assert "GQA-BERT" in report.verified  # verify="auto" loaded it (expanded) and ran it
    assert tree_hash(source) == digest


def test_calibration_as_lists_of_ints(tmp_path):
    source = _save("llama-mha-bias", tmp_path / "src")
    report = convert_checkpoint(
        source, tmp_path / "dst", num_kv_heads=1, method="similarity", calibration=[[1, 2, 3], [4, 5, 6, 7, 8]]
    )
    assert report.calibration["tokens"] == 8 and report.calibration["sequences"] == 2


def test_cli_calibration_flag(tmp_path, capsys):
    source = _save("bert", tmp_path / "src", tokenizer=True)
    text = tmp_path / "calibration.txt"
    text.write_text("the cat sat on the mat\nthe dog ran far\n")
    code = cli_main(
        ["convert", str(source), str(tmp_path / "dst"), "--kv-heads", "2", "--method", "pca", "--calibration", str(text)]
    )
    assert code == 0 and "method 'pca'" in capsys.readouterr().out
    code = cli_main(["convert", str(source), str(tmp_path / "other"), "--kv-heads", "2", "--method", "similarity"])
    assert code == 2 and "needs calibration data" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# --- refusals, all before any work -----------------------------------------------------------


@pytest.fixture
def no_model_runs(monkeypatch):
    """Validation must come before calibration: fail loudly if the model would be run."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was run before the input was validated")

    monkeypatch.setattr(convert, "collect_statistics", refuse)


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n")
    return path


REFUSALS = {
    "no calibration": (None, "needs calibration data"),
    "1-D tensor": (torch.arange(10), "num_sequences, seq_len"),
    "empty tensor": (torch.zeros(0, 5, dtype=torch.long), "num_sequences, seq_len"),
    "float tensor": (torch.zeros(2, 5), "must be integers"),
    "ids outside the vocabulary": (torch.full((2, 5), 500), "outside \\[0, 128\\)"),
    "too long": (torch.zeros(1, 65, dtype=torch.long), "max_position_embeddings 64"),
    "empty lists": ([], "empty"),
    "ragged non-ints": ([[1, 2], [3.0]], "ints only"),
    "not a path or ids": (3.5, "must be a path"),
    "missing file": ("does-not-exist.txt", "does not exist"),
    "empty file": (_empty_file, "holds no text"),
    "no tokenizer": ("__text__", "needs the tokenizer saved in the source folder"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refuses_bad_calibration_before_any_work(tmp_path, no_model_runs, case):
    calibration, match = REFUSALS[case]
    if callable(calibration):
        calibration = calibration(tmp_path)
    elif calibration == "__text__":
        calibration = tmp_path / "text.txt"
        calibration.write_text("some text\n")
    elif isinstance(calibration, str):
        calibration = tmp_path / calibration
    source = _save("llama-mha-bias", tmp_path / "src")  # saved without a tokenizer
    with pytest.raises(ConversionError, match=match):
        convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2, method="pca", calibration=calibration)
    assert not (tmp_path / "dst").exists() and _leftovers(tmp_path) == []


def test_refuses_falcon(tmp_path, no_model_runs):
    source = tmp_path / "src"
    FalconForCausalLM(FalconConfig(**TINY, num_attention_heads=4, multi_query=False)).save_pretrained(source)
    with pytest.raises(ConversionError, match="not supported for Falcon"):
        convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2, method="pca", calibration=CALIBRATION)
    assert not (tmp_path / "dst").exists() and _leftovers(tmp_path) == []


def test_refuses_a_gqa_bert_source(tmp_path, no_model_runs):
    source = _save("bert", tmp_path / "src")
    convert_checkpoint(source, tmp_path / "gqa", num_kv_heads=2)
    with pytest.raises(ConversionError, match="already a GQA-BERT"):
        convert_checkpoint(tmp_path / "gqa", tmp_path / "dst", num_kv_heads=1, method="pca", calibration=CALIBRATION)


# --- failures leave nothing ------------------------------------------------------------------


def test_failure_during_calibration_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ConversionError("calibration failed")

    monkeypatch.setattr(convert, "collect_statistics", broken)
    source = _save("llama-mha-bias", tmp_path / "src")
    with pytest.raises(ConversionError, match="calibration failed"):
        convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2, method="pca", calibration=CALIBRATION)
    assert not (tmp_path / "dst").exists() and _leftovers(tmp_path) == []


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    real_save, calls = conversion_writer.save_file, []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(conversion_writer, "save_file", fail_on_second)
    source = _save("bert", tmp_path / "src")
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2, method="pca", calibration=CALIBRATION)
    assert not (tmp_path / "dst").exists() and _leftovers(tmp_path) == []
