"""Triton backward kernels vs a dense fp64 oracle fed the SAME block selection.

On CPU the kernels run in the Triton interpreter (fp32/fp16, small shapes); the ``gpu`` tests
run bf16 on CUDA with the awkward shapes. Tolerance: the kernel's error against fp64 must stay
within 3x PyTorch's own error in the same dtype (plus a tiny floor for fp32).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moba_attn.ops import torch_impl
from moba_attn.ops import triton_backward as tb
from moba_attn.ops.gate import BlockLayout
from moba_attn.ops.naive import moba_mask_naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- oracle
def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32,
                        device=device)


def dense_mask(layout: BlockLayout, sel: torch.Tensor, total_k: int) -> torch.Tensor:
    """``[Hq, total_q, total_k]`` keys each (head, row) attends, from the layout and ``sel``."""
    total_q, hq = sel.shape[0], sel.shape[1]
    dev = sel.device
    key_blk = torch.repeat_interleave(torch.arange(layout.n_blocks, device=dev), layout.blk_len)
    key_off = torch.arange(total_k, device=dev) - layout.blk_start[key_blk]  # offset in block
    chosen = torch.zeros(total_q, hq, layout.n_blocks + 1, dtype=torch.bool, device=dev)
    s = sel.long().clone()
    s[s < 0] = layout.n_blocks  # unused slots hit a dummy column
    chosen.scatter_(2, s, True)
    m = chosen[:, :, key_blk]  # [Tq, Hq, Tk]
    own = (key_blk[None, :] == layout.row_own[:, None]) & (
        key_off[None, :] <= (layout.row_pos % layout.block_size)[:, None])  # [Tq, Tk]
    return (m | own[:, None, :]).permute(1, 0, 2)


def dense_grads(q, k, v, dout, mask, scale, dtype):
    """Gradients of dense masked attention computed in ``dtype`` (fp64 = the oracle)."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    s = torch.einsum("qhd,khd->hqk", qd, kd.repeat_interleave(g, 1)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    o = torch.einsum("hqk,khd->qhd", p, vd.repeat_interleave(g, 1))
    o.backward(dout.to(dtype))
    return qd.grad, kd.grad, vd.grad


def make_case(lens_q, lens_k, hq, hkv, d, block, topk, dtype, device=DEVICE):
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q = torch.randn(tq, hq, d, device=device, dtype=dtype)
    k = torch.randn(tk, hkv, d, device=device, dtype=dtype)
    v = torch.randn(tk, hkv, d, device=device, dtype=dtype)
    dout = torch.randn(tq, hq, d, device=device, dtype=dtype)
    layout = BlockLayout.build(cu_q, cu_k, block)
    scale = d ** -0.5
    sel = torch_impl._gate_all(q, k, layout, topk)
    out, lse = torch_impl._forward(q, k, v, layout, sel, topk, scale)
    return {"q": q, "k": k, "v": v, "out": out, "lse": lse.float(), "dout": dout, "layout": layout, "sel": sel,
                "topk": topk, "scale": scale}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_against_oracle(c, grads, low_dtype, floor):
    mask = dense_mask(c["layout"], c["sel"], c["k"].shape[0])
    ref = dense_grads(c["q"], c["k"], c["v"], c["dout"], mask, c["scale"], torch.float64)
    own = dense_grads(c["q"], c["k"], c["v"], c["dout"], mask, c["scale"], low_dtype)
    for name, got, r, o in zip(("dq", "dk", "dv"), grads, ref, own):
        assert got.dtype == c[name[1]].dtype and got.shape == c[name[1]].shape
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        e_kernel, e_torch = rel(got, r), rel(o, r)
        assert e_kernel <= 3 * e_torch + floor, (
            f"{name}: kernel error {e_kernel:.3e} > 3 x torch's {e_torch:.3e} + {floor:.0e}")


def run_kernel(c, deterministic=False):
    return tb.moba_backward_triton(c["q"], c["k"], c["v"], c["out"], c["lse"], c["dout"],
                                   c["layout"], c["sel"], c["topk"], c["scale"], deterministic)


@pytest.fixture
def poisoned(monkeypatch):
    """Every output buffer starts as NaN, so an unwritten element fails the test."""
    monkeypatch.setattr(tb, "_empty_like", lambda x: torch.full_like(x, float("nan")))


