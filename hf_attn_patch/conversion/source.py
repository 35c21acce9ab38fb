"""Reading a source checkpoint folder: config, shards, tensor headers; nothing else is loaded.

Only safetensors headers are read here (names, dtypes, shapes), so every check on the source
costs a few kilobytes per shard whatever the model size.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import ConversionError
from .listing import SourceTree, list_tree, unreadable

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
        problem = "is not a folder" if root.exists() else "does not exist"
        raise ConversionError(
            f"source {str(root)!r} {problem}; pass a checkpoint folder with config.json"
        )
    tree = list_tree(root)  # first: whatever cannot be read is refused before anything else
    config = _read_config(root)
    shards, index = _find_shards(root, tree)
    tensors, shard_metadata = _read_headers(root, shards)
    if index is not None:
        _check_index_matches(index, tensors)
        _check_every_shard_is_listed(root, index, tree)
    copied, skipped = _classify_other_files(tree, set(shards))
    return SourceCheckpoint(root, config, shards, tensors, shard_metadata, index, copied, skipped)


def _read_config(root: Path) -> dict:
    path = root / CONFIG_NAME
    if not path.is_file():
        raise ConversionError(
            f"{str(root)!r} has no {CONFIG_NAME}; a Hugging Face checkpoint folder needs one"
        )
    config = _read_json(path, "the config")
    if not isinstance(config, dict):
        raise ConversionError(f"{path} does not hold a JSON object; it is not a model config")
    return config


def _read_json(path: Path, what: str):
    try:
        text = path.read_text()
    except OSError as error:
        raise unreadable(path, what, error) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
        raise ConversionError(f"{path} is not valid JSON ({error}); fix or re-download it") from None


def _find_shards(root: Path, tree: SourceTree) -> tuple[tuple[str, ...], dict | None]:
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
    pickles = [name for name in tree.files if "/" not in name and name.endswith(_PICKLE_SUFFIXES)]
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
    index = _read_json(path, "the shard index")
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


# "model-00003-of-00016.safetensors": the numbering transformers gives the shards of one checkpoint.
_NUMBERED_SHARD = re.compile(r"(?P<stem>.+)-(?P<number>\d+)-of-(?P<total>\d+)\.safetensors")


def _check_every_shard_is_listed(root: Path, index: dict, tree: SourceTree) -> None:
    """Refuse an index that leaves out shards of this checkpoint: their tensors would be dropped.

    A .safetensors file beside the index that it does not list belongs to the checkpoint when it
    is numbered like the listed shards, or holds tensors under the same top-level names (such as
    "model."). Other weight files (Mistral's consolidated.safetensors, an adapter) are left out
    and named in the report, like other formats. Numbered names also say how many shards there
    are, so an index that lists fewer is refused too.
    """
    listed = set(index["weight_map"].values())
    numbers: dict[tuple[str, int], set[int]] = {}  # (stem, total) -> the numbers listed
    for shard in listed:
        if match := _NUMBERED_SHARD.fullmatch(shard):
            numbers.setdefault((match["stem"], int(match["total"])), set()).add(int(match["number"]))
    top_level = {name.split(".")[0] for name in index["weight_map"]}
    for name in tree.files:
        if "/" in name or not name.endswith(".safetensors") or name in listed:
            continue
        match = _NUMBERED_SHARD.fullmatch(name)
        held = _tensor_names_or_none(root / name)
        ours = [tensor for tensor in held or () if tensor.split(".")[0] in top_level]
        if (match and any(stem == match["stem"] for stem, _ in numbers)) or ours:
            held = ours + [tensor for tensor in held or () if tensor not in ours]
            shown = ", ".join(repr(tensor) for tensor in held[:3]) + (", ..." if len(held) > 3 else "")
            raise ConversionError(
                f"{INDEX_NAME} does not list the shard {name!r}, which is in {str(root)!r}"
                + (f" and holds {len(held)} tensors ({shown})" if held else "")
                + "; converting would drop them. The index is stale or was edited: regenerate it "
                "(save_pretrained writes both) or move the shard out of the folder"
            )
    for (stem, total), found in numbers.items():
        missing = sorted(set(range(1, total + 1)) - found)
        if missing and found <= set(range(1, total + 1)):  # numbered 1..total, as transformers does
            raise ConversionError(
                f"the shard names {stem}-N-of-{total} count {total} shards but {INDEX_NAME} lists "
                f"{len(found)} (shard number {', '.join(map(str, missing[:3]))} neither listed nor on "
                "disk); the checkpoint is incomplete: re-download it"
            )


def _tensor_names_or_none(path: Path) -> list[str] | None:
    """The tensor names in a safetensors file's header; None when it cannot be read as one."""
    try:
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError):
        return None


def _classify_other_files(tree: SourceTree, shards: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Files copied unchanged, and files left out (other weight formats, hidden entries)."""
    copied, skipped = [], []
    written_here = shards | {CONFIG_NAME, INDEX_NAME}
    for relative in tree.files:
        if relative in written_here:
            continue
        name = Path(relative).name
        is_weights = name.endswith(_OTHER_WEIGHT_SUFFIXES) or name.endswith(".index.json")
        (skipped if is_weights else copied).append(relative)
    return tuple(copied), tuple(skipped) + tree.hidden
