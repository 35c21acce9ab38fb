"""A run's folder on disk: resumable checkpoints, the final model, and what a resumed run must match.

    output_dir/checkpoints/step-NNNNNNN/   accelerator.save_state + trainer_state.json
    output_dir/final/                      save_pretrained of the trained model

A checkpoint is complete once its trainer_state.json exists: that file is written last,
atomically, after every process's files are on disk. A run killed at any moment therefore
leaves complete checkpoints plus at most one incomplete folder, which resume=True passes over
and the next save of that step replaces. final/ is written beside and renamed into place, so it
is always the old or the new model, never half of one. docs/reliability.md states the promises.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .._files import fsync_path

__all__ = ["STATE_NAME", "CHECKPOINTS", "FINAL", "ResumePoint", "find_resume_point", "check_output_dir",
           "check_resume", "check_same_model", "model_fingerprint", "prepare_output_dir", "save_checkpoint",
           "save_final"]

STATE_NAME = "trainer_state.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
_STEP_FOLDER = re.compile(r"step-(\d+)")


@dataclass(frozen=True)
class ResumePoint:
    folder: Path
    state: dict  # trainer_state.json, checked to hold step, layout and losses

    @property
    def step(self) -> int:
        return self.state["step"]


def find_resume_point(resume, output_dir: Path) -> ResumePoint | None:
    """The checkpoint `resume` names (UptrainConfig.resume), its state read and checked; None for none."""
    if resume is False:
        return None
    if resume is True:
        found = _complete_checkpoints(output_dir)
        return _read(found[-1][1]) if found else None
    folder = Path(resume)
    if not (folder / STATE_NAME).is_file():
        raise ValueError(f"UptrainConfig.resume: {folder} is not an uptrain checkpoint (no {STATE_NAME}; an "
                         "interrupted save leaves none, resume from an earlier checkpoint)")
    return _read(folder)


def check_output_dir(output_dir: Path, resume_point: ResumePoint | None, resume_requested: bool) -> None:
    """A run never overwrites what it does not continue: another run's final model or checkpoints."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"UptrainConfig.output_dir: {output_dir} exists and is not a folder")
    checkpoints = _complete_checkpoints(output_dir)
    if resume_point is None:
        found = [f"{FINAL}/"] if (output_dir / FINAL).exists() else []
        found += [f"{CHECKPOINTS}/{folder.name}" for _, folder in checkpoints[-1:]]
        if found:
            advice = ("it has no checkpoint to resume from" if resume_requested
                      else "continue it with resume=True (--resume)")
            raise ValueError(f"UptrainConfig.output_dir: {output_dir} already holds a run ({', '.join(found)}) "
                             f"that this run would overwrite; {advice}, or choose another output_dir")
        return
    later = [folder.name for step, folder in checkpoints if step > resume_point.step]
    if later:
        raise ValueError(f"cannot resume from {resume_point.folder} (step {resume_point.step}) into {output_dir}: it "
                         f"holds later checkpoints ({', '.join(later[:3])}) that this run would overwrite one by "
                         "one and that resume=True would take for this run's; move them out or choose another "
                         "output_dir")


def check_resume(resume_point: ResumePoint, *, max_steps: int, objective: str, layout: dict) -> None:
    """A resumed run must see the same batches and optimize the same loss (ValueError otherwise).

    Keys missing from an older trainer_state.json are not compared.
    """
    where = f"cannot resume from {resume_point.folder} (step {resume_point.step})"
    if max_steps < resume_point.step:
        raise ValueError(f"{where} with max_steps {max_steps}: the checkpoint is past it; pass max_steps >= "
                         f"{resume_point.step}")
    saved = resume_point.state.get("objective")
    if saved is not None and saved != objective:
        raise ValueError(f"{where}: the objective changed ({saved} -> {objective}); a resumed run must use the "
                         "same teacher and distill_weight. Start a new run in another output_dir instead")
    saved_layout = resume_point.state["layout"]
    changed = {key: (saved_layout[key], value) for key, value in layout.items()
               if key in saved_layout and saved_layout[key] != value}
    if changed:
        raise ValueError(f"{where}: the data layout changed "
                         f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); a resumed run "
                         "must see the same batches")


def model_fingerprint(model) -> dict:
    """Class, parameter count and a digest of every state-dict name and shape."""
    state = model.state_dict()
    shapes = sorted((name, tuple(tensor.shape)) for name, tensor in state.items())
    return {"class": type(model).__name__, "parameters": sum(tensor.numel() for tensor in state.values()),
            "shapes": hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]}


def check_same_model(resume_point: ResumePoint, fingerprint: dict) -> None:
    saved = resume_point.state.get("model")
    if saved is not None and saved != fingerprint:
        raise ValueError(f"cannot resume from {resume_point.folder}: it was saved from another model "
                         f"({saved['class']}, {saved['parameters']:,} parameters) than this one "
                         f"({fingerprint['class']}, {fingerprint['parameters']:,}); resume with the model it "
                         "was trained from")


def prepare_output_dir(output_dir: Path) -> None:
    """Create output_dir and prove it writable now, not at the first checkpoint hours later."""
    probe = output_dir / f".write-test-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OSError(error.errno or errno.EIO, f"cannot write into UptrainConfig.output_dir {output_dir} "
                      f"({error.strerror or error}); choose a folder you can write to") from error


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, save_total_limit: int | None) -> Path:
    """accelerator.save_state into checkpoints/step-N, then its trainer_state.json (the mark of completeness)."""
    folder = output_dir / CHECKPOINTS / f"step-{step:07d}"
    if accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)  # an incomplete save of this step by a killed run: never mix its files in
    accelerator.wait_for_everyone()
    accelerator.save_state(os.fspath(folder))
    accelerator.wait_for_everyone()  # every process's files are written
    if accelerator.is_main_process:
        _flush(folder)
        _write_atomically(folder / STATE_NAME, json.dumps(state, indent=1))
        if save_total_limit:
            for _, stale in _complete_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def save_final(model, tokenizer, output_dir: Path, state_dict: dict | None = None) -> Path:
    """save_pretrained beside final/, then swap it in: final/ is the old or the new model, never half.

    state_dict: the weights to write instead of the model's own (FSDP's gathered full state dict).
    """
    final, partial, old = output_dir / FINAL, output_dir / ".final.partial", output_dir / ".final.old"
    for leftover in (partial, old):  # of a run killed while saving
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        model.save_pretrained(partial, state_dict=state_dict)  # None: the model's own
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        _flush(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():
        final.rename(old)
    partial.rename(final)
    fsync_path(output_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


# --- helpers ----------------------------------------------------------------------------------


def _complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, by step (not by name: step-10000000 > step-9999999)."""
    found = []
    for state in (output_dir / CHECKPOINTS).glob(f"step-*/{STATE_NAME}"):
        match = _STEP_FOLDER.fullmatch(state.parent.name)
        if match:
            found.append((int(match[1]), state.parent))
    return sorted(found)


def _read(folder: Path) -> ResumePoint:
    path = folder / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"cannot resume from {folder}: {STATE_NAME} is damaged ({error}); move that checkpoint "
                         "out of the way and resume from the one before") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("layout"), dict)
            and isinstance(state.get("losses"), list)):
        raise ValueError(f"cannot resume from {folder}: {STATE_NAME} lacks step, layout or losses; it was not "
                         "written by uptrain")
    return ResumePoint(folder, state)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    fsync_path(path.parent)


def _flush(folder: Path) -> None:
    """fsync every file and folder under folder: the data is on disk before the mark that says so."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(folder)
