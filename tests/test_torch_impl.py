"""The efficient torch path against the fp64 reference: outputs, LSE and every gradient."""

import pytest
import torch

from moba_attn import moba_attn_func, moba_attn_varlen_func
from moba_attn.ops import gate, torch_impl

from .helpers import assert_within_rule, max_err, packed_inputs, reference

# (lens_q, lens_k, Hq, Hkv, D, block_size, topk): awkward shapes on purpose
CASES = [
    ([300], [300], 4, 4, 16, 16, 3),  # T not a multiple of B
    ([1, 70, 5, 0, 200], [1, 70, 5, 0, 200], 4, 2, 64, 16, 2),  # len-1, < B, zero-length
    ([700], [700], 8, 2, 16, 16, 5),  # > 32 blocks, GQA 4
    ([256, 129], [256, 129], 2, 1, 128, 64, 3),  # MQA, D=128
    ([200], [200], 2, 2, 16, 128, 2),  # one full block + a short one
    ([150], [150], 2, 2, 16, 16, 1),  # block-local
    ([150], [150], 2, 2, 16, 16, 10),  # topk >= #blocks: dense causal
    ([40, 7], [300, 50], 4, 2, 16, 16, 3),  # Tq < Tk (chunked prefill), packed
    ([1, 1, 1], [513, 64, 1], 4, 1, 16, 32, 4),  # decode: one query per sequence
]


def _id(c):
    lq, lk, hq, hkv, d, b, k = c
    return f"T{sum(lk)}-n{len(lk)}-Tq{sum(lq)}-H{hq}-Hkv{hkv}-D{d}-B{b}-k{k}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_torch_matches_reference_fp64(case):
    lq, lk, hq, hkv, d, B, k = case
    q, kk, v, cu_q, cu_k = packed_inputs(lq, lk, hq, hkv, d, torch.float64, grad=True)
    out, lse = moba_attn_varlen_func(q, kk, v, cu_q, cu_k, max(lq), max(lk), block_size=B, topk=k,
                                     backend="torch", return_lse=True)
    ref, ref_lse = reference(q, kk, v, cu_q, cu_k, B, k)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, kk, v), g)
    ref_grads = torch.autograd.grad(ref, (q, kk, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES[:4], ids=_id)
def test_torch_low_precision_within_pytorch_error(case, dtype):
    lq, lk, hq, hkv, d, B, k = case
    q, kk, v, cu_q, cu_k = packed_inputs(lq, lk, hq, hkv, d, dtype, grad=True)
    out = moba_attn_varlen_func(q, kk, v, cu_q, cu_k, max(lq), max(lk), block_size=B, topk=k,
                                backend="torch")
    assert out.dtype == dtype
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, kk, v), g)
    # reference in fp64, and PyTorch's own error: the same math run in this dtype
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, kk, v))
    ref, _ = reference(q64, k64, v64, cu_q, cu_k, B, k)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, kk, v))
    sel = gate.moba_select(ql, kl, cu_q, cu_k, block_size=B, topk=k)
    from moba_attn.ops.naive import moba_attn_naive
    low, _ = moba_attn_naive(ql, kl, vl, cu_q, cu_k, block_size=B, topk=k, compute_dtype=dtype,
                             selection=sel)
    low_grads = torch.autograd.grad(low, (ql, kl, vl), g.to(low.dtype))
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert_within_rule(out, ref, low.to(dtype), 2, floor)
    for name, a, r, b in zip("qkv", grads, ref_grads, low_grads):
        assert_within_rule(a, r, b, 3, floor, what=f"d{name}")


def test_batch_layout_equals_varlen():
    b, t, hq, hkv, d = 3, 150, 4, 2, 16
    q = torch.randn(b, t, hq, d, dtype=torch.float64)
    k = torch.randn(b, t, hkv, d, dtype=torch.float64)
    v = torch.randn(b, t, hkv, d, dtype=torch.float64)
    out, lse = moba_attn_func(q, k, v, block_size=16, topk=3, backend="torch", return_lse=True)
    assert out.shape == (b, t, hq, d) and lse.shape == (b, hq, t) and lse.dtype == torch.float32
    cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32)
    o2, l2 = moba_attn_varlen_func(q.reshape(-1, hq, d), k.reshape(-1, hkv, d), v.reshape(-1, hkv, d),
                                   cu, cu, t, t, block_size=16, topk=3, backend="torch",
                                   return_lse=True)
    torch.testing.assert_close(out.reshape(-1, hq, d), o2)
    torch.testing.assert_close(lse, l2.reshape(hq, b, t).transpose(0, 1))


