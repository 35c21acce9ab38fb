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

    kv_size = commands.add_parser(
        "kv-size",
        help="KV-cache bytes, what fits beside the weights and the decode-step bound, as is and as GQA/MQA",
    )
    kv_size.add_argument(
        "model",
        metavar="MODEL_DIR_OR_CONFIG",
        help="checkpoint folder with config.json (safetensors optional; only their headers are read), or a config file",
    )
    kv_size.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    kv_size.add_argument(
        "--seq", type=int, help="tokens per sequence (default: the config's max_position_embeddings, capped; the output says at what)"
    )
    kv_size.add_argument("--dtype", help="bf16, fp16 or fp32, for weights and K/V (default: the config's torch_dtype, else bf16)")
    kv_size.add_argument(
        "--gpu-memory", type=float, metavar="GiB", help="GPU memory (default: the local GPU's, else 80 as on an H100)"
    )
    kv_size.add_argument(
        "--bandwidth", type=float, metavar="TB/s",
        help="peak memory bandwidth (default: the local GPU's data sheet figure, else 3.35 as on an H100 SXM)",
    )
    kv_size.set_defaults(run=_run_kv_size)

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


def _run_kv_size(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .kv_size import format_bytes, kv_size_report

    report = kv_size_report(
        args.model,
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
        gpu_memory_gib=args.gpu_memory,
        bandwidth_tb_s=args.bandwidth,
    )
    shape, batch_seq = report.shape, f"{report.batch} x {report.seq:,}"
    title = (
        f"{report.name}: {report.model_type}, {shape.num_layers} layers, {report.num_query_heads} query "
        f"heads of dim {shape.head_dim}, {shape.num_kv_heads} KV heads"
    )
    if shape.sliding_window is not None:
        title += f", sliding window {shape.sliding_window:,}"
    table = Table(title=Text(title), title_justify="left")  # Text: a folder name is not markup
    table.add_column("KV heads")
    table.add_column("K/V per token", justify="right")
    if report.encoder:
        table.add_column(f"K/V of {batch_seq}", justify="right")
    else:
        kept = f" ({report.tokens_held:,} kept)" if report.tokens_held < report.seq else ""
        table.add_column(f"K/V cache, {batch_seq}{kept}", justify="right")
    table.add_column("weights", justify="right")
    if not report.encoder:
        for header in ("K/V tokens that fit", f"batch at {report.seq:,}", f"seq at batch {report.batch}",
                       "decode step >=", "tokens/s <="):
            table.add_column(header, justify="right")
    for v in report.variants:
        row = [f"{v.kv_heads} ({v.label})", format_bytes(v.kv_bytes_per_token), format_bytes(v.kv_bytes),
               format_bytes(v.weight_bytes)]
        if not report.encoder:
            if not v.fits:
                row[2] = f"[red]{row[2]} (too big)[/red]"
            row += [f"{v.max_tokens:,}", f"{v.max_batch:,}", "any" if v.max_seq is None else f"{v.max_seq:,}",
                    f"{v.decode_step_s * 1e3:,.2f} ms", f"{v.tokens_per_s:,.0f}"]
        table.add_row(*row)

    # Captured output (a pipe, a log) is not a terminal: rich would wrap the table at 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for note in report.notes:
        console.print(f"- {note}", markup=False, highlight=False)
    if any(v.fits is False for v in report.variants):
        console.print("- too big: the weights and the K/V of batch x seq exceed the GPU memory", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
