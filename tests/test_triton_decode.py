"""Triton decode step (``ops.triton_decode``) against the PyTorch step and the naive reference.

On CPU the kernels run under the Triton interpreter (fp32/fp16, small caches with left and
two-sided padding, an empty row, lengths that are not multiples of the block); tests marked
``gpu`` use bf16 caches of 64K tokens and more. The gate is tested apart from attention
(attention gets the torch gate's selection); end-to-end steps are compared with
``_decode_rows``. Tolerance (flash-attn's rule): kernel error <= 2x the error of the same
attention computed by PyTorch in the kernel's dtype, plus a small floor.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import moba_attn.integrations.transformers as hf
from moba_attn.ops import triton_decode as td
from moba_attn.ops.gate import sortable_key
from moba_attn.ops.naive import moba_attn_naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
GARBAGE = 100.0  # padding slots and unused centroid columns: any read of them shows


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs and partial buffers start as NaN (indices as -7): unwritten elements show up."""
    monkeypatch.setattr(td, "POISON", True)


def make_step(n_real, firsts, tk, hq, hkv, d, bs, dtype, extra_cols=2, device=DEVICE, gen=None):
    """A decode step on a padded cache: ``(q, key, value, first, n_real, centroids)``.

    Row ``b`` holds ``n_real[b]`` real tokens from slot ``firsts[b]``; the other slots and the
    centroid columns of non-full blocks (plus ``extra_cols`` spare columns) hold garbage.
    """
    bsz = len(n_real)
    q = torch.randn(bsz, hq, d, device=device, generator=gen).to(dtype)
    key = torch.full((bsz, hkv, tk, d), GARBAGE, device=device).to(dtype)
    value = torch.full((bsz, hkv, tk, d), GARBAGE, device=device).to(dtype)
    n_cent = max(n // bs for n in n_real) + extra_cols
    cent = torch.full((bsz, n_cent, hkv, d), GARBAGE, device=device)
    for b, (n, f) in enumerate(zip(n_real, firsts)):
        key[b, :, f : f + n] = torch.randn(hkv, n, d, device=device, generator=gen).to(dtype)
        value[b, :, f : f + n] = torch.randn(hkv, n, d, device=device, generator=gen).to(dtype)
        full = n // bs
        blocks = key[b, :, f : f + full * bs].float().view(hkv, full, bs, d).mean(2)
        cent[b, :full] = blocks.transpose(0, 1)
    first = torch.tensor(firsts, dtype=torch.int64, device=device)
    n = torch.tensor(n_real, dtype=torch.int64, device=device)
    return q, key, value, first, n, cent


def torch_selection(q, n_real, cent, bs, topk):
    """The PyTorch step's gate: ``[B, Hq, k-1]`` block ids by decreasing score, -1 unused."""
    bsz, hq, d = q.shape
    n_cent, hkv = cent.shape[1], cent.shape[2]
    m = min(topk - 1, n_cent)
    own = (n_real - 1).clamp(min=0) // bs
    scores = torch.einsum("bkgd,bnkd->bkgn", q.float().view(bsz, hkv, hq // hkv, d), cent)
    cand = torch.arange(n_cent, device=q.device)[None, :] < own[:, None]
    scores = scores.masked_fill(~cand[:, None, None, :], float("-inf")).reshape(bsz, hq, n_cent)
    idx = sortable_key(scores).topk(m, dim=-1).indices
    return torch.where(idx < own[:, None, None], idx, -1).to(torch.int32)


def masked_reference(q, key, value, first, n_real, sel, bs, scale, dtype):
    """The step given the selection, computed in ``dtype`` through a dense ``[B, Hq, Tk]``
    mask of the attended slots (own block up to the query, whole selected blocks)."""
    bsz, hq, d = q.shape
    hkv, tk = key.shape[1], key.shape[2]
    g = hq // hkv
    t = n_real - 1
    own = t.clamp(min=0) // bs
    pos = torch.arange(tk, device=q.device)[None, :] - first[:, None]  # [B, Tk] real position
    real = (pos >= 0) & (pos < n_real[:, None])
    blk = pos.clamp(min=0) // bs
    chosen = (sel.long()[..., None] == blk[:, None, None, :]).any(2)  # [B, Hq, Tk]
    own_ok = (blk == own[:, None]) & (pos <= t[:, None])
    mask = real[:, None, :] & (own_ok[:, None, :] | chosen)
    s = torch.einsum("bkgd,bktd->bkgt", q.to(dtype).view(bsz, hkv, g, d), key.to(dtype))
    s = (s.reshape(bsz, hq, tk) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).view(bsz, hkv, g, tk)
    return torch.einsum("bkgt,bktd->bkgd", p, value.to(dtype)).reshape(bsz, hq, d)


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_rule(out, truth, lowp, floor, what="output"):
    e, base = err(out, truth), err(lowp, truth)
    assert e <= 2 * base + floor, f"{what}: error {e:.3e} > 2 x PyTorch's {base:.3e} + {floor}"


# ============================================================================ CPU (interpreter)
ROWS = ([37, 0, 70], [43, 5, 3])  # n_real (empty row, not multiples of B), first (padding)
TK = 80
CASES = [  # (Hq, Hkv, D, block, topk, dtype, gate splits, attention splits)
    (8, 2, 16, 16, 3, torch.float32, None, None),
    (8, 2, 32, 32, 2, torch.float16, 2, 2),
    (2, 2, 16, 16, 2, torch.float32, 4, None),  # MHA
    (4, 1, 16, 32, 1, torch.float32, None, 2),  # block-local
    (4, 2, 16, 16, 9, torch.float16, None, None),  # topk above the number of blocks
    (2, 2, 64, 16, 3, torch.float16, None, None),  # MHA
]


def _cid(c):
    hq, hkv, d, bs, k, dt, sg, ns = c
    return f"H{hq}-Hkv{hkv}-D{d}-B{bs}-k{k}-{str(dt).split('.')[-1]}-sg{sg}-ns{ns}"


@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_step_matches_torch(monkeypatch, case):
    """Gate == the torch gate (same order), attention given it within the rule, and the whole
    step == ``_decode_rows``."""
    hq, hkv, d, bs, topk, dtype, sg, ns = case
    monkeypatch.setattr(td, "GATE_SPLITS", sg)
    monkeypatch.setattr(td, "ATTN_SPLITS", ns)
    q, key, value, first, n_real, cent = make_step(*ROWS, TK, hq, hkv, d, bs, dtype)
    scale = d ** -0.5
    sel = td.decode_select_triton(q, cent, n_real, block_size=bs, topk=topk)
    want = torch_selection(q, n_real, cent, bs, topk)
    assert torch.equal(sel, want)
    truth = masked_reference(q, key, value, first, n_real, want, bs, scale, torch.float64)
    lowp = masked_reference(q, key, value, first, n_real, want, bs, scale, dtype)
    floor = 1e-5 if dtype == torch.float32 else 1e-4
    got = td.decode_attend_triton(q, key, value, first, n_real, want, block_size=bs, scale=scale)
    assert got.dtype == dtype and not got.isnan().any()
    assert_close_rule(got, truth, lowp, floor)
    step = td.moba_decode_triton(q, key, value, first, n_real, cent, block_size=bs, topk=topk,
                                 scale=scale)
    ref = hf.moba_decode_attention(q, key, value, first, n_real, cent, block_size=bs, topk=topk,
                                   scale=scale, backend="torch")
    assert_close_rule(step, ref, lowp, floor)
    assert torch.equal(step[1], torch.zeros_like(step[1]))  # the empty row
    if topk < 9:  # a sparse step really differs from dense attention over the row
        dense = masked_reference(q, key, value, first, n_real,
                                 torch.arange(TK // bs).expand(3, hq, -1), bs, scale, dtype)
        assert err(step[2], dense[2]) > 1e-2


@pytest.mark.parametrize("sg", [None, 2])
def test_ties_go_to_the_lower_block(monkeypatch, sg):
    """Every block has the same (integer) keys, so every gate score ties exactly: the lowest
    earlier blocks win, in every gate split; the step still equals the torch step."""
    monkeypatch.setattr(td, "GATE_SPLITS", sg)
    bs, topk, hq, hkv, d = 16, 4, 8, 2, 16
    n_real, firsts, tk = [110, 70, 40], [10, 0, 80], 120
    q, key, value, first, n, _ = make_step(n_real, firsts, tk, hq, hkv, d, bs, torch.float32)
    q = torch.randint(-3, 4, q.shape).float()
    one = torch.randint(-2, 3, (hkv, 1, d)).float()
    for b, (m, f) in enumerate(zip(n_real, firsts)):
        key[b, :, f : f + m] = one
    cent = one.view(1, 1, hkv, d).expand(3, 8, hkv, d).contiguous()
    sel = td.decode_select_triton(q, cent, n, block_size=bs, topk=topk)
    own = ((n - 1) // bs)[:, None, None]
    j = torch.arange(topk - 1)
    assert torch.equal(sel.long(), torch.where(j < own, j, -1).expand(3, hq, -1))
    assert torch.equal(sel, torch_selection(q, n, cent, bs, topk))
    step = td.moba_decode_triton(q, key, value, first, n, cent, block_size=bs, topk=topk,
                                 scale=0.25)
    ref = hf.moba_decode_attention(q, key, value, first, n, cent, block_size=bs, topk=topk,
                                   scale=0.25, backend="torch")
    assert err(step, ref) < 1e-5


def test_integer_scores_many_ties_with_split_gate(monkeypatch):
    """Small-integer blocks: exact scores, frequent ties across blocks and heads."""
    monkeypatch.setattr(td, "GATE_SPLITS", 2)
    bs, topk, hq, hkv, d, tk = 16, 5, 8, 2, 16, 160
    q = torch.randint(-2, 3, (2, hq, d)).float()
    blocks = torch.randint(-1, 2, (2, hkv, tk // bs, 1, d)).float()
    key = blocks.expand(-1, -1, -1, bs, -1).reshape(2, hkv, tk, d)
    cent = blocks[:, :, :, 0].transpose(1, 2).contiguous()
    n = torch.tensor([tk, tk - 20])
    sel = td.decode_select_triton(q, cent, n, block_size=bs, topk=topk)
    assert torch.equal(sel, torch_selection(q, n, cent, bs, topk))
    value = torch.randn_like(key)
    first = torch.tensor([0, 20])
    step = td.moba_decode_triton(q, key, value, first, n, cent, block_size=bs, topk=topk,
                                 scale=0.25)
    ref = hf.moba_decode_attention(q, key, value, first, n, cent, block_size=bs, topk=topk,
                                   scale=0.25, backend="torch")
    assert err(step, ref) < 1e-5


def test_equals_last_row_of_full_forward():
    """A decode step == the last query row of a full-sequence MoBA forward (naive reference)."""
    bs, topk, hq, hkv, d = 16, 3, 4, 2, 32
    lens = [90, 64, 17]
    tk = max(lens)
    q_all = torch.randn(sum(lens), hq, d)
    k_all = torch.randn(sum(lens), hkv, d)
    v_all = torch.randn(sum(lens), hkv, d)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    full, _ = moba_attn_naive(q_all, k_all, v_all, cu, cu, block_size=bs, topk=topk)
    key = torch.zeros(3, hkv, tk, d)
    value = torch.zeros(3, hkv, tk, d)
    cent = torch.zeros(3, tk // bs, hkv, d)
    for b, (s, n) in enumerate(zip(cu[:-1].tolist(), lens)):  # left padding, as HF pads
        key[b, :, tk - n :] = k_all[s : s + n].transpose(0, 1)
        value[b, :, tk - n :] = v_all[s : s + n].transpose(0, 1)
        cent[b, : n // bs] = k_all[s : s + n // bs * bs].view(n // bs, bs, hkv, d).mean(1)
    last = cu[1:].long() - 1
    first = torch.tensor([tk - n for n in lens])
    step = td.moba_decode_triton(q_all[last], key, value, first, torch.tensor(lens), cent,
                                 block_size=bs, topk=topk, scale=d ** -0.5)
    assert err(step, full[last]) < 1e-5


def test_backend_switch_and_errors(monkeypatch):
    q, key, value, first, n, cent = make_step(*ROWS, TK, 4, 2, 16, 16, torch.float32)
    common = {"block_size": 16, "topk": 3, "scale": 0.25}
    ref = hf._decode_rows(q, key, value, first, n, cent, 16, 3, 0.25)
    # "auto" on CPU tensors is the PyTorch step, even with the interpreter available
    assert torch.equal(hf.moba_decode_attention(q, key, value, first, n, cent, **common), ref)
    tri = td.moba_decode_triton(q, key, value, first, n, cent, **common)
    via = hf.moba_decode_attention(q, key, value, first, n, cent, backend="triton", **common)
    assert torch.equal(via, tri)
    monkeypatch.setattr(hf, "DECODE_BACKEND", "triton")
    assert torch.equal(hf.moba_decode_attention(q, key, value, first, n, cent, **common), tri)
    with pytest.raises(ValueError, match="decode backend"):
        hf.moba_decode_attention(q, key, value, first, n, cent, backend="cuda", **common)
    with pytest.raises(ValueError, match="multiple of 16"):
        hf.moba_decode_attention(q, key, value, first, n, cent, backend="triton",
                                 block_size=24, topk=3, scale=0.25)
    with pytest.raises(ValueError, match="centroids"):
        td.moba_decode_triton(q, key, value, first, n, cent.half(), **common)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        td.moba_decode_triton(q[:, :3], key, value, first, n, cent, **common)


# ============================================================================ GPU
def _check_long(q, key, value, first, n_real, cent, bs, topk, min_agree=0.99):
    """Kernel step vs ``_decode_rows`` on (row, head)s whose gate agrees with the torch gate;
    the others must be near-ties of the fp32 scores (summation order differs)."""
    scale = q.shape[-1] ** -0.5
    sel = td.decode_select_triton(q, cent, n_real, block_size=bs, topk=topk)
    want = torch_selection(q, n_real, cent, bs, topk)
    same = (torch.sort(sel, -1).values == torch.sort(want, -1).values).all(-1)  # [B, Hq]
    assert same.float().mean().item() >= min_agree
    if not same.all():  # the score gap at the (k-1)-th place is a rounding-size near-tie
        bsz, hq, d = q.shape
        hkv = key.shape[1]
        s = torch.einsum("bkgd,bnkd->bkgn", q.float().view(bsz, hkv, hq // hkv, d), cent)
        s = s.reshape(bsz, hq, -1)
        lost = torch.gather(s, 2, want.long().clamp(min=0)).min(-1).values
        won = torch.gather(s, 2, sel.long().clamp(min=0)).min(-1).values
        gap = (lost - won).abs()[~same]
        assert (gap <= 1e-5 * s.abs().amax()).all(), gap.max()
    step = td.moba_decode_triton(q, key, value, first, n_real, cent, block_size=bs, topk=topk,
                                 scale=scale)
    ref = hf.moba_decode_attention(q, key, value, first, n_real, cent, block_size=bs, topk=topk,
                                   scale=scale, backend="torch")
    lowp = masked_reference(q, key, value, first, n_real, want, bs, scale, q.dtype)
    assert_close_rule(step[same], ref[same], lowp[same], 1e-4)
    return step


@gpu
@pytest.mark.parametrize("bs,topk", [(512, 8), (4096, 12), (64, 4)], ids=lambda v: str(v))
def test_gpu_long_cache_bf16(bs, topk):
    tk = 65536
    n_real = [tk, tk - 3000, 4097, 0]
    firsts = [tk - n for n in n_real]
    step = make_step(n_real, firsts, tk, 32, 8, 128, bs, torch.bfloat16, extra_cols=7)
    _check_long(*step, bs, topk)


@gpu
@pytest.mark.parametrize("n_rows", [1, 16])
def test_gpu_split_paths(n_rows):
    """One row: gate splits and token chunks per block; 16 rows: neither."""
    tk, bs, topk = 32768, 512, 8
    n_real = [tk - 37 * i for i in range(n_rows)]
    step = make_step(n_real, [tk - n for n in n_real], tk, 32, 8, 128, bs, torch.bfloat16)
    _check_long(*step, bs, topk)


@gpu
@pytest.mark.parametrize("d,hq,hkv", [(64, 8, 8), (256, 16, 2), (128, 32, 1)],
                         ids=lambda v: str(v))
def test_gpu_head_dims_and_groups(d, hq, hkv):
    tk, bs = 20000, 256
    n_real = [tk, 9000, 300]
    step = make_step(n_real, [0, 5, tk - 300], tk, hq, hkv, d, bs, torch.float16)
    _check_long(*step, bs, 5)


@gpu
def test_gpu_offsets_beyond_int32():
    tk, hkv, d = 1_100_000, 8, 128  # one row of the cache holds 1.1e9 elements; two > 2^31
    assert 2 * hkv * tk * d > 2 ** 31
    step = make_step([tk, tk - 5], [0, 5], tk, 16, hkv, d, 4096, torch.bfloat16)
    out = _check_long(*step, 4096, 12)
    assert not out.isnan().any()


@gpu
def test_gpu_step_captures_in_a_cuda_graph():
    """No host synchronisation inside: the step records into a CUDA graph and replays."""
    tk, bs, topk = 16384, 512, 8
    q, key, value, first, n_real, cent = make_step([tk, 9000], [0, tk - 9000], tk, 32, 8, 128,
                                                   bs, torch.bfloat16)
    args = {"block_size": bs, "topk": topk, "scale": 128 ** -0.5}
    want = td.moba_decode_triton(q, key, value, first, n_real, cent, **args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = td.moba_decode_triton(q, key, value, first, n_real, cent, **args)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, td.moba_decode_triton(q, key, value, first, n_real, cent, **args))
    assert not torch.equal(out, want)
