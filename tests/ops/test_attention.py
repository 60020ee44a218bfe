"""Attention of every backend, outputs and all three gradients, against the fp64 naive
reference fed the backend's own selection (the gate is tested in ``test_gate.py``), plus the
identity oracles. Triton runs under the CPU interpreter here (fp32/fp16, small shapes) and
in bf16 on the GPU (``gpu`` tests, long shapes, every block-size class, every schedule)."""

import pytest
import torch
import torch.nn.functional as F

from moba_attn import MobaConfig, moba_attn_func, moba_attn_varlen_func, prepare_layout
from moba_attn.ops.backends import TRITON
from moba_attn.ops.config import SCHEDULES
from moba_attn.ops.triton.forward import plan_schedule

from ..utils import (
    case_id,
    check_against_reference,
    global_selection,
    max_err,
    packed_inputs,
    rows_reference,
    selection,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [  # (lens_q, lens_k, Hq, Hkv, D, block, topk): awkward shapes on purpose
    ([300], [300], 4, 4, 16, 16, 3),  # T not a multiple of B
    ([1, 70, 5, 0, 200], [1, 70, 5, 0, 200], 4, 2, 32, 16, 2),  # len-1, < B, zero-length
    ([520], [520], 2, 1, 16, 16, 5),  # > 32 blocks, MQA
    ([40, 7], [300, 50], 4, 2, 16, 16, 3),  # Tq < Tk (chunked prefill), packed
    ([1, 1, 1], [513, 64, 1], 4, 1, 16, 32, 4),  # decode: one query per sequence
    ([150], [150], 2, 2, 16, 16, 1),  # block-local
    ([150], [150], 2, 1, 32, 16, 10),  # topk >= #blocks: dense causal
]
TORCH_ONLY = [
    ([200], [200], 2, 2, 24, 24, 2),  # head dim and block size the kernels do not take
    ([129, 64], [129, 64], 2, 1, 16, 7, 3),  # block of 7
]


def _ids(cases):
    return [case_id(*c) for c in cases]


def _varlen(backend, cu_q, cu_k, bsz, topk, config=None, **kw):
    mq = int((cu_q[1:] - cu_q[:-1]).max())
    mk = int((cu_k[1:] - cu_k[:-1]).max())
    return lambda q, k, v: moba_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, block_size=bsz,
                                                 topk=topk, backend=backend, config=config, **kw)


def _check(backend, case, dtype, config=None, grads=True):
    lq, lk, hq, hkv, d, bsz, topk = case
    q, k, v, cu_q, cu_k = packed_inputs(lq, lk, hq, hkv, d, dtype)
    sel = selection(q, k, cu_q, cu_k, bsz, topk, backend, config)
    return check_against_reference(_varlen(backend, cu_q, cu_k, bsz, topk, config), q, k, v,
                                   cu_q, cu_k, bsz, topk, sel, grads=grads)


@pytest.mark.parametrize("case", CASES + TORCH_ONLY, ids=_ids(CASES + TORCH_ONLY))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_matches_reference(case, dtype):
    _check("torch", case, dtype)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_matches_reference(case, dtype):
    _check("triton", case, dtype)


SCHEDULE_CASES = [
    ([300], [300], 4, 2, 32, 16, 3),
    ([1, 40, 0, 130, 7], [1, 40, 0, 130, 7], 2, 1, 32, 32, 2),
    ([64, 1], [256, 200], 2, 2, 32, 32, 4),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=_ids(SCHEDULE_CASES))
def test_every_forward_schedule(schedule, case):
    # query tiles masked by the selection, or the gathered blocks merged into the output in
    # place (one launch per slot) or through partial buffers merged per pass
    _check("triton", case, torch.float32, MobaConfig(schedule=schedule), grads=False)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [4096, 1 << 16], ids=["row-chunks", "head-groups"])
