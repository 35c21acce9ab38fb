"""Conversion benchmark: peak resident memory and throughput of `convert_checkpoint`.

Writes a random Llama checkpoint of 1B shape (hidden 2048, 16 layers, 32 heads and 32 KV heads,
intermediate 5632, vocab 32000, untied head, bf16: 1.9 GB) in shards of a given size into a
temporary folder, then converts it to 8 and to 1 KV heads, each conversion in a fresh Python
process. The child reports its own peak RSS (VmHWM, exact) and its RSS just before
converting (the interpreter with torch and safetensors imported); a sampler in this process
reads the child's /proc status every 20 ms to split the peak into anonymous memory (tensors)
and file-backed pages (the memory-mapped source shards). Before each run the disk is synced and
the source's pages are dropped from the page cache (posix_fadvise), so every run reads from disk;
the converter's own time includes fsync of everything it wrote.

    python benchmarks/conversion.py                        # 500 and 250 MB shards, 8 and 1 KV heads
    python benchmarks/conversion.py --shard-mb 500 --kv-heads 8 --verify full --repeats 1
    python benchmarks/conversion.py --layers 2 --shard-mb 40 --no-save   # quick harness check

Rows are appended to benchmarks/results/conversion-<date>-cpu.json and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, environment, read_results, results_path
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

SHAPE = dict(hidden=2048, layers=16, heads=32, intermediate=5632, vocab=32000)
_CHILD = """
import json, sys, time
from pathlib import Path
from hf_attn_patch.conversion import convert_checkpoint

def status_kib(field):  # VmHWM is this process's own peak; ru_maxrss would include the parent's fork
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])

