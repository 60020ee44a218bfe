"""The gate alone, every backend: selection vs the reference rule, the tie rule, the NaN
rule, the int64 keys, and the precision setting. Triton runs under the CPU interpreter here
and in bf16 on the GPU (``gpu`` tests)."""

import pytest
import torch

from moba_attn import MobaConfig, moba_attn_with_kvcache, moba_select, prepare_layout
from moba_attn.ops.naive import moba_mask_naive
from moba_attn.ops.torch.gate import NOT_CANDIDATE, sortable_key
from moba_attn.ops.triton import decode as triton_decode

from ..utils import cu_seqlens, packed_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


def _naive_blocks(q, k, bsz, topk):
    """Per (head, query) set of selected earlier blocks according to the reference mask."""
    mask = moba_mask_naive(q, k, bsz, topk)
    blk = torch.arange(k.shape[0], device=q.device) // bsz
    own = torch.arange(k.shape[0] - q.shape[0], k.shape[0], device=q.device) // bsz
    return [[set(blk[mask[h, t]].tolist()) - {int(own[t])} for t in range(q.shape[0])]
            for h in range(q.shape[1])]


def _sets(sel):
    return [[{x for x in row if x >= 0} for row in r] for r in sel.tolist()]


GATE_CASES = [  # (lens_q, lens_k, Hq, Hkv, D, block, topk)
    ([400], [400], 4, 2, 32, 16, 4),
    ([90, 1, 0, 300], [90, 1, 0, 300], 2, 1, 32, 32, 3),
    ([33], [600], 8, 8, 16, 16, 9),  # Tq < Tk
    ([320], [320], 2, 1, 16, 16, 12),  # 20 blocks, top-11 (the top-k path)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GATE_CASES, ids=lambda c: f"Tq{sum(c[0])}-Tk{sum(c[1])}-k{c[6]}")
def test_selection_matches_reference_up_to_fp32_near_ties(backend, case):
    lq, lk, hq, hkv, d, bsz, topk = case
    q, k, _, cu_q, cu_k = packed_inputs(lq, lk, hq, hkv, d)
    sel = moba_select(q, k, cu_q, cu_k, block_size=bsz, topk=topk, backend=backend,
                      config=MobaConfig(gate_precision="ieee"))
    assert sel.shape == (sum(lq), hq, topk - 1) and sel.dtype == torch.int64
    got = _sets(sel)
    mismatches = 0
    for s in range(len(lq)):
        a, b = int(cu_q[s]), int(cu_q[s + 1])
        if a == b:
            continue
        ref = _naive_blocks(q[a:b], k[int(cu_k[s]):int(cu_k[s + 1])], bsz, topk)
        for t in range(b - a):
            mismatches += sum(got[a + t][h] != ref[h][t] for h in range(hq))
    assert mismatches <= 2, f"{mismatches} rows disagree (only fp32 near ties may)"
    # selected blocks are strictly earlier, in the row's sequence, best score first
    lay = prepare_layout(cu_q, cu_k, block_size=bsz)
    own_local = (lay.row_own - lay.row_first)[:, None, None].expand_as(sel)
    valid = sel >= 0
    assert (sel[valid] < own_local[valid]).all()
    assert valid[(lay.row_own - lay.row_first) >= topk - 1].all()


def _tied_case(n_blocks, tied, bsz=16, d=16, heads=1):
    base = torch.randn(bsz, heads, d)
    blocks = [torch.randn(bsz, heads, d) * 0.01 for _ in range(n_blocks)]
    for i in tied:
        blocks[i] = base.clone()
    k = torch.cat(blocks)
    q = base.mean(0, keepdim=True).expand(k.shape[0], heads, d).contiguous()
    return q, k, cu_seqlens([k.shape[0]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [3, 6, 8], ids=lambda k: f"k{k}")
def test_tie_at_the_selection_boundary_goes_to_lower_blocks(backend, topk):
    """Six bit-identical best blocks, fewer slots than ties: the lowest indices win, on the
    repeated-max path (small k) and the top-k path (larger k) alike."""
    tied = [1, 3, 4, 6, 8, 9]
    q, k, cu = _tied_case(12, tied)
    sel = moba_select(q, k, cu, cu, block_size=16, topk=topk, backend=backend,
                      config=MobaConfig(gate_precision="ieee"))
    picks = set(sel[10 * 16, 0].tolist()) - {-1}
    assert picks >= set(tied[: min(topk - 1, 6)]) and len(picks) == topk - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_scores_are_ordered_by_block(backend):
    # every block has the same keys: every score ties, the lowest earlier blocks win in order
    lens, bsz, topk = [150, 70], 16, 4
    cq = cu_seqlens(lens)
    q = torch.randint(-3, 4, (sum(lens), 2, 32)).float()  # integers: every sum is exact
    k = torch.randint(-3, 4, (1, 1, 32)).float().expand(sum(lens), 1, 32).contiguous()
    sel = moba_select(q, k, cq, cq, block_size=bsz, topk=topk, backend=backend)
    lay = prepare_layout(cq, cq, block_size=bsz)
    j = torch.arange(topk - 1)
    want = torch.where(j < (lay.row_own - lay.row_first)[:, None], j, -1)
    assert torch.equal(sel, want[:, None, :].expand_as(sel))


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_integer_scores_are_exact_in_every_precision(precision):
    lens, bsz, topk = [256], 16, 6
    cq = cu_seqlens(lens)
    q = torch.randint(-2, 3, (256, 2, 32)).float()
    k = torch.randint(-1, 2, (16, 1, 32)).float().repeat_interleave(bsz, 0)
    want = _sets(moba_select(q, k, cq, cq, block_size=bsz, topk=topk, backend="torch"))
    got = moba_select(q, k, cq, cq, block_size=bsz, topk=topk, backend="triton",
                      config=MobaConfig(gate_precision=precision))
    assert _sets(got) == want


def test_precision_is_a_setting():
    assert MobaConfig().gate_precision == "tf32"
    with pytest.raises(ValueError, match="gate_precision"):
        MobaConfig(gate_precision="fp16")
    cfg = MobaConfig(gate_precision="ieee", schedule="masked")
    assert MobaConfig.from_json(cfg.to_json()) == cfg


def test_sortable_key_orders_like_floats_with_lower_index_first_and_nan_last():
    x = torch.tensor([[0.5, -1.0, float("-inf"), 0.5, -0.0, 0.0, 3e38, -2.5, float("inf"),
                       float("nan")]])
    order = sortable_key(x).argsort(descending=True)[0].tolist()
    assert order == [8, 6, 0, 3, 4, 5, 1, 7, 2, 9]  # ties: lower first; NaN below -inf
    r = torch.randn(4, 1000)
    assert torch.equal(sortable_key(r).argsort(-1, descending=True),
                       torch.sort(r, dim=-1, descending=True, stable=True).indices)
    cand = torch.tensor([[True] * 9 + [False]])
    assert sortable_key(x, cand)[0, 9] == NOT_CANDIDATE


def _nan_case():
    """One sequence of 10 blocks of 16 keys; block 3 holds a NaN key (NaN centroid)."""
    q, k, _, cu, _ = packed_inputs([160], [160], 2, 1, 16)
    k[3 * 16 + 5, 0, 7] = float("nan")
    return q, k, cu


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_centroid_is_picked_last_in_every_backend(backend):
    q, k, cu = _nan_case()
    want = _sets(moba_select(q, k, cu, cu, block_size=16, topk=3, backend="torch"))
    ref = _naive_blocks(q, k, 16, 3)
    got = _sets(moba_select(q, k, cu, cu, block_size=16, topk=3, backend=backend,
                            config=MobaConfig(gate_precision="ieee")))
    assert got == want
    for t in range(160):
        for h in range(2):
            assert got[t][h] == ref[h][t]
            if t // 16 > 3:  # enough finite candidates: the NaN block never wins
                assert 3 not in got[t][h]
            elif t // 16 <= 2:  # rows with <= 2 candidates take them all
                assert got[t][h] == set(range(t // 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_centroid_in_decode_follows_the_same_rule(backend):
    q, k, _ = _nan_case()
    kc = k[None]  # [1, 160, 1, 16]
    seqlens = torch.tensor([160])
    sel_naive = _naive_blocks(q[-1:], k, 16, 3)[0][0]
    assert 3 not in sel_naive
    cent = kc.reshape(1, 10, 16, 1, 16).float().mean(2)
    if backend == "triton":
        sel = triton_decode.select(q[None, -1:], cent, seqlens, None, block_size=16, topk=3,
                                   config=MobaConfig())
        assert set(sel[0, 0].tolist()) - {-1} == sel_naive
    out = moba_attn_with_kvcache(q[None, -1:], kc, k[None].clone(), seqlens, block_size=16,
                                 topk=3, centroids=cent, backend=backend)
    assert torch.isfinite(out).all()  # the NaN block is not attended


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "ieee"])
@pytest.mark.parametrize("topk", [9, 65])
def test_gpu_gate_exact_on_integer_scores(precision, topk):
    t, bsz = 8192, 64
    cq = cu_seqlens([t], "cuda")
    q = torch.randint(-3, 4, (t, 8, 128), device="cuda").to(torch.bfloat16)
    k = torch.randint(-2, 3, (t, 2, 128), device="cuda").to(torch.bfloat16)
    want = moba_select(q.cpu(), k.cpu(), cq.cpu(), cq.cpu(), block_size=bsz, topk=topk,
                       backend="torch")
    got = moba_select(q, k, cq, cq, block_size=bsz, topk=topk, backend="triton",
                      config=MobaConfig(gate_precision=precision))
    assert torch.equal(got.sort(-1).values.cpu(), want.sort(-1).values)


@pytest.mark.gpu
@pytest.mark.parametrize("precision,min_agree", [("ieee", 0.999), ("tf32", 0.95)])
def test_gpu_gate_random_agreement(precision, min_agree):
    """Random bf16 inputs: IEEE agrees with the CPU fp32 gate except fp32 near ties, TF32
    on at least ``min_agree`` of the (row, head) selections (the README states the measured
    rate)."""
    lens = [1, 5000, 37, 20000]
    q, k, _, cq, _ = packed_inputs(lens, lens, 8, 2, 128, torch.bfloat16, "cuda")
    want = moba_select(q.cpu().float(), k.cpu().float(), cq.cpu(), cq.cpu(), block_size=128,
                       topk=8, backend="torch")
    got = moba_select(q, k, cq, cq, block_size=128, topk=8, backend="triton",
                      config=MobaConfig(gate_precision=precision)).cpu()
    agree = (got.sort(-1).values == want.sort(-1).values).all(-1).float().mean().item()
    print(f"gate {precision}: {agree:.4%} of (row, head) selections equal the fp32 CPU gate")
    assert agree >= min_agree


@pytest.mark.gpu
def test_gpu_nan_centroid_rule_matches_the_reference():
    q, k, cu = _nan_case()
    ref = _naive_blocks(q, k, 16, 3)
    got = _sets(moba_select(q.cuda(), k.cuda(), cu.cuda(), cu.cuda(), block_size=16, topk=3,
                            backend="triton", config=MobaConfig(gate_precision="ieee")))
    assert all(got[t][h] == ref[h][t] for t in range(160) for h in range(2))
    kc = k[None].cuda()
    cent = kc.reshape(1, 10, 16, 1, 16).float().mean(2)
    out = moba_attn_with_kvcache(q[None, -1:].cuda(), kc, kc.clone(), torch.tensor([160]).cuda(),
                                 block_size=16, topk=3, centroids=cent, backend="triton")
    assert torch.isfinite(out).all()
