# Run R (session 8): why is causal D=64 N=1k slower than non-causal in kernels.py? Times the forward
# alone (inputs without requires_grad: the direct launch) with the autotuner's choice, then with each
# shipped forward config. Run from the repository root on a GPU: python probe_causal.py
import torch, triton
from hf_attn_patch.kernels import flash_attention, _flash_triton as ft
q, k, v = (torch.randn(16, 16, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100)
for causal in (False, True):
    flash_attention(q, k, v, causal=causal)
    ms = bench(lambda: flash_attention(q, k, v, causal=causal))
    print(f"causal={causal} fwd {ms:.4f} ms", {k2: (c['BLOCK_M'], c['BLOCK_N'], c['num_warps'], c['num_stages']) for k2, c in [(str(kk), cc) for kk, cc in ft._CHOSEN_CONFIGS.items()]}, flush=True)
    print("  timings:", {str(c): round(t[0] if isinstance(t, list) else t, 4) for c, t in ft._fwd_kernel.configs_timings.items()} if getattr(ft._fwd_kernel, "configs_timings", None) else None, flush=True)
for blocks in ft._FWD_BLOCKS:
    ft.set_autotuning(True, {"fwd": [blocks]})
    row = []
    for causal in (False, True):
        try:
            flash_attention(q, k, v, causal=causal)
            row.append(f"{bench(lambda: flash_attention(q, k, v, causal=causal)):.4f}")
        except Exception as e:
            row.append(type(e).__name__)
    print(blocks, "noncausal / causal ms:", row, flush=True)
