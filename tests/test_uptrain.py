"""hf_attn_patch.training.uptrain on tiny models (CPU: the kernels run in Triton's interpreter).

Kept short on purpose (a few steps each, sequences of 32, batches of 1-2): one step of a
two-layer model costs about a second in the interpreter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from hf_attn_patch import is_patched
from hf_attn_patch.conversion import convert_checkpoint
from hf_attn_patch.kernels import _flash_triton
from hf_attn_patch.models.bert import load_gqa_bert
from hf_attn_patch.training import UptrainConfig, load_token_ids, lr_at, uptrain

from .helpers import forbid_stock_attention, tree_hash

SEQ = 32
FAST = dict(seq_len=SEQ, warmup_steps=0, schedule="constant", gradient_checkpointing=False, quiet=True,
            log_every=1)


def llama(vocab: int = 128, kv_heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=kv_heads, intermediate_size=128,
                                        max_position_embeddings=64))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny MHA Llama and BertModel, and their conversions (Llama to MQA, BERT to GQA-BERT, KV heads 2)."""
    root = tmp_path_factory.mktemp("uptrain")
    llama().save_pretrained(root / "llama")
    convert_checkpoint(root / "llama", root / "llama-mqa", num_kv_heads=1, method="mean")
    torch.manual_seed(0)
    # Default attention dropout (0.1) on purpose: uptrain zeroes it so that training stays on the kernel.
    BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         # Larger weights than BERT's 0.02, so that pooling K/V heads changes the outputs.
                         initializer_range=0.2)).save_pretrained(root / "bert")
    convert_checkpoint(root / "bert", root / "bert-gqa", num_kv_heads=2, method="mean")
    return root


@pytest.fixture
def stock_attention_forbidden(monkeypatch):
    """Stock attention and 4-D mask builders raise (as in test_patch.py); counts our kernel's backward calls."""
    forbid_stock_attention(monkeypatch, ("llama", "bert"),
                           "stock attention or a (B, 1, Nq, Nk) mask was used while training a patched model")

    calls = {"backward": 0}
    backward = _flash_triton.backward

    def counted(*args, **kwargs):
        calls["backward"] += 1
        return backward(*args, **kwargs)

    monkeypatch.setattr(_flash_triton, "backward", counted)
    return calls


def falls(result, factor: float = 0.9) -> bool:
    losses = [loss for _, loss in result.losses]
    return losses[-1] < factor * losses[0]


