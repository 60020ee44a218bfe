"""The gate alone: fast selection vs the reference rule, the tie rule, the int64 keys."""

import pytest
import torch

from moba_attn import moba_select
from moba_attn.ops.gate import BlockLayout, dense_causal_keys, n_attended_keys, sortable_key
from moba_attn.ops.naive import moba_mask_naive

from .helpers import cu_seqlens, packed_inputs


def _naive_blocks(q, k, B, topk):
    """Per (head, query) set of selected earlier blocks according to the reference mask."""
    mask = moba_mask_naive(q, k, B, topk)
    blk = torch.arange(k.shape[0]) // B
    own = torch.arange(k.shape[0] - q.shape[0], k.shape[0]) // B
    return [[set(blk[mask[h, t]].tolist()) - {int(own[t])} for t in range(q.shape[0])]
            for h in range(q.shape[1])]


@pytest.mark.parametrize("lens_q,lens_k,hq,hkv,B,topk", [
    ([400], [400], 4, 2, 16, 4),
    ([90, 1, 300], [90, 1, 300], 2, 1, 32, 3),
    ([33], [600], 8, 8, 16, 9),
    ([700], [700], 2, 2, 8, 65),  # topk up to 64+ over 88 blocks
])
def test_selection_matches_reference_up_to_fp32_near_ties(lens_q, lens_k, hq, hkv, B, topk):
    q, k, _, cu_q, cu_k = packed_inputs(lens_q, lens_k, hq, hkv, 32)
    sel = moba_select(q, k, cu_q, cu_k, block_size=B, topk=topk)
    assert sel.shape == (sum(lens_q), hq, topk - 1)
    mismatches = 0
    for s in range(len(lens_q)):
        a, b = cu_q[s].item(), cu_q[s + 1].item()
        ka, kb = cu_k[s].item(), cu_k[s + 1].item()
        if a == b:
            continue
        ref = _naive_blocks(q[a:b], k[ka:kb], B, topk)
        for h in range(hq):
            for t in range(b - a):
                got = {x for x in sel[a + t, h].tolist() if x >= 0}
                if got != ref[h][t]:
                    mismatches += 1
    assert mismatches <= 2, f"{mismatches} rows disagree (only fp32 near-ties may)"


def test_selection_is_exact_on_exact_ties():
    """Duplicated blocks have bit-identical centroids: the lower index must win, everywhere."""
    B, D, n_blocks = 8, 16, 12
    base = torch.randn(B, 2, D)
    blocks = [torch.randn(B, 2, D) * 0.01 for _ in range(n_blocks)]
    for i in (2, 5, 6, 9):
        blocks[i] = base.clone()
    k = torch.cat(blocks)
    q = base.mean(0, keepdim=True).expand(k.shape[0], 2, D).contiguous()
    cu = cu_seqlens([k.shape[0]])
    sel = moba_select(q, k, cu, cu, block_size=B, topk=3)
    t = 10 * B  # candidates 0..9: ties among 2, 5, 6, 9 -> {2, 5}
    assert set(sel[t, 0].tolist()) == {2, 5} and set(sel[t, 1].tolist()) == {2, 5}
    assert set(sel[7 * B, 0].tolist()) == {2, 5}
    assert set(sel[6 * B, 0].tolist()) == {2, 5}


def test_sortable_key_orders_like_floats_with_lower_index_first():
    x = torch.tensor([[0.5, -1.0, float("-inf"), 0.5, -0.0, 0.0, 3e38, -2.5, float("inf")]])
    key = sortable_key(x)
    order = key.argsort(descending=True)[0].tolist()
    assert order == [8, 6, 0, 3, 4, 5, 1, 7, 2]  # ties (0.5, 0.5) and (-0.0, 0.0): lower first
    r = torch.randn(4, 1000)
    assert torch.equal(sortable_key(r).argsort(-1, descending=True),
                       torch.sort(r, dim=-1, descending=True, stable=True).indices)


def test_selected_blocks_are_strictly_earlier_and_in_sequence():
    lens = [50, 130, 1, 77]
    q, k, _, cu, _ = packed_inputs(lens, lens, 2, 2, 16)
    B = 16
    sel = moba_select(q, k, cu, cu, block_size=B, topk=4)
    layout = BlockLayout.build(cu, cu, B)
    own_local = layout.row_own - layout.row_first
    valid = sel >= 0
    assert (sel[valid] < own_local[:, None, None].expand_as(sel)[valid]).all()
    # rows with >= k-1 candidates fill every slot
    full = own_local >= 3
    assert valid[full].all()


def test_work_counts():
    cu = cu_seqlens([100, 37])
    B, k = 16, 3
    n = n_attended_keys(cu, cu, B, k)
    brute = 0
    for T in (100, 37):
        for t in range(T):
            brute += t % B + 1 + min(k - 1, t // B) * B
    assert n == brute
    assert dense_causal_keys(cu, cu) == 100 * 101 // 2 + 37 * 38 // 2


@pytest.mark.parametrize("topk", [3, 6, 8], ids=lambda k: f"k{k}")
def test_tie_at_the_selection_boundary_goes_to_lower_blocks(topk):
    """Six bit-identical best blocks, fewer slots than ties: the lowest indices win, on both
    the repeated-max path (small k) and the top-k path (larger k)."""
    B, D = 8, 16
    base = torch.randn(B, 1, D)
    blocks = [torch.randn(B, 1, D) * 0.01 for _ in range(12)]
    tied = [1, 3, 4, 6, 8, 9]
    for i in tied:
        blocks[i] = base.clone()
    k = torch.cat(blocks)
    q = base.mean(0, keepdim=True).expand(k.shape[0], 1, D).contiguous()
    cu = cu_seqlens([k.shape[0]])
    sel = moba_select(q, k, cu, cu, block_size=B, topk=topk)
    picks = set(sel[10 * B, 0].tolist()) - {-1}
    m = topk - 1
    assert picks >= set(tied[: min(m, 6)])
    assert len(picks) == m
