"""Writing the converted checkpoint into a folder, one shard at a time.

Each output shard is built from its source shard tensor by tensor and saved before the next one
is read, so resident memory stays near the largest shard. Rewritten tensors are produced per
layer (a layer's key and value may sit in different shards); those not yet due wait in a small
dict until their shard comes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ConversionError
from .methods import PoolingMethod
from .plan import ConversionPlan
from .source import CONFIG_NAME, INDEX_NAME, SourceCheckpoint


@dataclass(frozen=True)
class WriteStats:
    tensors_rewritten: int
    tensors_copied: int
    bytes_written: int


def write_checkpoint(
    source: SourceCheckpoint,
    plan: ConversionPlan,
    method: PoolingMethod,
    folder: Path,
    *,
    progress: bool = False,
) -> WriteStats:
    """Write weights, index, config and the other files of the converted checkpoint into folder."""
    owners = plan.owners()
    waiting: dict[str, torch.Tensor] = {}
    rewritten = copied = bytes_written = parameters = 0
    with _ShardReader(source) as reader, _progress_bar(progress, source.total_bytes) as (bar, task):
        for shard in source.shards:
            tensors = {}
            for name in source.shard_tensors(shard):
                if name in owners:
                    if name not in waiting:
                        waiting.update(owners[name].rewrite(reader.load, method))
                    tensors[name] = waiting.pop(name).contiguous()
                    rewritten += 1
                else:
                    tensors[name] = reader.load(name)
                    copied += 1
                parameters += tensors[name].numel()
                bytes_written += tensors[name].numel() * tensors[name].element_size()
                bar.advance(task, source.tensors[name].nbytes)
            _save_shard(tensors, folder / shard, source.shard_metadata[shard])
            del tensors
            reader.close_all()
    if source.index is not None:
        _write_index(source.index, bytes_written, parameters, folder / INDEX_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(plan.new_config, indent=2) + "\n")
    for relative in source.copied_files:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.root / relative, folder / relative)
    return WriteStats(rewritten, copied, bytes_written)


class _ShardReader:
    """Loads tensors by name from whichever source shard holds them.

    Handles are closed after every output shard: a safetensors handle maps its whole file, and
    pages read through a mapping count as resident until it is closed.
    """

    def __init__(self, source: SourceCheckpoint):
        self._source = source
        self._handles: dict[str, object] = {}

    def __enter__(self) -> "_ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close_all()

    def load(self, name: str) -> torch.Tensor:
        shard = self._source.tensors[name].shard
        if shard not in self._handles:
            self._handles[shard] = safe_open(self._source.root / shard, framework="pt").__enter__()
        try:
            return self._handles[shard].get_tensor(name)
        except SafetensorError as error:  # the headers read fine before: the file changed since
            raise ConversionError(
                f"tensor {name!r} of shard {shard!r} cannot be read ({error}); was the source modified "
                "during the conversion? Nothing was left behind"
            ) from None

    def close_all(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def _save_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None) -> None:
    """save_file, with its I/O failures (disk full, file too large) raised as the OSError they are."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as error:
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(path)) from error


def _write_index(source_index: dict, total_size: int, total_parameters: int, path: Path) -> None:
    metadata = dict(source_index.get("metadata") or {})
    metadata["total_size"] = total_size
    if "total_parameters" in metadata:
        metadata["total_parameters"] = total_parameters
    index = {**source_index, "metadata": metadata}
    path.write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def _progress_bar(enabled: bool, total_bytes: int):
    """A rich progress bar over bytes on stderr (silent when disabled); yields (progress, task)."""
    progress = Progress(
        TextColumn("converting"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )
    with progress:
        yield progress, progress.add_task("convert", total=total_bytes)