def test_pretrain_instance_on_the_kernel_loss_falls(tmp_path, stock_attention_forbidden):
    """From scratch on a model instance (byte-level text, one fixed batch), gradient checkpointing on."""
    model = llama(vocab=256)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("def f(x):\n    return x + 1\n" * 4)[: 2 * SEQ])  # 64 bytes: exactly one batch of 2
    steps = 5
    result = uptrain(UptrainConfig(model=model, output_dir=tmp_path / "run", data=corpus, tokenizer="bytes",
                                   batch_size=2, max_steps=steps, lr=1e-2,
                                   **{**FAST, "gradient_checkpointing": True}))
    assert [s for s, _ in result.losses] == list(range(1, steps + 1))
    assert falls(result, 0.8), result.losses
    assert result.steps == steps and result.tokens_seen == steps * 2 * SEQ
    # Every layer's backward ran through our Triton kernel, every step (stock attention raised).
    assert stock_attention_forbidden["backward"] == steps * 2
    # The instance comes back as it came (unpatched, training mode), trained.
    assert not is_patched(model) and model.training
    checkpointing = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert not getattr(model, checkpointing)

    # The final checkpoint is a stock one: no trace of the patch, loads into plain transformers.
    config = json.loads((result.final_dir / "config.json").read_text())
    assert "hf_attn_patch" not in json.dumps(config)
    reloaded = LlamaForCausalLM.from_pretrained(result.final_dir)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_with_the_same_batches_and_losses(checkpoints, tmp_path):
    data = torch.randint(0, 128, (7 * SEQ + 5,), generator=torch.Generator().manual_seed(3))  # 7 sequences, packed
    common = dict(model=checkpoints / "llama", data=data, batch_size=1, grad_accum=2, lr=3e-3, shuffle=True,
                  **{**FAST, "warmup_steps": 1, "schedule": "cosine"})
    whole = uptrain(UptrainConfig(output_dir=tmp_path / "whole", max_steps=4, save_every=2, **common))
    assert [p.name for p in whole.checkpoints] == ["step-0000002", "step-0000004"]
    state = json.loads((whole.checkpoints[0] / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["sequences_seen"] == 4

    resumed = uptrain(UptrainConfig(output_dir=tmp_path / "resumed", max_steps=4,
                                    resume=whole.checkpoints[0], **common))
    assert resumed.resumed_from == whole.checkpoints[0] and resumed.steps == 4
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4]
    for (step, expected), (_, actual) in zip(whole.losses, resumed.losses):
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6), step
    final_whole = LlamaForCausalLM.from_pretrained(whole.final_dir).state_dict()
    final_resumed = LlamaForCausalLM.from_pretrained(resumed.final_dir).state_dict()
    for name, tensor in final_whole.items():
        torch.testing.assert_close(final_resumed[name], tensor, rtol=1e-5, atol=1e-6)

    # resume=True picks the latest checkpoint; a run already at max_steps trains no further.
    again = uptrain(UptrainConfig(output_dir=tmp_path / "whole", max_steps=4, resume=True, **common))
    assert again.resumed_from == whole.checkpoints[-1] and again.losses == whole.losses
    # A changed data layout is refused rather than silently seeing other batches.
    with pytest.raises(ValueError, match="data layout changed"):
        uptrain(UptrainConfig(output_dir=tmp_path / "whole", max_steps=6, resume=True,
                              **{**common, "batch_size": 2}))


def test_distill_causal_lm_toward_the_mha_teacher(checkpoints, tmp_path, stock_attention_forbidden):
    data = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(4))
    result = uptrain(UptrainConfig(model=checkpoints / "llama-mqa", teacher=checkpoints / "llama",
                                   output_dir=tmp_path / "run", data=data, distill_weight=0.5,
                                   distill_temperature=2.0, batch_size=2, max_steps=4, lr=1e-2, **FAST))
    assert result.objective.startswith("lm+distill-kl")
    assert falls(result), result.losses
    assert stock_attention_forbidden["backward"] == 4 * 2  # the teacher runs without grad: forward only
    reloaded = LlamaForCausalLM.from_pretrained(result.final_dir)
    assert reloaded.config.num_key_value_heads == 1


def test_distill_gqa_bert_hidden_states(checkpoints, tmp_path, stock_attention_forbidden):
    data = torch.randint(1, 128, (2, SEQ), generator=torch.Generator().manual_seed(5))
    result = uptrain(UptrainConfig(model=checkpoints / "bert-gqa", teacher=checkpoints / "bert",
                                   output_dir=tmp_path / "run", data=data, batch_size=2, max_steps=4, lr=1e-3,
                                   **FAST))
    assert result.objective == "distill-hidden"
    assert falls(result, 0.7), result.losses
    assert stock_attention_forbidden["backward"] == 4 * 2  # attention dropout 0.1 was zeroed: no fallback
    model = load_gqa_bert(result.final_dir)
    assert type(model).__name__ == "BertModel" and model.config.num_key_value_heads == 2
    assert model.encoder.layer[0].attention.self.key.weight.shape == (2 * 16, 64)
    assert model.config.attention_probs_dropout_prob == 0.1  # the config is saved as it was


