"""GPU: why does bf16 autocast training of GQA models differ? Narrow it down."""
import os, sys, itertools, torch
sys.path.insert(0, os.getcwd())
from hf_attn_patch.kernels import flash_attention
from hf_attn_patch.kernels.reference import attention_reference
from hf_attn_patch.kernels import _launch, _flash_triton
from tests.helpers import relative_error
from tests.test_patch import llama, falcon_40b, falcon_7b, batch, build, CASES
from hf_attn_patch import patch_model

dev = "cuda"
def model_case(case_build, autocast=True, train=True):
    torch.manual_seed(0)
    model = case_build().to(dev)
    model.train(train)
    inputs = batch(dev, True)
    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).logits.float().pow(2).mean()
        loss.backward()
        return loss.detach()
    a = run(); patch_model(model); b = run()
    return relative_error(b, a)

for name, fn in (("llama", llama), ("falcon40b", falcon_40b), ("falcon7b", falcon_7b)):
    for autocast, train in ((True, True), (True, False), (False, True)):
        print(name, "autocast", autocast, "train", train, "loss rel err", f"{model_case(fn, autocast, train):.4f}", flush=True)

def kernel_case(dtype, layout, grad, padding, hq=4, hkv=2, n=12, d=16, own=False, causal=True):
    torch.manual_seed(1)
    shape = (2, n, hq, d) if layout == "bnhd" else (2, hq, n, d)
    def make(h):
        t = torch.randn(2, n, h, d, device=dev, dtype=dtype) if layout == "bnhd" else torch.randn(2, h, n, d, device=dev, dtype=dtype)
        t = t.transpose(1, 2) if layout == "bnhd" else t
        return t.detach().requires_grad_(grad)
    q, k, v = make(hq), make(hkv), make(hkv)
    mask = None
    if padding:
        mask = torch.ones(2, n, dtype=torch.bool, device=dev); mask[0, :5] = False
    ctx = _launch.tritons_own_launch() if own else torch.enable_grad()
    with ctx:
        out = flash_attention(q, k, v, causal=causal, key_padding_mask=mask)
    ref = attention_reference(q.float(), k.float(), v.float(), causal=causal, key_padding_mask=mask)
    rows = mask[:, None, :, None].expand_as(out) if mask is not None else torch.ones_like(out, dtype=torch.bool)
    return relative_error(out.float()[rows], ref[rows])

for dtype, layout, grad, padding, own in itertools.product((torch.bfloat16, torch.float32), ("bnhd", "bhnd"), (True, False), (True, False), (False, True)):
    try:
        e = kernel_case(dtype, layout, grad, padding, own=own)
    except Exception as exc:
        e = repr(exc)[:120]
    print("kernel", dtype, layout, "grad", grad, "padding", padding, "triton-own", own, "err", e, flush=True)
print("fast launch stats", _launch.fast_launch_stats())
