"""The direct launch path (`kernels/_launch.py`): same results as Triton's own, and a new
specialisation never reuses a binary compiled for another."""

from __future__ import annotations

import pytest
import torch

from hf_attn_patch.kernels import _launch, attention_reference, flash_attention

from .helpers import relative_error

# Kernels only, no transformers: CI runs this file on one transformers release (see .ci/run).
pytestmark = pytest.mark.kernels


def test_specialisation_follows_tritons_rules():
    def spec(arg):
        return _launch._specialise((arg,))[0]

    # Integers: Triton compiles apart a 1, multiples of 16, and 64-bit values.
    assert spec(1) != spec(3)
    assert spec(16) != spec(24)
    assert spec(32) == spec(48)
    assert spec(2**31) != spec(2**31 - 16)
    # Tensors: dtype and 16-byte alignment.
    base = torch.zeros(64, dtype=torch.float16)
    assert spec(base) == spec(base[8:])  # 16 bytes in: still aligned
    assert spec(base) != spec(base[1:])
    assert spec(base) != spec(base.float())
    assert spec(None) == spec(None) != spec(0)
    assert spec(True) != spec(1) and spec(2.0) == spec(3.0)


def test_host_side_integer_helpers_match_tritons():
    import triton

    for n in range(1, 300):
        assert _launch.next_power_of_2(n) == triton.next_power_of_2(n)
        for block in (16, 64, 128):
            assert _launch.cdiv(n, block) == triton.cdiv(n, block)


def test_ordered_params_put_constexprs_in_signature_order():
    class FakeKernel:
        arg_names = ["X", "n", "BLOCK", "FLAG"]

    params = ["x", 7, *_launch._constexpr_params(FakeKernel, 2, {"FLAG": True, "num_warps": 4, "BLOCK": 64})]
    assert params == ["x", 7, 64, True]


@pytest.mark.gpu
def test_direct_launches_match_the_reference_as_a_cache_grows():
    """Decode-shaped calls over a growing contiguous cache: strides and lengths change every
    call (as with transformers' DynamicCache), most calls take the direct path."""
    torch.manual_seed(0)
    before = _launch.fast_launch_stats()
    k_all = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
    v_all = torch.randn_like(k_all)
    for length in range(200, 240):
        q = torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        k, v = k_all[:, :, :length].contiguous(), v_all[:, :, :length].contiguous()
        out = flash_attention(q, k, v, causal=True)
        expected = attention_reference(q.float(), k.float(), v.float(), causal=True)
        assert relative_error(out, expected) < 2e-2, length
    after = _launch.fast_launch_stats()
    assert after["disabled"] is None
    assert after["fast"] - before["fast"] >= 30


def test_repeat_launches_skip_tritons_run(monkeypatch):
    """The cause found in issue 12: Triton's per-call bookkeeping. After the first launch of a
    specialisation, launches go to the compiled kernel; a new specialisation goes back to Triton."""
    monkeypatch.setattr(_launch, "_INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_COMPILED", {})
    monkeypatch.setattr(_launch, "_disabled_reason", None)
    direct = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *params: direct.append((grid, params))

    class Kernel:
        arg_names = ["X", "n", "BLOCK"]
        runs = 0

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                Kernel.runs += 1
                return Compiled()
            return run

    kernel, x = Kernel(), torch.zeros(64)
    grid = lambda meta: (4 // meta["BLOCK"],)  # noqa: E731
    for _ in range(3):
        _launch.launch(kernel, grid, (x, 32), {"BLOCK": 2, "num_warps": 4})
    assert Kernel.runs == 1 and len(direct) == 2
    # every parameter in signature order, no options; the tensor as its address
    assert direct[0] == ((2, 1, 1), (x.data_ptr(), 32, 2))
    _launch.launch(kernel, grid, (x, 1), {"BLOCK": 2, "num_warps": 4})  # n == 1: Triton specialises
    assert Kernel.runs == 2


def test_repeat_launches_call_the_c_launcher_without_hooks(monkeypatch):
    """Triton 3.x's runner looks the device and stream up through its driver, builds launch
    metadata and calls two empty hook chains on every launch: a repeat launch skips it and calls
    the launcher with the current stream and no hooks."""
    monkeypatch.setattr(_launch, "_INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(_launch, "_COMPILED", {})
    monkeypatch.setattr(_launch, "_disabled_reason", None)
    monkeypatch.setattr(_launch, "_STREAM_OF_DEVICE", lambda device: 1000 + device)
    launched = []

    class Compiled:
        function, packed_metadata = 77, (4, 1, 0)

        def run(self, *launch_args):
            launched.append(launch_args)

        def __getitem__(self, grid):
            raise AssertionError("the runner is not used once the launcher is known")

    class Kernel:
        arg_names = ["X", "n", "BLOCK"]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: Compiled()

    kernel, x = Kernel(), torch.zeros(64)
    for _ in range(2):
        _launch.launch(kernel, (5, 2), (x, 32), {"BLOCK": 2, "num_warps": 4})
    # The tensor goes as its address: the launcher would call data_ptr() back and ask the
    # driver about it (cuPointerGetAttribute) on every launch.
    assert launched == [(5, 2, 1, 1003, 77, (4, 1, 0), None, None, None, x.data_ptr(), 32, 2)]


@pytest.mark.skipif(not _launch._INTERPRETED, reason="seeds the first launch in Triton's interpreter (CPU)")
def test_a_repeat_launch_stays_lean_in_python(monkeypatch):
    """Issue 12's finding: inside a real decode step every Python call on the launch path costs
    several times its hot-loop price (the model's own code evicts ours from the CPU's caches),
    and the path once made ~330 calls per attention call. Count the Python functions a repeat
    `flash_attention` call enters, with the compiled kernel stubbed as on the direct GPU path."""
    import sys

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 40, 64)
    v = torch.randn_like(k)
    with torch.no_grad():
        flash_attention(q, k, v, causal=True)  # tunes and compiles (interpreted) once

    class Compiled:
        def __getitem__(self, grid):
            return lambda *params: None

    class EveryKeyCompiled(dict):
        def get(self, key, default=None):
            return Compiled(), (), None

    monkeypatch.setattr(_launch, "_COMPILED", EveryKeyCompiled())
    monkeypatch.setattr(_launch, "_INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    entered = []

    def count(frame, event, arg):
        if event == "call" and frame.f_code.co_filename != __file__:
            entered.append(frame.f_code.co_name)

    with torch.no_grad():
        sys.setprofile(count)
        try:
            flash_attention(q, k, v, causal=True)
        finally:
            sys.setprofile(None)
    assert "launch" in entered and "run" not in entered  # the direct path, not Triton's
    assert len(entered) <= 45, entered  # 37 today; 111 before the launch path was trimmed
