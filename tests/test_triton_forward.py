"""Triton forward (gate + attention) against the naive / torch references.

On CPU the kernels run under the Triton interpreter (fp32/fp16, small shapes); tests marked
``gpu`` need CUDA (bf16/fp16, long shapes, every block-size class). Selection is tested apart
from attention: attention tests feed one selection to the kernel and to the reference.
Tolerance (flash-attn's rule): kernel error vs an fp64 reference <= 2x the error of the same
PyTorch computation in the kernel's dtype, plus a small floor.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from moba_attn import interface
from moba_attn.ops import triton_attention as ta
from moba_attn.ops import triton_gate as tg
from moba_attn.ops.gate import BlockLayout, block_centroids
from moba_attn.ops.naive import moba_attn_naive
from moba_attn.ops.torch_impl import _gate_all

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every kernel output starts as NaN (or -7 for indices): unwritten elements show up."""
    monkeypatch.setattr(ta, "POISON", True)
    monkeypatch.setattr(tg, "POISON", True)


def cu(lens, device=DEVICE):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32,
                        device=device)


def make_qkv(total_q, total_k, hq, hkv, d, dtype, device=DEVICE):
    q = torch.randn(total_q, hq, d, device=device).to(dtype)
    k = torch.randn(total_k, hkv, d, device=device).to(dtype)
    v = torch.randn(total_k, hkv, d, device=device).to(dtype)
    return q, k, v


