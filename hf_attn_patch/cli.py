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

    args = parser.parse_args(argv)
    return args.run(args) or 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
