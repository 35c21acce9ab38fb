"""Issue 13, conversion half: no silent loss, no crash, no traceback for a user's mistake.

Every case here is a source, a destination or a file system that a user can get wrong. Each
must end in a clear ConversionError (before anything is written) or an OSError that names the
destination, and must leave no partial checkpoint: the destination absent, or the old one intact
under overwrite=True, and no work folder beside it. docs/reliability.md states the promises.

The tests run as root in CI, for whom chmod 000 changes nothing: the permission cases make
Python's and safetensors' file functions fail as they do for a user without the permission
(`denied`), and one test runs the command line on real permissions, as root without the
capabilities that let root ignore them.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from transformers import LlamaConfig, LlamaForCausalLM

from hf_attn_patch.cli import main as cli_main
from hf_attn_patch.conversion import ConversionError, convert_checkpoint
from hf_attn_patch.conversion import source as conversion_source
from hf_attn_patch.conversion import writer as conversion_writer

from .helpers import tree_hash

INDEX = "model.safetensors.index.json"
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>
FAST = {"verify": "shapes"}  # loading the result is covered by test_conversion.py


def _tiny_llama(folder: Path, shard_size: str = "8KB") -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size=shard_size)
    (folder / "tokenizer.json").write_text('{"stand-in": "copied unchanged"}')
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("nested files are copied too")
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("reliability") / "src")


@pytest.fixture
def source(pristine, tmp_path) -> Path:
    """A private copy of the tiny sharded Llama, free to damage."""
    copy = tmp_path / "src"
    for path in pristine.rglob("*"):
        target = copy / path.relative_to(pristine)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return copy


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def _shards(folder: Path) -> list[str]:
    return sorted(set(_index(folder)["weight_map"].values()))


def _work_folders(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".converting-" in p.name or ".replaced-" in p.name)


def _refused(source: Path, destination: Path, match: str, **options) -> ConversionError:
    options = {"num_kv_heads": 2, **FAST, **options}
    with pytest.raises(ConversionError, match=match) as caught:
        convert_checkpoint(source, destination, **options)
    assert not destination.exists() and _work_folders(destination.parent) == []
    return caught.value


@pytest.fixture
def denied(monkeypatch):
    """denied(path): reading path (a file or a folder) fails as it does without read permission.

    Python's open raises PermissionError, os.scandir too; safetensors' safe_open, which reports
    any failure to open as a missing file, raises FileNotFoundError (what a non-root user sees).
    """
    paths: set[str] = set()

    def is_denied(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.realpath(path) in paths

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    real_open, real_scandir, real_safe_open = builtins.open, os.scandir, conversion_source.safe_open

    def guarded_open(file, *args, **kwargs):
        return refuse(file) if is_denied(file) else real_open(file, *args, **kwargs)

    def guarded_scandir(path="."):
        return refuse(path) if is_denied(path) else real_scandir(path)

    def guarded_safe_open(path, *args, **kwargs):
        if is_denied(path):
            raise FileNotFoundError(f"No such file or directory: {path}")
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)  # pathlib's read_text goes through io.open
    monkeypatch.setattr(os, "scandir", guarded_scandir)  # os.walk lists folders with it
    monkeypatch.setattr(conversion_source, "safe_open", guarded_safe_open)
    monkeypatch.setattr(conversion_writer, "safe_open", guarded_safe_open)
    return lambda path: paths.add(os.path.realpath(path))


# --- the shard index ---------------------------------------------------------------------------


def test_index_that_leaves_out_a_shard_on_disk_is_refused(source, tmp_path):
    """Issue 13: the tensors of an unlisted shard were silently missing from the output."""
    index = _index(source)
    held = {shard: [name for name, where in index["weight_map"].items() if where == shard] for shard in _shards(source)}
    # A shard of MLP weights: the conversion plan does not look for those, so only the index check can catch it.
    left_out = next(shard for shard, names in held.items() if all(".mlp." in name for name in names))
    dropped = held[left_out]
    index["weight_map"] = {name: shard for name, shard in index["weight_map"].items() if shard != left_out}
    (source / INDEX).write_text(json.dumps(index))
    error = _refused(source, tmp_path / "dst", f"does not list the shard '{left_out}'", verify="full")
    assert repr(dropped[0]) in str(error) and "converting would drop them" in str(error)


def test_index_that_lists_fewer_shards_than_their_numbering_is_refused(source, tmp_path):
    """A shard neither listed nor on disk (an edited index over an incomplete download)."""
    last = _shards(source)[-1]
    index = _index(source)
    index["weight_map"] = {name: shard for name, shard in index["weight_map"].items() if shard != last}
    (source / INDEX).write_text(json.dumps(index))
    (source / last).unlink()
    total = len(_shards(source)) + 1
    _refused(source, tmp_path / "dst", f"count {total} shards but {INDEX} lists {total - 1}")


def test_unnumbered_shard_with_the_models_tensors_is_refused(source, tmp_path):
    """Named unlike the listed shards, but it holds 'model.*' tensors the index does not list."""
    from safetensors.torch import save_file

    save_file({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}, source / "part-extra.safetensors")
    _refused(source, tmp_path / "dst", "does not list the shard 'part-extra.safetensors'.*model.layers.9")


def test_other_safetensors_beside_the_index_are_left_out_and_named(source, tmp_path):
    """Mistral ships consolidated.safetensors (its own names) beside the transformers shards."""
    from safetensors.torch import save_file

    save_file({"layers.0.attention.wk.weight": torch.zeros(2, 2)}, source / "consolidated.safetensors")
    report = convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2, **FAST)
    assert "consolidated.safetensors" in report.skipped_files
    assert not (tmp_path / "dst" / "consolidated.safetensors").exists()


# --- what cannot be read is refused before any work ----------------------------------------------


def test_unreadable_subfolder_is_refused(source, tmp_path, denied):
    """Issue 13: it was missing from the output, named neither as copied nor as skipped."""
    denied(source / "extra")
    _refused(source, tmp_path / "dst", r"cannot read the folder .*extra' \(Permission denied\)")


def test_unreadable_file_to_copy_is_refused_before_writing(source, tmp_path, denied):
    denied(source / "tokenizer.json")
    _refused(source, tmp_path / "dst", r"cannot read the file .*tokenizer.json' \(Permission denied\)")


def test_unreadable_config_is_refused(source, tmp_path, denied):
    """Issue 13: a PermissionError traceback."""
    denied(source / "config.json")
    _refused(source, tmp_path / "dst", r"config.json' \(Permission denied\)")


def test_unreadable_shard_is_reported_as_unreadable_not_missing(source, tmp_path, denied):
    """Issue 13: safetensors said FileNotFoundError for a shard that exists."""
    shard = _shards(source)[0]
    denied(source / shard)
    error = _refused(source, tmp_path / "dst", rf"cannot read the file .*{shard}' \(Permission denied\)")
    assert "No such file" not in str(error)


def test_unreadable_calibration_file_is_refused(source, tmp_path, denied):
    text = tmp_path / "calibration.txt"
    text.write_text("some text\n")
    denied(text)
    _refused(source, tmp_path / "dst", r"calibration.txt' \(Permission denied\)", method="pca", calibration=text)


def test_broken_link_is_refused(source, tmp_path):
    (source / "tokenizer.json").unlink()
    (source / "tokenizer.json").symlink_to(tmp_path / "blobs" / "gone")
    _refused(source, tmp_path / "dst", "tokenizer.json' is a link to .*gone', which does not exist")


def test_special_file_is_refused_and_never_opened(source, tmp_path):
    os.mkfifo(source / "pipe")  # opening a pipe to copy it would block forever
    _refused(source, tmp_path / "dst", "pipe' is not a regular file")


def test_folder_that_links_to_itself_is_refused(source, tmp_path):
    (source / "extra" / "loop").symlink_to(source)
    _refused(source, tmp_path / "dst", "links back to a folder that contains it")


def test_linked_folder_is_copied(source, tmp_path):
    """Linked folders are followed like linked files (os.walk used to drop them without a word)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "vocab.txt").write_text("a b c")
    (source / "tokenizer").symlink_to(elsewhere)
    report = convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2, **FAST)
    assert "tokenizer/vocab.txt" in report.copied_files
    assert (tmp_path / "dst" / "tokenizer" / "vocab.txt").read_text() == "a b c"