def rows_reference(q, k, v, layout, sel, scale, dtype, rows=None, chunk=64):
    """Output and LSE of ``rows`` given the selection, computed in ``dtype`` by gathering each
    row's keys (own block causal + selected blocks): ``(out [R, Hq, D], lse [Hq, R])``."""
    total_q, hq, _ = q.shape
    group = hq // k.shape[1]
    bsz = layout.block_size
    rows = torch.arange(total_q, device=q.device) if rows is None else rows
    hk = (torch.arange(hq, device=q.device) // group)[None, :, None]
    j = torch.arange(bsz, device=q.device)
    outs, lses = [], []
    for c0 in range(0, rows.numel(), chunk):
        r = rows[c0:c0 + chunk]
        n = r.numel()
        blocks = torch.cat([layout.row_own[r][:, None, None].expand(n, hq, 1), sel[r].long()], 2)
        b = blocks.clamp(min=0)
        valid = (blocks >= 0)[..., None] & (j < layout.blk_len[b][..., None])  # [n, Hq, k, B]
        valid[:, :, 0] &= j[None, None, :] <= (layout.row_pos[r] % bsz)[:, None, None]
        tok = (layout.blk_start[b][..., None] + j).clamp(max=k.shape[0] - 1).reshape(n, hq, -1)
        valid = valid.reshape(n, hq, -1)
        kk, vv = k[tok, hk].to(dtype), v[tok, hk].to(dtype)  # [n, Hq, k*B, D]
        s = torch.einsum("nhd,nhkd->nhk", q[r].to(dtype), kk) * scale
        s = s.masked_fill(~valid, float("-inf"))
        lse = torch.logsumexp(s.float(), -1)
        p = torch.softmax(s, -1)
        outs.append(torch.einsum("nhk,nhkd->nhd", p, vv))
        lses.append(lse.t())
    return torch.cat(outs), torch.cat(lses, 1)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_attention(q, k, v, cu_q, cu_k, bsz, topk, rows=None, floor=1e-5):
    """Kernel (given the torch gate's selection) vs the fp64 row reference; 2x PyTorch's error."""
    layout = BlockLayout.build(cu_q, cu_k, bsz)
    sel = _gate_all(q, k, layout, topk)
    scale = q.shape[-1] ** -0.5
    out, lse = ta._moba_forward(q, k, v, layout, sel, topk, scale)
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten outputs"
    r = torch.arange(q.shape[0], device=q.device) if rows is None else rows
    ref_o, ref_l = rows_reference(q, k, v, layout, sel, scale, torch.float64, r)
    pt_o, pt_l = rows_reference(q, k, v, layout, sel, scale, q.dtype, r)
    e_o, pt_e_o = err(out[r], ref_o), err(pt_o, ref_o)
    e_l, pt_e_l = err(lse[:, r], ref_l), err(pt_l, ref_l)
    assert e_o <= 2 * pt_e_o + floor, (e_o, pt_e_o)
    assert e_l <= 2 * pt_e_l + floor, (e_l, pt_e_l)
    return out, lse, sel


def sets(sel):
    return torch.sort(sel, dim=-1).values


# ============================================================================ CPU (interpreter)
GATE_CASES = [  # (q lens, k lens, Hq, Hkv, D, block, topk)
    ([300], [300], 4, 2, 32, 16, 3),
    ([1, 17, 200, 0, 90], [1, 17, 200, 0, 90], 4, 1, 32, 16, 5),
    ([200], [200], 1, 1, 16, 2, 65),  # 100 blocks, k-1 = 64 slots
    ([50, 1], [300, 200], 2, 2, 64, 32, 9),  # Tq < Tk (chunked prefill, decode)
]


def _gid(c):
    return f"Tq{sum(c[0])}-Tk{sum(c[1])}-n{len(c[0])}-H{c[2]}-Hkv{c[3]}-D{c[4]}-B{c[5]}-k{c[6]}"


@pytest.mark.parametrize("case", GATE_CASES, ids=_gid)
def test_gate_matches_torch(case):
    lq, lk, hq, hkv, d, bsz, topk = case
    cq, ck = cu(lq), cu(lk)
    q, k, _ = make_qkv(sum(lq), sum(lk), hq, hkv, d, torch.float32)
    layout = BlockLayout.build(cq, ck, bsz)
    cent = tg.block_centroids_triton(k, layout)
    torch.testing.assert_close(cent, block_centroids(k, layout), rtol=1e-6, atol=1e-6)
    got = tg.select_blocks_triton(q, cent, layout, topk, precision="ieee")
    want = _gate_all(q, k, layout, topk)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(sets(got), sets(want))


def test_gate_tie_rule_lower_block_wins():
    # every block has the same keys -> every score ties -> the lowest earlier blocks win
    lens, bsz, topk = [150, 70], 16, 4
    cq = cu(lens)
    q = torch.randint(-3, 4, (sum(lens), 2, 32)).float()  # integers: every sum is exact
    k = torch.randint(-3, 4, (1, 1, 32)).float().expand(sum(lens), 1, 32).contiguous()
    layout = BlockLayout.build(cq, cq, bsz)
    got = tg.gate_triton(q, k, layout, topk)
    n_earlier = layout.row_own - layout.row_first
    j = torch.arange(topk - 1)
    want = torch.where(j < n_earlier[:, None], layout.row_first[:, None] + j, -1)
    assert torch.equal(got, want[:, None, :].expand_as(got))  # order too: equal scores, index up
    assert torch.equal(sets(got), sets(_gate_all(q, k, layout, topk)))


def test_gate_integer_scores_many_ties():
    # small integers: every score is exact in any precision, ties are frequent
    lens, bsz, topk = [256], 16, 6
    cq = cu(lens)
    q = torch.randint(-2, 3, (256, 2, 32)).float()
    blk = torch.randint(-1, 2, (16, 1, 32)).float()
    k = blk.repeat_interleave(bsz, 0)
    layout = BlockLayout.build(cq, cq, bsz)
    want = sets(_gate_all(q, k, layout, topk))
    for prec in ("tf32", "ieee"):
        assert torch.equal(sets(tg.gate_triton(q, k, layout, topk, precision=prec)), want)


def test_gate_precision_switch():
    old = tg.get_gate_precision()
    try:
        tg.set_gate_precision("IEEE")
        assert tg.get_gate_precision() == "ieee"
        with pytest.raises(ValueError, match="gate precision"):
            tg.set_gate_precision("fp16")
    finally:
        tg.set_gate_precision(old)


ATTN_CASES = [  # (q lens, k lens, Hq, Hkv, D, block, topk, dtype)
    ([300], [300], 4, 2, 32, 16, 3, torch.float32),
    ([1, 40, 0, 130, 7], [1, 40, 0, 130, 7], 2, 1, 32, 32, 2, torch.float32),  # len-1, < block
    ([64, 1], [256, 200], 2, 2, 64, 32, 4, torch.float32),  # Tq < Tk
    ([256], [256], 2, 1, 32, 64, 2, torch.float16),
    ([200], [200], 2, 2, 32, 16, 1, torch.float16),  # block-local
    ([400], [400], 2, 1, 32, 16, 9, torch.float16),
]


def _aid(c):
    return _gid(c[:7]) + f"-{str(c[7]).split('.')[-1]}"


SCHEDULES = pytest.mark.parametrize("schedule", ta.SCHEDULES)


@SCHEDULES
@pytest.mark.parametrize("case", ATTN_CASES, ids=_aid)
def test_attention_given_selection(monkeypatch, case, schedule):
    # every schedule: query tiles over their causal keys masked by the selection, or the
    # gathered blocks merged into the output in place (one launch per slot) or through
    # partial buffers merged per pass
    monkeypatch.setattr(ta, "SCHEDULE", schedule)
    lq, lk, hq, hkv, d, bsz, topk, dtype = case
    q, k, v = make_qkv(sum(lq), sum(lk), hq, hkv, d, dtype)
    check_attention(q, k, v, cu(lq), cu(lk), bsz, topk, floor=1e-5 if dtype == torch.float32 else 1e-4)


def test_schedule_rule(monkeypatch):
    # the cost model: masked runs every causal key, the gather pays per entry and per key
    layout = BlockLayout.build(cu([64]), cu([64]), 16)  # rows have 0, 1, 2, 3 earlier blocks
    monkeypatch.setattr(ta, "GATHER_ENTRY_NS", 0.0)
    monkeypatch.setattr(ta, "GATHER_TFLOPS", 1.0)
    # keys: masked 16 * (6 + 2) blocks per 16 rows; gather 16 * (3 + 2) at k - 1 = 1
    monkeypatch.setattr(ta, "MASKED_TFLOPS", 8 / 5 - 1e-6)
    assert not ta._masked_wins(layout, 1, 32)
    monkeypatch.setattr(ta, "MASKED_TFLOPS", 8 / 5 + 1e-6)
    assert ta._masked_wins(layout, 1, 32)
    monkeypatch.undo()
    # the fitted constants: FlashMoBA's 8K setting (blocks of 128, k - 1 = 7) goes masked,
    # its 16K gathers (in place while the partial buffer's floor would break the peak bound);
    # GQA's 8K (blocks of 512, k - 1 = 2) and the paper's 128K gather in place; blocks of 16
    # (windows under one entry tile) keep the partials
    def sched(lens, bsz, k1, est=None, floored=True):
        layout = BlockLayout.build(cu(lens), cu(lens), bsz)
        est = sum(lens) * k1 / layout.n_blocks if est is None else est
        return ta._schedule(layout, est, 64, k1, 128, floored)

    assert sched([8192, 8192], 128, 7) == "masked"
    assert sched([16384, 16384], 128, 7) == "in-place"
    assert sched([16384, 16384], 128, 7, floored=False) == "partials"
    assert sched([8192], 16, 2) == "partials"
    assert sched([8192], 512, 2, est=8192 * 4 * 2 / 16, floored=False) == "in-place"
    assert sched([131072], 4096, 11, floored=False) == "in-place"
    monkeypatch.setattr(ta, "SCHEDULE", "partials")
    assert sched([8192, 8192], 128, 7) == "partials"
    monkeypatch.setattr(ta, "SCHEDULE", "in place")
    with pytest.raises(ValueError, match="in-place"):
        sched([8192, 8192], 128, 7)


def test_partial_floor_rule(monkeypatch):
    small = torch.empty(16384 * 2, 16, 128, dtype=torch.bfloat16, device="meta")  # 134 MB
    large = torch.empty(262144 * 2, 16, 128, dtype=torch.bfloat16, device="meta")  # 2.1 GB
    assert ta._part_floored(small) and not ta._part_floored(large)
    monkeypatch.setattr(ta, "PART_CHUNK_ELEMS", 1 << 20)  # a set budget has no floor
    assert not ta._part_floored(small)


@pytest.mark.parametrize("fma", [True, False], ids=["fma", "mul-add"])
def test_online_softmax_variants_match_reference(monkeypatch, fma):
    # the scale folded into one FMA per score with P @ V accumulated in the MMA, or not
    monkeypatch.setattr(ta, "FWD_FMA", fma)
    lens = [40, 300]
    q, k, v = make_qkv(340, 340, 4, 2, 32, torch.float32)
    check_attention(q, k, v, cu(lens), cu(lens), 16, 4, floor=1e-5)


def routed(lens, bsz, topk, hq, hkv, d, dtype):
    """Inputs of one packed call and the torch gate's selection: ``(q, k, v, layout, sel)``."""
    q, k, v = make_qkv(sum(lens), sum(lens), hq, hkv, d, dtype)
    layout = BlockLayout.build(cu(lens), cu(lens), bsz)
    return q, k, v, layout, _gate_all(q, k, layout, topk)


@pytest.mark.parametrize("shared_sort", [True, False], ids=["shared-sort", "sort-per-pass"])
def test_pass_splits_match_one_pass(monkeypatch, shared_sort):
    monkeypatch.setattr(ta, "SCHEDULE", "partials")
    # all kv heads in one pass vs groups of kv heads vs one kv head over row chunks; the
    # passes either share one sort of all entries (bucketed by kv head, row chunk and block)
    # or sort their own
    monkeypatch.setattr(ta, "SHARED_SORT", shared_sort)
    lens, bsz, topk, hq, hkv, d = [40, 300], 16, 4, 6, 3, 32
    q, k, v, layout, sel = routed(lens, bsz, topk, hq, hkv, d, torch.float32)
    one = ta._moba_forward(q, k, v, layout, sel, topk, 0.2)
    per_head = 340 * (hq // hkv) * (topk - 1) * d
    ts, te = ta._diag_tiles(layout, 32, split_blocks=False)
    for budget, n_pass in ((per_head, 3), (2 * per_head, 2), (per_head // 3, None)):
        passes = ta._passes(ts, te, hq, hkv, topk - 1, d, budget)
        if n_pass is not None:
            assert len(passes) == n_pass and sum(p[1] for p in passes) == hkv
        else:
            assert len(passes) > hkv and all(p[1] == 1 for p in passes)
        monkeypatch.setattr(ta, "PART_CHUNK_ELEMS", budget)
        got = ta._moba_forward(q, k, v, layout, sel, topk, 0.2)
        assert torch.equal(one[0], got[0]) and torch.equal(one[1], got[1])
    assert len(ta._passes(ts, te, hq, hkv, topk - 1, d, hkv * per_head)) == 1


def test_partial_dtype_and_key_width_do_not_change_routing(monkeypatch):
    monkeypatch.setattr(ta, "SCHEDULE", "partials")
    # fp16 inputs: fp16 partials (default) vs fp32 partials, int16 vs int32 sort keys
    topk = 4
    q, k, v, layout, sel = routed([40, 300], 16, topk, 4, 2, 32, torch.float16)
    assert ta._part_dtype(q) == torch.float16
    base = ta._moba_forward(q, k, v, layout, sel, topk, 0.2)
    monkeypatch.setattr(ta, "INT16_KEYS_MAX", 0)  # int32 keys: same sort, same tiles
    wide = ta._moba_forward(q, k, v, layout, sel, topk, 0.2)
    assert torch.equal(base[0], wide[0]) and torch.equal(base[1], wide[1])
    monkeypatch.setattr(ta, "PART_DTYPE", torch.float32)
    f32 = ta._moba_forward(q, k, v, layout, sel, topk, 0.2)
    assert torch.equal(base[1], f32[1])  # the LSE never goes through the partial dtype
    assert err(base[0], f32[0]) <= 2e-3


def test_partial_budget_rule():
    q = torch.empty(1000, 8, 128, dtype=torch.bfloat16)
    assert ta._part_budget_elems(q, torch.bfloat16) == ta.PART_MIN_BYTES // 2  # floor
    big = torch.empty(1 << 23, 8, 128, dtype=torch.bfloat16, device="meta")  # 16 GB output
    assert ta._part_budget_elems(big, torch.bfloat16) == ta.PART_MAX_BYTES // 2  # cap
    mid = torch.empty(1 << 20, 8, 128, dtype=torch.bfloat16, device="meta")  # 2 GB
    assert ta._part_budget_elems(mid, torch.float32) == (2 << 30) // 4 // 4


def test_cu_seqlens_memo_follows_in_place_changes():
    cq = cu([100, 60])
    lay = ta._layout_for(cq, cq, 16)
    assert ta._layout_for(cq, cq, 16) is lay  # memo hit: no new host copy
    q, k, v = make_qkv(160, 160, 2, 1, 32, torch.float32)
    run = lambda: ta.moba_attn_triton(q, k, v, cq, cq, 100, 100, block_size=16, topk=3,
                                      softmax_scale=0.2)[0]
    run()
    cq[1] = 70  # in place: the version counter moves, the memo must not be used
    lay2 = ta._layout_for(cq, cq, 16)
    assert lay2 is not lay and int(lay2.row_pos[70]) == 0
    ref, _ = moba_attn_naive(q, k, v, cq, cq, block_size=16, topk=3, softmax_scale=0.2)
    assert err(run(), ref) < 1e-5


def test_end_to_end_matches_naive_through_interface():
    lens = [1, 90, 250]
    cq = cu(lens)
    q, k, v = make_qkv(341, 341, 4, 2, 32, torch.float32)
    out, lse = interface.moba_attn_varlen_func(q, k, v, cq, cq, 250, 250, block_size=32, topk=3,
                                               return_lse=True, backend="triton")
    ref_o, ref_l = moba_attn_naive(q.double(), k.double(), v.double(), cq, cq, block_size=32,
                                   topk=3, compute_dtype=torch.float64)
    assert err(out, ref_o) < 1e-5 and err(lse, ref_l) < 1e-5


def test_identity_oracles():
    t, bsz, hq, hkv, d = 256, 32, 4, 2, 32
    cq = cu([t])
    q, k, v = make_qkv(t, t, hq, hkv, d, torch.float32)
    qh, kh, vh = (x.double().transpose(0, 1) for x in (q, k.repeat_interleave(2, 1),
                                                        v.repeat_interleave(2, 1)))
    dense = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(0, 1)
    run = lambda topk: ta.moba_attn_triton(q, k, v, cq, cq, t, t, block_size=bsz, topk=topk,
                                           softmax_scale=d ** -0.5)[0]
    assert err(run(t // bsz), dense) < 1e-5  # topk >= #blocks == dense causal
    pos = torch.arange(t)
    local = (pos[:, None] // bsz == pos[None, :] // bsz) & (pos[None, :] <= pos[:, None])
    blocal = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=local).transpose(0, 1)
    assert err(run(1), blocal) < 1e-5  # topk == 1 == block-local
    assert err(run(3), dense) > 1e-2  # small topk really is sparse


def test_backward_through_function():
    lens = [100, 60]
    cq = cu(lens)
    q, k, v = (x.requires_grad_() for x in make_qkv(160, 160, 2, 1, 32, torch.float32))
    out, _ = ta.moba_attn_triton(q, k, v, cq, cq, 100, 100, block_size=16, topk=3,
                                 softmax_scale=0.2)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    ref, _ = moba_attn_naive(q, k, v, cq, cq, block_size=16, topk=3, softmax_scale=0.2)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        assert err(a, b) < 1e-4


def test_dense_selection_equals_gate_when_dense():
    lens, bsz, topk = [100, 1, 64], 16, 8  # every sequence has <= 7 earlier blocks
    cq = cu(lens)
    q, k, _ = make_qkv(165, 165, 2, 1, 32, torch.float32)
    layout = BlockLayout.build(cq, cq, bsz)
    assert torch.equal(sets(ta.dense_selection(layout, 2, topk)), sets(_gate_all(q, k, layout, topk)))


@pytest.mark.parametrize("bsz,d", [(24, 32), (16, 48)], ids=["B24", "D48"])
def test_unsupported_falls_back_with_warning(bsz, d):
    ta._warned.clear()
    cq = cu([100])
    q, k, v = make_qkv(100, 100, 2, 2, d, torch.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, _ = ta.moba_attn_triton(q, k, v, cq, cq, 100, 100, block_size=bsz, topk=2,
                                       softmax_scale=d ** -0.5)
    assert any("torch path" in str(w.message) for w in rec) and ta.LAST_PATH == "torch"
    ref, _ = moba_attn_naive(q, k, v, cq, cq, block_size=bsz, topk=2)
    assert err(out, ref) < 1e-5


# ============================================================================ GPU
def _sample_rows(total, n=48, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(1)
    r = torch.cat([torch.arange(min(8, total)), torch.arange(max(total - 8, 0), total),
                   torch.randint(0, total, (n,), generator=g)])
    return r.unique().to(device)


@gpu
@pytest.mark.parametrize("prec", ["tf32", "ieee"])
@pytest.mark.parametrize("topk", [9, 65])
def test_gpu_gate_exact_on_integer_scores(prec, topk):
    t, bsz = 8192, 64
    cq = cu([t])
    q = torch.randint(-3, 4, (t, 8, 128), device="cuda").to(torch.bfloat16)
    blk = torch.randint(-2, 3, (t // bsz, 2, 128), device="cuda").to(torch.bfloat16)
    k = blk.repeat_interleave(bsz, 0)
    layout = BlockLayout.build(cq, cq, bsz)
    assert torch.equal(sets(tg.gate_triton(q, k, layout, topk, precision=prec)),
                       sets(_gate_all(q, k, layout, topk)))


@gpu
@pytest.mark.parametrize("prec,min_agree", [("ieee", 0.999), ("tf32", 0.95)])
def test_gpu_gate_random(prec, min_agree):
    lens = [1, 5000, 37, 20000]
    cq = cu(lens)
    q, k, _ = make_qkv(sum(lens), sum(lens), 8, 2, 128, torch.bfloat16)
    layout = BlockLayout.build(cq, cq, 128)
    got, want = tg.gate_triton(q, k, layout, 8, precision=prec), _gate_all(q, k, layout, 8)
    same = (sets(got) == sets(want)).all(-1).float().mean().item()
    assert same >= min_agree, same


BLOCK_CLASSES = [16, 48, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bsz", BLOCK_CLASSES, ids=[f"B{b}" for b in BLOCK_CLASSES])
def test_gpu_block_size_classes(bsz, dtype):
    t = max(1000, int(4.5 * bsz))
    q, k, v = make_qkv(t, t, 4, 2, 128, dtype)
    check_attention(q, k, v, cu([t]), cu([t]), bsz, 3, rows=_sample_rows(t), floor=1e-4)


@gpu
@pytest.mark.parametrize("bsz,d", [(b, 128) for b in BLOCK_CLASSES[:7]] + [(128, 256), (64, 64)],
                         ids=[f"B{b}-D128" for b in BLOCK_CLASSES[:7]] + ["B128-D256", "B64-D64"])
def test_gpu_masked_schedule(monkeypatch, bsz, d):
    # the query-tile-major schedule at every block class it can take, two sequences
    monkeypatch.setattr(ta, "SCHEDULE", "masked")
    lens = [max(1000, int(4.5 * bsz)), 777]
    q, k, v = make_qkv(sum(lens), sum(lens), 4, 2, d, torch.bfloat16)
    check_attention(q, k, v, cu(lens), cu(lens), bsz, 4, rows=_sample_rows(sum(lens)),
                    floor=1e-4)


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@SCHEDULES
def test_gpu_varlen_gqa(monkeypatch, d, dtype, schedule):
    monkeypatch.setattr(ta, "SCHEDULE", schedule)
    lq = [1, 100, 0, 3000, 37, 9000, 2]
    lk = [1, 100, 0, 3000, 500, 9000, 4000]  # some Tq < Tk (chunked prefill, decode)
    q, k, v = make_qkv(sum(lq), sum(lk), 8, 2, d, dtype)
    check_attention(q, k, v, cu(lq), cu(lk), 128, 4, floor=1e-4)


@gpu
def test_gpu_long_multichunk_setting(monkeypatch):
    # 64K tokens, block 128, k 8: many partial chunks and thousands of tiles
    t = 65536
    q, k, v = make_qkv(t, t, 4, 4, 128, torch.bfloat16)
    monkeypatch.setattr(ta, "PART_CHUNK_ELEMS", 1 << 22)
    for schedule in ta.SCHEDULES:
        monkeypatch.setattr(ta, "SCHEDULE", schedule)
        check_attention(q, k, v, cu([t]), cu([t]), 128, 8, rows=_sample_rows(t, 256), floor=1e-4)


@gpu
def test_gpu_kv_head_group_passes(monkeypatch):
    # partials of one kv head fit the budget, all kv heads do not: passes over kv-head groups;
    # then a budget under one kv head's: one kv head at a time over row chunks
    t, hq, hkv, d, topk = 6000, 8, 4, 128, 5
    q, k, v = make_qkv(t, t, hq, hkv, d, torch.bfloat16)
    monkeypatch.setattr(ta, "SCHEDULE", "partials")
    per_head = t * (hq // hkv) * (topk - 1) * d
    for budget in (2 * per_head, per_head // 3):
        monkeypatch.setattr(ta, "PART_CHUNK_ELEMS", budget)
        for shared in (True, False):  # one sort of all entries, or one per pass
            monkeypatch.setattr(ta, "SHARED_SORT", shared)
            check_attention(q, k, v, cu([t]), cu([t]), 128, topk, rows=_sample_rows(t),
                            floor=1e-4)


@gpu
def test_gpu_offsets_beyond_int32():
    t, h, d = 1_100_000, 16, 128  # T*H*D = 2.25e9 > 2^31
    assert t * h * d > 2 ** 31
    q, k, v = make_qkv(t, t, h, h, d, torch.bfloat16)
    layout = BlockLayout.build(cu([t]), cu([t]), 512)
    out, lse, sel = ta.moba_forward_triton(q, k, v, layout, 3, d ** -0.5)
    rows = torch.cat([torch.arange(t - 40, t), torch.arange(0, 8)]).cuda()
    assert (sel[rows] >= 0).sum() > 0
    ref_o, ref_l = rows_reference(q, k, v, layout, sel, d ** -0.5, torch.float64, rows, chunk=8)
    pt_o, pt_l = rows_reference(q, k, v, layout, sel, d ** -0.5, torch.bfloat16, rows, chunk=8)
    assert err(out[rows], ref_o) <= 2 * err(pt_o, ref_o) + 1e-4
    assert err(lse[:, rows], ref_l) <= 2 * err(pt_l, ref_l) + 1e-4
    assert not out[-1000:].isnan().any()


@gpu
@pytest.mark.parametrize("hkv", [8, 2])
def test_gpu_dense_dispatch_and_identity(hkv):
    b, t, hq, d, bsz = 2, 2048, 8, 128, 512
    cq = cu([t] * b)
    q, k, v = make_qkv(b * t, b * t, hq, hkv, d, torch.bfloat16)
    out, lse = ta.moba_attn_triton(q, k, v, cq, cq, t, t, block_size=bsz, topk=4,
                                   softmax_scale=d ** -0.5)  # Tk <= topk*B: cuDNN dispatch
    assert ta.LAST_PATH == "cudnn-dense"
    layout = BlockLayout.build(cq, cq, bsz)
    kern_o, kern_l, _ = ta.moba_forward_triton(q, k, v, layout, 4, d ** -0.5)  # kernels
    dsel = ta.dense_selection(layout, hq, 4)
    ref_o, ref_l = rows_reference(q, k, v, layout, dsel, d ** -0.5, torch.float64)
    pt_o, pt_l = rows_reference(q, k, v, layout, dsel, d ** -0.5, torch.bfloat16)
    for o, l in ((out, lse), (kern_o, kern_l)):
        assert err(o, ref_o) <= 2 * err(pt_o, ref_o) + 1e-4
        assert err(l, ref_l) <= 2 * err(pt_l, ref_l) + 1e-4
    # the backward of the dense path (its LSE comes from cuDNN) equals the kernels' one
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    o1, _ = ta.moba_attn_triton(qg, kg, vg, cq, cq, t, t, block_size=bsz, topk=4,
                                softmax_scale=d ** -0.5)
    g = torch.randn_like(o1)
    grads = torch.autograd.grad(o1, (qg, kg, vg), g)
    ref_g = ta._backward_impl()(q, k, v, kern_o, kern_l, g, layout, dsel, 4, d ** -0.5, False)
    for a, b in zip(grads, ref_g):
        assert torch.isfinite(a).all()
        assert (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()


@gpu
def test_gpu_topk1_block_local_and_backward():
    t = 4096
    cq = cu([t])
    q, k, v = (x.requires_grad_() for x in make_qkv(t, t, 4, 2, 128, torch.bfloat16))
    out, _ = ta.moba_attn_triton(q, k, v, cq, cq, t, t, block_size=256, topk=1,
                                 softmax_scale=128 ** -0.5)
    pos = torch.arange(t, device="cuda")
    local = (pos[:, None] // 256 == pos[None, :] // 256) & (pos[None, :] <= pos[:, None])
    qh, kh, vh = (x.detach().float().transpose(0, 1) for x in (q, k.repeat_interleave(2, 1),
                                                               v.repeat_interleave(2, 1)))
    ref = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=local).transpose(0, 1)
    pt = F.scaled_dot_product_attention(qh.bfloat16(), kh.bfloat16(), vh.bfloat16(),
                                        attn_mask=local).transpose(0, 1)
    assert err(out, ref) <= 2 * err(pt, ref) + 1e-4
    out.float().square().sum().backward()  # the backward path runs and gives finite grads
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
