"""Several processes (accelerate launch / torchrun): what changes under FSDP.

DDP needs nothing from this module: accelerate wraps the model, each process reads its own
slice of every global batch (the stream positions of data.py depend on the process index), and
the gradients are averaged over processes. FSDP (accelerate's FSDP plugin; FSDP2 `fully_shard`
where the installed accelerate and torch offer it) shards the parameters, so

* the final model's weights are gathered into one full state dict on the main process before
  `save_pretrained` (the sharded parameters themselves are DTensors that it cannot write), and
* a checkpoint is accelerate's FSDP state (`pytorch_model_fsdp_0/`, `optimizer_0/`: with the
  default SHARDED_STATE_DICT every process writes its own part), which only an FSDP run of the
  same shape can load; a plain checkpoint (`model.safetensors`) only a run without FSDP.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_fsdp", "full_state_dict", "check_checkpoint_kind", "describe_sharding", "end_of_run"]


def end_of_run() -> None:
    """The last call of a script that ran `uptrain` in several processes: every process waits for
    the others, then leaves the process group. A process that exits with the group still up while
    another is still working (the main process writing its results) can abort in torch's teardown
    ("terminate called without an active exception", SIGABRT), and the launcher then stops the
    others: a finished run that exits non-zero. `uptrain` itself leaves the group up, for scripts
    that go on. Nothing to do in one process."""
    import torch.distributed

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from accelerate.state import PartialState

    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()


def is_fsdp(accelerator) -> bool:
    """`accelerator`: an Accelerator or its AcceleratorState."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def describe_sharding(state) -> str:
    """"FSDP2 (SHARDED_STATE_DICT)", "DDP" or "one process", from an `AcceleratorState`
    (`accelerator.state`)."""
    if is_fsdp(state):
        plugin = state.fsdp_plugin
        return f"FSDP{plugin.fsdp_version} ({plugin.state_dict_type.name})"
    return "DDP" if state.num_processes > 1 else "one process"


def full_state_dict(accelerator, model) -> dict | None:
    """The whole model's weights on the main process under FSDP (on the CPU; other processes get
    an empty dict), None without FSDP, where save_pretrained reads the model itself.

    Every process must call this: the shards are gathered with collectives.
    """
    if not is_fsdp(accelerator):
        return None
    return accelerator.get_state_dict(model)


def check_checkpoint_kind(folder: Path, accelerator) -> None:
    """Refuse (ValueError) to load an FSDP checkpoint without FSDP, or a plain one under FSDP:
    accelerate would fail on a missing file halfway through loading."""
    saved_fsdp = any(Path(folder).glob("pytorch_model_fsdp_*"))
    if saved_fsdp != is_fsdp(accelerator):
        saved, now = ("under FSDP", "without FSDP") if saved_fsdp else ("without FSDP", "under FSDP")
        raise ValueError(f"cannot resume from {folder}: it was saved {saved} and this run is {now}; resume it "
                         "with the launcher configuration it was trained with (examples/accelerate/)")
