"""uptrain in 2 processes on the CPU (gloo, launched with torch.distributed.run), issue 17.

Two processes with batch b reach the losses and weights of one process with batch 2b (the same
global batch, in the same order), under DDP and under FSDP2; a 2-process run resumed from its
checkpoint continues exactly. The kernels run in Triton's interpreter: tiny model, 3 steps.

This file is also the worker the launcher starts (`__main__` at the bottom): it runs uptrain
with the settings of a JSON file and the main process writes what came out to another.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SEQ = 32
REPO = Path(__file__).resolve().parent.parent
# Shuffled, warm-up then cosine, clipping on, accumulation 2: every part of a step that could
# go wrong across processes (data slices, the averaged loss, the global norm, the schedule).
COMMON = dict(seq_len=SEQ, grad_accum=2, max_steps=3, lr=3e-3, warmup_steps=1, schedule="cosine", shuffle=True,
              max_grad_norm=0.5, mixed_precision="no", tokenizer="bytes", gradient_checkpointing=False,
              quiet=True, log_every=1)


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """A tiny GQA Llama (byte vocabulary) saved as a folder, and a text file of 24 sequences."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("uptrain-ddp")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128,
                                 max_position_embeddings=64)).save_pretrained(root / "llama")
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40))
    (root / "corpus.txt").write_text(text[: 24 * SEQ])
    return dict(model=root / "llama", data=root / "corpus.txt")


@pytest.fixture(scope="module")
def one_process(run_inputs, tmp_path_factory):
    """The reference: one process, batch 2, in this process."""
    from hf_attn_patch.training import UptrainConfig, uptrain

    return uptrain(UptrainConfig(output_dir=tmp_path_factory.mktemp("one") / "run", batch_size=2, **run_inputs,
                                 **COMMON))


def test_ddp_two_processes_match_one_and_resume_exactly(run_inputs, one_process, tmp_path):
    settings = dict(batch_size=1, **run_inputs, **COMMON)
    whole = launch(tmp_path / "whole", dict(settings, save_every=2))
    assert whole["sharding"] == "DDP" and whole["steps"] == 3
    assert whole["left_process_group"]  # end_of_run(): no process exits with the group up
    assert whole["tokens_seen"] == one_process.tokens_seen  # counted over both processes
    assert_same_losses(whole["losses"], one_process.losses, rel=1e-5)
    assert_same_weights(Path(whole["final_dir"]), one_process.final_dir, atol=1e-5)
    step2 = tmp_path / "whole" / "checkpoints" / "step-0000002"
    # One copy of the weights (written by the main process), each process's RNG state.
    assert sorted(p.name for p in step2.iterdir()) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                                       "random_states_1.pkl", "trainer_state.json"]
    assert json.loads((step2 / "trainer_state.json").read_text())["layout"]["num_processes"] == 2

    resumed = launch(tmp_path / "resumed", dict(settings, resume=str(step2)))
    assert resumed["resumed_from"] == str(step2)
    assert_same_losses(resumed["losses"], whole["losses"], rel=1e-6)
    assert_same_weights(Path(resumed["final_dir"]), Path(whole["final_dir"]), atol=1e-7)


def test_accelerate_configs_launch_what_they_say():
    """examples/accelerate/*.yaml, read by accelerate's own launcher: the variables it hands the processes."""
    ddp, fsdp, cpu = (launcher_env(name) for name in ("ddp", "fsdp", "cpu_2proc"))
    assert ddp["ACCELERATE_MIXED_PRECISION"] == "bf16" and "ACCELERATE_USE_FSDP" not in ddp
    assert fsdp["ACCELERATE_MIXED_PRECISION"] == "bf16" and fsdp["ACCELERATE_USE_FSDP"] == "true"
    assert (fsdp["FSDP_VERSION"], fsdp["FSDP_AUTO_WRAP_POLICY"], fsdp["FSDP_RESHARD_AFTER_FORWARD"]) == \
        ("2", "TRANSFORMER_BASED_WRAP", "true")
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in fsdp  # taken from the model's _no_split_modules
    assert cpu["ACCELERATE_MIXED_PRECISION"] == "no" and "ACCELERATE_USE_FSDP" not in cpu


