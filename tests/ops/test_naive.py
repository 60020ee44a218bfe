"""The naive reference against independent formulations (SDPA with explicit masks) and the
spec's identity oracles."""

import math

import pytest
import torch
import torch.nn.functional as F

from moba_attn.ops.naive import moba_attn_naive, moba_mask_naive

from ..utils import cu_seqlens, packed_inputs


def _sdpa_masked(q, k, v, mask):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D], mask [Hq, Tq, Tk] -> [Tq, Hq, D] in fp64."""
    g = q.shape[1] // k.shape[1]
    qh = q.double().transpose(0, 1)
    kh = k.double().repeat_interleave(g, 1).transpose(0, 1)
    vh = v.double().repeat_interleave(g, 1).transpose(0, 1)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(0, 1)


def _causal_mask(tq, tk):
    return torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]


@pytest.mark.parametrize("T,hq,hkv,B,k", [(100, 4, 2, 16, 3), (257, 2, 1, 32, 2), (64, 2, 2, 64, 1)])
def test_naive_matches_sdpa_with_its_mask(T, hq, hkv, B, k):
    q, kk, v, cu, _ = packed_inputs([T], [T], hq, hkv, 32, torch.float64)
    mask = moba_mask_naive(q, kk, B, k)
    out, lse = moba_attn_naive(q, kk, v, cu, cu, block_size=B, topk=k, compute_dtype=torch.float64)
    torch.testing.assert_close(out, _sdpa_masked(q, kk, v, mask))
    scores = torch.einsum("qhd,khd->hqk", q, kk.repeat_interleave(hq // hkv, 1)) / math.sqrt(32)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores.masked_fill(~mask, -math.inf), -1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,B", [(200, 16), (64, 64), (1, 8), (130, 32)])
def test_topk_at_least_blocks_is_dense_causal(T, B):
    q, k, _, _, _ = packed_inputs([T], [T], 2, 2, 16)
    nb = math.ceil(T / B)
    mask = moba_mask_naive(q, k, B, nb)
    assert torch.equal(mask, _causal_mask(T, T).expand_as(mask))
    assert torch.equal(moba_mask_naive(q, k, B, nb + 5), mask)


def test_topk_one_is_block_local():
    T, B = 150, 32
    q, k, _, _, _ = packed_inputs([T], [T], 2, 1, 16)
    mask = moba_mask_naive(q, k, B, 1)
    pos = torch.arange(T)
    local = (pos[None, :] // B == pos[:, None] // B) & (pos[None, :] <= pos[:, None])
    assert torch.equal(mask, local.expand_as(mask))


def test_small_topk_differs_from_dense_and_keeps_prefix_dense():
    T, B, k = 256, 16, 3
    q, kk, v, cu, _ = packed_inputs([T], [T], 2, 2, 16, torch.float64)
    mask = moba_mask_naive(q, kk, B, k)
    causal = _causal_mask(T, T)
    assert torch.equal(mask[:, : k * B], causal[: k * B].expand(2, -1, -1))  # t < k*B: dense
    assert not torch.equal(mask, causal.expand_as(mask))
    # every query sees exactly (k-1) whole blocks + its causal own-block part
    per_row = mask.sum(-1)[:, k * B :]
    expect = (k - 1) * B + (torch.arange(k * B, T) % B + 1)
    assert torch.equal(per_row, expect.expand_as(per_row))
    out, _ = moba_attn_naive(q, kk, v, cu, cu, block_size=B, topk=k, compute_dtype=torch.float64)
    dense = _sdpa_masked(q, kk, v, causal.expand_as(mask))
    assert (out - dense).abs().max() > 1e-3


def test_gate_picks_highest_centroid_scores():
    """Blocks are chosen by <q, mean(K_block)>: plant one block whose keys align with q."""
    T, B, D = 128, 16, 8
    q = torch.zeros(T, 1, D)
    q[:, 0, 0] = 1.0
    k = torch.randn(T, 1, D) * 0.01
    k[3 * B : 4 * B, 0, 0] = 5.0  # block 3: large centroid score
    mask = moba_mask_naive(q, k, B, 2)
    blk = torch.arange(T) // B
    for t in range(4 * B + 1, T):  # block 3 is a candidate: it must be the one picked
        picked = set(blk[mask[0, t]].tolist()) - {t // B}
        assert picked == {3}, (t, picked)


def test_queries_are_bottom_right_aligned():
    """Tq < Tk: the queries are the last Tq positions; same answer as the full sequence."""
    T, tq, B, k = 200, 37, 16, 3
    q, kk, v, _, _ = packed_inputs([T], [T], 4, 2, 16, torch.float64)
    cu = cu_seqlens([T])
    full, lse_full = moba_attn_naive(q, kk, v, cu, cu, block_size=B, topk=k, compute_dtype=torch.float64)
    part, lse_part = moba_attn_naive(q[-tq:], kk, v, cu_seqlens([tq]), cu, block_size=B, topk=k,
                                     compute_dtype=torch.float64)
    torch.testing.assert_close(part, full[-tq:])
    torch.testing.assert_close(lse_part, lse_full[:, -tq:])


def test_packed_sequences_are_independent():
    lens, B, k = [50, 1, 0, 33, 80], 16, 2
    q, kk, v, cu, _ = packed_inputs(lens, lens, 2, 1, 16, torch.float64)
    out, _ = moba_attn_naive(q, kk, v, cu, cu, block_size=B, topk=k, compute_dtype=torch.float64)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        c1 = cu_seqlens([b - a])
        alone, _ = moba_attn_naive(q[a:b], kk[a:b], v[a:b], c1, c1, block_size=B, topk=k,
                                   compute_dtype=torch.float64)
        torch.testing.assert_close(out[a:b], alone)


def test_tie_rule_lower_block_wins():
    """Identical blocks give identical centroids: the lower index must be chosen."""
    B, D = 8, 4
    base = torch.randn(B, 1, D)

    def noise():
        return torch.randn(B, 1, D) * 0.01

    k = torch.cat([noise(), base, noise(), base, base, noise()])
    q = base.mean(0).expand(k.shape[0], 1, D)  # aligned with the repeated block
    mask = moba_mask_naive(q, k, B, 2)
    blk = torch.arange(k.shape[0]) // B
    t = 5 * B  # candidates 0..4; blocks 1, 3, 4 tie at the top
    assert set(blk[mask[0, t]].tolist()) == {1, 5}


def test_nan_score_ranks_below_every_number():
    # block 1's keys hold a NaN: its centroid and every score against it are NaN. It is
    # picked only when no other candidate is left (the gate's NaN rule, every backend).
    t, bsz = 64, 8
    q, k, _, _, _ = packed_inputs([t], [t], 2, 1, 8, torch.float64)
    k[8 + 3, 0, 2] = float("nan")
    mask = moba_mask_naive(q, k, bsz, 3)  # [Hq, Tq, Tk]
    # rows in block 7 have 7 candidates and pick 2: never block 1
    assert not mask[:, 56:, 8:16].any()
    # rows in block 2 have 2 candidates (0 and 1) and pick both: NaN or not
    assert mask[:, 16:24, 8:16].all()


def test_kvcache_reference_is_the_packed_rule():
    from moba_attn.ops.naive import moba_attn_with_kvcache_naive

    b, tmax, hq, hkv, d, bsz, topk = 2, 90, 4, 2, 16, 16, 3
    kc, vc = torch.randn(b, tmax, hkv, d, dtype=torch.float64), torch.randn(b, tmax, hkv, d,
                                                                            dtype=torch.float64)
    lens, pad, tq = [90, 61], [0, 5], 4
    q = torch.randn(b, tq, hq, d, dtype=torch.float64)
    out, lse = moba_attn_with_kvcache_naive(q, kc, vc, torch.tensor(lens), block_size=bsz,
                                            topk=topk, cache_leftpad=torch.tensor(pad),
                                            compute_dtype=torch.float64)
    for i in range(b):
        n = lens[i] - pad[i]
        o, l = moba_attn_naive(q[i], kc[i, pad[i]:lens[i]], vc[i, pad[i]:lens[i]],
                               torch.tensor([0, tq]), torch.tensor([0, n]), block_size=bsz,
                               topk=topk, compute_dtype=torch.float64)
        torch.testing.assert_close(out[i], o)
        torch.testing.assert_close(lse[i], l)