def test_partial_passes_match_one_pass(budget):
    # a partial budget under one kv head's partials: one kv head at a time over row chunks
    # (sharing one sort of all entries); above it: groups of kv heads
    case = ([200, 90], [200, 90], 4, 2, 16, 16, 4)
    one = _check("triton", case, torch.float32, MobaConfig(schedule="partials"), grads=False)
    torch.manual_seed(0)
    split = _check("triton", case, torch.float32,
                   MobaConfig(schedule="partials", part_budget_bytes=budget), grads=False)
    assert split.shape == one.shape


def test_schedule_cost_model():
    cfg = MobaConfig()
    q = torch.empty(8192 * 2, 16, 128)
    short = prepare_layout(torch.tensor([0, 8192, 16384]), block_size=128)
    assert plan_schedule(short, q, 16, 8, cfg) == "masked"  # FlashMoBA's 8K: masked
    long_q = torch.empty(131072, 8, 128)
    long = prepare_layout(torch.tensor([0, 131072]), block_size=4096)
    assert plan_schedule(long, long_q, 8, 12, cfg) == "in-place"  # paper's: long windows
    assert plan_schedule(long, long_q, 8, 1, cfg) == "diag"
    assert plan_schedule(long, long_q, 8, 12, MobaConfig(schedule="partials")) == "partials"


def test_identity_oracles():
    # topk >= #blocks is dense causal attention; topk = 1 is block-local; a small topk
    # differs from dense beyond the first k blocks and equals it before
    t, h, d, bsz = 300, 2, 16, 32
    q, k, v, cu, _ = packed_inputs([t], [t], h, h, d, torch.float64)
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
    dense = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)[0].transpose(0, 1)
    idx = torch.arange(t)
    local_mask = (idx[None, :] <= idx[:, None]) & (idx[None, :] // bsz == idx[:, None] // bsz)
    local = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=local_mask)[0].transpose(0, 1)
    for backend, dt in (("torch", torch.float64), ("triton", torch.float32)):
        qq, kk, vv = q.to(dt), k.to(dt), v.to(dt)
        full = _varlen(backend, cu, cu, bsz, 10)(qq, kk, vv)
        assert max_err(full, dense) < (1e-12 if dt == torch.float64 else 1e-5)
        one = _varlen(backend, cu, cu, bsz, 1)(qq, kk, vv)
        assert max_err(one, local) < (1e-12 if dt == torch.float64 else 1e-5)
        few = _varlen(backend, cu, cu, bsz, 2)(qq, kk, vv)
        assert max_err(few[: 2 * bsz], dense[: 2 * bsz]) < 1e-5
        assert max_err(few[2 * bsz:], dense[2 * bsz:]) > 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deterministic_is_bit_identical(backend):
    q, k, v, cu, _ = packed_inputs([150, 90], [150, 90], 4, 2, 32, torch.float32)
    fn = _varlen(backend, cu, cu, 16, 4, deterministic=True)
    dout = torch.randn_like(q)
    a = [x.detach() for x in _grads(fn, q, k, v, dout)]
    b = [x.detach() for x in _grads(fn, q, k, v, dout)]
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _grads(fn, q, k, v, dout):
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*xs)
    return [out] + list(torch.autograd.grad(out, xs, dout))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_api_equals_varlen(backend):
    b, tq, tk, hq, hkv, d = 3, 40, 100, 4, 2, 16
    q, k, v = torch.randn(b, tq, hq, d), torch.randn(b, tk, hkv, d), torch.randn(b, tk, hkv, d)
    out, lse = moba_attn_func(q, k, v, block_size=16, topk=3, return_lse=True, backend=backend)
    cq = torch.arange(0, (b + 1) * tq, tq, dtype=torch.int32)
    ck = torch.arange(0, (b + 1) * tk, tk, dtype=torch.int32)
    ov, lv = moba_attn_varlen_func(q.reshape(-1, hq, d), k.reshape(-1, hkv, d),
                                   v.reshape(-1, hkv, d), cq, ck, tq, tk, block_size=16, topk=3,
                                   return_lse=True, backend=backend)
    assert torch.equal(out.reshape(-1, hq, d), ov)
    assert torch.equal(lse, lv.reshape(hq, b, tq).transpose(0, 1))


