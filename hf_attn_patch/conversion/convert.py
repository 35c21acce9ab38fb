"""convert_checkpoint: check everything, write into a temporary folder, verify, move into place."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import time
import uuid
from importlib.metadata import version
from pathlib import Path

from .._files import fsync_path
from .calibration import CalibrationInput, collect_statistics, prepare_calibration
from .errors import ConversionError
from .families import plan_conversion
from .methods import METHODS, PoolingMethod, needs_calibration
from .plan import ConversionPlan
from .report import REPORT_NAME, ConversionReport
from .source import SourceCheckpoint, read_source
from .verify import resolve_verify, verify_checkpoint
from .writer import write_checkpoint


def convert_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    num_kv_heads: int,
    method: str = "mean",
    calibration: CalibrationInput = None,
    overwrite: bool = False,
    verify: str = "auto",
    progress: bool = False,
) -> ConversionReport:
    """Convert a safetensors checkpoint folder to `num_kv_heads` key/value heads per layer.

    Llama, Mistral, Falcon (all three fused layouts) and BERT (to GQA-BERT) are supported. The
    source is only read. Nothing is written until the whole source has been checked; the result
    is written into a hidden folder beside `dst_dir`, verified (see `verify.py` for the modes),
    and renamed to `dst_dir` at the end, so a failure at any point leaves no partial checkpoint.
    An existing `dst_dir` is replaced only with `overwrite=True`, and only once the new one is
    complete. Raises ConversionError (a ValueError) with the reason on any refusal, including a
    source that cannot be read and a destination folder that cannot be written; an OSError when
    writing fails midway (disk full, file too large). docs/reliability.md lists the promises,
    and what a killed conversion leaves behind (the next conversion to the same path removes it).

    `calibration` feeds the methods that need it (`needs_calibration`, e.g. "similarity", "pca";
    Llama, Mistral and BERT only): a path to a text file (one sequence per non-empty line,
    tokenized with the tokenizer saved in `src_dir`), or token ids as a (num_sequences, seq_len)
    integer tensor or a list of lists of ints. Such a method first runs the original model over
    it (see calibration.py for the cost). Other methods ignore it.
    """
    source_dir, destination = Path(src_dir), Path(os.path.abspath(dst_dir))
    pool = _pooling_method(method)
    calibrated = needs_calibration(pool)
    if calibrated and calibration is None:
        raise ConversionError(
            f"method {method!r} needs calibration data: pass calibration= (--calibration) a text file "
            "or token ids of a few thousand tokens of text like the model's"
        )
    _remove_leftovers(destination)  # first: it may put back the old destination of a killed swap
    _check_destination(source_dir, destination, overwrite)
    source = read_source(source_dir)
    plan = plan_conversion(source.config, source.tensors, num_kv_heads, rewrite_attention=calibrated)
    tokens = prepare_calibration(calibration, source_dir, source.config) if calibrated else None
    verify_mode = resolve_verify(verify, source.total_bytes)
    _check_free_space(destination.parent, source)
    staging = _make_staging_folder(destination)  # also proves that the destination's folder is writable
    try:
        calibration_report = None
        if calibrated:
            started = time.perf_counter()
            statistics = collect_statistics(source_dir, plan, tokens)
            pool = functools.partial(pool, statistics=statistics)
            calibration_report = {
                **tokens.summary(),
                "seconds": round(time.perf_counter() - started, 3),
            }
        started = time.perf_counter()
        stats = write_checkpoint(source, plan, pool, staging, progress=progress)
        _flush_to_disk(staging)
        seconds = time.perf_counter() - started  # until the data is on disk, not in the page cache
        verified = verify_checkpoint(staging, source, plan, verify_mode)
        report = _report(
            source, destination, plan, method, stats, seconds, verify_mode, verified, calibration_report
        )
        report.save(staging / REPORT_NAME)
        _flush_to_disk(staging)
        _move_into_place(staging, destination, overwrite)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise _failed_writing(error, staging, destination) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _pooling_method(method: str) -> PoolingMethod:
    if method not in METHODS:
        raise ConversionError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[method]


def _check_destination(source: Path, destination: Path, overwrite: bool) -> None:
    if not destination.name:
        raise ConversionError(f"destination {str(destination)!r} is a file system root; name a new folder")
    source_real, destination_real = _resolve(source), _resolve(destination)
    if (
        destination_real == source_real
        or source_real in destination_real.parents
        or destination_real in source_real.parents
    ):
        raise ConversionError(
            f"destination {str(destination)!r} is the source or nested with it; write the converted "
            "checkpoint to a separate folder (the source is never modified)"
        )
    if not destination.parent.is_dir():
        problem = "is not a folder" if destination.parent.exists() else "does not exist"
        raise ConversionError(
            f"the folder {str(destination.parent)!r} that should hold {destination.name!r} {problem}; "
            "create it first"
        )
    if destination.exists() or destination.is_symlink():
        if not destination.is_dir() or destination.is_symlink():
            raise ConversionError(
                f"destination {str(destination)!r} exists and is not a folder; remove it or choose "
                "another path"
            )
        if not overwrite:
            raise ConversionError(
                f"destination {str(destination)!r} already exists; pass overwrite=True (--overwrite) to "
                "replace it once the new checkpoint is complete"
            )
        protected = _protected_folder(destination_real)
        if protected:
            raise ConversionError(
                f"destination {str(destination)!r} is {protected}; overwrite=True would delete it and all it "
                "holds. Write the checkpoint to a new folder"
            )


def _protected_folder(folder: Path) -> str | None:
    """Folders that a slip of the keyboard (`.`, `..`, `~`) must not let overwrite=True replace."""
    try:
        working = Path.cwd().resolve()
    except OSError:  # the working folder was deleted: nothing to protect
        working = None
    try:
        home = Path.home().resolve()
    except (OSError, RuntimeError):  # no HOME and no password entry
        home = None
    if working is not None and (folder == working or folder in working.parents):
        return "the working folder or holds it"
    if folder == home:
        return "the home folder"
    return None


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ConversionError(f"{str(path)!r} cannot be resolved ({error}); pass another path") from None


# Work folders live beside the destination (so the final rename stays on one file system), hidden,
# and named after the destination, the host and the process, so that a later conversion to the same
# path can tell those of a dead process from those of a live one:
#   .<name>.converting-<host>-<pid>-<tag>   the checkpoint being written
#   .<name>.replaced-<host>-<pid>-<tag>     the old destination, during the swap under overwrite=True
_CONVERTING, _REPLACED = "converting", "replaced"


def _work_folder(destination: Path, kind: str) -> Path:
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return destination.with_name(f".{destination.name}.{kind}-{tag}")


def _make_staging_folder(destination: Path) -> Path:
    staging = _work_folder(destination, _CONVERTING)
    try:
        staging.mkdir()
    except OSError as error:
        raise ConversionError(
            f"cannot write into {str(destination.parent)!r} ({error.strerror or error}); nothing was "
            "written. Choose a destination in a folder you can write to"
        ) from None
    return staging


def _remove_leftovers(destination: Path) -> None:
    """Remove the work folders that a killed conversion to this destination left behind.

    A dead process's staging folder is deleted. Its replaced folder holds the old destination: it
    goes back into place if the process died between the two renames (no destination now), and is
    deleted otherwise. Folders of live processes, and of other hosts, are left alone.
    """
    host = socket.gethostname()
    try:
        entries = list(destination.parent.iterdir())
    except OSError:
        return  # nothing can be cleaned here; writing will fail with a clear error later
    for path in entries:
        for kind in (_CONVERTING, _REPLACED):
            prefix = f".{destination.name}.{kind}-"
            if not path.name.startswith(prefix):
                continue
            owner, _, rest = path.name[len(prefix):].rpartition("-")
            owner_host, _, pid = owner.rpartition("-")
            if owner_host != host or not pid.isdigit() or not rest or _is_running(int(pid)):
                continue
            try:
                if kind == _REPLACED and not (destination.exists() or destination.is_symlink()):
                    path.rename(destination)
                else:
                    shutil.rmtree(path)
            except OSError:
                pass  # cleaning is a courtesy; the conversion itself does not depend on it


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _failed_writing(error: OSError, staging: Path, destination: Path) -> OSError:
    """The same OSError, said in terms of the destination the user named (not the hidden staging folder)."""
    reason = error.strerror or str(error)
    if error.filename:
        where = Path(error.filename)
        if where.is_relative_to(staging):
            where = where.relative_to(staging)
        reason += f" ({where})"
    message = f"converting into {str(destination)!r} failed: {reason}; no partial checkpoint was left behind"
    return OSError(error.errno, message) if error.errno else OSError(message)


def _check_free_space(folder: Path, source: SourceCheckpoint) -> None:
    # The output is never larger than the input (pooling only shrinks K/V), so the input's size bounds it.
    needed = source.total_bytes + sum((source.root / name).stat().st_size for name in source.copied_files)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConversionError(
            f"{str(folder)!r} has {free / 1e9:.1f} GB free but the converted checkpoint may need up to "
            f"{needed / 1e9:.1f} GB; free some space or write elsewhere"
        )


def _flush_to_disk(folder: Path) -> None:
    """fsync every file, then every folder, so that a crash after the rename cannot leave empty shards."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def _move_into_place(staging: Path, destination: Path, overwrite: bool) -> None:
    if destination.exists():
        if not overwrite:  # appeared while we were writing
            raise ConversionError(
                f"destination {str(destination)!r} appeared during the conversion; nothing was replaced"
            )
        replaced = _work_folder(destination, _REPLACED)
        destination.rename(replaced)
        try:
            staging.rename(destination)
        except BaseException:
            replaced.rename(destination)
            raise
        shutil.rmtree(replaced, ignore_errors=True)  # the new checkpoint is in place; a rerun cleans any rest
    else:
        staging.rename(destination)
    fsync_path(destination.parent)  # makes the rename itself durable


def _report(
    source, destination, plan: ConversionPlan, method, stats, seconds, verify_mode, verified, calibration
) -> ConversionReport:
    return ConversionReport(
        source=str(source.root.resolve()),
        destination=str(destination.resolve()),
        family=plan.family,
        layout=plan.layout,
        method=method,
        num_layers=len(plan.layers),
        num_query_heads=plan.num_query_heads,
        kv_heads_before=plan.kv_heads_before,
        kv_heads_after=plan.kv_heads_after,
        head_dim=plan.head_dim,
        shards=len(source.shards),
        tensors_rewritten=stats.tensors_rewritten,
        tensors_copied=stats.tensors_copied,
        bytes_read=source.total_bytes,
        bytes_written=stats.bytes_written,
        seconds=round(seconds, 3),
        megabytes_per_second=round(source.total_bytes / 1e6 / max(seconds, 1e-9), 1),
        verification=verify_mode,
        verified=verified,
        stock_loadable=plan.stock_loadable,
        config_changes=plan.config_changes(source.config),
        copied_files=list(source.copied_files),
        skipped_files=list(source.skipped_files),
        notes=list(plan.notes),
        calibration=calibration,
        versions={package: version(package) for package in ("torch", "safetensors", "transformers")},
    )
