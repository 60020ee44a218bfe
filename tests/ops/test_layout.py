"""The prepared block layout: every index against a plain loop, host facts against brute
force, shapes-only construction, and no way to go stale."""

import numpy as np
import pytest
import torch

from moba_attn import moba_attn_varlen_func, prepare_layout
from moba_attn.ops.layout import batch_layout, with_block_size
from moba_attn.ops.triton import schedule

from ..utils import cu_seqlens, packed_inputs

CASES = [  # (lens_q, lens_k, block)
    ([300], [300], 16),
    ([1, 70, 5, 0, 200], [1, 70, 5, 0, 200], 16),  # len-1, < B, zero-length
    ([40, 7, 1], [300, 50, 1], 32),  # Tq < Tk
    ([0, 0], [0, 0], 8),  # nothing at all
    ([700], [700], 16),  # > 32 blocks
    ([5, 0, 3], [64, 10, 3], 64),  # a sequence shorter than a block
]


def _loop_layout(lq, lk, bsz):
    """Every index of the layout by a plain loop over sequences, rows and blocks."""
    row_pos, row_own, row_first, blk_start, blk_len = [], [], [], [], []
    first_blk, k0 = 0, 0
    for a, b in zip(lq, lk):
        nb = -(-b // bsz)
        for i in range(a):
            pos = b - a + i
            row_pos.append(pos)
            row_own.append(first_blk + pos // bsz)
            row_first.append(first_blk)
        for j in range(nb):
            blk_start.append(k0 + j * bsz)
            blk_len.append(min(bsz, b - j * bsz))
        first_blk += nb
        k0 += b
    return row_pos, row_own, row_first, blk_start, blk_len


@pytest.mark.parametrize("lq,lk,bsz", CASES, ids=lambda c: str(c))
def test_indices_match_a_plain_loop(lq, lk, bsz):
    lay = prepare_layout(cu_seqlens(lq), cu_seqlens(lk), block_size=bsz)
    want = _loop_layout(lq, lk, bsz)
    got = (lay.row_pos, lay.row_own, lay.row_first, lay.blk_start, lay.blk_len)
    for g, w in zip(got, want):
        assert g.tolist() == w
    host = lay.host_rows()
    for h, w in zip(host, want[:3]):
        assert h.tolist() == w
    assert lay.n_blocks == len(want[3]) and lay.total_q == sum(lq) and lay.total_k == sum(lk)
    assert lay.width == max(1, min(bsz, max(lk)))
    assert lay.all_full == all(n == lay.width for n in want[4])


@pytest.mark.parametrize("lq,lk,bsz", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("topk", [1, 3, 50])
def test_work_counts_match_brute_force(lq, lk, bsz, topk):
    lay = prepare_layout(cu_seqlens(lq), cu_seqlens(lk), block_size=bsz)
    pos, own, first, _, _ = _loop_layout(lq, lk, bsz)
    earlier = np.array(own, dtype=np.int64) - np.array(first, dtype=np.int64)
    assert lay.sum_earlier_blocks() == int(earlier.sum())
    assert lay.sum_earlier_blocks(topk - 1) == int(np.minimum(earlier, topk - 1).sum())
    attended = sum(p % bsz + 1 + min(topk - 1, e) * bsz for p, e in zip(pos, earlier))
    assert lay.attended_keys(topk) == attended
    assert lay.dense_keys() == sum(p + 1 for p in pos)
    assert lay.is_dense(topk) == (max(-(-n // bsz) for n in lk) <= topk)


def test_batch_layout_equals_prepared_and_needs_no_lengths_from_the_device():
    b, tq, tk, bsz = 3, 50, 130, 32
    lay = batch_layout(b, tq, tk, bsz, "cpu")
    ref = prepare_layout(cu_seqlens([tq] * b), cu_seqlens([tk] * b), block_size=bsz)
    for name in ("row_pos", "row_own", "row_first", "blk_start", "blk_len", "cu_seqlens_q",
                 "cu_seqlens_k"):
        assert torch.equal(getattr(lay, name).long(), getattr(ref, name).long()), name
    assert lay.equal_lengths and ref.equal_lengths
    again = with_block_size(lay, 64)
    assert torch.equal(again.row_own, prepare_layout(ref.cu_seqlens_q, ref.cu_seqlens_k,
                                                      block_size=64).row_own)


def test_prepare_layout_validates_values():
    with pytest.raises(ValueError, match="start at 0"):
        prepare_layout(torch.tensor([1, 5]), block_size=4)
    with pytest.raises(ValueError, match="non-decreasing"):
        prepare_layout(torch.tensor([0, 5, 3]), block_size=4)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        prepare_layout(torch.tensor([0, 5]), torch.tensor([0, 3]), block_size=4)
    with pytest.raises(TypeError, match="int32 or int64"):
        prepare_layout(torch.tensor([0.0, 5.0]), block_size=4)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        prepare_layout(torch.tensor([0, 5]), block_size=0)
    with pytest.raises(ValueError, match="end at the token count"):
        prepare_layout(torch.tensor([0, 5]), block_size=4, total_q=6)


def test_a_layout_never_goes_stale():
    # cu_seqlens rewritten in place without a version bump (through .data): calls without a
    # layout see the new lengths, and a layout keeps the lengths it was prepared from
    q, k, v, cu, _ = packed_inputs([60, 40], [60, 40], 2, 1, 16)
    kw = {"block_size": 16, "topk": 2, "backend": "torch"}
    first = moba_attn_varlen_func(q, k, v, cu, cu, 100, 100, **kw)
    lay = prepare_layout(cu, cu, block_size=16)
    cu.data.copy_(cu_seqlens([30, 70]))
    fresh = cu_seqlens([30, 70])
    after = moba_attn_varlen_func(q, k, v, cu, cu, 100, 100, **kw)
    want = moba_attn_varlen_func(q, k, v, fresh, fresh, 100, 100, **kw)
    assert torch.equal(after, want) and not torch.equal(after, first)
    assert lay.lens_q.tolist() == [60, 40]
    with pytest.raises(ValueError, match="differ from the ones the layout was prepared from"):
        moba_attn_varlen_func(q, k, v, cu, cu, 100, 100, layout=lay, **kw)
    same = moba_attn_varlen_func(q, k, v, cu, cu, 100, 100, layout=lay, validate=False, **kw)
    assert torch.equal(same, first)  # the layout's own lengths, not the rewritten tensor's


def test_a_layout_must_fit_the_call():
    q, k, v, cu, _ = packed_inputs([60, 40], [60, 40], 2, 1, 16)
    lay = prepare_layout(cu, cu, block_size=16)
    kw = {"topk": 2, "backend": "torch"}
    with pytest.raises(ValueError, match="block_size=16"):
        moba_attn_varlen_func(q, k, v, cu, cu, 100, 100, block_size=32, layout=lay, **kw)
    with pytest.raises(ValueError, match="prepare the layout of this batch"):
        moba_attn_varlen_func(q[:50], k[:50], v[:50], cu, cu, 100, 100, block_size=16,
                              layout=lay, **kw)
    with pytest.raises(TypeError, match="prepare_layout"):
        moba_attn_varlen_func(q, k, v, cu, cu, 100, 100, block_size=16, layout=object(), **kw)


@pytest.mark.parametrize("lq,lk,bsz", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("bm,split", [(8, True), (16, False), (64, True)])
def test_query_tiles_cover_rows_and_respect_boundaries(lq, lk, bsz, bm, split):
    lay = prepare_layout(cu_seqlens(lq), cu_seqlens(lk), block_size=bsz)
    tiles = schedule.query_tiles(lay, bm, split)
    assert tiles.start.tolist() == tiles.start_np.tolist()
    assert tiles.end.tolist() == tiles.end_np.tolist()
    _, own, first = lay.host_rows()
    key = own if split else first
    covered = []
    for s, e in zip(tiles.start_np, tiles.end_np):
        assert 0 < e - s <= bm
        assert len(set(key[s:e].tolist())) == 1  # one sequence (one own block with split)
        covered.extend(range(s, e))
    assert covered == list(range(lay.total_q))


@pytest.mark.gpu
def test_gpu_a_layout_never_goes_stale():
    q, k, v, cu, _ = packed_inputs([600, 400], [600, 400], 4, 2, 128, torch.bfloat16, "cuda")
    kw = {"block_size": 64, "topk": 3, "backend": "triton"}
    lay = prepare_layout(cu, cu, block_size=64)
    first = moba_attn_varlen_func(q, k, v, cu, cu, 1000, 1000, layout=lay, validate=False, **kw)
    cu.data.copy_(cu_seqlens([300, 700], "cuda"))
    after = moba_attn_varlen_func(q, k, v, cu, cu, 1000, 1000, **kw)
    fresh = cu_seqlens([300, 700], "cuda")
    assert torch.equal(after, moba_attn_varlen_func(q, k, v, fresh, fresh, 1000, 1000, **kw))
    assert not torch.equal(after, first)
    again = moba_attn_varlen_func(q, k, v, cu, cu, 1000, 1000, layout=lay, validate=False, **kw)
    assert torch.equal(again, first)
