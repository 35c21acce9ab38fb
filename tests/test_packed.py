"""Packed sequences (padding-free training): several documents in one row.

The kernel takes per-position document ids (`doc_ids`); a patched model gets them from
transformers' own packed-sequence detection (position_ids that restart, no attention mask).
Everything is compared with the same documents run one by one, or with the reference.
CPU shapes are tiny (the interpreter runs 32 x 32 tiles): documents of 1 token and documents
that span tile boundaries are both in every layout.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import (BertConfig, BertModel, FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM)
from transformers.masking_utils import create_bidirectional_mask

from hf_attn_patch import patch_model
from hf_attn_patch.kernels import flash_attention
from hf_attn_patch.kernels.reference import attention_reference
from hf_attn_patch.models import _interface, falcon
from hf_attn_patch.training import UptrainConfig, uptrain
from hf_attn_patch.training.data import packed_positions

from .helpers import forbid_stock_attention, relative_error

# Document lengths per row; every row of a batch has the same total length.
LAYOUTS = {
    "one-token-and-straddling": [[1, 40, 7, 33, 19]],
    "two-rows": [[40, 1, 23], [64]],
    "many-short": [[3, 1, 1, 5, 2, 20, 1, 8, 9]],
}


def doc_ids_for(layout, device="cpu") -> torch.Tensor:
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in layout]
    return torch.stack(rows).to(device=device, dtype=torch.int32)


def check_against_reference(layout, *, causal=True, heads=(2, 2), window=None, alibi=False,
                            dtype=torch.float32, head_dim=16, device="cpu", tolerance=None):
    torch.manual_seed(0)
    doc_ids = doc_ids_for(layout, device)
    batch, n = doc_ids.shape
    q_heads, kv_heads = heads
    q = torch.randn(batch, q_heads, n, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype, requires_grad=True)
    options = dict(causal=causal, window=window, doc_ids=doc_ids,
                   alibi_slopes=torch.rand(q_heads, device=device) if alibi else None)
    out = flash_attention(q, k, v, **options)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected = attention_reference(q, k, v, **options)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    tolerance = tolerance or (1e-5 if dtype == torch.float32 else 2e-2)
    for name, actual, wanted in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected, *expected_grads)):
        assert relative_error(actual, wanted) < tolerance, name


# --- kernel -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_kernel_matches_reference_causal(layout, device):
    check_against_reference(layout, device=device)


@pytest.mark.parametrize("options", [
    dict(causal=False),
    dict(heads=(4, 1)),
    dict(window=9, heads=(4, 2)),
    dict(alibi=True, causal=False, window=(5, 3)),
    dict(dtype=torch.bfloat16),
], ids=["bidirectional", "mqa", "gqa-window", "alibi-local", "bf16"])
def test_kernel_matches_reference_with_options(options, device):
    check_against_reference(LAYOUTS["one-token-and-straddling"], device=device, **options)


def test_packed_row_equals_documents_one_by_one(device):
    """The defining property, on the kernel alone: nothing leaks between documents."""
    torch.manual_seed(1)
    lengths = [1, 40, 7, 33, 19]
    q, k, v = (torch.randn(1, 2, sum(lengths), 16, device=device) for _ in range(3))
    packed = flash_attention(q, k, v, causal=True, doc_ids=doc_ids_for([lengths], device))
    alone = [flash_attention(*(t[:, :, s:s + n] for t in (q, k, v)), causal=True)
             for s, n in zip(torch.tensor([0] + lengths).cumsum(0).tolist(), lengths)]
    assert relative_error(packed, torch.cat(alone, dim=2)) < 1e-6


def test_tiles_of_another_document_never_read_its_keys(device):
    """A tile whose queries all lie in later documents skips the earlier ones' key blocks (NaN
    there stays out). Inside a tile that straddles two documents, as in any flash kernel, a
    key's NaN would reach the other document's rows as 0 * NaN: real tokens are finite."""
    # Documents of 128: a multiple of every tile size (interpreter 32, GPU 16..128).
    q, k, v = (torch.randn(1, 2, 256, 16, device=device) for _ in range(3))
    k[:, :, :128] = float("nan")
    v[:, :, :128] = float("nan")
    q.requires_grad_(True)
    out = flash_attention(q, k, v, causal=True, doc_ids=doc_ids_for([[128, 128]], device))
    assert torch.isfinite(out[:, :, 128:]).all()
    (grad_q,) = torch.autograd.grad(out[:, :, 128:].sum(), q)
    assert torch.isfinite(grad_q[:, :, 128:]).all()


def test_doc_ids_through_the_custom_ops_under_torch_compile(device):
    """Forward and backward ops carry doc_ids (fake implementations included): one graph."""
    torch.manual_seed(3)
    doc_ids = doc_ids_for([[9, 1, 22]], device)
    q, k, v = (torch.randn(1, 2, 32, 16, device=device, requires_grad=True) for _ in range(3))

    def attention(q, k, v, doc_ids):
        return flash_attention(q, k, v, causal=True, doc_ids=doc_ids)

    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, doc_ids)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = attention_reference(q, k, v, causal=True, doc_ids=doc_ids)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    assert relative_error(out, expected) < 1e-5
    for actual, wanted in zip(grads, expected_grads):
        assert relative_error(actual, wanted) < 1e-5


@pytest.mark.parametrize("length", [1, 7, 1024, 2500])
def test_document_bounds_are_each_runs_first_and_end(length, device):
    """The bounds kernel scans 1024 positions at a time and carries the open run across blocks:
    runs that cross those borders, a row of one document, and a strided row."""
    from hf_attn_patch.kernels._flash_triton import document_bounds

    torch.manual_seed(0)
    ids = torch.randint(0, 3, (4, 2 * length), dtype=torch.int32)
    ids[1] = torch.arange(2 * length) // 700
    ids[2] = 5
    for rows in (ids[:, :length], ids[:, ::2]):  # positions at stride 1, then at stride 2
        bounds = document_bounds(rows.to(device)).cpu()
        for b, row in enumerate(rows.tolist()):
            first, expected = 0, []
            for i, doc in enumerate(row):
                if i > 0 and doc != row[i - 1]:
                    first = i
                expected.append(first)
            end, ends = length, [0] * length
            for i in reversed(range(length)):
                if i < length - 1 and row[i] != row[i + 1]:
                    end = i + 1
                ends[i] = end
            assert bounds[b, :, 0].tolist() == expected and bounds[b, :, 1].tolist() == ends


def test_doc_ids_need_as_many_queries_as_keys():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="as many queries as keys"):
        flash_attention(q, k, k, doc_ids=torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="integer document ids"):
        flash_attention(k, k, k, doc_ids=torch.zeros(1, 8))


# --- patched models -----------------------------------------------------------------------------

DECODER = dict(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
               max_position_embeddings=64, pad_token_id=0, num_key_value_heads=2)
MODEL_LENGTHS = [5, 1, 9, 17]  # one row of 32 tokens


def llama():
    return LlamaForCausalLM(LlamaConfig(**DECODER, intermediate_size=128))


def mistral():
    return MistralForCausalLM(MistralConfig(**DECODER, intermediate_size=128, sliding_window=4))


@pytest.fixture
def kernel_only(monkeypatch):
    """Stock attention, 4-D masks and our dense-mask fallback all raise."""
    forbid_stock_attention(monkeypatch, ("llama", "mistral"), "a packed batch left the kernel")

    def forbidden(*args, **kwargs):
        raise AssertionError("the dense-mask fallback was taken for a packed batch")

    monkeypatch.setattr(_interface, "_stock_with_dense_mask", forbidden)
    monkeypatch.setattr(falcon, "_eager_fallback", forbidden)


def packed_batch(lengths, device):
    torch.manual_seed(2)
    input_ids = torch.randint(1, 128, (1, sum(lengths)), device=device)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    return input_ids, position_ids


def packed_vs_one_by_one(build, device, kernel_checks):
    """Logits and gradients of one packed row against the same documents one by one."""
    torch.manual_seed(0)
    model = build().to(device)
    patch_model(model)
    input_ids, position_ids = packed_batch(MODEL_LENGTHS, device)
    weights = torch.randn(1, input_ids.shape[1], model.config.vocab_size, device=device)

    kernel_checks()
    packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    (packed * weights).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    alone, start = [], 0
    for n in MODEL_LENGTHS:
        logits = model(input_ids=input_ids[:, start:start + n], use_cache=False).logits
        (logits * weights[:, start:start + n]).sum().backward()
        alone.append(logits)
        start += n
    assert relative_error(packed, torch.cat(alone, dim=1)) < 1e-4
    for packed_grad, p in zip(packed_grads, model.parameters()):
        assert relative_error(packed_grad, p.grad) < 1e-4


@pytest.mark.parametrize("build", [llama, mistral], ids=["llama-gqa", "mistral-window"])
def test_patched_model_packed_matches_documents_one_by_one(build, device, kernel_only):
    packed_vs_one_by_one(build, device, lambda: None)


def test_compiled_patched_llama_keeps_documents_apart(device, kernel_only):
    """Under torch.compile the document ids come from position_ids in the attention entry."""
    torch.manual_seed(0)
    model = llama().to(device).eval()
    patch_model(model)
    input_ids, position_ids = packed_batch(MODEL_LENGTHS, device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        packed = compiled(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        eager = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    assert relative_error(packed, eager) < 1e-5


def test_packed_batch_reaches_the_kernel_with_document_ids(device, monkeypatch):
    calls = []
    attend = _interface.attend

    def spy(*args, **kwargs):
        calls.append(kwargs.get("doc_ids"))
        return attend(*args, **kwargs)

    monkeypatch.setattr(_interface, "attend", spy)
    model = llama().to(device).eval()
    patch_model(model)
    input_ids, position_ids = packed_batch(MODEL_LENGTHS, device)
    with torch.no_grad():
        model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    expected = doc_ids_for([MODEL_LENGTHS], device)
    assert len(calls) == model.config.num_hidden_layers and all(torch.equal(ids, expected) for ids in calls)


FALCONS = {
    "falcon-40b": dict(num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False),
    "falcon-rw": dict(alibi=True, multi_query=False, new_decoder_architecture=False, parallel_attn=False, bias=True),
}


@pytest.mark.parametrize("layout", FALCONS.values(), ids=FALCONS.keys())
def test_falcon_packed_matches_stock(layout, device, monkeypatch):
    """Falcon answers a packed batch as stock transformers does: documents apart where FalconModel
    passes position_ids to its mask (5.24), one sequence where it does not (5.17). ALiBi distances
    are the row's, which inside a document differ from the document's own by a constant per row."""
    torch.manual_seed(0)
    config = {key: value for key, value in DECODER.items() if key != "num_key_value_heads"}
    model = FalconForCausalLM(FalconConfig(**config, **layout)).to(device).eval()
    input_ids, position_ids = packed_batch(MODEL_LENGTHS, device)
    with torch.no_grad():
        stock = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        patch_model(model)
        monkeypatch.setattr(falcon, "_eager_fallback", None)  # the kernel path only
        ours = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    assert relative_error(ours, stock) < 1e-4


def test_bert_packed_matches_stock(device, monkeypatch):
    """BERT answers a packed row as stock transformers does: one sequence up to 5.24 (BertModel
    builds its mask without position_ids); from 5.25 documents apart, each bidirectional, and
    then on the kernel with document ids, never on a 4-D mask."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config).to(device).eval()
    input_ids, position_ids = packed_batch(MODEL_LENGTHS, device)
    with torch.no_grad():
        stock = model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        alone = torch.cat([model(input_ids=part).last_hidden_state
                           for part in input_ids.split(MODEL_LENGTHS, dim=1)], dim=1)
        documents_apart = "position_ids" in inspect.signature(create_bidirectional_mask).parameters
        assert (relative_error(stock, alone) < 1e-5) is documents_apart
        patch_model(model)
        if documents_apart:
            forbid_stock_attention(monkeypatch, ("bert",), "a packed BERT batch left the kernel")
        ours = model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
    assert relative_error(ours, stock) < 1e-4