def test_fsdp2_two_processes_match_one_and_resume_exactly(run_inputs, one_process, tmp_path):
    """FSDP2 (fully_shard, sharded checkpoints, the full state dict gathered for final/) on gloo,
    with the FSDP settings of examples/accelerate/fsdp.yaml.

    accelerate switches FSDP on only for GPU-like launches, so the worker switches it on by hand
    on the CPU (`_fsdp_on_cpu`); everything after that is accelerate's FSDP2 path, as on GPUs.
    """
    settings = dict(batch_size=1, **run_inputs, **{**COMMON, "gradient_checkpointing": True})
    whole = launch(tmp_path / "whole", dict(settings, save_every=2), env=fsdp2_env())
    assert whole["sharding"] == "FSDP2 (SHARDED_STATE_DICT)" and whole["left_process_group"]
    assert_same_losses(whole["losses"], one_process.losses, rel=1e-5)
    assert_same_weights(Path(whole["final_dir"]), one_process.final_dir, atol=1e-5)  # from_pretrained loads it
    step2 = tmp_path / "whole" / "checkpoints" / "step-0000002"
    assert {"pytorch_model_fsdp_0", "optimizer_0", "trainer_state.json"} <= {p.name for p in step2.iterdir()}

    resumed = launch(tmp_path / "resumed", dict(settings, resume=str(step2)), env=fsdp2_env())
    assert_same_losses(resumed["losses"], whole["losses"], rel=1e-6)
    assert_same_weights(Path(resumed["final_dir"]), Path(whole["final_dir"]), atol=1e-7)


def test_fsdp2_bf16_stays_near_float32_and_saves_float32(run_inputs, one_process, tmp_path):
    """bf16 mixed precision under FSDP2 (parameters gathered and gradients reduced in bf16, kernel
    inputs in bf16): a smoke check against the float32 run, and final/ holds the float32 master
    weights."""
    from safetensors import safe_open

    settings = dict(batch_size=1, **run_inputs, **{**COMMON, "mixed_precision": "bf16", "max_steps": 2})
    run = launch(tmp_path / "bf16", settings, env=fsdp2_env())
    assert run["sharding"] == "FSDP2 (SHARDED_STATE_DICT)"
    float32 = one_process.losses[:2]  # their learning rates (warm-up, the cosine's start) ignore max_steps
    assert [loss for _, loss in run["losses"]] != [loss for _, loss in float32]  # bf16 changed the arithmetic
    assert_same_losses(run["losses"], float32, rel=1e-2)
    with safe_open(Path(run["final_dir"]) / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}


def test_a_checkpoint_resumes_only_under_the_kind_that_wrote_it(tmp_path):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hf_attn_patch.training.distributed import check_checkpoint_kind

    ddp, fsdp = (SimpleNamespace(distributed_type=kind) for kind in (DistributedType.MULTI_GPU, DistributedType.FSDP))
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    (plain / "model.safetensors").parent.mkdir()
    (plain / "model.safetensors").write_bytes(b"")
    (sharded / "pytorch_model_fsdp_0").mkdir(parents=True)
    check_checkpoint_kind(plain, ddp)
    check_checkpoint_kind(sharded, fsdp)
    with pytest.raises(ValueError, match="saved under FSDP and this run is without FSDP"):
        check_checkpoint_kind(sharded, ddp)
    with pytest.raises(ValueError, match="saved without FSDP and this run is under FSDP"):
        check_checkpoint_kind(plain, fsdp)


# --- helpers ----------------------------------------------------------------------------------


