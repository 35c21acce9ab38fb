"""Draw the plots of a kernel benchmark results file (written by `kernel_speed.py`).

    python benchmarks/plot.py benchmarks/results/kernels-2026-11-22-nvidia-h100-80gb-hbm3.json

One PNG per (head dim, query heads / KV heads), next to the JSON unless --out says otherwise:
a grid of panels, one per mode (rows) and pass (columns), TFLOP/s against N with a line per
provider. A results file accumulates runs; each point is the newest measurement of its row, so
runs split by head dim or mode (`kernel_speed.py --d 64`, then `--d 128`) draw together.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from _common import read_results

PASSES = ("fwd", "bwd")
ROW_KEY = ("kernel", "provider", "mode", "window", "pass", "B", "H", "Hkv", "N", "D")
PROVIDER_ORDER = ("ours", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a kernels-<date>-<device>.json file")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: the JSON's folder)")
    args = parser.parse_args()
    for png in plot_results(args.results, args.out):
        print(png)


def plot_results(results: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the PNGs for the newest run in `results`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    rows = newest_per_row(read_results(results))
    measured = [r for r in rows if r["kernel"] == "flash_attention" and r.get("tflops") is not None]
    ceiling = next((r for r in rows if r.get("provider") == "matmul-bf16"), None)
    out_dir = Path(out_dir or Path(results).parent)
    out_dir.mkdir(parents=True, exist_ok=True)

    by_config = defaultdict(list)
    for row in measured:
        by_config[(row["D"], row["H"], row["Hkv"])].append(row)
    pngs = []
    for (d, h, hkv), config_rows in sorted(by_config.items()):
        png = out_dir / f"{Path(results).stem}-d{d}-h{h}-kv{hkv}.png"
        title = f"{rows[0]['device']}: bf16, D={d}, heads {h}/{hkv}, torch {rows[0]['torch']}"
        if ceiling:
            title += f" (matmul ceiling {ceiling['tflops']:.3g} TFLOP/s)"
        draw_figure(config_rows, title, png)
        pngs.append(png)
    return pngs


def newest_per_row(rows: list[dict]) -> list[dict]:
    """For each (provider, mode, window, pass, shape), the row of the newest run; ceilings too."""
    newest = {}
    for row in sorted(rows, key=lambda r: r.get("run_id", "")):
        newest[tuple(row.get(field) for field in ROW_KEY)] = row
    return list(newest.values())


def draw_figure(rows: list[dict], title: str, png: Path) -> None:
    import matplotlib.pyplot as plt

    cases = sorted({(r["mode"], r["window"] or 0) for r in rows}, key=case_order)
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(
        len(cases), len(passes), figsize=(5 * len(passes), 3.2 * len(cases)), squeeze=False
    )
    for (mode, window), panel_row in zip(cases, axes):
        for step, ax in zip(passes, panel_row):
            panel = [r for r in rows if (r["mode"], r["window"] or 0, r["pass"]) == (mode, window, step)]
            draw_panel(ax, panel, f"{case_label(mode, window)}, {step}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def draw_panel(ax, rows: list[dict], title: str) -> None:
    providers = sorted({r["provider"] for r in rows}, key=provider_order)
    for provider in providers:
        points = sorted((r["N"], r["tflops"]) for r in rows if r["provider"] == provider)
        xs, ys = zip(*points)
        # ours stands out: the one line this benchmark is about
        ax.plot(xs, ys, marker="o", linewidth=2.5 if provider == "ours" else 1.2, label=provider,
                color=f"C{provider_order(provider)}")  # the same colour in every panel
    ax.set_xscale("log", base=2)
    seq_lens = sorted({r["N"] for r in rows})
    ax.set_xticks(seq_lens, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in seq_lens])
    ax.minorticks_off()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("N (tokens per sequence)")
    ax.set_ylabel("TFLOP/s")
    top = max((r["tflops"] for r in rows), default=1)
    ax.set_ylim(0, 1.1 * top)  # from zero, so heights compare; room above the highest line
    ax.grid(alpha=0.3)
    if providers:
        ax.legend(fontsize=7, loc="lower right")  # lines sit high: the bottom is free


def case_label(mode: str, window: int) -> str:
    return f"window W={window}" if window else mode


def case_order(case: tuple[str, int]) -> tuple[int, int]:
    mode, window = case
    return ("noncausal", "causal", "window").index(mode), window


def provider_order(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


if __name__ == "__main__":
    main()