def test_no_grad_and_empty_inputs():
    q, k, v, cu, _ = packed_inputs([0, 0], [0, 0], 2, 1, 16)
    for backend in ("torch", "triton", "naive"):
        out = _varlen(backend, cu, cu, 16, 3)(q, k, v)
        assert out.shape == q.shape
    with torch.no_grad():
        q, k, v, cu, _ = packed_inputs([70], [70], 2, 1, 16)
        assert _varlen("torch", cu, cu, 16, 3)(q, k, v).shape == q.shape


# ============================================================================ GPU (bf16)
gpu = pytest.mark.gpu
BLOCK_CLASSES = [16, 32, 64, 128, 256, 512, 1024, 4096, 8192]


def _gpu_check(q, k, v, cu_q, cu_k, bsz, topk, config=None, rows=None, floor=1e-4,
               grads=False, deterministic=False):
    """Public varlen call vs the fp64 row reference given the same (Triton) selection."""
    lay = prepare_layout(cu_q, cu_k, block_size=bsz)
    sel = global_selection(selection(q, k, cu_q, cu_k, bsz, topk, "triton", config), lay)
    scale = q.shape[-1] ** -0.5
    xs = [x.clone().requires_grad_(grads) for x in (q, k, v)]
    out, lse = moba_attn_varlen_func(*xs, cu_q, cu_k, lay.max_len_q, lay.max_len_k,
                                     block_size=bsz, topk=topk, return_lse=True,
                                     backend="triton", layout=lay, config=config,
                                     deterministic=deterministic)
    r = torch.arange(q.shape[0], device=q.device) if rows is None else rows
    ref_o, ref_l = rows_reference(q, k, v, lay, sel, scale, torch.float64, r)
    pt_o, pt_l = rows_reference(q, k, v, lay, sel, scale, q.dtype, r)
    assert max_err(out[r], ref_o) <= 2 * max_err(pt_o, ref_o) + floor
    assert max_err(lse[:, r], ref_l) <= 2 * max_err(pt_l, ref_l) + floor
    if grads:
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, xs, dout)
        sel_local = lay.local_blocks(sel)
        from ..utils import reference

        def ref(dt):
            ys = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
            o = reference(*ys, cu_q, cu_k, bsz, topk, dt, sel_local)[0]
            return torch.autograd.grad(o, ys, dout.to(dt))

        want, base = ref(torch.float64), ref(q.dtype)
        for g, w, b in zip(got, want, base):
            assert max_err(g, w) <= 3 * max_err(b, w) + 1e-3
    return out


def _rows(t):
    return torch.cat([torch.arange(0, 64), torch.randint(0, t, (200,)),
                      torch.arange(t - 64, t)]).unique().to(DEVICE)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bsz", BLOCK_CLASSES, ids=[f"B{b}" for b in BLOCK_CLASSES])
def test_gpu_block_size_classes(bsz, dtype):
    t = max(1000, int(4.5 * bsz))
    q, k, v, cu, _ = packed_inputs([t], [t], 4, 2, 128, dtype, DEVICE)
    _gpu_check(q, k, v, cu, cu, bsz, 3, rows=_rows(t))


@gpu
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_varlen_gqa_every_schedule(schedule, d):
    lq = [1, 100, 0, 3000, 37, 9000, 2]
    lk = [1, 100, 0, 3000, 500, 9000, 4000]  # some Tq < Tk (chunked prefill, decode)
    q, k, v, cq, ck = packed_inputs(lq, lk, 8, 2, d, torch.bfloat16, DEVICE)
    _gpu_check(q, k, v, cq, ck, 128, 4, MobaConfig(schedule=schedule), rows=_rows(sum(lq)))


@gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("case", [
    ([1, 100, 3000, 777], 8, 8, 128, 64, 4),  # 47 blocks, T not a multiple of B
    ([2500, 5, 1300], 8, 2, 128, 128, 8),  # GQA 4
    ([5000, 1], 4, 2, 128, 1024, 3),  # large blocks
    ([4100], 4, 4, 64, 16, 6),  # 257 tiny blocks
], ids=lambda c: f"T{'-'.join(map(str, c[0]))}-H{c[1]}-Hkv{c[2]}-D{c[3]}-B{c[4]}-k{c[5]}")
def test_gpu_forward_and_gradients(case, deterministic):
    lens, hq, hkv, d, bsz, topk = case
    q, k, v, cu, _ = packed_inputs(lens, lens, hq, hkv, d, torch.bfloat16, DEVICE)
    _gpu_check(q, k, v, cu, cu, bsz, topk, grads=True, deterministic=deterministic)


@gpu
def test_gpu_kv_head_group_and_row_chunk_passes():
    t, hq, hkv, d, topk = 6000, 8, 4, 128, 5
    q, k, v, cu, _ = packed_inputs([t], [t], hq, hkv, d, torch.bfloat16, DEVICE)
    per_head = t * 2 * (topk - 1) * d * 2  # bytes of one kv head's bf16 partials
    for budget in (2 * per_head, per_head // 3):
        _gpu_check(q, k, v, cu, cu, 64, topk, MobaConfig(schedule="partials",
                                                         part_budget_bytes=budget),
                   rows=_rows(t))


@gpu
def test_gpu_offsets_beyond_int32():
    t, h, d = 1_100_000, 16, 128  # T*H*D = 2.25e9 > 2^31
    q, k, v, cu, _ = packed_inputs([t], [t], h, h, d, torch.bfloat16, DEVICE)
    rows = torch.cat([torch.arange(t - 40, t), torch.arange(0, 8)]).to(DEVICE)
    out = _gpu_check(q, k, v, cu, cu, 512, 3, rows=rows)
    assert not out[-1000:].isnan().any()


@gpu
@pytest.mark.parametrize("hkv", [8, 2])
def test_gpu_dense_calls_use_cudnn_and_match(hkv):
    # Tk <= topk * B: exactly dense, cuDNN forward and backward; the kernels agree
    b, t, hq, d, bsz = 2, 2048, 8, 128, 512
    q, k, v = (torch.randn(b, t, h, d, device=DEVICE, dtype=torch.bfloat16)
               for h in (hq, hkv, hkv))
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    dense = moba_attn_func(*xs, block_size=bsz, topk=4)
    kern = moba_attn_func(q, k, v, block_size=bsz, topk=4, deterministic=True)  # kernels
    ref = F.scaled_dot_product_attention(q.transpose(1, 2).double(),
                                         k.transpose(1, 2).double().repeat_interleave(hq // hkv, 1),
                                         v.transpose(1, 2).double().repeat_interleave(hq // hkv, 1),
                                         is_causal=True).transpose(1, 2)
    assert max_err(dense, ref) < 2e-2 and max_err(kern, ref) < 2e-2
    g = torch.randn_like(dense)
    grads = torch.autograd.grad(dense, xs, g)
    ys = [x.clone().requires_grad_() for x in (q, k, v)]
    kg = torch.autograd.grad(moba_attn_func(*ys, block_size=bsz, topk=4, deterministic=True),
                             ys, g)
    for a, c in zip(grads, kg):
        assert (a.float() - c.float()).norm() <= 2e-2 * c.float().norm()


@gpu
def test_gpu_backend_resolution():
    q = torch.randn(1, 64, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    assert TRITON.supports(q.device, q.dtype, 128, 64, 3) is None
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: head dim 24"):
        x = torch.randn(1, 64, 2, 24, device=DEVICE)
        moba_attn_func(x, x, x, block_size=64, topk=3, backend="triton")