# --- training -----------------------------------------------------------------------------------


def test_packed_positions_restart_after_each_separator():
    batch = torch.tensor([[5, 9, 2, 7, 2, 2, 8], [2, 3, 4, 5, 6, 2, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 0, 1, 2, 3, 4, 0]])
    assert torch.equal(packed_positions(batch, separator=2), expected)


def test_uptrain_with_packing_trains_on_the_kernel(tmp_path, kernel_only):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DECODER, intermediate_size=128, eos_token_id=3))
    documents = [torch.cat([torch.randint(4, 128, (n,)), torch.tensor([3])]) for n in (6, 13, 2, 20, 9, 11)]
    config = UptrainConfig(model=model, output_dir=tmp_path / "run", data=torch.cat(documents), packing=True,
                           seq_len=32, batch_size=2, max_steps=2, warmup_steps=0, schedule="constant",
                           gradient_checkpointing=False, quiet=True, log_every=1)
    result = uptrain(config)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)


def test_packing_is_refused_without_a_separator_or_for_an_encoder(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(**DECODER, intermediate_size=128, eos_token_id=None))
    config = UptrainConfig(model=model, output_dir=tmp_path / "a", data=torch.arange(64), packing=True, seq_len=32)
    with pytest.raises(ValueError, match="no eos_token_id; pass doc_separator"):
        uptrain(config)
    encoder = BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=128))
    config = UptrainConfig(model=encoder, output_dir=tmp_path / "b", data=torch.arange(64), packing=True,
                           seq_len=32, teacher=encoder, doc_separator=0)
    with pytest.raises(ValueError, match="packing is for causal LMs"):
        uptrain(config)


# --- GPU ----------------------------------------------------------------------------------------


def _gpu_layout(total: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(1, 700, (), generator=generator)))
    lengths[-1] -= sum(lengths) - total  # stays >= 1: the loop stopped at the first sum >= total
    return [lengths]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [dict(), dict(heads=(8, 2), window=256), dict(alibi=True, causal=False)],
                         ids=["causal", "gqa-window", "alibi-bidirectional"])
def test_gpu_kernel_matches_reference(dtype, options):
    layout = _gpu_layout(3000, seed=5)
    check_against_reference(layout, dtype=dtype, head_dim=128, device="cuda", **options)


@pytest.mark.gpu
def test_gpu_patched_llama_packed_matches_documents_one_by_one(kernel_only):
    packed_vs_one_by_one(llama, "cuda", lambda: None)
