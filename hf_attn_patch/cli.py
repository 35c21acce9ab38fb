"""The `hf-attn-patch` console script (also `python -m hf_attn_patch`).

Each subcommand parses its arguments and calls one public function; no logic lives here.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-attn-patch",
        description="Triton attention for Hugging Face transformers: patch, convert, benchmark.",
    )
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

    args = parser.parse_args(argv)
    return args.run(args) or 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


def _run_info(args: argparse.Namespace) -> int:
    from .info import format_info

    print(format_info())
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from .conversion import ConversionError, convert_checkpoint

    try:
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
    except ConversionError as error:
        print(f"hf-attn-patch convert: error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
