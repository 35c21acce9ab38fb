"""The `hf-attn-patch` console script (also `python -m hf_attn_patch`).

Each subcommand parses its arguments and calls one public function; no logic lives here. Every
subcommand runs through `run_command`, so a user's mistake (a bad path, a bad number, a file that
cannot be read or written) ends in one line on stderr and a non-zero exit, never a traceback;
`--debug` shows the traceback. The exit codes follow; docs/reliability.md states the promises.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

EXIT_REFUSED = 2  # the input was refused: bad arguments, a checkpoint that cannot be converted (ValueError)
EXIT_OS_ERROR = 3  # the file system failed: unreadable, unwritable, disk full (OSError)
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-attn-patch",
        description="Triton attention for Hugging Face transformers: patch, convert, benchmark.",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="patched vs unpatched on the embedded defaults")
    demo.set_defaults(run=_run_demo)

    convert = commands.add_parser(
        "convert", help="convert a safetensors checkpoint to fewer key/value heads (MHA -> GQA/MQA)"
    )
    convert.add_argument("src", help="source checkpoint folder (config.json + safetensors); only read")
    convert.add_argument("dst", help="output folder; must not exist unless --overwrite")
    convert.add_argument(
        "--kv-heads", type=int, required=True, metavar="G", help="key/value heads per layer after conversion"
    )
    convert.add_argument(
        "--method",
        default="mean",
        help="how a group of heads is pooled: mean (default), similarity or pca (these two need --calibration)",
    )
    convert.add_argument(
        "--calibration",
        metavar="FILE",
        help="text file (one sequence per line, tokenized with the source's tokenizer) for the "
        "methods that read activations of the original model",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace dst once the new checkpoint is complete"
    )
    convert.add_argument(
        "--verify",
        default="auto",
        choices=("auto", "full", "shapes", "off"),
        help="full: load the result and run a forward pass; shapes: re-read headers only; "
        "auto (default): full up to 1 GiB of weights, shapes above",
    )
    convert.set_defaults(run=_run_convert)

    info = commands.add_parser("info", help="versions, GPU and supported range: paste this into a bug report")
    info.set_defaults(run=_run_info)

    _accept_debug_after_the_command(commands)
    args = parser.parse_args(argv)
    return run_command(f"{parser.prog} {args.command}", lambda: args.run(args), debug=args.debug)


def run_command(name: str, run: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run one command and return its exit code; expected errors become one line on stderr.

    ValueError (refused input, ConversionError among them) and OSError (the file system) are
    expected: `name: error: <message>` and EXIT_REFUSED or EXIT_OS_ERROR. Anything else is a
    bug and keeps its traceback. `debug=True` re-raises everything.
    """
    try:
        return run() or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, ValueError) as error:
        if debug:
            raise
        print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_OS_ERROR if isinstance(error, OSError) else EXIT_REFUSED


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror  # "[Errno 13]" says nothing to a user; the file name does
        if error.filename is not None:
            text += f": {os.fsdecode(error.filename)!r}"
        if error.filename2 is not None:  # rename, link: from -> to
            text += f" -> {os.fsdecode(error.filename2)!r}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _accept_debug_after_the_command(commands: argparse._SubParsersAction) -> None:
    """`--debug` after the subcommand too (`hf-attn-patch convert ... --debug`), for every subcommand."""
    for parser in {id(parser): parser for parser in commands.choices.values()}.values():
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


def _run_info(args: argparse.Namespace) -> int:
    from .info import format_info

    print(format_info())
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from .conversion import convert_checkpoint

    report = convert_checkpoint(
        args.src,
        args.dst,
        num_kv_heads=args.kv_heads,
        method=args.method,
        calibration=args.calibration,
        overwrite=args.overwrite,
        verify=args.verify,
        progress=sys.stderr.isatty(),
    )
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