# ----------------------------------------------------------------------------- CPU (interpreter)
CPU_CASES = [  # (lens_q, lens_k, Hq, Hkv, D, B, topk, dtype)
    ([100, 1, 37, 200], None, 4, 2, 64, 32, 3, torch.float32),
    ([100, 1, 37, 200], None, 4, 2, 64, 32, 3, torch.float16),
    ([300], None, 4, 1, 32, 16, 4, torch.float16),
    ([512], None, 2, 2, 16, 16, 5, torch.float32),  # 32 blocks
    ([130, 0, 70], None, 2, 1, 128, 64, 2, torch.float16),  # zero-length sequence
    ([1, 50], [70, 130], 4, 2, 64, 32, 3, torch.float32),  # Tq < Tk (bottom-right)
    ([200], None, 2, 2, 48, 32, 1, torch.float32),  # block-local, head dim not a power of 2
    ([200], None, 2, 1, 64, 32, 99, torch.float16),  # topk >= #blocks: dense causal
]


def _id(case):
    lq, lk, hq, hkv, d, b, kk, dt = case
    lens = "-".join(map(str, lq)) + ("" if lk is None else "of" + "-".join(map(str, lk)))
    return f"T{lens}-H{hq}-Hkv{hkv}-D{d}-B{b}-k{kk}-{str(dt).split('.')[-1]}"


@pytest.mark.parametrize("case", CPU_CASES, ids=[_id(c) for c in CPU_CASES])
def test_grads_match_oracle(case, poisoned):
    lq, lk, hq, hkv, d, b, kk, dt = case
    c = make_case(lq, lk or lq, hq, hkv, d, b, kk, dt)
    check_against_oracle(c, run_kernel(c), dt, floor=1e-5 if dt == torch.float32 else 0.0)