src, dst, groups, verify = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
before = status_kib("VmRSS")
started = time.perf_counter()
report = convert_checkpoint(src, dst, num_kv_heads=groups, verify=verify)
wall = time.perf_counter() - started
result = {"rss_before_kib": before, "peak_rss_kib": status_kib("VmHWM"), "wall_s": wall}
print(json.dumps({**result, "report": report.to_dict()}))
"""


def main() -> None:
    args = _parse_args()
    shape = {**SHAPE, "layers": args.layers}
    rows = []
    with tempfile.TemporaryDirectory(prefix="conversion-bench-", dir=args.tmp) as scratch:
        for shard_mb in args.shard_mb:
            source = Path(scratch) / f"llama-{shard_mb}mb"
            shard_sizes = write_random_llama(source, shape, shard_mb * 10**6)
            for groups in args.kv_heads:
                for verify in args.verify:
                    for _ in range(args.repeats):
                        destination = Path(scratch) / f"out-{shard_mb}-{groups}-{verify}"
                        measured = run_conversion(source, destination, groups, verify)
                        rows.append(_row(shape, shard_sizes, groups, verify, measured))
                        _remove_tree(destination)
            _remove_tree(source)
    _print_table(rows)
    if not args.no_save:
        path = results_path(RESULTS_DIR, "conversion", slug="cpu")
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = read_results(path) if path.exists() else []
        path.write_text(json.dumps(existing + rows, indent=1) + "\n")
        print(f"appended {len(rows)} rows to {path}")


def write_random_llama(folder: Path, shape: dict, max_shard_bytes: int) -> list[int]:
    """A LlamaForCausalLM-named bf16 checkpoint, shard by shard; returns the shard sizes in bytes."""
    from transformers import LlamaConfig

    folder.mkdir()
    config = LlamaConfig(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        intermediate_size=shape["intermediate"],
        vocab_size=shape["vocab"],
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(folder)
    groups = _shard_groups(_llama_shapes(shape), max_shard_bytes)
    weight_map, sizes = {}, []
    generator = torch.Generator().manual_seed(0)
    for number, group in enumerate(groups, start=1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            name: (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16) for name, size in group
        }
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        sizes.append(sum(t.numel() * 2 for t in tensors.values()))
        weight_map.update({name: shard for name in tensors})
        del tensors
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sizes


def run_conversion(source: Path, destination: Path, groups: int, verify: str) -> dict:
    """Convert in a child process; its peak RSS, its RSS split at the sampled peak, and timings."""
    os.sync()  # no write-back of earlier runs competes with this one
    _drop_from_page_cache(source)
    load = os.getloadavg()[0]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(source), str(destination), str(groups), verify],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    sampler = _RssSampler(child)
    out, _ = child.communicate()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"conversion failed with exit code {child.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), **sampler.result, "load_average_1min": load}


def _llama_shapes(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter, vocab = shape["hidden"], shape["intermediate"], shape["vocab"]
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(shape["layers"]):
        base = f"model.layers.{layer}."
        names += [(f"{base}self_attn.{p}_proj.weight", (hidden, hidden)) for p in "qkvo"]
        names += [(f"{base}mlp.{p}_proj.weight", (inter, hidden)) for p in ("gate", "up")]
        names += [(f"{base}mlp.down_proj.weight", (hidden, inter))]
        names += [(f"{base}{n}.weight", (hidden,)) for n in ("input_layernorm", "post_attention_layernorm")]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return names


def _shard_groups(shapes, max_shard_bytes: int):
    """Split in order at max_shard_bytes, as save_pretrained does."""
    groups, current, size = [], [], 0
    for name, tensor_shape in shapes:
        nbytes = 2 * torch.Size(tensor_shape).numel()
        if current and size + nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, tensor_shape))
        size += nbytes
    return groups + [current]


def _drop_from_page_cache(folder: Path) -> None:
    for path in folder.iterdir():
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


class _RssSampler(threading.Thread):
    """Polls /proc/<pid>/status; keeps RssAnon and RssFile at the highest VmRSS seen."""

    def __init__(self, child: subprocess.Popen):
        super().__init__(daemon=True)
        self._status = Path(f"/proc/{child.pid}/status")
        self._child = child
        self.result = {"sampled_peak_rss_kib": 0, "anon_at_peak_kib": 0, "file_at_peak_kib": 0}
        self.start()

    def run(self) -> None:
        while self._child.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in self._status.read_text().splitlines())
            except (OSError, ValueError):
                break
            if "VmRSS" not in fields:  # exiting: its memory is gone already
                break
            rss = int(fields["VmRSS"].split()[0])
            if rss > self.result["sampled_peak_rss_kib"]:
                self.result = {
                    "sampled_peak_rss_kib": rss,
                    "anon_at_peak_kib": int(fields["RssAnon"].split()[0]),
                    "file_at_peak_kib": int(fields["RssFile"].split()[0]),
                }
            time.sleep(0.02)


def _row(shape: dict, shard_sizes: list[int], groups: int, verify: str, measured: dict) -> dict:
    report = measured["report"]
    mib = 1024  # KiB per MiB
    return {
        "benchmark": "conversion",
        "model": "llama-1b-shape bf16 " + " ".join(f"{k}={v}" for k, v in shape.items()),
        "method": report["method"],
        "kv_heads": f"{report['kv_heads_before']}->{groups}",
        "verify": verify,
        "shards": len(shard_sizes),
        "checkpoint_mb": round(sum(shard_sizes) / 1e6, 1),
        "largest_shard_mb": round(max(shard_sizes) / 1e6, 1),
        "written_mb": round(report["bytes_written"] / 1e6, 1),
        "peak_rss_mib": round(measured["peak_rss_kib"] / mib, 1),
        "rss_before_convert_mib": round(measured["rss_before_kib"] / mib, 1),
        "anon_at_sampled_peak_mib": round(measured["anon_at_peak_kib"] / mib, 1),
        "file_at_sampled_peak_mib": round(measured["file_at_peak_kib"] / mib, 1),
        "write_s": report["seconds"],
        "mb_per_s": report["megabytes_per_second"],
        "wall_s": round(measured["wall_s"], 2),
        "load_average_1min": measured["load_average_1min"],
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        **environment(),
        "device": "cpu",
    }


def _print_table(rows: list[dict]) -> None:
    columns = {
        "shards": "shards",
        "largest_shard_mb": "largest shard MB",
        "kv_heads": "KV heads",
        "verify": "verify",
        "peak_rss_mib": "peak RSS MiB",
        "rss_before_convert_mib": "RSS before MiB",
        "anon_at_sampled_peak_mib": "anon MiB",
        "file_at_sampled_peak_mib": "file MiB",
        "write_s": "write s",
        "mb_per_s": "MB/s",
        "wall_s": "wall s",
        "load_average_1min": "load",
    }
    table = Table(title="convert_checkpoint, 1B-shaped Llama, bf16, source read from disk")
    for header in columns.values():
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(
            *(f"{row[key]:.2f}" if key == "load_average_1min" else str(row[key]) for key in columns)
        )
    Console(width=160).print(table)


def _remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-mb", type=int, nargs="+", default=[500, 250], help="max shard size(s), MB")
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--verify", nargs="+", default=["auto"], choices=("auto", "full", "shapes", "off"))
    parser.add_argument("--repeats", type=int, default=2, help="conversions per setting")
    parser.add_argument("--layers", type=int, default=SHAPE["layers"])
    parser.add_argument("--tmp", default=None, help="folder for the temporary checkpoints (default: $TMPDIR)")
    parser.add_argument(
        "--no-save", action="store_true", help="print only; do not append to the results file"
    )
    return parser.parse_args()


if __name__ == "__main__":
    main()
