"""Reading a source checkpoint folder: config, shards, tensor headers; nothing else is loaded.

Only safetensors headers are read here (names, dtypes, shapes), so every check on the source
costs a few kilobytes per shard whatever the model size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import ConversionError

CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Weights in formats we never read: copying them would leave stale multi-head weights beside a
# config that now says grouped-query, so they are left out and listed in the report.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_BYTES_PER_ELEMENT = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it looks like, from its shard's header."""

    shard: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * _BYTES_PER_ELEMENT.get(self.dtype, 1)


@dataclass(frozen=True)
class SourceCheckpoint:
    root: Path
    config: dict
    shards: tuple[str, ...]
    tensors: dict[str, TensorInfo]
    shard_metadata: dict[str, dict[str, str] | None]
    index: dict | None
    copied_files: tuple[str, ...]
    skipped_files: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def shard_tensors(self, shard: str) -> list[str]:
        return [name for name, info in self.tensors.items() if info.shard == shard]


def read_source(root: str | os.PathLike) -> SourceCheckpoint:
    """Read and check a checkpoint folder's layout; raise ConversionError on anything wrong."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(
            f"source {str(root)!r} is not a folder; pass a checkpoint folder with config.json"
        )
    config = _read_config(root)
    shards, index = _find_shards(root)
    tensors, shard_metadata = _read_headers(root, shards)
    if index is not None:
        _check_index_matches(index, tensors)
    copied, skipped = _classify_other_files(root, set(shards))
    return SourceCheckpoint(root, config, shards, tensors, shard_metadata, index, copied, skipped)


def _read_config(root: Path) -> dict:
    path = root / CONFIG_NAME
    if not path.is_file():
        raise ConversionError(
            f"{str(root)!r} has no {CONFIG_NAME}; a Hugging Face checkpoint folder needs one"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} does not hold a JSON object; it is not a model config")
    return config


def _find_shards(root: Path) -> tuple[tuple[str, ...], dict | None]:
    has_single = (root / SINGLE_FILE_NAME).is_file()
    has_index = (root / INDEX_NAME).is_file()
    if has_single and has_index:
        raise ConversionError(
            f"{str(root)!r} holds both {SINGLE_FILE_NAME} and {INDEX_NAME}; one of them is stale. "
            "Remove the one that does not belong and convert again"
        )
    if has_single:
        return (SINGLE_FILE_NAME,), None
    if has_index:
        index = _read_index(root / INDEX_NAME)
        shards = tuple(sorted(set(index["weight_map"].values())))
        for shard in shards:
            if not (root / shard).is_file():
                raise ConversionError(
                    f"{INDEX_NAME} names shard {shard!r}, which is missing from {str(root)!r}"
                )
        return shards, index
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ConversionError(
            f"{str(root)!r} holds only pickle weights ({', '.join(pickles)}). Only safetensors "
            "checkpoints are converted: loading a pickle runs arbitrary code from the file, so "
            "this tool never calls torch.load on one. Convert it to safetensors yourself from a "
            "source you trust (model.save_pretrained(path) writes safetensors) and retry"
        )
    raise ConversionError(
        f"{str(root)!r} has neither {SINGLE_FILE_NAME} nor {INDEX_NAME}; nothing to convert"
    )


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); fix or re-download it") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{path} has no 'weight_map'; it is not a safetensors shard index")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise ConversionError(
                f"{path} maps {name!r} to {shard!r}; shards must be .safetensors files in the same folder"
            )
    return index


def _read_headers(root: Path, shards: tuple[str, ...]):
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, dict[str, str] | None] = {}
    for shard in shards:
        try:
            with safe_open(root / shard, framework="pt") as handle:
                metadata[shard] = handle.metadata()
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    if name in tensors:
                        raise ConversionError(
                            f"tensor {name!r} is stored twice, in {tensors[name].shard} and {shard}"
                        )
                    tensors[name] = TensorInfo(shard, piece.get_dtype(), tuple(piece.get_shape()))
        except SafetensorError as error:
            raise ConversionError(
                f"shard {shard!r} is corrupt or truncated ({error}); re-download or re-save the checkpoint"
            ) from None
    return tensors, metadata


def _check_index_matches(index: dict, tensors: dict[str, TensorInfo]) -> None:
    for name, shard in index["weight_map"].items():
        info = tensors.get(name)
        if info is None or info.shard != shard:
            raise ConversionError(
                f"{INDEX_NAME} says {name!r} is in {shard}, but it is not there; the checkpoint is "
                "incomplete or its index is stale"
            )
    unlisted = sorted(set(tensors) - set(index["weight_map"]))
    if unlisted:
        raise ConversionError(
            f"the shards hold tensors that {INDEX_NAME} does not list (first: {unlisted[0]!r}); "
            "the index is stale"
        )


def _classify_other_files(root: Path, shards: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Files copied unchanged, and files left out (other weight formats, hidden entries)."""
    copied, skipped = [], []
    written_here = shards | {CONFIG_NAME, INDEX_NAME}
    for folder, subfolders, files in os.walk(root):
        relative_folder = Path(folder).relative_to(root)
        for hidden in [name for name in subfolders if name.startswith(".")]:
            subfolders.remove(hidden)
            skipped.append(str(relative_folder / hidden) + "/")
        for name in sorted(files):
            relative = str(relative_folder / name)
            if relative in written_here:
                continue
            is_weights = name.endswith(_OTHER_WEIGHT_SUFFIXES) or name.endswith(".index.json")
            (skipped if is_weights or name.startswith(".") else copied).append(relative)
    return tuple(copied), tuple(skipped)