def test_deterministic_matches_and_is_bitwise_stable(poisoned):
    c = make_case([150, 90], [150, 90], 4, 2, 32, 16, 4, torch.float32)
    a = run_kernel(c, deterministic=True)
    b = run_kernel(c, deterministic=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    check_against_oracle(c, a, torch.float32, floor=1e-5)
    atomic = run_kernel(c, deterministic=False)
    for x, y in zip(a, atomic):
        assert rel(x, y) < 1e-5


def test_deterministic_row_chunks(monkeypatch, poisoned):
    """A small dQ buffer budget forces several row chunks; the result must not change."""
    c = make_case([120, 60], [120, 60], 2, 1, 32, 16, 3, torch.float32)
    whole = run_kernel(c, deterministic=True)
    monkeypatch.setattr(tb, "DQ_PART_BYTES", 2 * 3 * 32 * 4 * 50)  # 50 rows per chunk
    chunked = run_kernel(c, deterministic=True)
    for x, y in zip(whole, chunked):
        assert torch.equal(x, y)


def test_int32_selection_and_slot_order():
    c = make_case([160], [160], 2, 2, 32, 16, 4, torch.float32)
    base = run_kernel(c)
    c2 = dict(c, sel=c["sel"].flip(-1).to(torch.int32))  # slot order is irrelevant
    for x, y in zip(base, run_kernel(c2)):
        assert rel(x, y) < 1e-5


def test_entries_decode_rows_and_key_limits():
    """The per-entry arrays the kernels read: each group's entries, in order, are the
    (row, head) pairs that attend its block through that kv head, with the causal limit."""
    c = make_case([70, 1, 150], [70, 1, 150], 4, 2, 16, 16, 3, torch.float32, device="cpu")
    lay, sel, hq, hkv, topk = c["layout"], c["sel"], 4, 2, 3
    ents = tb._Entries(lay, sel, 0, sel.shape[0], hq, hkv, topk, keep_ids=False)
    assert ents.ent is None and ents.rh.dtype == torch.int32 and ents.lim.dtype == torch.int32
    want = {}
    for row in range(sel.shape[0]):
        pos = int(lay.row_pos[row])
        for h in range(hq):
            blocks = [(int(lay.row_own[row]), pos % lay.block_size + 1)]
            blocks += [(int(b), lay.block_size) for b in sel[row, h] if int(b) >= 0]
            for b, lim in blocks:
                want.setdefault(b * hkv + h // (hq // hkv), []).append((row * hq + h, lim))
    off = ents.grp_off.tolist()
    assert off[-1] == sum(len(x) for x in want.values())
    for g in range(ents.n_groups):
        got = list(zip(ents.rh[off[g]:off[g + 1]].tolist(), ents.lim[off[g]:off[g + 1]].tolist()))
        assert got == sorted(want.get(g, [])), g


def test_oracle_mask_equals_naive_rule():
    """The oracle's mask from (layout, sel) is the spec's mask, so sel means what we think."""
    c = make_case([200], [200], 4, 2, 32, 16, 4, torch.float32)
    mask = dense_mask(c["layout"], c["sel"], 200)
    assert torch.equal(mask, moba_mask_naive(c["q"], c["k"], 16, 4))


def test_matches_torch_backward_through_autograd():
    """End to end: the torch path's forward, our backward == torch backward."""
    c = make_case([96, 33], [96, 33], 2, 1, 32, 16, 3, torch.float32)
    ref = torch_impl._backward(c["q"], c["k"], c["v"], c["out"], c["lse"], c["dout"],
                               c["layout"], c["sel"], c["topk"], c["scale"], False)
    for x, y in zip(run_kernel(c), ref):
        assert rel(x, y) < 1e-5


def test_small_topk_differs_from_dense():
    c = make_case([256], [256], 2, 2, 32, 16, 2, torch.float32)
    mask = dense_mask(c["layout"], c["sel"], 256)
    causal = torch.ones(256, 256, dtype=torch.bool).tril()
    dense = dense_grads(c["q"], c["k"], c["v"], c["dout"], causal.expand(2, -1, -1), c["scale"],
                        torch.float64)
    assert not torch.equal(mask, causal.expand(2, -1, -1))
    assert rel(run_kernel(c)[0], dense[0]) > 1e-2


def test_fallback_warns_once_and_is_exact():
    c = make_case([64], [64], 2, 1, 16, 16, 2, torch.float64)
    tb._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = run_kernel(c)
        run_kernel(c)
    msgs = [str(x.message) for x in w if "moba_backward_triton" in str(x.message)]
    assert len(msgs) == 1 and "float64" in msgs[0]
    ref = torch_impl._backward(c["q"], c["k"], c["v"], c["out"], c["lse"], c["dout"],
                               c["layout"], c["sel"], c["topk"], c["scale"], False)
    for x, y in zip(got, ref):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- GPU (bf16)
GPU_CASES = [  # (lens, Hq, Hkv, D, B, topk): packed with a length-1 and shorter-than-B sequence
    ([1, 100, 3000, 777], 8, 8, 128, 64, 4),  # 47 blocks, T not a multiple of B
    ([1, 100, 3000, 777], 8, 4, 64, 64, 4),  # GQA 2
    ([2500, 5, 1300], 8, 2, 128, 128, 8),  # GQA 4
    ([5000, 1], 4, 2, 128, 1024, 3),  # large blocks
    ([4100], 4, 4, 64, 16, 6),  # 257 tiny blocks
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[
    f"T{'-'.join(map(str, c[0]))}-H{c[1]}-Hkv{c[2]}-D{c[3]}-B{c[4]}-k{c[5]}" for c in GPU_CASES])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_gpu_bf16_grads(case, deterministic, poisoned):
    lens, hq, hkv, d, b, kk = case
    c = make_case(lens, lens, hq, hkv, d, b, kk, torch.bfloat16)
    check_against_oracle(c, run_kernel(c, deterministic), torch.bfloat16, floor=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes(dtype, poisoned):
    c = make_case([1, 900, 1500], [1, 900, 1500], 4, 2, 64, 128, 4, dtype)
    check_against_oracle(c, run_kernel(c), dtype, floor=1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.gpu
def test_gpu_deterministic_bitwise():
    c = make_case([8192, 4000], [8192, 4000], 16, 4, 128, 128, 8, torch.bfloat16)
    a = run_kernel(c, deterministic=True)
    b = run_kernel(c, deterministic=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # the atomic dQ differs only by summation order
    for x, y in zip(a, run_kernel(c, deterministic=False)):
        assert rel(x, y) < 1e-2
