"""Uptraining on 1 GPU and on N (issue 17): tokens/s, scaling efficiency, and the two loss curves.

The workload is quality_llama.py's uptraining: its byte-level Llama (hidden 512, 8 layers, 8
heads, 1024-byte sequences, 32 sequences a step) converted to 4 KV heads by `mean`, trained with
0.5 * next-byte loss + 0.5 * KL toward the MHA model, on the stdlib bytes of quality_llama.py,
through `examples/uptrain.py` (our kernels forward and backward, bf16 autocast). The MHA model is
a fresh random one (or `--teacher`, a pre-trained folder): throughput does not depend on it.

One process runs `python examples/uptrain.py` on one GPU; N processes run
`accelerate launch --config_file examples/accelerate/{ddp,fsdp}.yaml --num_processes N` on N. By
default the global batch is the same (N processes x 32/N sequences): the same updates, so the two
loss curves should lie on each other, and tokens/s measures strong scaling; `--scaling weak`
gives each process the whole 32 (global batch 32 N). Tokens/s is the steady rate: the first
logged window (Triton's compilation, warm-up) is left out.

    python benchmarks/uptrain_scaling.py --gpus 2                    # DDP, ~3 min on 2 H100s (estimate)
    python benchmarks/uptrain_scaling.py --gpus 2 --sharding fsdp    # FSDP2
    python benchmarks/uptrain_scaling.py --quick                     # CPU: 2 gloo processes, tiny model

Rows are appended to `<out>/uptrain-scaling-<date>-<device>.json`; a PNG of the loss curves and
tokens/s is written beside it. The goal of issue 17 is a speed-up >= 1.8 on 2 GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS_DIR, environment, error_string, latest_run, results_path, write_results
from _quality import convert, run_info
from quality_llama import FULL, QUICK, fresh_llama, stdlib_bytes

NAME = "uptrain-scaling"
REPO = Path(__file__).resolve().parent.parent
GOAL = 1.8  # issue 17: tokens/s on 2 GPUs over 1
_LOG_LINE = re.compile(r"\[uptrain\] step (\d+)/\d+ \| loss \S+ \| lr \S+ \| [\d,]+ tok/s \| ([\d.]+) s")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    size = QUICK if args.quick else FULL
    steps = args.steps or (6 if args.quick else 200)
    common = environment()
    record_rows: list[dict] = []

    def record(row: dict) -> None:
        record_rows.append({**row, **common})
        write_results([record_rows[-1]], args.out, NAME)

    settings = {"quick": args.quick, "gpus": args.gpus, "sharding": args.sharding, "scaling": args.scaling,
                "steps": steps, "global_batch": size["batch_size"], "seq_len": size["seq_len"],
                "model": {k: size[k] for k in ("hidden", "layers", "heads", "intermediate")}, "kv_heads": 4 if not
                args.quick else 2, "distill_weight": 0.5, "lr": args.lr, "patched": not args.quick}
    record({"kind": "run", "benchmark": NAME, **run_info("uptrain_scaling", argv), "settings": settings})
    with tempfile.TemporaryDirectory(prefix="uptrain-scaling-") as scratch:
        scratch = Path(scratch)
        student, teacher, data = prepare(scratch, size, settings["kv_heads"], args.teacher)
        runs = {}
        for processes in (1, args.gpus):
            per_process = size["batch_size"] // processes if args.scaling == "strong" else size["batch_size"]
            try:
                runs[processes] = train(args, scratch / f"run-{processes}", processes, per_process, steps, size,
                                        student, teacher, data)
            except Exception as error:  # the other run's numbers are still worth keeping
                record({"kind": "error", "benchmark": NAME, "processes": processes, "error": error_string(error, 2000)})
                print(f"{processes} process(es): {error_string(error, 2000)}")
                continue
            record({"kind": "result", "benchmark": NAME, **runs[processes]})
            print(f"{processes} process(es): {runs[processes]['tokens_per_second']:,.0f} tokens/s, final loss "
                  f"{runs[processes]['losses'][-1][1]:.4f}")
    if 1 in runs and args.gpus in runs:
        record(summary(runs[1], runs[args.gpus], args.gpus))
        print_table(record_rows)
    path = results_path(args.out, NAME)
    print(f"wrote {path}")
    if not args.no_plot:
        png = plot(read_latest(path), path.with_suffix(".png"))
        if png:
            print(f"wrote {png}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2, help="processes of the second run (one GPU each)")
    parser.add_argument("--sharding", choices=("ddp", "fsdp"), default="ddp",
                        help="examples/accelerate/ddp.yaml or fsdp.yaml for the multi-process run")
    parser.add_argument("--scaling", choices=("strong", "weak"), default="strong",
                        help="strong: the same global batch (comparable loss curves); weak: the same per process")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 200; --quick 6)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--teacher", type=Path, help="a pre-trained MHA folder (quality_llama's); default: fresh")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: 2 gloo processes (cpu_2proc.yaml), quality_llama's quick model, "
                             "stock attention (Triton's interpreter would take minutes a step)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and PNG")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.gpus, args.sharding = 2, "ddp"  # gloo on the CPU: DDP only (FSDP: tests/test_uptrain_distributed.py)
    elif torch.cuda.device_count() < args.gpus:
        parser.error(f"--gpus {args.gpus} needs {args.gpus} CUDA GPUs, this machine has {torch.cuda.device_count()}; "
                     "use --quick on a CPU")
    batch = (QUICK if args.quick else FULL)["batch_size"]
    if args.scaling == "strong" and batch % args.gpus:
        parser.error(f"--scaling strong splits the global batch of {batch} over --gpus, which must divide it")
    return args


def prepare(scratch: Path, size: dict, kv_heads: int, teacher: Path | None) -> tuple[Path, Path, Path]:
    """(student folder, teacher folder, token file): the MHA model converted to kv_heads by `mean`."""
    if teacher is None:
        teacher = scratch / "mha"
        fresh_llama(size).save_pretrained(teacher)
    student = scratch / f"kv{kv_heads}"
    convert(teacher, student, kv_heads, "mean", None)
    train_data, _, described = stdlib_bytes(size["seq_len"], size["max_train_bytes"], size["seq_len"])
    data = scratch / "train.npy"
    np.save(data, train_data.numpy().astype(np.uint8))
    print(f"data: {described['train_files']} stdlib files, {len(train_data):,} sequences of {size['seq_len']} bytes")
    return student, teacher, data


def train(args, output_dir: Path, processes: int, per_process: int, steps: int, size: dict, student: Path,
          teacher: Path, data: Path) -> dict:
    """One examples/uptrain.py run; its losses (from the last checkpoint) and its steady tokens/s."""
    log_every = max(1, steps // 20)
    script = [os.fspath(REPO / "examples" / "uptrain.py"), os.fspath(student), "--teacher", os.fspath(teacher),
              "--data", os.fspath(data), "--output-dir", os.fspath(output_dir), "--seq-len", str(size["seq_len"]),
              "--batch-size", str(per_process), "--max-steps", str(steps), "--lr", str(args.lr),
              "--warmup-steps", str(max(1, steps // 10)), "--distill-weight", "0.5", "--log-every", str(log_every),
              "--save-every", str(steps), "--no-gradient-checkpointing"]
    env = dict(os.environ)
    if args.quick:
        script.append("--no-patch")
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    if processes == 1:
        launcher, command = "python", [sys.executable, *script]
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    else:
        config = "cpu_2proc" if args.quick else args.sharding
        launcher = f"accelerate launch, {config}.yaml"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.fspath(REPO / "examples" / "accelerate" / f"{config}.yaml"), "--num_processes", str(processes),
                   "--main_process_port", str(_free_port()), *script]
    print("$ " + " ".join(command))
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    state = json.loads((output_dir / "checkpoints" / f"step-{steps:07d}" / "trainer_state.json").read_text())
    tokens_per_step = per_process * processes * size["seq_len"]
    return {"processes": processes, "launcher": launcher,
            "per_process_batch": per_process, "global_batch": per_process * processes, "steps": steps,
            "tokens_per_second": steady_rate(done.stdout, tokens_per_step), "wall_seconds": round(seconds, 1),
            "losses": state["losses"]}


def steady_rate(log: str, tokens_per_step: int) -> float:
    """Tokens/s between the first and the last log line (the first window holds compilation)."""
    points = [(int(step), float(at)) for step, at in _LOG_LINE.findall(log)]
    if len(points) < 2:
        raise RuntimeError(f"too few log lines to time the run: {points}; raise --steps")
    (first_step, first_at), (last_step, last_at) = points[0], points[-1]
    return (last_step - first_step) * tokens_per_step / max(last_at - first_at, 1e-9)


def summary(one: dict, many: dict, gpus: int) -> dict:
    speedup = many["tokens_per_second"] / one["tokens_per_second"]
    gaps = [abs(a - b) for (_, a), (_, b) in zip(one["losses"], many["losses"])]
    return {"kind": "scaling", "benchmark": NAME, "processes": gpus, "speedup": round(speedup, 3),
            "efficiency": round(speedup / gpus, 3), "goal_speedup_2_gpus": GOAL,
            "max_loss_gap": max(gaps) if gaps else None, "final_losses": [one["losses"][-1][1], many["losses"][-1][1]]}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'processes':>9} | {'global batch':>12} | {'tokens/s':>12} | {'final loss':>10}")
    for row in rows:
        if row.get("kind") == "result":
            print(f"{row['processes']:>9} | {row['global_batch']:>12} | {row['tokens_per_second']:>12,.0f} | "
                  f"{row['losses'][-1][1]:>10.4f}")
        elif row.get("kind") == "scaling":
            print(f"speed-up on {row['processes']}: {row['speedup']:.2f}x (efficiency {row['efficiency']:.0%}); "
                  f"largest loss gap {row['max_loss_gap']:.2e}")


def read_latest(path: Path) -> list[dict]:
    return latest_run(json.loads(path.read_text()))


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib; the JSON has every number)")
        return None
    results = [row for row in rows if row.get("kind") == "result"]
    if not results:
        return None
    figure, (curves, rates) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    for row in results:
        steps, losses = zip(*row["losses"])
        curves.plot(steps, losses, label=f"{row['processes']} process(es), batch {row['global_batch']}",
                    linestyle="-" if row["processes"] == 1 else "--")
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("training loss")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    rates.bar([str(row["processes"]) for row in results], [row["tokens_per_second"] for row in results])
    rates.set_xlabel("processes")
    rates.set_ylabel("tokens/s")
    figure.suptitle(f"uptraining, 1 vs {results[-1]['processes']} ({rows[0].get('device')}, {rows[0].get('date')})",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
