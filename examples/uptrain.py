"""Uptrain a converted (GQA/MQA) checkpoint with accelerate, attention on hf-attn-patch's kernels.

    python examples/uptrain.py llama-gqa4 --data corpus.txt --output-dir runs/gqa4 --teacher llama-mha
    python examples/uptrain.py llama-gqa4 --data tokens/ --output-dir runs/gqa4 --packing
    accelerate launch --num_processes 8 examples/uptrain.py llama-gqa4 --data tokens/ --output-dir runs/gqa4

A thin command line over `hf_attn_patch.training.uptrain`; every flag is a field of UptrainConfig
(docs/uptraining.md). Prints the result as one JSON line at the end (main process). A refused
config or a file that cannot be read or written is one line on stderr and a non-zero exit, as
with `hf-attn-patch` (docs/reliability.md); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hf_attn_patch.cli import run_command
from hf_attn_patch.training import UptrainConfig, end_of_run, uptrain


def parse_args(argv=None) -> tuple[UptrainConfig, bool]:
    """The run's config, and whether --debug was given."""
    defaults = UptrainConfig(model="", output_dir="", data="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="checkpoint folder to train (converted GQA/MQA Llama, Mistral, Falcon, GQA-BERT, ...)")
    p.add_argument("--data", required=True,
                   help="text file, token file or folder of token files (.npy, .pt, .bin)")
    p.add_argument("--output-dir", required=True, help="checkpoints/ and final/ go here")
    p.add_argument("--teacher", help="the original (unconverted) checkpoint to distil from; required for encoders")
    p.add_argument("--tokenizer", help="tokenizer folder for text data, or 'bytes' (default: the model folder's)")
    p.add_argument("--distill-weight", type=float, default=defaults.distill_weight,
                   help="causal LMs: loss = (1 - w) * LM + w * T^2 * KL")
    p.add_argument("--distill-temperature", type=float, default=defaults.distill_temperature)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per process per micro-step")
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio)
    p.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=defaults.schedule)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="0: no clipping")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default=defaults.mixed_precision,
                   help="auto: bf16 on CUDA, no on the CPU")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--no-patch", dest="patch", action="store_false", help="train on stock transformers attention")
    p.add_argument("--save-every", type=int, default=defaults.save_every, help="steps between checkpoints; 0: none")
    p.add_argument("--save-total-limit", type=int, default=defaults.save_total_limit)
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="resume from the latest checkpoint in --output-dir, or from the folder given")
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--log-with", help="an accelerate tracker: tensorboard, wandb, ...")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--token-dtype", default=defaults.token_dtype, help="element type of .bin token files")
    p.add_argument("--packing", action="store_true",
                   help="padding-free: documents apart in each row (position_ids restart after each separator)")
    p.add_argument("--doc-separator", type=int, default=defaults.doc_separator,
                   help="with --packing: token id that ends a document (default: the model's eos_token_id)")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    args = vars(p.parse_args(argv))
    debug = args.pop("debug")
    return UptrainConfig(**args), debug


def main(argv=None) -> int:
    config, debug = parse_args(argv)
    return run_command("uptrain.py", lambda: run(config), debug=debug)


def run(config: UptrainConfig) -> None:
    result = uptrain(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": result.steps, "tokens_seen": result.tokens_seen, "seconds": round(result.seconds, 2),
                          "first_loss": result.losses[0][1] if result.losses else None,
                          "last_loss": result.losses[-1][1] if result.losses else None,
                          "final_dir": str(result.final_dir),
                          "resumed_from": str(result.resumed_from) if result.resumed_from else None}))
    end_of_run()  # several processes: leave together, or one may abort at exit


if __name__ == "__main__":
    sys.exit(main())
