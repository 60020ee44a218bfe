"""Launchers of the MoBA forward kernels: attention of a packed batch given the selection.

The gate (``gate.py``) gives ``sel [T, Hq, k-1]``; ``schedule.choose_schedule`` picks how
the selected blocks are attended:

- masked (query-tile-major, ``_masked_tile_kernel``): one launch; each query tile runs a
  flash loop over every causal key from its lowest selected block, masked per row by the
  selection. No sort, no partial buffer, but it computes the keys of blocks its rows did
  not choose: short sequences of small blocks.
- key-block-major gather: (row, q head, slot) entries get a bucket key ``(kv head, block)``
  (``_bucket_key_kernel``), are sorted on the device (no host sync) and cut into dense
  tiles of up to BM entries that all use ONE key block of one kv head
  (``_sel_block_kernel``); ``_diag_merge_kernel`` runs the causal own block. Their results
  meet either
  - in place: the own block writes the output and LSE first, then one launch per slot j
    merges the j-th selected block of every (row, head) into them by LSE (each (row, head)
    once per launch: no partial buffer); or
  - through partials: the selected blocks write normalised partial outputs (input dtype)
    and LSEs, and the own-block kernel merges a row's k-1 partials in fp32, in passes
    whose partials fit ``schedule.part_budget_elems``. Up to
    ``schedule.SHARED_SORT_MAX_ENTRIES`` entries the passes share one sort.

The grids of the gather are upper bounds of the tile counts (idle programs exit), so no
launch needs a device-to-host copy: a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton

from ..config import MobaConfig
from ..layout import BlockLayout
from . import kernels, schedule

LOG2E = 1.4426950408889634


def _arange(layout: BlockLayout, n: int, dtype, device) -> torch.Tensor:
    """``arange(n)`` (the searchsorted probes), kept on the layout per length and dtype."""
    return layout.memo(("arange", n, str(dtype)), lambda: torch.arange(n, dtype=dtype,
                                                                      device=device))


def plan_schedule(layout: BlockLayout, q: torch.Tensor, hkv: int, topk: int,
                  config: MobaConfig) -> str:
    """The schedule :func:`attend` takes for this call (``"diag"`` when ``topk == 1``),
    decided once per layout and call shape."""
    total_q, hq, d = q.shape
    k1 = max(topk - 1, 0)
    if k1 == 0:
        return "diag"

    def choose():
        est = total_q * (hq // hkv) * k1 / max(layout.n_blocks, 1)
        sel_bm = schedule.fwd_tiles(d, layout.block_size, est, config)[0]
        floored = schedule.part_floored(q.numel() * q.element_size(), config)
        return schedule.choose_schedule(layout, est, sel_bm, k1, d, floored, config)

    return layout.memo(("schedule", hq, hkv, d, topk, q.element_size(), config), choose)


def attend(q, k, v, layout: BlockLayout, sel, topk: int, scale: float, config: MobaConfig):
    """Attention given the selection: ``(out [T, Hq, D] q.dtype, lse [Hq, T] fp32)``.

    q ``[T, Hq, D]``, k/v ``[Tk, Hkv, D]`` contiguous in the last dim; ``sel [T, Hq, k-1]``
    global block ids (-1 = unused slot)."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    k1 = max(topk - 1, 0)
    out = torch.empty_like(q)
    lse = torch.empty(hq, total_q, dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse
    ieee = q.dtype == torch.float32
    scale2 = scale * LOG2E
    bsz = layout.block_size
    n_blocks = layout.n_blocks
    est = total_q * group * k1 / max(n_blocks, 1)
    sel_bm, sel_bn, sel_w, diag_bm, diag_bn, diag_w, stages = schedule.fwd_tiles(
        d, bsz, est, config)
    strides = {"stride_qt": q.stride(0), "stride_qh": q.stride(1), "stride_kt": k.stride(0),
               "stride_kh": k.stride(1), "stride_vt": v.stride(0), "stride_vh": v.stride(1),
               "stride_ot": out.stride(0), "stride_oh": out.stride(1)}
    sched = plan_schedule(layout, q, hkv, topk, config)
    if sel.stride(2) != 1:
        sel = sel.contiguous()
    row_ks, row_ke = schedule.row_key_ranges(layout)

    if sched == "masked":  # one launch: every query tile over its causal keys, masked
        bm, bn, warps, st = schedule.masked_tile(d, bsz, config)
        tiles = schedule.query_tiles(layout, bm, split_blocks=bsz >= bm)
        kernels._masked_tile_kernel[(tiles.n, hq)](
            Q=q, K=k, V=v, O=out, LSE=lse, SEL=sel, TILE_RS=tiles.start, TILE_RE=tiles.end,
            ROW_KS=row_ks, ROW_KE=row_ke, ROW_FIRST=layout.row_first,
            BLK_START=layout.blk_start, K1=k1, block_size=bsz, total_q=total_q,
            scale2=scale2, **strides, stride_st=sel.stride(0), stride_sh=sel.stride(1),
            GROUP=group, D=d, BM=bm, BN=bn, K1P=triton.next_power_of_2(k1), IEEE=ieee,
            num_warps=warps, num_stages=st,
        )
        return out, lse

    tiles = schedule.query_tiles(layout, diag_bm, split_blocks=bsz >= diag_bm)

    def diag(po, pl, tile_lo, tile_hi, r0, h0, hs, k1_pass, sel_t, stride_st, stride_sh,
             k1p):
        kernels._diag_merge_kernel[(tile_hi - tile_lo, hs)](
            Q=q, K=k, V=v, O=out, LSE=lse, PO=po, PL=pl, SEL=sel_t, TILE_RS=tiles.start,
            TILE_RE=tiles.end, ROW_KS=row_ks, ROW_KE=row_ke, tile0=tile_lo, r0=r0, h0=h0,
            HS=hs, K1=k1_pass, total_q=total_q, scale2=scale2, **strides,
            stride_st=stride_st, stride_sh=stride_sh, GROUP=group, D=d, BM=diag_bm,
            BN=diag_bn, K1P=k1p, IEEE=ieee, num_warps=diag_w, num_stages=stages,
        )

    # own-block causal attention of every row and head, one launch: with k1 == 0 that is
    # the whole answer, with the in-place schedule the selected blocks merge into it
    in_place = sched == "in-place"
    if k1 == 0 or in_place:
        diag(lse, lse, 0, tiles.n, 0, 0, hq, 0, sel, 0, 0, 1)
        if k1 == 0:
            return out, lse

    if in_place:  # no partial buffer; one sort of the (row, head) entries per slot
        part_o = part_l = lse  # not read by merging launches
        shared, n_chunks, chunk_t = False, 1, tiles.start
        max_buckets, n_keys = hkv * n_blocks, total_q * hq
    else:
        part_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
        budget = schedule.part_budget_elems(q.numel() * q.element_size(), part_dtype.itemsize,
                                            config)
        plan = layout.memo(("passes", diag_bm, hq, hkv, k1, d, budget), lambda: schedule.passes(
            tiles.start_np, tiles.end_np, hq, hkv, k1, d, budget))
        n_ent_cap = max((r1 - r0) * nkh * group * k1 for _, nkh, _, _, r0, r1 in plan)
        part_o = torch.empty(n_ent_cap, d, dtype=part_dtype, device=q.device)
        part_l = torch.empty(n_ent_cap, dtype=torch.float32, device=q.device)
        # the passes share one sort of every entry (bucketed by kv head, row chunk and
        # block) when the entries are few enough that its arrays stay small next to the
        # partials: each pass then launches only its two attention kernels
        n_all = total_q * hq * k1
        shared = len(plan) > 1 and n_all <= schedule.SHARED_SORT_MAX_ENTRIES
        chunk_start = sorted({r0 for _, _, _, _, r0, _ in plan})  # [0]: head-group passes
        n_chunks = len(chunk_start) if shared else 1
        # first row of every row chunk, gathered on the device from the tile starts
        first_tiles = sorted({t_lo for _, _, t_lo, _, _, _ in plan})
        chunk_t = layout.memo(("chunk_starts", diag_bm, tuple(first_tiles)), lambda: torch.stack(
            [tiles.start[t] for t in first_tiles])) if shared else tiles.start
        max_buckets = (hkv * n_chunks if shared else max(p[1] for p in plan)) * n_blocks
        n_keys = n_all if shared else n_ent_cap
    # bucket keys are < 2**15 in most calls: int16 halves the radix sort's passes
    key_dtype = torch.int16 if max_buckets < schedule.INT16_KEYS_MAX else torch.int32
    keys = torch.empty(n_keys, dtype=key_dtype, device=q.device)
    key_block = 1024

    def sort_entries(r0, r1, h0, hs, nkh, nch, j0, nj):
        """Bucket keys, sort and tile arrays of the (row, head, slot) entries of rows
        ``[r0, r1)``, q heads ``[h0, h0 + hs)`` and slots ``[j0, j0 + nj)``, on device."""
        n_ent = (r1 - r0) * hs * nj
        n_buckets = nkh * nch * n_blocks
        kv = keys[:n_ent]
        kernels._bucket_key_kernel[(triton.cdiv(n_ent, key_block),)](
            SEL=sel, KEY=kv, CHUNK_START=chunk_t, n_ent=n_ent, r0=r0, h0=h0, HS=hs, J0=j0,
            NJ=nj, n_blocks=n_blocks, n_chunks=nch, n_buckets=n_buckets,
            stride_st=sel.stride(0), stride_sh=sel.stride(1), GROUP=group, BLOCK=key_block,
            num_warps=4,
        )
        sorted_b, ent = torch.sort(kv, stable=True)
        bounds = torch.searchsorted(sorted_b, _arange(layout, n_buckets + 1, key_dtype, q.device))
        ntile = torch.diff(bounds).add_(sel_bm - 1).div_(sel_bm, rounding_mode="floor")
        tile_end = torch.cumsum(ntile, 0)  # the kernel derives each bucket's first tile
        n_ub = triton.cdiv(n_ent, sel_bm) + min(n_buckets, n_ent)  # >= tiles needed
        tile_blk = torch.searchsorted(tile_end, _arange(layout, n_ub, tile_end.dtype, q.device),
                                      right=True)
        return ent, bounds, tile_end, tile_blk, n_ub

    def sel_launch(srt, n_ent, nkh, b_lo, b_hi, er0, r0, base_hk, h0, hs, hs_ent, nj, merge):
        ent, bounds, tile_end, tile_blk, n_tiles = srt
        grid = triton.cdiv(n_ent, sel_bm) + min(nkh * n_blocks, n_ent)  # >= the pass's tiles
        kernels._sel_block_kernel[(grid,)](
            Q=q, K=k, V=v, PO=part_o, PL=part_l, O=out, LSE=lse, ENT=ent, TILE_BLK=tile_blk,
            BOUNDS=bounds, TILE_END=tile_end, BLK_START=layout.blk_start, n_blocks=n_blocks,
            n_chunks=n_chunks, b_lo=b_lo, b_hi=b_hi, n_tiles=n_tiles, er0=er0, r0=r0,
            hk0=base_hk, h0=h0, HS=hs, HS_ENT=hs_ent, K1=k1, NJ=nj, block_size=bsz,
            total_q=total_q, scale2=scale2, **strides, GROUP=group, D=d, BM=sel_bm,
            BN=sel_bn, IEEE=ieee, MERGE=merge, num_warps=sel_w, num_stages=stages,
        )

    if in_place:  # slot j of every (row, head): each (row, head) once per launch
        for j in range(k1):
            srt = sort_entries(0, total_q, 0, hq, hkv, 1, j, 1)
            sel_launch(srt, total_q * hq, hkv, 0, hkv * n_blocks, 0, 0, 0, 0, hq, hq, 1, True)
        return out, lse

    if shared:
        srt = sort_entries(0, total_q, 0, hq, hkv, n_chunks, 0, k1)
    k1p = triton.next_power_of_2(k1)
    for hk0, nkh, t_lo, t_hi, r0, r1 in plan:
        hs = nkh * group  # q heads of this pass
        h0 = hk0 * group
        n_ent = (r1 - r0) * hs * k1
        if shared:  # bucket ids and entry ids are those of the shared sort (all heads, rows)
            b_lo = (hk0 * n_chunks + chunk_start.index(r0)) * n_blocks
            b_hi = b_lo + (nkh if n_chunks == 1 else 1) * n_blocks
            sel_launch(srt, n_ent, nkh, b_lo, b_hi, 0, r0, 0, h0, hs, hq, k1, False)
        else:
            srt = sort_entries(r0, r1, h0, hs, nkh, 1, 0, k1)
            sel_launch(srt, n_ent, nkh, 0, nkh * n_blocks, r0, r0, hk0, h0, hs, hs, k1, False)
        diag(part_o, part_l, t_lo, t_hi, r0, h0, hs, k1, sel, sel.stride(0), sel.stride(1), k1p)
    return out, lse


__all__ = ["attend", "plan_schedule"]
