"""flash_attention with autotuning on, the default a user gets (issue 13): every supported head
dim, forward and backward, causal or not, against the reference.

The rest of the suite runs with HF_ATTN_PATCH_AUTOTUNE=0 (conftest.py); this module turns
autotuning on for itself, so every config the pruner offers is compiled and timed: a few
minutes on an H200, nearly all of it compiling. Lengths of 300 give several blocks even to the
128-row configs; q_len = 1 is the decode-shaped backward whose dK/dV was handed, alone and
untried, a config needing more shared memory than an H200 has (head dim 256). Then every
shipped config alone, causal and with packed documents: what the autotuner chooses depends on
the GPU, and each config must be right wherever it is chosen.
"""

from __future__ import annotations

import pytest
import torch

from hf_attn_patch.kernels import SUPPORTED_HEAD_DIMS, _flash_triton
from tests.test_flash import check_against_reference, make_inputs
from tests.test_packed import check_against_reference as check_packed_against_reference

pytestmark = [pytest.mark.gpu, pytest.mark.kernels]  # kernels only: one transformers release in CI


@pytest.fixture(scope="module", autouse=True)
def autotuning():
    _flash_triton.set_autotuning(True)
    assert len(_flash_triton._fwd_kernel.configs) > 1
    yield
    _flash_triton.set_autotuning(_flash_triton._autotune_enabled())


SHAPES = [
    pytest.param(300, 300, False, id="full"),
    pytest.param(300, 300, True, id="causal"),
    pytest.param(1, 300, True, id="decode"),
]


@pytest.mark.parametrize("q_len,k_len,causal", SHAPES)
@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_tuned_kernels_match_reference(head_dim, q_len, k_len, causal):
    q, k, v = make_inputs(2, 4, 2, q_len, k_len, head_dim, torch.bfloat16, "cuda", seed=head_dim)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_tuned_head_dim_256_in_other_dtypes(dtype):
    """float32 tiles take twice the shared memory: no tuned dK/dV or dQ config fits at D=256."""
    q, k, v = make_inputs(1, 4, 2, 300, 300, 256, dtype, "cuda", seed=1)
    check_against_reference(q, k, v, causal=True)
    check_against_reference(q[:, :, :1], k, v, causal=True)


# Every shipped config of every kernel, each the only candidate in its turn (the other two kernels
# get one untuned config): the autotuner above checks only the configs it happens to choose.
SHIPPED = [(name, block) for name, blocks in (("fwd", _flash_triton._FWD_BLOCKS),
                                              ("dkdv", _flash_triton._DKDV_BLOCKS),
                                              ("dq", _flash_triton._DQ_BLOCKS))
           for block in blocks]


@pytest.fixture
def only_config():
    def use(kernel, block):
        candidates = dict.fromkeys(("fwd", "dkdv", "dq"), [_flash_triton._UNTUNED[0]])
        _flash_triton.set_autotuning(True, {**candidates, kernel: [block]})

    yield use
    _flash_triton.set_autotuning(True)  # the module's shipped candidates again


@pytest.mark.parametrize("kernel,block", SHIPPED, ids=str)
def test_each_shipped_config_matches_reference(kernel, block, only_config):
    only_config(kernel, block)
    q, k, v = make_inputs(1, 4, 2, 640, 640, 128, torch.bfloat16, "cuda", seed=sum(block))
    check_against_reference(q, k, v, causal=True)
    check_packed_against_reference([[300, 21, 190, 129]], heads=(4, 2), dtype=torch.bfloat16, head_dim=128,
                                   device="cuda")
