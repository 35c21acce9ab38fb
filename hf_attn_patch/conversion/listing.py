"""Listing a source checkpoint folder: every file found, and anything that cannot be read refused.

The whole tree is listed, and every file opened once, before anything is written: a folder or
file that cannot be read would otherwise be missing from the output without a word. Linked
files and folders are followed (a Hugging Face cache snapshot is made of links); hidden entries
are left out and named in the report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError


@dataclass(frozen=True)
class SourceTree:
    files: tuple[str, ...]  # relative paths of the regular files (links followed), sorted
    hidden: tuple[str, ...]  # hidden files, and hidden folders with a trailing "/", never read


def list_tree(root: Path) -> SourceTree:
    """All files under root; raise ConversionError for anything unreadable, broken or special."""
    files: list[str] = []
    hidden: list[str] = []
    _list_folder(root, Path(), (_real_path(root),), files, hidden)
    return SourceTree(tuple(files), tuple(hidden))


def check_readable(path: Path, what: str) -> None:
    """Open path once for reading: safetensors reports a file it may not read as missing, so ask first."""
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise unreadable(path, what, error) from None


def unreadable(path: Path, what: str, error: OSError) -> ConversionError:
    return ConversionError(
        f"cannot read {what} {str(path)!r} ({error.strerror or error}); nothing was written. Make it "
        "readable (check its permissions and the disk) and convert again"
    )


def _list_folder(root: Path, relative: Path, ancestors: tuple[str, ...], files: list, hidden: list) -> None:
    folder = root / relative
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        raise unreadable(folder, "the folder", error) from None
    for entry in entries:
        path = relative / entry.name
        try:
            kind = _kind(entry)
        except OSError as error:
            raise unreadable(root / path, "the entry", error) from None
        if entry.name.startswith("."):
            hidden.append(f"{path}/" if kind == "folder" else str(path))
        elif kind == "folder":
            real = _real_path(root / path)
            if real in ancestors:
                raise ConversionError(
                    f"{str(root / path)!r} links back to a folder that contains it; remove the link "
                    "(a checkpoint folder cannot contain itself)"
                )
            _list_folder(root, path, ancestors + (real,), files, hidden)
        elif kind == "file":
            check_readable(root / path, "the file")
            files.append(str(path))
        elif kind == "broken link":
            raise ConversionError(
                f"{str(root / path)!r} is a link to {os.readlink(root / path)!r}, which does not exist "
                "(an incomplete download?); restore its target or remove the link"
            )
        else:
            raise ConversionError(
                f"{str(root / path)!r} is not a regular file (a pipe, socket or device) and cannot be "
                "copied; move it out of the checkpoint folder"
            )


def _kind(entry: os.DirEntry) -> str:
    if entry.is_dir():
        return "folder"
    if entry.is_file():
        return "file"
    return "broken link" if entry.is_symlink() else "special"


def _real_path(path: Path) -> str:
    return os.path.realpath(path)