def test_deeply_nested_config_is_refused(source, tmp_path):
    (source / "config.json").write_text("[" * 100_000)
    _refused(source, tmp_path / "dst", "config.json is not valid JSON")


def test_missing_source_says_so(tmp_path):
    _refused(tmp_path / "nowhere", tmp_path / "dst", "'.*nowhere' does not exist")


# --- the destination -----------------------------------------------------------------------------


def _deny_creating_in(monkeypatch, folder: Path):
    real_mkdir = os.mkdir

    def guarded_mkdir(path, *args, **kwargs):
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def test_read_only_destination_folder_is_refused_before_any_work(source, tmp_path, monkeypatch):
    """Issue 13: a PermissionError traceback, naming the hidden staging folder."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    _deny_creating_in(monkeypatch, read_only)
    error = _refused(source, read_only / "dst", r"cannot write into .*read-only' \(Permission denied\)")
    assert ".converting-" not in str(error)


def test_destination_that_is_not_nameable_is_refused(source, tmp_path):
    with pytest.raises(ConversionError, match="file system root"):
        convert_checkpoint(source, "/", num_kv_heads=2, overwrite=True)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConversionError, match="a-file' that should hold 'dst' is not a folder"):
        convert_checkpoint(source, tmp_path / "a-file" / "dst", num_kv_heads=2)
    assert _work_folders(tmp_path) == []


def test_destination_in_a_link_loop_is_refused(source, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ConversionError, match="cannot be resolved|not a folder"):
        convert_checkpoint(source, tmp_path / "loop" / "dst", num_kv_heads=2)
    assert _work_folders(tmp_path) == []


# --- the file system fails while writing ---------------------------------------------------------


def _file_too_large_after_first_shard(monkeypatch):
    """What safetensors raises when RLIMIT_FSIZE (or a full disk) stops a shard."""
    real_save = conversion_writer.save_file
    calls = []

    def save_then_fail(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(conversion_writer, "save_file", save_then_fail)


def test_file_too_large_is_an_os_error_that_names_the_destination(source, tmp_path, monkeypatch):
    _file_too_large_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match=r"converting into .*dst' failed: File too large \(model-") as caught:
        convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2, **FAST)
    assert caught.value.errno == errno.EFBIG and ".converting-" not in str(caught.value)
    assert not (tmp_path / "dst").exists() and _work_folders(tmp_path) == []


def test_file_too_large_under_overwrite_keeps_the_old_destination(source, tmp_path, monkeypatch):
    convert_checkpoint(source, tmp_path / "dst", num_kv_heads=4, **FAST)
    before = tree_hash(tmp_path / "dst")
    _file_too_large_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match="File too large"):
        convert_checkpoint(source, tmp_path / "dst", num_kv_heads=1, overwrite=True, **FAST)
    assert tree_hash(tmp_path / "dst") == before and _work_folders(tmp_path) == []


def test_file_size_limit_in_a_real_process(pristine, tmp_path):
    """Issue 13's reproduction: RLIMIT_FSIZE in a subprocess; one line, exit 3, nothing left."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000)); "
    done = _cli_process(["convert", str(pristine), str(tmp_path / "dst"), "--kv-heads", "2", "--verify", "off"],
                        prelude=limit)
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert "File too large" in done.stderr
    assert not (tmp_path / "dst").exists() and _work_folders(tmp_path) == []


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["config", "shard", "subfolder", "read-only destination"])
def test_cli_real_permissions_one_line_no_traceback(tmp_path, case):
    """On real permissions (as root, without the capabilities that let root ignore them)."""
    source = _tiny_llama(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    locked = {"config": source / "config.json", "shard": source / _shards(source)[0],
              "subfolder": source / "extra", "read-only destination": out}[case]
    locked.chmod(0o555 if case == "read-only destination" else 0o000)
    try:
        done = _cli_process(["convert", str(source), str(out / "dst"), "--kv-heads", "2", "--verify", "off"],
                            obey_permissions=True)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-attn-patch convert: error: "), done.stderr
    assert "Permission denied" in lines[0] and "No such file" not in lines[0]
    assert not (out / "dst").exists() and _work_folders(out) == []


def test_cli_os_errors_are_one_line_with_the_file(source, tmp_path, monkeypatch, capsys):
    _file_too_large_after_first_shard(monkeypatch)
    code = cli_main(["convert", str(source), str(tmp_path / "dst"), "--kv-heads", "2", "--verify", "off"])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1
    assert err.startswith("hf-attn-patch convert: error: converting into") and "File too large" in err


def test_cli_debug_shows_the_traceback(source, tmp_path, denied):
    denied(source / "config.json")
    for argv in (["--debug", "convert"], ["convert", "--debug"]):
        with pytest.raises(ConversionError, match="Permission denied"):
            cli_main([*argv, str(source), str(tmp_path / "dst"), "--kv-heads", "2"])


# --- a killed conversion, and the next one ----------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_sigkill_mid_write_leaves_only_a_work_folder_that_the_next_run_removes(pristine, tmp_path):
    kill_after_first_shard = (
        "import os, signal; from hf_attn_patch.conversion import writer; real = writer.save_file; "
        "calls = []\n"
        "def save(*a, **k):\n"
        "    calls.append(1); real(*a, **k)\n"
        "    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "writer.save_file = save\n"
    )
    done = _cli_process(["convert", str(pristine), str(tmp_path / "dst"), "--kv-heads", "2", "--verify", "off"],
                        prelude=kill_after_first_shard)
    assert done.returncode == -signal.SIGKILL
    left = _work_folders(tmp_path)
    assert not (tmp_path / "dst").exists() and len(left) == 1 and left[0].startswith(".dst.converting-")

    convert_checkpoint(pristine, tmp_path / "dst", num_kv_heads=2, **FAST)
    assert _work_folders(tmp_path) == [] and (tmp_path / "dst" / "config.json").is_file()


def test_killed_between_the_two_renames_the_next_run_puts_the_old_destination_back(source, tmp_path):
    convert_checkpoint(source, tmp_path / "old", num_kv_heads=4, **FAST)
    before = tree_hash(tmp_path / "old")
    host = socket.gethostname()
    # The state a SIGKILL between "dst -> replaced" and "staging -> dst" leaves:
    (tmp_path / "old").rename(tmp_path / f".dst.replaced-{host}-{_dead_pid()}-0badc0de")
    (tmp_path / f".dst.converting-{host}-{_dead_pid()}-0badc0de").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert_checkpoint(source, tmp_path / "dst", num_kv_heads=1, **FAST)
    assert tree_hash(tmp_path / "dst") == before and _work_folders(tmp_path) == []


def test_work_folders_of_live_processes_and_other_hosts_are_left_alone(source, tmp_path):
    mine = tmp_path / f".dst.converting-{socket.gethostname()}-{os.getpid()}-12345678"
    theirs = tmp_path / f".dst.converting-another-host-{_dead_pid()}-12345678"
    other_name = tmp_path / f".other.converting-{socket.gethostname()}-{_dead_pid()}-12345678"
    for folder in (mine, theirs, other_name):
        folder.mkdir()
    convert_checkpoint(source, tmp_path / "dst", num_kv_heads=2, **FAST)
    assert mine.is_dir() and theirs.is_dir() and other_name.is_dir()


# --- helpers ---------------------------------------------------------------------------------------


def _cli_process(argv: list[str], *, prelude: str = "", obey_permissions: bool = False) -> subprocess.CompletedProcess:
    """Run the command line in a fresh Python; `prelude` runs first (limits, fault injection)."""
    code = prelude + "\nimport sys; from hf_attn_patch.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1"}
    before_exec = _drop_permission_override if obey_permissions and os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                          timeout=120, preexec_fn=before_exec)


def _drop_permission_override() -> None:
    """In the child, before exec: root keeps its identity but loses CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, so file modes apply to it as to anyone (a failure fails the test)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.parametrize("slip", [".", "..", "~"])
def test_overwrite_never_replaces_the_working_or_home_folder(source, tmp_path, monkeypatch, slip):
    """`convert src . --overwrite` (or `..`, `~`) would delete the folder the user is working in."""
    work, home = tmp_path / "parent" / "work", tmp_path / "home"
    work.mkdir(parents=True)
    home.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    destination = os.path.expanduser(slip)
    with pytest.raises(ConversionError, match="overwrite=True would delete it"):
        convert_checkpoint(source, destination, num_kv_heads=2, overwrite=True, **FAST)
    assert (work / "notes.txt").read_text() == "mine" and home.is_dir()