def test_batch_layout_decode_tq_lt_tk():
    q = torch.randn(2, 1, 4, 16, dtype=torch.float64)
    k = torch.randn(2, 90, 2, 16, dtype=torch.float64)
    v = torch.randn(2, 90, 2, 16, dtype=torch.float64)
    out = moba_attn_func(q, k, v, block_size=16, topk=2, backend="torch")
    ref = moba_attn_func(q, k, v, block_size=16, topk=2, backend="naive")
    torch.testing.assert_close(out, ref)


def test_identity_oracles_on_torch_path():
    T, B = 300, 32
    q, k, v, cu, _ = packed_inputs([T], [T], 4, 2, 16, torch.float64)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    full = moba_attn_varlen_func(q, k, v, cu, cu, T, T, block_size=B, topk=10, backend="torch")
    torch.testing.assert_close(full, dense)
    sparse = moba_attn_varlen_func(q, k, v, cu, cu, T, T, block_size=B, topk=2, backend="torch")
    assert max_err(sparse, dense) > 1e-3
    torch.testing.assert_close(sparse[: 2 * B], dense[: 2 * B])  # t < k*B: dense


@pytest.mark.parametrize("per_group", [True, False], ids=["group-loop", "tiles"])
def test_chunking_and_schedules_do_not_change_results(monkeypatch, per_group):
    """Tiny chunk budgets force many row chunks, tile batches and gate chunks."""
    lens = [333, 17, 250]
    q, k, v, cu, _ = packed_inputs(lens, lens, 4, 2, 16, torch.float64, grad=True)
    args = (q, k, v, cu, cu, 333, 333)
    kw = {"block_size": 16, "topk": 4, "backend": "torch"}
    out = moba_attn_varlen_func(*args, **kw)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    monkeypatch.setattr(torch_impl, "PART_CHUNK_ELEMS", 4 * 4 * 16 * 37)
    monkeypatch.setattr(torch_impl, "TILE_CHUNK_ELEMS", 16 * 16 * 3)
    monkeypatch.setattr(torch_impl, "GROUP_LOOP_MIN_WORK", 0 if per_group else 1 << 62)
    monkeypatch.setattr(gate, "GATE_CHUNK_ELEMS", 4 * 50)
    out2 = moba_attn_varlen_func(*args, **kw)
    grads2 = torch.autograd.grad(out2.sum(), (q, k, v))
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_deterministic_is_bit_identical():
    lens = [400, 90]
    q, k, v, cu, _ = packed_inputs(lens, lens, 4, 2, 32, torch.float32, grad=True)
    runs = []
    for _ in range(2):
        out = moba_attn_varlen_func(q, k, v, cu, cu, 400, 400, block_size=32, topk=3,
                                    backend="torch", deterministic=True)
        runs.append((out,) + torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_empty_batch_and_no_grad_paths():
    q, k, v, cu_q, cu_k = packed_inputs([0, 0], [0, 5], 2, 2, 16)
    out, lse = moba_attn_varlen_func(q, k, v, cu_q, cu_k, 0, 5, block_size=4, topk=2,
                                     backend="torch", return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


def test_matmul_path_used_off_cpu_matches_reference(monkeypatch):
    """Other devices run the tiles on plain matmuls (no fused CPU flash kernel): check that
    path here by hiding the CPU kernel."""
    monkeypatch.setattr(torch_impl, "_CPU_FLASH", None)
    lens = [300, 1, 77]
    q, k, v, cu, _ = packed_inputs(lens, lens, 4, 2, 16, torch.float64, grad=True)
    out, lse = moba_attn_varlen_func(q, k, v, cu, cu, 300, 300, block_size=16, topk=3,
                                     backend="torch", return_lse=True)
    ref, ref_lse = reference(q, k, v, cu, cu, 16, 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_deterministic_rounds_equal_index_add():
    dst = torch.zeros(10, 3, dtype=torch.float64)
    index = torch.tensor([1, 4, 1, 7, 4, 1])
    rank = torch.tensor([0, 0, 1, 0, 1, 2])  # tiles of one group get ranks 0, 1, 2, ...
    src = torch.randn(6, 3, dtype=torch.float64)
    torch_impl._add_rows_in_rounds(dst, index, src, rank)
    want = torch.zeros(10, 3, dtype=torch.float64).index_add_(0, index, src)
    torch.testing.assert_close(dst, want)
