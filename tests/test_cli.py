"""The `hf-attn-patch` command line: every subcommand turns a user's mistake into one line (issue 13).

Expected errors (ValueError, ConversionError among them, and OSError) print
`hf-attn-patch <cmd>: error: <message>` on one line and exit non-zero; a bug keeps its traceback;
`--debug`, before or after the subcommand, re-raises. The conversion's own failure cases are in
test_conversion_reliability.py.
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys

import pytest

from hf_attn_patch import cli, demo
from hf_attn_patch.conversion import ConversionError


def _demo_raises(monkeypatch, error: BaseException) -> None:
    def run_demo():
        raise error

    monkeypatch.setattr(demo, "run_demo", run_demo)


@pytest.mark.parametrize(
    "error, code, message",
    [
        (ValueError("seq_len must be positive"), cli.EXIT_REFUSED, "seq_len must be positive"),
        (ConversionError("cannot convert 8 KV heads to 3"), cli.EXIT_REFUSED, "cannot convert 8 KV heads to 3"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/config.json"), cli.EXIT_OS_ERROR,
         "Permission denied: '/data/config.json'"),
        (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), cli.EXIT_OS_ERROR,
         "Invalid cross-device link: '/a' -> '/b'"),
        (OSError("simulated: disk full"), cli.EXIT_OS_ERROR, "simulated: disk full"),
        (ValueError("first line\n  second line"), cli.EXIT_REFUSED, "first line second line"),
        (ValueError(), cli.EXIT_REFUSED, "ValueError"),
    ],
)
def test_expected_errors_are_one_line_and_an_exit_code(monkeypatch, capsys, error, code, message):
    _demo_raises(monkeypatch, error)
    assert cli.main(["demo"]) == code
    captured = capsys.readouterr()
    assert captured.err == f"hf-attn-patch demo: error: {message}\n" and captured.out == ""


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    _demo_raises(monkeypatch, KeyboardInterrupt())
    assert cli.main(["demo"]) == 130
    assert capsys.readouterr().err == "hf-attn-patch demo: interrupted\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    _demo_raises(monkeypatch, RuntimeError("a real bug"))
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(["demo"])


@pytest.mark.parametrize("argv", [["--debug", "demo"], ["demo", "--debug"]])
@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"), ValueError("bad"),
                                   KeyboardInterrupt()])
def test_debug_re_raises_before_or_after_the_subcommand(monkeypatch, argv, error):
    _demo_raises(monkeypatch, error)
    with pytest.raises(type(error)):
        cli.main(argv)


def test_a_subcommand_added_later_gets_the_same_handling(monkeypatch, capsys):
    """Any parser added with commands.add_parser(...) and set_defaults(run=...) in main()."""
    add_parser = argparse._SubParsersAction.add_parser

    def add_and_add_one_more(commands, name, **kwargs):
        parser = add_parser(commands, name, **kwargs)
        if name == "convert":
            later = add_parser(commands, "later", help="stands for a subcommand written after this test")
            later.set_defaults(run=lambda args: open(os.path.join(os.sep, "no", "such", "file")))
        return parser

    monkeypatch.setattr(argparse._SubParsersAction, "add_parser", add_and_add_one_more)
    assert cli.main(["later"]) == cli.EXIT_OS_ERROR
    assert capsys.readouterr().err == "hf-attn-patch later: error: No such file or directory: '/no/such/file'\n"
    with pytest.raises(FileNotFoundError):
        cli.main(["later", "--debug"])


def test_usage_errors_exit_2_without_a_traceback(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["convert", "src", "dst", "--kv-heads", "two"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "argument --kv-heads: invalid int value: 'two'" in err
    assert "Traceback" not in err


def test_python_dash_m_prints_one_line(tmp_path):
    command = [sys.executable, "-m", "hf_attn_patch", "convert", str(tmp_path / "missing"), str(tmp_path / "dst"),
               "--kv-heads", "2"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == cli.EXIT_REFUSED
    assert done.stderr == f"hf-attn-patch convert: error: source '{tmp_path / 'missing'}' does not exist; pass a " \
                          "checkpoint folder with config.json\n"