def launch(output_dir: Path, settings: dict, *, processes: int = 2, env: dict | None = None,
           timeout: float = 300) -> dict:
    """Run uptrain in `processes` processes (torch.distributed.run, gloo on 127.0.0.1); the main
    process's result as a dict."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    job = output_dir.parent / f"{output_dir.name}.json"
    result = output_dir.parent / f"{output_dir.name}.result.json"
    job.write_text(json.dumps({**{k: os.fspath(v) if isinstance(v, Path) else v for k, v in settings.items()},
                               "output_dir": os.fspath(output_dir), "_result": os.fspath(result),
                               "_fsdp_on_cpu": bool(env and env.get("ACCELERATE_USE_FSDP") == "true")}))
    child_env = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                 and not k.startswith(("ACCELERATE_", "FSDP_"))}
    child_env.update(TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
                     PYTHONPATH=os.pathsep.join(filter(None, [os.fspath(REPO), os.environ.get("PYTHONPATH")])),
                     **(env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, os.fspath(job)]
    process = subprocess.Popen(command, env=child_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the launcher stops its workers (they also die with it: _worker)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"{processes}-process uptrain did not finish in {timeout} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    return json.loads(result.read_text())


def launcher_env(config: str) -> dict:
    """What `accelerate launch --config_file examples/accelerate/<config>.yaml` sets for its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", os.fspath(REPO / "examples" / "accelerate" /
                                                                         f"{config}.yaml"), "examples/uptrain.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def fsdp2_env() -> dict:
    """The FSDP variables of examples/accelerate/fsdp.yaml (its bf16 is left to each run's mixed_precision)."""
    return {k: v for k, v in launcher_env("fsdp").items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


def assert_same_losses(actual, expected, rel: float) -> None:
    assert [step for step, _ in actual] == [step for step, _ in expected]
    for (step, a), (_, b) in zip(actual, expected):
        assert a == pytest.approx(b, rel=rel, abs=rel), f"step {step}: {a} != {b}"


def assert_same_weights(actual_dir: Path, expected_dir: Path, atol: float) -> None:
    """Each tensor within `atol` everywhere and within relative (Frobenius) error `atol` as a whole.

    Summation order differs between 1 and 2 processes, and Adam divides by the root of the squared
    gradient, so an element whose gradient is near zero can move by up to about lr * 1e-3 more or
    less (1.5e-6 seen at lr 3e-3); a real difference (another batch, a missed all-reduce) moves
    every element by about lr.
    """
    from transformers import LlamaForCausalLM

    actual = LlamaForCausalLM.from_pretrained(actual_dir).state_dict()
    expected = LlamaForCausalLM.from_pretrained(expected_dir).state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        difference = actual[name] - tensor
        assert difference.abs().max() <= atol, (name, difference.abs().max().item())
        assert difference.norm() <= atol * tensor.norm(), (name, (difference.norm() / tensor.norm()).item())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the worker -----------------------------------------------------------------------------


def _worker(job: Path) -> None:
    _die_with_the_launcher()
    settings = json.loads(job.read_text())
    result_path, fsdp_on_cpu = Path(settings.pop("_result")), settings.pop("_fsdp_on_cpu")
    if fsdp_on_cpu:
        _fsdp_on_cpu()
    from accelerate.state import AcceleratorState

    from hf_attn_patch.training import UptrainConfig, end_of_run, uptrain
    from hf_attn_patch.training.distributed import describe_sharding

    result = uptrain(UptrainConfig(**settings))
    state = AcceleratorState()
    main, sharding = state.is_main_process, describe_sharding(state)
    end_of_run()  # every process leaves the group; then the main one writes what came out
    if main:
        result_path.write_text(json.dumps({
            "losses": result.losses, "steps": result.steps, "tokens_seen": result.tokens_seen,
            "final_dir": os.fspath(result.final_dir), "sharding": sharding,
            "resumed_from": os.fspath(result.resumed_from) if result.resumed_from else None,
            "left_process_group": not torch.distributed.is_initialized()}))


def _fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin run on a CPU launch (gloo).

    AcceleratorState turns FSDP on only for GPU-like distributed types; a CPU launch with the
    FSDP variables set would quietly run DDP. FSDP2's `fully_shard` itself works on CPU tensors
    over gloo, so the test switches the type after the state is built; the rest is accelerate's
    own FSDP2 path (prepare, no_sync, clipping, save_state/load_state, get_state_dict).
    """
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    build = accelerate_state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        build(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self._mixed_precision != "no":  # as AcceleratorState does for GPU launches
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate_state.AcceleratorState.__init__ = init


def _die_with_the_launcher() -> None:
    """Linux: SIGKILL this worker when its launcher dies (a test that times out kills the launcher;
    the launcher starts each worker in a session of its own, out of reach of a process-group kill)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
