"""Probe (session 10): our forward kernel at D=128, N=16k, B=1, H=16, bf16, with the config the
autotuner chose and then forced to each of the shipped forward configs, so that the TMA probe's
rows (tma_ws_probe.py) compare like with like."""

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from hf_attn_patch.kernels import _flash_triton, flash_attention  # noqa: E402

q, k, v = (torch.randn(1, 16, 16384, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for causal in (False, True):
    flops = 4 * 16 * 16384**2 * 128 / (2 if causal else 1)
    flash_attention(q, k, v, causal=causal)
    key = next(key for key in _flash_triton._CHOSEN_CONFIGS if key[0] is _flash_triton._fwd_kernel
               and key[3][3] == causal)  # HAS_RIGHT is the fourth switch
    chosen = dict(_flash_triton._CHOSEN_CONFIGS[key])
    print("causal" if causal else "non-causal", "autotuner chose",
          {name: chosen[name] for name in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}, flush=True)
    for block_m, block_n, warps, stages in _flash_triton._FWD_BLOCKS:
        _flash_triton._CHOSEN_CONFIGS[key] = dict(chosen, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                                  num_stages=stages)
        try:
            ms = triton.testing.do_bench(lambda: flash_attention(q, k, v, causal=causal))
            print(f"  {block_m}x{block_n} w{warps} s{stages}: {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
        except Exception as exc:
            print(f"  {block_m}x{block_n} w{warps} s{stages}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    _flash_triton._CHOSEN_CONFIGS[key] = chosen