def test_bad_configs_are_refused_before_any_work(checkpoints, tmp_path):
    out = tmp_path / "never"
    tokens = torch.randint(0, 128, (4 * SEQ,))
    cases = [
        (dict(model=checkpoints / "bert-gqa", data=tokens), "encoder"),
        (dict(model=checkpoints / "llama", data=tmp_path / "missing.txt"), "does not exist"),
        (dict(model=checkpoints / "llama", data=tmp_path), "no token files"),
        (dict(model=checkpoints / "llama", data=tokens[: SEQ - 1]), "too long for the data"),
        (dict(model=checkpoints / "llama", data=tokens, seq_len=128), "max_position_embeddings"),
        (dict(model=checkpoints / "llama", data=tokens.view(-1, 16)), "seq_len"),
        (dict(model=checkpoints / "llama", data=tokens + 1000), "outside the model's vocabulary"),
        (dict(model=checkpoints / "llama", data=tokens, teacher=checkpoints / "bert"), "not"),
        (dict(model=checkpoints / "llama", data=tokens, grad_accum=0), "grad_accum"),
        (dict(model=tmp_path, data=tokens), "not a model folder"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            uptrain(UptrainConfig(output_dir=out, **{"seq_len": SEQ, "quiet": True, **fields}))
    assert not out.exists()


def test_token_files_and_schedule(tmp_path):
    folder = tmp_path / "tokens"
    folder.mkdir()
    np.save(folder / "a.npy", np.arange(0, 5, dtype=np.int32))
    torch.save(torch.arange(5, 8), folder / "b.pt")
    np.arange(8, 12, dtype=np.uint16).tofile(folder / "c.bin")
    (folder / "notes.md").write_text("ignored")
    assert torch.equal(load_token_ids(folder), torch.arange(12))

    config = UptrainConfig(model="unused", output_dir=tmp_path, data=folder, lr=1.0, warmup_steps=2, max_steps=12,
                           min_lr_ratio=0.1)
    assert [lr_at(s, config) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, config) == pytest.approx(1.0) and lr_at(12, config) == pytest.approx(0.1)


def test_hidden_distillation_loss_matches_tokens_and_pooled_embedding():
    """Zero for equal states; padded positions change nothing; the pooled term is there."""
    from hf_attn_patch.training import hidden_distillation_loss

    torch.manual_seed(0)
    teacher = torch.randn(3, 7, 16)
    student = teacher + 0.3 * torch.randn(3, 7, 16)
    mask = torch.ones(3, 7)
    mask[1, 5:] = 0
    assert hidden_distillation_loss(teacher, teacher.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)

    loss = hidden_distillation_loss(student, teacher, mask)
    moved = student.clone()
    moved[1, 5:] += 10.0  # padding only
    assert hidden_distillation_loss(moved, teacher, mask).item() == pytest.approx(loss.item(), rel=1e-6)

    # Independent reference: per-token cos + MSE over real tokens, plus the pooled cosine term.
    real = mask.bool()
    per_token = (1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)) + (student - teacher).pow(2).mean(-1)
    pooled = [torch.nn.functional.cosine_similarity(student[b][real[b]].mean(0), teacher[b][real[b]].mean(0), dim=0)
              for b in range(3)]
    expected = per_token[real].mean() + torch.stack([1 - p for p in pooled]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# --- issue 13: bad input, interrupted and mismatched resumes -------------------------------------
# Stock attention (patch=False) keeps these fast: what they test is the files, not the kernel.

QUICK = dict(FAST, patch=False, batch_size=1)


def _tokens(seed: int, sequences: int = 4) -> torch.Tensor:
    return torch.randint(0, 128, (sequences * SEQ,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def run_with_checkpoints(checkpoints, tmp_path):
    """A finished 2-step run on the MHA Llama with checkpoints at steps 1 and 2; returns its settings."""
    settings = dict(model=checkpoints / "llama", output_dir=tmp_path / "run", data=_tokens(7), max_steps=2,
                    save_every=1, **QUICK)
    result = uptrain(UptrainConfig(**settings))
    assert [p.name for p in result.checkpoints] == ["step-0000001", "step-0000002"]
    return settings


@pytest.mark.parametrize("field, value, message", [
    ("lr", float("nan"), "lr must be a finite number > 0"),
    ("lr", float("inf"), "lr must be a finite number > 0"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number >= 0"),
    ("distill_temperature", float("inf"), "distill_temperature must be a finite number > 0"),
    ("max_grad_norm", -1.0, "max_grad_norm must be a finite number >= 0"),
    ("adam_betas", (0.9, 1.0), r"adam_betas must be two numbers in \[0, 1\)"),
    ("seed", -1, r"seed must be an int in \[0, 2\*\*32\)"),
    ("token_dtype", "float32", "token_dtype must name a numpy integer type"),
    ("token_dtype", "int7", "token_dtype must name a numpy integer type"),
    ("save_total_limit", 0.5, "save_total_limit must be an int >= 1"),
    ("warmup_steps", True, "warmup_steps must be an int >= 0"),
])
def test_bad_numbers_are_refused_before_any_work(checkpoints, tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        uptrain(UptrainConfig(model=checkpoints / "llama", output_dir=tmp_path / "out", data=_tokens(0),
                              **{**QUICK, field: value}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", "café".encode("latin-1"), "latin1.txt is not UTF-8 text"),
    ("garbage.npy", b"garbage", "garbage.npy is not a numpy array of token ids"),
    ("garbage.pt", b"garbage", "garbage.pt is not a saved tensor of token ids"),
    ("odd.bin", b"abc", "odd.bin has 3 bytes, not a whole number of uint16 values"),
])
def test_unreadable_data_names_the_file(checkpoints, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        uptrain(UptrainConfig(model=checkpoints / "llama", output_dir=tmp_path / "out", data=tmp_path / name,
                              tokenizer="bytes", **QUICK))
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_refused(checkpoints, tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        uptrain(UptrainConfig(model=checkpoints / "llama", output_dir=tmp_path / "out", data=_tokens(0), **QUICK))


def test_unwritable_output_dir_is_refused_before_the_model_loads(checkpoints, tmp_path, monkeypatch):
    import errno
    import os

    from hf_attn_patch.training import trainer

    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "read-only")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(PermissionError, match=r"cannot write into UptrainConfig.output_dir .*read-only/out"):
        uptrain(UptrainConfig(model=checkpoints / "llama", output_dir=tmp_path / "read-only" / "out",
                              data=_tokens(0), **QUICK))


def test_a_new_run_never_overwrites_a_finished_one(checkpoints, tmp_path):
    settings = dict(model=checkpoints / "llama", output_dir=tmp_path / "run", data=_tokens(1), max_steps=1, **QUICK)
    uptrain(UptrainConfig(**settings))  # no checkpoints: save_every=0
    before = tree_hash(tmp_path / "run" / "final")
    with pytest.raises(ValueError, match=r"already holds a run \(final/\).*continue it with resume=True"):
        uptrain(UptrainConfig(**settings))
    with pytest.raises(ValueError, match="already holds a run .*it has no checkpoint to resume from"):
        uptrain(UptrainConfig(**{**settings, "resume": True}))
    assert tree_hash(tmp_path / "run" / "final") == before


def test_resume_refuses_a_run_that_does_not_match(checkpoints, run_with_checkpoints, tmp_path):
    settings, run = run_with_checkpoints, tmp_path / "run"
    before = tree_hash(run)
    cases = [
        (dict(max_steps=1), r"\(step 2\) with max_steps 1: the checkpoint is past it"),
        (dict(teacher=checkpoints / "llama"), r"the objective changed \(lm -> lm\+distill-kl"),
        (dict(data=_tokens(8)), "the data layout changed .*data_fingerprint"),
        (dict(model=checkpoints / "llama-mqa"), "it was saved from another model"),
        (dict(resume=run / "checkpoints" / "step-0000001"), r"holds later checkpoints \(step-0000002\)"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            uptrain(UptrainConfig(**{**settings, "resume": True, "max_steps": 3, **change}))
    assert tree_hash(run) == before  # nothing was written by a refused resume


def test_damaged_trainer_state_is_refused_with_its_path(run_with_checkpoints, tmp_path):
    state = tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer_state.json"
    state.write_text(state.read_text()[:20])
    with pytest.raises(ValueError, match=r"step-0000002: trainer_state.json is damaged"):
        uptrain(UptrainConfig(**{**run_with_checkpoints, "resume": True, "max_steps": 3}))


def test_interrupted_checkpoint_is_passed_over_and_replaced(run_with_checkpoints, tmp_path):
    """A save killed before its trainer_state.json: resume=True takes the one before, and the
    rerun's save of that step leaves none of the dead run's files."""
    broken = tmp_path / "run" / "checkpoints" / "step-0000003"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"half a file")
    (broken / ".trainer_state.json.partial").write_text('{"st')
    result = uptrain(UptrainConfig(**{**run_with_checkpoints, "resume": True, "max_steps": 3}))
    assert result.resumed_from.name == "step-0000002" and result.steps == 3
    assert sorted(p.name for p in broken.iterdir()) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                                        "trainer_state.json"]
    assert json.loads((broken / "trainer_state.json").read_text())["step"] == 3


def test_sigkill_mid_checkpoint_then_resume_matches_an_uninterrupted_run(checkpoints, tmp_path):
    """A real SIGKILL after step 2's weights are saved but before its trainer_state.json."""
    import os
    import signal
    import subprocess
    import sys

    data = tmp_path / "tokens.npy"
    np.save(data, _tokens(9).numpy())
    settings = dict(model=checkpoints / "llama", data=data, max_steps=3, save_every=1, **QUICK)
    killer = (
        "import os, signal; from hf_attn_patch.training import checkpoints as c; real = c._write_atomically\n"
        "def write(path, text):\n"
        "    if path.parent.name == 'step-0000002': os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(path, text)\n"
        "c._write_atomically = write\n"
        "from pathlib import Path; from hf_attn_patch.training import UptrainConfig, uptrain\n"
        f"uptrain(UptrainConfig(output_dir=Path({str(tmp_path / 'killed')!r}), "
        f"**{ {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in settings.items()} !r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not (tmp_path / "killed" / "checkpoints" / "step-0000002" / "trainer_state.json").exists()

    resumed = uptrain(UptrainConfig(output_dir=tmp_path / "killed", resume=True, **settings))
    whole = uptrain(UptrainConfig(output_dir=tmp_path / "whole", **settings))
    assert resumed.resumed_from.name == "step-0000001"
    assert [step for step, _ in resumed.losses] == [1, 2, 3]
    for (step, expected), (_, actual) in zip(whole.losses, resumed.losses):
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6), step


def test_failed_final_save_keeps_the_previous_final(run_with_checkpoints, tmp_path, monkeypatch):
    final = tmp_path / "run" / "final"
    before = tree_hash(final)

    def disk_full(self, folder, *args, **kwargs):
        (folder / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        uptrain(UptrainConfig(**{**run_with_checkpoints, "resume": True, "max_steps": 3}))
    assert tree_hash(final) == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "final"]


def test_example_script_errors_are_one_line(checkpoints, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "uptrain.py"
    spec = importlib.util.spec_from_file_location("uptrain_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = [str(checkpoints / "llama"), "--data", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path / "out")]
    assert example.main(argv) == 2
    assert capsys.readouterr().err == f"uptrain.py: error: UptrainConfig.data: {tmp_path / 'missing.txt'} does not exist\n"
    with pytest.raises(ValueError, match="does not exist"):
        example.main([*argv, "--debug"])
    assert example.main([*argv[:2], str(tmp_path), "--output-dir", str(tmp_path / "out"), "--lr", "nan"]) == 2
    assert "lr must be a finite number > 0" in capsys.readouterr().err


def test_interrupted_run_hands_a_given_model_back_as_it_came(tmp_path, monkeypatch):
    """Ctrl-C in a notebook: the instance must not stay patched, dropout-free, checkpointed, in train mode."""
    from hf_attn_patch.training import objectives

    model = llama()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.eval()

    def interrupted(self, student, batch):
        assert is_patched(student) and student.model.layers[0].self_attn.attention_dropout == 0.0
        raise KeyboardInterrupt

    monkeypatch.setattr(objectives.Objective, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        uptrain(UptrainConfig(model=model, output_dir=tmp_path / "run", data=_tokens(0),
                              **{**QUICK, "patch": True, "gradient_checkpointing": True}))
    checkpointing = ("is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing")
                     else "is_gradient_checkpointing")  # renamed in transformers 5.2x
    assert not is_patched(model) and not model.training and not getattr(model, checkpointing)
    assert model.config.use_cache is True and model.model.layers[0].self_attn.attention_dropout == 0.1
