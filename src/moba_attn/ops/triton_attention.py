"""MoBA forward in Triton: kernels -> launchers -> autograd Function -> ``moba_attn_triton``.

Schedules (exact per-token routing; see ``naive.py`` for the rule). The gate
(``triton_gate``: fp32 centroids, fused scores + top-(k-1)) gives ``sel [T, Hq, k-1]``; then
``_schedule`` picks one of:
  - masked (query-tile-major, ``_masked_tile_kernel``): one launch; each query tile runs a
    flash-attention loop over every causal key from its lowest selected block, masked per
    row by the selection. Writes the output and LSE directly (no sort, no partial buffer) but
    computes the keys of blocks its rows did not choose: used for short sequences of small
    blocks, where gathering costs more than that waste (``_masked_wins``).
  - key-block-major gather, steps 2-3 below, in place or through partials.
  2. (row, q head, slot) entries get a bucket key ``(kv head, selected block)``
     (``_bucket_key_kernel``), are sorted by it (``torch.sort``, on device, no host sync) and
     cut into dense tiles of up to BM entries that all use ONE key block of one kv head:
     ``_sel_block_kernel`` gathers their query rows and runs a flash-attention loop over that
     block (the key-block-major "gather" schedule);
  3. ``_diag_merge_kernel`` runs the causal own-block attention of every query tile (a plain
     block-diagonal causal attention).
The gathered blocks' results reach the output in one of two ways:
  - in place: step 3 runs first and writes the output and LSE; then one sort and one
    ``_sel_block_kernel`` launch per slot ``j`` (the j-th selected block of every row and
    head), each merging its tiles' results into the output by LSE. A launch holds each
    (row, head) once, so no two programs touch the same output row, and no partial buffer
    exists. Used where the (slot, kv head, block) windows are many tiles long (large blocks,
    GQA), or fill at least one tile while the partial buffer's floor would break the peak
    bound (short T); small windows leave a ragged tile each.
  - partials: step 2 writes a normalised partial output and its LSE per entry, stored in the
    input dtype (fp16/bf16; fp32 for fp32 inputs), and step 3 merges a row's k-1 partials in
    fp32. A pass covers all kv heads and all rows when its partials (``[rows, Hq, k-1, D]``)
    fit ``_part_budget_elems`` (a quarter of the output's bytes, 256 MB to 4 GB). Otherwise
    passes take groups of kv heads over all rows, or (long T) one kv head over row chunks,
    so the partials never reach ``[T, H, k, D]``. Up to ``SHARED_SORT_MAX_ENTRIES`` entries
    the passes share one sort of every entry, bucketed by (kv head, row chunk, block)
    (``SHARED_SORT``): each pass then launches only its two attention kernels on its window
    of buckets. Longer calls sort each pass's entries apart.
The attention kernels share one online-softmax step (``_online_softmax_step``).
When MoBA is exactly dense causal (every sequence has ``Tk <= topk * block_size``) on CUDA
the op calls cuDNN attention instead, forward and backward (with ``deterministic=True`` the
backward stays the Triton one). Host copies of ``cu_seqlens`` and the block layouts
built from them are memoised per live tensor pair, so repeated calls (every layer of a step)
do no host sync. Unsupported configs fall back to the torch path.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import weakref

import numpy as np
import torch
import triton
import triton.language as tl

from . import triton_gate
from .gate import BlockLayout

LOG2E = 1.4426950408889634
PART_CHUNK_ELEMS: int | None = None  # override of the partial-buffer budget (elements)
# Partial outputs of the selected blocks are stored in this dtype (None: the input dtype for
# fp16/bf16, fp32 for fp32 inputs). They are normalised (a convex combination of V rows), so
# the input dtype holds them without overflow; the LSE merge runs in fp32.
PART_DTYPE: torch.dtype | None = None
# Partial-buffer budget: a quarter of the output's bytes, within [PART_MIN_BYTES,
# PART_MAX_BYTES], so the forward's peak stays within 1.5x dense attention's (output + LSE)
# plus index-sized buffers at long T (H200 sweep, 2026-11-28: benchmarks/RESULTS.md).
PART_MIN_BYTES = 256 << 20
# Partial passes share one sort of all entries (True) or sort their own entries (False);
# shared only up to SHARED_SORT_MAX_ENTRIES (row, head, slot) entries: the sort's arrays and
# scratch hold ~27 bytes per entry (0.31 GB more peak at 11.5M entries, H200 sweep,
# 2026-11-28), and longer calls have few, long passes whose own sorts cost little.
SHARED_SORT = True
SHARED_SORT_MAX_ENTRIES = 1 << 24
# Schedule of the selected blocks: "masked" (query-tile-major, ``_masked_tile_kernel``),
# "in-place" (key-block-major, merged into the output one launch per slot) or "partials"
# (key-block-major through partial buffers); None: ``_schedule`` decides.
#  - masked when its modelled time is at most the gather's (``_masked_wins``): the masked
#    loop runs every causal key at about MASKED_TFLOPS; the gather pays GATHER_ENTRY_NS per
#    (row, head, selected block) entry plus its keys at about GATHER_TFLOPS. Fitted to the
#    H200 sweep of 2026-11-29 (benchmarks/RESULTS.md): short sequences of blocks up to 256
#    keys go masked (FlashMoBA's setting at 8K), longer ones and larger blocks gather.
#  - else in place when a (slot, kv head, block) window averages at least
#    IN_PLACE_MIN_TILES entry tiles. H200 sweep, 2026-11-28 (benchmarks/RESULTS.md): in place
#    was 5% faster to 5% slower at 32 entry tiles per window (paper 128K and 1M, GQA 8K and
#    32K) and cut the peak 1.1-2.7x; at 2 tiles per window (FlashMoBA, blocks of 128) the
#    ragged last tiles and per-slot launches made it 8-61% slower.
#  - in place also where windows fill one entry tile and the output is under 4x
#    PART_MIN_BYTES: there the partial buffer's floor would break the peak bound (FlashMoBA's
#    16K-64K; 16% slower than partials at 16K, H200 2026-11-29).
#  - else partials.
SCHEDULE: str | None = None
SCHEDULES = ("masked", "in-place", "partials")
IN_PLACE_MIN_TILES = 8
MASKED_TFLOPS = 360.0
GATHER_TFLOPS = 300.0
GATHER_ENTRY_NS = 0.75
MASKED_CONFIG: tuple | None = None  # override ``(BM, BN, warps, stages)`` of the masked kernel
# Online softmax with the scale folded into one FMA per score and P @ V accumulated in the MMA
# (True), or a separate scale multiply and accumulator add (False).
FWD_FMA = True
PART_MAX_BYTES = 4 << 30
INT16_KEYS_MAX = (1 << 15) - 1  # passes with fewer buckets sort int16 keys
FWD_CONFIG: tuple | None = None  # override of ``_configs`` (benchmarks sweep tile shapes)
LAST_PATH = ""  # which path the last forward took: "cudnn-dense", "kernels" or "torch"
LAST_SCHEDULE = ""  # the schedule of the last forward on the kernels (``SCHEDULES``, or "diag")
POISON = False  # debugging/tests: fill outputs and partial buffers with NaN before the kernels
_warned: set[str] = set()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _online_softmax_step(qk, vt, scale2, m_i, l_i, acc, IEEE: tl.constexpr, FMA: tl.constexpr):
    """One key tile of the online softmax: raw scores ``qk [BM, BN]`` (``-inf`` where masked),
    values ``vt [BN, D]``; returns the new running max (log2 domain), sum and accumulator.
    ``FMA``: the scale folds into the exponent's argument (one fused multiply-add per score)
    and the P @ V product accumulates into ``acc`` inside the MMA."""
    if FMA:
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale2)  # scale2 > 0: max commutes
        p = tl.math.exp2(qk * scale2 - m_new[:, None])
    else:
        s = qk * scale2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if FMA:
        if IEEE:
            acc = tl.dot(p.to(vt.dtype), vt, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(vt.dtype), vt, acc)
    else:
        if IEEE:
            acc = acc + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            acc = acc + tl.dot(p.to(vt.dtype), vt)
    return m_new, l_i, acc


@triton.jit
def _attend_key_tile(q, K, V, kidx, kmask, ok, hk, stride_kt, stride_kh, stride_vt, stride_vh,
                     scale2, m_i, l_i, acc, D: tl.constexpr, IEEE: tl.constexpr,
                     FMA: tl.constexpr, LOAD_MASK: tl.constexpr):
    """Keys ``kidx [BN]`` of kv head ``hk`` for a query tile ``q [BM, D]``: scores where
    ``ok`` (``[BM, BN]`` or ``[BM, 1]``; ``-inf`` elsewhere), then one online-softmax step.
    ``LOAD_MASK``: K/V rows where ``kmask`` is false are not read (zeros)."""
    d = tl.arange(0, D)
    kptr = K + kidx[:, None] * stride_kt + hk * stride_kh + d[None, :]
    vptr = V + kidx[:, None] * stride_vt + hk * stride_vh + d[None, :]
    if LOAD_MASK:
        kt = tl.load(kptr, mask=kmask[:, None], other=0.0)  # [BN, D]
    else:
        kt = tl.load(kptr)
    if IEEE:
        qk = tl.dot(q, tl.trans(kt), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(kt))  # [BM, BN]
    qk = tl.where(ok, qk, float("-inf"))  # the running max stays finite: m_i starts at -1e30
    if LOAD_MASK:
        vt = tl.load(vptr, mask=kmask[:, None], other=0.0)
    else:
        vt = tl.load(vptr)
    return _online_softmax_step(qk, vt, scale2, m_i, l_i, acc, IEEE, FMA)


@triton.jit
def _query_tile(Q, ROW_KS, ROW_KE, rs, re, h, stride_qt, stride_qh, D: tl.constexpr,
                BM: tl.constexpr):
    """The query tile of rows ``[rs, rs + BM)`` (those below ``re`` valid) for q head ``h``:
    rows (int64), row mask, each row's own-block key range ``[ks, ke)`` (``ke``: one past the
    row's own key), the queries ``[BM, D]`` and a fresh online-softmax state."""
    rows = rs + tl.arange(0, BM)
    rmask = rows < re
    ks = tl.load(ROW_KS + rows, mask=rmask, other=9223372036854775807)
    ke = tl.load(ROW_KE + rows, mask=rmask, other=0)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + tl.arange(0, D)[None, :],
                mask=rmask[:, None], other=0.0)
    m_i = tl.full([BM], -1.0e30, tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    return rows, rmask, ks, ke, q, m_i, l_i, acc


@triton.jit
def _store_tile(O, LSE, rows, rmask, h, total_q, stride_ot, stride_oh, m_i, l_i, acc,
                D: tl.constexpr):
    """The tile's final output rows of q head ``h`` and their LSE (natural log)."""
    out = acc / l_i[:, None]
    tl.store(O + rows[:, None] * stride_ot + h * stride_oh + tl.arange(0, D)[None, :],
             out.to(O.dtype.element_ty), mask=rmask[:, None])
    tl.store(LSE + h * total_q + rows, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=rmask)


@triton.jit
def _bucket_key_kernel(SEL, KEY, CHUNK_START, n_ent, r0, h0, HS, J0, NJ, n_blocks, n_chunks,
                       n_buckets, stride_st, stride_sh, GROUP: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Sort key of every (row, q head, slot) entry of slots ``[J0, J0 + NJ)``: ``((kv head
    (local) * n_chunks + row chunk) * n_blocks + block`` (int16 or int32), ``n_buckets`` for
    an unused slot; row chunk ``c`` starts at row ``CHUNK_START[c]`` (``n_chunks`` = 1: no
    chunks). Entry ``e = ((row-r0)*HS + g)*NJ + j - J0``."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < n_ent
    row = r0 + e // (HS * NJ)
    g = (e // NJ) % HS
    j = J0 + e % NJ
    s = tl.load(SEL + row * stride_st + (h0 + g) * stride_sh + j, mask=m, other=-1)
    chunk = tl.zeros_like(row)
    for c in range(1, n_chunks):
        chunk += (row >= tl.load(CHUNK_START + c)).to(tl.int64)
    key = tl.where(s >= 0, s + ((g // GROUP) * n_chunks + chunk) * n_blocks, n_buckets)
    tl.store(KEY + e, key.to(KEY.dtype.element_ty), mask=m)


@triton.jit
def _sel_block_kernel(Q, K, V, PO, PL, O, LSE, ENT, TILE_BLK, BOUNDS, TILE_END, BLK_START,
                      n_blocks, n_chunks, b_lo, b_hi, n_tiles, er0, r0, hk0, h0, HS, HS_ENT, K1,
                      NJ, block_size, total_q,
                      scale2, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_ot, stride_oh,
                      GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      IEEE: tl.constexpr, FMA: tl.constexpr, MERGE: tl.constexpr):
    """One tile: up to BM (row, q head, slot) entries that selected the same (kv head, row
    chunk, key block) bucket ``b = ((kv head - hk0) * n_chunks + chunk) * n_blocks + block``,
    for the buckets ``[b_lo, b_hi)`` of this pass. Entry ids count rows from ``er0``,
    ``HS_ENT`` heads from kv head ``hk0`` and ``NJ`` slots per (row, head). The partials of
    the pass are stored by ``((row - r0) * HS + head - h0) * K1 + slot``; with ``MERGE`` (one
    slot per launch, so no two programs hold the same (row, head)) the tile's result is
    merged by LSE into the output ``O`` and ``LSE`` in place instead."""
    t = tl.load(TILE_END + b_lo - 1, mask=b_lo > 0, other=0) + tl.program_id(0).to(tl.int64)
    # int64 bucket of this tile; past the pass's buckets for an idle program
    b = tl.load(TILE_BLK + t, mask=t < n_tiles, other=b_hi)
    if b < b_hi:
        hk = hk0 + b // (n_chunks * n_blocks)
        blk = b % n_blocks
        e_lo = tl.load(BOUNDS + b)
        e_hi = tl.load(BOUNDS + b + 1)
        tile0 = tl.load(TILE_END + b) - (e_hi - e_lo + BM - 1) // BM
        e0 = e_lo + (t - tile0) * BM
        m = tl.arange(0, BM)
        emask = e0 + m < e_hi
        ent = tl.load(ENT + e0 + m, mask=emask, other=0)  # [BM] int64 entry ids
        row = er0 + ent // (HS_ENT * NJ)
        h = hk0 * GROUP + (ent // NJ) % HS_ENT
        d = tl.arange(0, D)
        q = tl.load(Q + row[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                    mask=emask[:, None], other=0.0)  # [BM, D]
        kstart = tl.load(BLK_START + blk)
        n = tl.arange(0, BN)
        m_i = tl.full([BM], -1.0e30, tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, D], dtype=tl.float32)
        for n0 in range(0, block_size, BN):  # selected blocks are always full
            kidx = kstart + n0 + n  # [BN] int64
            kt = tl.load(K + kidx[:, None] * stride_kt + hk * stride_kh + d[None, :])  # [BN, D]
            if IEEE:
                qk = tl.dot(q, tl.trans(kt), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(kt))  # [BM, BN]
            vt = tl.load(V + kidx[:, None] * stride_vt + hk * stride_vh + d[None, :])  # [BN, D]
            m_i, l_i, acc = _online_softmax_step(qk, vt, scale2, m_i, l_i, acc, IEEE, FMA)
        if MERGE:  # (out, lse) <- LSE merge of (out, lse) and this block's result, fp32
            optr = O + row[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :]
            o_old = tl.load(optr, mask=emask[:, None], other=0.0).to(tl.float32)
            l_old = tl.load(LSE + h * total_q + row, mask=emask, other=0.0) * 1.4426950408889634
            l_blk = m_i + tl.math.log2(l_i)
            mx = tl.maximum(l_old, l_blk)
            w_old = tl.math.exp2(l_old - mx)
            w_blk = tl.math.exp2(l_blk - mx)
            o = (o_old * w_old[:, None] + acc * (w_blk / l_i)[:, None]) / (w_old + w_blk)[:, None]
            tl.store(optr, o.to(O.dtype.element_ty), mask=emask[:, None])
            tl.store(LSE + h * total_q + row, (mx + tl.math.log2(w_old + w_blk)) / 1.4426950408889634,
                     mask=emask)
        else:
            part = ((row - r0) * HS + h - h0) * K1 + ent % NJ  # [BM] partial slot of the pass
            o = acc / l_i[:, None]
            lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # natural log
            tl.store(PO + part[:, None] * D + d[None, :], o.to(PO.dtype.element_ty),
                     mask=emask[:, None])
            tl.store(PL + part, lse, mask=emask)


@triton.jit
def _diag_merge_kernel(Q, K, V, O, LSE, PO, PL, SEL, TILE_RS, TILE_RE, ROW_KS, ROW_KE,
                       tile0, r0, h0, HS, K1, total_q, scale2,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_ot, stride_oh, stride_st, stride_sh,
                       GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       K1P: tl.constexpr, IEEE: tl.constexpr, FMA: tl.constexpr):
    """Causal own-block attention of a query tile for one q head, then the LSE merge of the
    row's k-1 selected-block partials (``K1P``: k-1 rounded up to a power of two); writes the
    final output and LSE."""
    t = tile0 + tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    h = h0 + g
    hk = h // GROUP
    rows, rmask, ks, ke, q, m_i, l_i, acc = _query_tile(
        Q, ROW_KS, ROW_KE, tl.load(TILE_RS + t), tl.load(TILE_RE + t), h, stride_qt, stride_qh,
        D, BM)
    lo = tl.min(ks, axis=0)
    hi = tl.max(ke, axis=0)
    n = tl.arange(0, BN)
    for n0 in range(lo, hi, BN):
        kidx = n0 + n  # [BN] int64
        ok = (kidx[None, :] >= ks[:, None]) & (kidx[None, :] < ke[:, None])
        m_i, l_i, acc = _attend_key_tile(q, K, V, kidx, kidx < hi, ok, hk, stride_kt, stride_kh,
                                         stride_vt, stride_vh, scale2, m_i, l_i, acc, D, IEEE,
                                         FMA, True)
    # Merge the selected-block partials (each a normalised output o_j with LSE_j). All slots'
    # selections and LSEs are loaded at once, so the weights are known before any partial is
    # read and the partial loads do not wait on each other.
    jj = tl.arange(0, K1P)
    slot_ok = rmask[:, None] & (jj[None, :] < K1)
    blk = tl.load(SEL + rows[:, None] * stride_st + h * stride_sh + jj[None, :], mask=slot_ok,
                  other=-1)  # [BM, K1P]
    used = blk >= 0
    ent0 = ((rows - r0) * HS + g) * K1  # [BM] entry id of the row's slot 0
    ents = ent0[:, None] + jj[None, :]
    pl = tl.load(PL + ents, mask=used, other=0.0) * 1.4426950408889634  # log2 domain
    pl = tl.where(used, pl, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(pl, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    w = tl.where(used, tl.math.exp2(pl - m_new[:, None]), 0.0)  # [BM, K1P]
    acc = acc * alpha[:, None]
    l_i = l_i * alpha + tl.sum(w, axis=1)
    m_i = m_new
    d = tl.arange(0, D)
    for j in range(K1):
        wj = tl.sum(tl.where(jj[None, :] == j, w, 0.0), axis=1)  # [BM]
        po = tl.load(PO + (ent0 + j)[:, None] * D + d[None, :], mask=(wj > 0)[:, None],
                     other=0.0).to(tl.float32)
        acc += wj[:, None] * po
    _store_tile(O, LSE, rows, rmask, h, total_q, stride_ot, stride_oh, m_i, l_i, acc, D)


@triton.jit
def _masked_tile_kernel(Q, K, V, O, LSE, SEL, TILE_RS, TILE_RE, ROW_KS, ROW_KE, ROW_FIRST,
                        BLK_START, K1, block_size, total_q, scale2,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_ot, stride_oh, stride_st, stride_sh,
                        GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, K1P: tl.constexpr, IEEE: tl.constexpr,
                        FMA: tl.constexpr):
    """The query-tile-major ("masked") schedule: one query tile of one q head runs a
    flash-attention loop over every key from the tile's lowest selected block to its last
    causal key; a key tile (``BN`` divides the block size, so it lies in one block) counts
    for the rows that selected its block, plus each row's own-block causal keys. Writes the
    final output and LSE; no sort, no partials. Exact per row; wasted work where the rows of
    a tile disagree. (Branching around key tiles that no row chose cost 1.4x at FlashMoBA's
    8K, H200 sweep 2026-11-29: it stops the loop's loads from being pipelined.)"""
    # last tiles first: a sequence's later tiles have the longest loops
    t = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    hk = h // GROUP
    rs = tl.load(TILE_RS + t)
    rows, rmask, ks, ke, q, m_i, l_i, acc = _query_tile(
        Q, ROW_KS, ROW_KE, rs, tl.load(TILE_RE + t), h, stride_qt, stride_qh, D, BM)
    own_lo = tl.min(ks, axis=0)
    hi = tl.max(ke, axis=0)
    first = tl.load(ROW_FIRST + rs)  # the sequence's first block (a tile is in one sequence)
    kseq0 = tl.load(BLK_START + first)
    jj = tl.arange(0, K1P)
    blk = tl.load(SEL + rows[:, None] * stride_st + h * stride_sh + jj[None, :],
                  mask=rmask[:, None] & (jj[None, :] < K1), other=-1).to(tl.int64)  # [BM, K1P]
    low = tl.min(tl.where(blk >= 0, blk, 1 << 40), axis=1)
    low = tl.min(low, axis=0)  # the tile's lowest selected block
    lo = tl.where(low < (1 << 40), kseq0 + (low - first) * block_size, own_lo)
    lo = tl.minimum(lo, own_lo)
    n = tl.arange(0, BN)
    # past keys of every row of the tile: only the selection masks them
    for n0 in range(lo, own_lo, BN):
        b = first + (n0 - kseq0) // block_size
        hit = tl.max((blk == b).to(tl.int32), axis=1) > 0  # [BM] rows that selected block b
        kidx = n0 + n  # [BN] int64, all before every row's own block
        m_i, l_i, acc = _attend_key_tile(q, K, V, kidx, kidx < own_lo, hit[:, None], hk,
                                         stride_kt, stride_kh, stride_vt, stride_vh, scale2,
                                         m_i, l_i, acc, D, IEEE, FMA, False)
    # keys from the first own block on: own-block causal keys, or (rows whose own block
    # starts later, with blocks shorter than the tile) a selected block
    for n0 in range(own_lo, hi, BN):
        b = first + (n0 - kseq0) // block_size
        hit = tl.max((blk == b).to(tl.int32), axis=1) > 0
        kidx = n0 + n
        ok = ((kidx[None, :] >= ks[:, None]) & (kidx[None, :] < ke[:, None])) | hit[:, None]
        m_i, l_i, acc = _attend_key_tile(q, K, V, kidx, kidx < hi, ok, hk, stride_kt, stride_kh,
                                         stride_vt, stride_vh, scale2, m_i, l_i, acc, D, IEEE,
                                         FMA, True)
    _store_tile(O, LSE, rows, rmask, h, total_q, stride_ot, stride_oh, m_i, l_i, acc, D)


# ----------------------------------------------------------------------------- launchers
def unsupported_reason(q: torch.Tensor, block_size: int, topk: int) -> str | None:
    """Why the Triton path cannot run this call (``None`` when it can)."""
    if q.device.type != "cuda" and not _interpreting():
        return f"tensors are on {q.device.type}; the Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the kernels take float16, bfloat16, float32)"
    if block_size % 16:
        return f"block_size={block_size} is not a multiple of 16"
    return triton_gate.gate_supported(q.shape[-1], topk)


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"moba_attn: Triton path unavailable ({reason}); using the torch path",
                      stacklevel=3)


def _pow2_divisor(x: int) -> int:
    return x & -x


def _diag_tiles(layout: BlockLayout, bm: int, split_blocks: bool):
    """Query tiles of <= bm rows that never cross a sequence (nor, if ``split_blocks``, an
    own-block) boundary: host arrays ``(start, end)``."""
    key = layout.row_own_np if split_blocks else layout.row_first_np
    total = key.shape[0]
    brk = np.flatnonzero(key[1:] != key[:-1]) + 1
    seg_s = np.concatenate([[0], brk]).astype(np.int64)
    seg_e = np.concatenate([brk, [total]]).astype(np.int64)
    n = (seg_e - seg_s + bm - 1) // bm
    first = np.cumsum(n) - n
    idx = np.arange(int(n.sum()), dtype=np.int64)
    seg = np.repeat(np.arange(seg_s.shape[0]), n)
    start = seg_s[seg] + (idx - first[seg]) * bm
    end = np.minimum(start + bm, seg_e[seg])
    return start, end


def _part_dtype(q) -> torch.dtype:
    if PART_DTYPE is not None:
        return PART_DTYPE
    return q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32


def _part_budget_elems(q, part_dtype) -> int:
    """Elements of partial output one pass may hold."""
    if PART_CHUNK_ELEMS is not None:
        return int(PART_CHUNK_ELEMS)
    out_bytes = q.numel() * q.element_size()
    nbytes = min(max(out_bytes // 4, PART_MIN_BYTES), PART_MAX_BYTES)
    return nbytes // part_dtype.itemsize


def _configs(d: int, block_size: int, dense_entries: float):
    """Tile shapes ``(sel BM, sel BN, sel warps, diag BM, diag BN, diag warps, stages)``."""
    bn_cap = _pow2_divisor(block_size)
    if FWD_CONFIG is not None:
        sbm, sbn, sw, dbm, dbn, dw, st = FWD_CONFIG
        return sbm, min(sbn, bn_cap), sw, dbm, dbn, dw, st
    if _interpreting():
        return 32, min(32, bn_cap), 4, 32, 32, 4, 1
    bn = 128 if d <= 64 else (64 if d <= 128 else 32)
    # 64-entry tiles of 4 warps were faster at blocks of 128 and 512 (H200 sweep, 2026-11-28:
    # benchmarks/RESULTS.md); larger blocks keep 128-row tiles, their loops are long
    small = block_size <= 512
    sel_bm = 128 if (dense_entries >= 128 and d <= 128 and not small) else 64
    # 128-key tiles in the selected-block loop above 512 keys (measured at blocks of 4096, H200
    # sweep 2026-11-28: 3.7% faster at the paper's 1M, 5.5% at 256K)
    sel_bn = min(128 if (d <= 128 and not small) else bn, bn_cap)
    diag_bm = 128 if (block_size >= 128 and d <= 128 and not small) else 64
    return (sel_bm, sel_bn, 8 if sel_bm == 128 else 4, diag_bm, min(bn, 64),
            8 if diag_bm == 128 else 4, 2 if d > 128 else 3)


def _layout_cache(layout: BlockLayout) -> dict:
    """Per-layout memo of the host/device arrays the launchers derive from it."""
    c = layout.__dict__.get("_fwd_memo")
    if c is None:
        c = layout.__dict__["_fwd_memo"] = {}
    return c


def _tiles_for(layout: BlockLayout, device, diag_bm: int):
    """``(ts_np, te_np, tile_rs, tile_re, row_ks, row_ke)`` for this layout, memoised."""
    c = _layout_cache(layout)
    key = ("tiles", diag_bm, str(device))
    hit = c.get(key)
    if hit is None:
        bsz = layout.block_size
        ts_np, te_np = _diag_tiles(layout, diag_bm, split_blocks=bsz >= diag_bm)
        row_ks = layout.blk_start[layout.row_own]
        row_ke = row_ks + layout.row_pos % bsz + 1
        hit = (ts_np, te_np, torch.from_numpy(ts_np).to(device),
               torch.from_numpy(te_np).to(device), row_ks, row_ke)
        c[key] = hit
    return hit


def _passes(ts_np, te_np, hq: int, hkv: int, k1: int, d: int, budget: int):
    """Work split ``[(hk0, n_kv_heads, tile_lo, tile_hi, r0, r1)]`` so that one pass's
    partials (``rows * n_kv_heads * group * k1 * d`` fp32) fit ``budget``: all kv heads and
    all rows in one pass when they fit, else groups of kv heads over all rows, else one kv
    head at a time over row chunks (long T)."""
    group = hq // hkv
    n_tiles = ts_np.shape[0]
    total = int(te_np[-1]) if n_tiles else 0
    per_head = total * group * k1 * d  # one kv head, all rows
    if per_head <= budget:
        khs = hkv if per_head * hkv <= budget else max(1, budget // max(per_head, 1))
        n_pass = -(-hkv // khs)
        khs = -(-hkv // n_pass)  # balanced groups
        return [(h, min(khs, hkv - h), 0, n_tiles, 0, total) for h in range(0, hkv, khs)]
    rows_cap = max(1, budget // (group * k1 * d))
    chunk_id = ts_np // rows_cap
    cut = np.flatnonzero(chunk_id[1:] != chunk_id[:-1]) + 1
    t_lo = np.concatenate([[0], cut]).astype(np.int64)
    t_hi = np.concatenate([cut, [n_tiles]]).astype(np.int64)
    return [(hk, 1, int(a), int(b), int(ts_np[a]), int(te_np[b - 1]))
            for hk in range(hkv) for a, b in zip(t_lo, t_hi)]


def _chunk_starts(layout: BlockLayout, starts: list, device) -> torch.Tensor:
    """First row of every row chunk, int64 on ``device``, memoised."""
    c = _layout_cache(layout)
    key = ("chunks", tuple(starts), str(device))
    t = c.get(key)
    if t is None:
        t = c[key] = torch.tensor(starts, dtype=torch.int64, device=device)
    return t


def _arange_cached(layout: BlockLayout, n: int, dtype, device) -> torch.Tensor:
    c = _layout_cache(layout)
    key = ("arange", str(dtype), str(device))
    a = c.get(key)
    if a is None or a.shape[0] < n:
        a = torch.arange(max(n, 1024), dtype=dtype, device=device)
        c[key] = a
    return a[:n]


def _moba_forward(q, k, v, layout: BlockLayout, sel, topk: int, scale: float):
    """Attention given the selection: ``(out [T, Hq, D] q.dtype, lse [Hq, T] fp32)``."""
    global LAST_SCHEDULE
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    k1 = max(topk - 1, 0)
    out = torch.empty_like(q)
    lse = torch.empty(hq, total_q, dtype=torch.float32, device=q.device)
    if POISON:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if total_q == 0:
        return out, lse
    ieee = q.dtype == torch.float32
    scale2 = scale * LOG2E
    bsz = layout.block_size
    n_blocks = layout.n_blocks
    est = total_q * group * k1 / max(n_blocks, 1)
    sel_bm, sel_bn, sel_w, diag_bm, diag_bn, diag_w, stages = _configs(d, bsz, est)
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))

    schedule = _schedule(layout, est, sel_bm, k1, d, _part_floored(q)) if k1 > 0 else "diag"
    LAST_SCHEDULE = schedule
    if sel.stride(2) != 1:
        sel = sel.contiguous()
    if schedule == "masked":  # one launch: every query tile over its causal keys, masked
        bm, bn, warps, st = _masked_config(d, bsz)
        m_ts, _, m_rs, m_re, row_ks, row_ke = _tiles_for(layout, q.device, bm)
        _masked_tile_kernel[(m_ts.shape[0], hq)](
            q, k, v, out, lse, sel, m_rs, m_re, row_ks, row_ke, layout.row_first,
            layout.blk_start, k1, bsz, total_q, scale2, *common, out.stride(0), out.stride(1),
            sel.stride(0), sel.stride(1), GROUP=group, D=d, BM=bm, BN=bn,
            K1P=triton.next_power_of_2(k1), IEEE=ieee, FMA=FWD_FMA,
            num_warps=warps, num_stages=st,
        )
        return out, lse

    ts_np, te_np, tile_rs, tile_re, row_ks, row_ke = _tiles_for(layout, q.device, diag_bm)
    # own-block causal attention of every row and head, one launch; with k1 == 0 that is
    # the whole answer, with the in-place schedule the selected blocks merge into it
    in_place = schedule == "in-place"
    if k1 == 0 or in_place:
        _diag_merge_kernel[(ts_np.shape[0], hq)](
            q, k, v, out, lse, lse, lse, sel, tile_rs, tile_re, row_ks, row_ke,
            0, 0, 0, hq, 0, total_q, scale2, *common, out.stride(0), out.stride(1), 0, 0,
            GROUP=group, D=d, BM=diag_bm, BN=diag_bn, K1P=1, IEEE=ieee, FMA=FWD_FMA,
            num_warps=diag_w, num_stages=stages,
        )
        if k1 == 0:
            return out, lse

    if in_place:  # no partial buffer; one sort of the (row, head) entries per slot
        part_o = part_l = lse  # not read by merging launches
        shared, n_chunks, chunk_t = False, 1, tile_rs
        max_buckets, n_keys = hkv * n_blocks, total_q * hq
    else:
        part_dtype = _part_dtype(q)
        passes = _passes(ts_np, te_np, hq, hkv, k1, d, _part_budget_elems(q, part_dtype))
        n_ent_cap = max((r1 - r0) * nkh * group * k1 for _, nkh, _, _, r0, r1 in passes)
        part_o = torch.empty(n_ent_cap, d, dtype=part_dtype, device=q.device)
        part_l = torch.empty(n_ent_cap, dtype=torch.float32, device=q.device)
        if POISON:
            part_o.fill_(float("nan"))
            part_l.fill_(float("nan"))
        # The passes share one sort of every entry (bucketed by kv head, row chunk and
        # block) when SHARED_SORT is set and the entries are few enough that their sort
        # arrays stay small next to the partials: each pass then launches only its two
        # attention kernels.
        n_all = total_q * hq * k1
        shared = SHARED_SORT and len(passes) > 1 and n_all <= SHARED_SORT_MAX_ENTRIES
        chunk_start = sorted({r0 for _, _, _, _, r0, _ in passes})  # [0]: head-group passes
        n_chunks = len(chunk_start) if shared else 1
        chunk_t = _chunk_starts(layout, chunk_start, q.device) if shared else tile_rs
        max_buckets = (hkv * n_chunks if shared else max(p[1] for p in passes)) * n_blocks
        n_keys = n_all if shared else n_ent_cap
    # bucket keys are < 2**15 in most calls: int16 halves the radix sort's passes
    key_dtype = torch.int16 if max_buckets < INT16_KEYS_MAX else torch.int32
    keys = torch.empty(n_keys, dtype=key_dtype, device=q.device)
    key_block = 1024

    def sort_entries(r0, r1, h0, hs, nkh, nch, j0, nj):
        """Bucket keys, sort and tile arrays of the (row, head, slot) entries of rows
        ``[r0, r1)``, q heads ``[h0, h0 + hs)`` and slots ``[j0, j0 + nj)``, on device."""
        n_ent = (r1 - r0) * hs * nj
        n_buckets = nkh * nch * n_blocks
        kv = keys[:n_ent]
        _bucket_key_kernel[(triton.cdiv(n_ent, key_block),)](
            sel, kv, chunk_t, n_ent, r0, h0, hs, j0, nj, n_blocks, nch, n_buckets,
            sel.stride(0), sel.stride(1), GROUP=group, BLOCK=key_block, num_warps=4,
        )
        sorted_b, ent = torch.sort(kv, stable=True)
        bounds = torch.searchsorted(
            sorted_b, _arange_cached(layout, n_buckets + 1, key_dtype, q.device))
        ntile = torch.diff(bounds).add_(sel_bm - 1).div_(sel_bm, rounding_mode="floor")
        tile_end = torch.cumsum(ntile, 0)  # the kernel derives each bucket's first tile
        n_ub = triton.cdiv(n_ent, sel_bm) + min(n_buckets, n_ent)  # >= tiles needed
        tile_blk = torch.searchsorted(
            tile_end, _arange_cached(layout, n_ub, tile_end.dtype, q.device), right=True)
        return ent, bounds, tile_end, tile_blk, n_ub

    def sel_launch(ent, bounds, tile_end, tile_blk, n_tiles, n_ent, nkh, b_lo, b_hi, er0, r0,
                   base_hk, h0, hs, hs_ent, nj, merge):
        grid = triton.cdiv(n_ent, sel_bm) + min(nkh * n_blocks, n_ent)  # >= the pass's tiles
        _sel_block_kernel[(grid,)](
            q, k, v, part_o, part_l, out, lse, ent, tile_blk, bounds, tile_end,
            layout.blk_start, n_blocks, n_chunks, b_lo, b_hi, n_tiles, er0, r0, base_hk, h0,
            hs, hs_ent, k1, nj, bsz, total_q, scale2, *common, out.stride(0), out.stride(1),
            GROUP=group, D=d, BM=sel_bm, BN=sel_bn, IEEE=ieee, FMA=FWD_FMA, MERGE=merge,
            num_warps=sel_w, num_stages=stages,
        )

    if in_place:  # slot j of every (row, head): each (row, head) once per launch
        for j in range(k1):
            srt = sort_entries(0, total_q, 0, hq, hkv, 1, j, 1)
            sel_launch(*srt, total_q * hq, hkv, 0, hkv * n_blocks, 0, 0, 0, 0, hq, hq, 1, True)
        return out, lse

    if shared:
        srt = sort_entries(0, total_q, 0, hq, hkv, n_chunks, 0, k1)
    for hk0, nkh, t_lo, t_hi, r0, r1 in passes:
        hs = nkh * group  # q heads of this pass
        h0 = hk0 * group
        n_ent = (r1 - r0) * hs * k1
        if shared:  # bucket ids and entry ids are those of the shared sort (all heads, rows)
            b_lo = (hk0 * n_chunks + chunk_start.index(r0)) * n_blocks
            b_hi = b_lo + (nkh if n_chunks == 1 else 1) * n_blocks
            sel_launch(*srt, n_ent, nkh, b_lo, b_hi, 0, r0, 0, h0, hs, hq, k1, False)
        else:
            srt = sort_entries(r0, r1, h0, hs, nkh, 1, 0, k1)
            sel_launch(*srt, n_ent, nkh, 0, nkh * n_blocks, r0, r0, hk0, h0, hs, hs, k1, False)
        _diag_merge_kernel[(t_hi - t_lo, hs)](
            q, k, v, out, lse, part_o, part_l, sel, tile_rs, tile_re, row_ks, row_ke,
            t_lo, r0, h0, hs, k1, total_q, scale2, *common,
            out.stride(0), out.stride(1), sel.stride(0), sel.stride(1),
            GROUP=group, D=d, BM=diag_bm, BN=diag_bn, K1P=triton.next_power_of_2(k1), IEEE=ieee,
            FMA=FWD_FMA,
            num_warps=diag_w, num_stages=stages,
        )
    return out, lse


def _schedule(layout: BlockLayout, est: float, sel_bm: int, k1: int, d: int,
              floored: bool) -> str:
    """``SCHEDULE`` when set, else: "masked" where ``_masked_wins``; "in-place" when the
    (slot, kv head, block) windows are long, or when they fill at least one entry tile and
    the partial buffer would be ``floored`` above its share of the peak bound; "partials"
    otherwise. ``est``: entries per (kv head, block) bucket; one launch per slot cuts every
    bucket into ``k1`` windows with a ragged last tile each."""
    if SCHEDULE is not None:
        if SCHEDULE not in SCHEDULES:
            raise ValueError(f"triton_attention.SCHEDULE={SCHEDULE!r}; use one of {SCHEDULES} "
                             "or None")
        return SCHEDULE
    if _masked_wins(layout, k1, d):
        return "masked"
    window = est / k1
    if window >= IN_PLACE_MIN_TILES * sel_bm or (floored and window >= sel_bm):
        return "in-place"
    return "partials"


def _part_floored(q) -> bool:
    """Whether ``PART_MIN_BYTES`` lifts the partial budget above a quarter of the output's
    bytes: the partials would then take the forward's peak over 1.5x dense attention's."""
    if PART_CHUNK_ELEMS is not None:
        return False
    return q.numel() * q.element_size() // 4 < PART_MIN_BYTES


def _masked_wins(layout: BlockLayout, k1: int, d: int) -> bool:
    """Whether the masked schedule's modelled time is at most the gather's, summed over
    rows: masked runs every key from the sequence's first block (random routing: some row
    of the tile chose it) to the row, ``earlier * B + B / 2``, at ``MASKED_TFLOPS``; the
    gather runs ``min(earlier, k1)`` entries of ``B`` keys, at ``GATHER_ENTRY_NS`` each (at
    D=128) plus ``GATHER_TFLOPS``, and the own block's ``B / 2`` keys."""
    c = _layout_cache(layout)
    key = ("row_sums", k1)
    if key not in c:  # host sums over every row, once per layout
        earlier = layout.row_own_np - layout.row_first_np
        c[key] = (float(earlier.sum()), float(np.minimum(earlier, k1).sum()), earlier.size)
    earlier_sum, entries, rows = c[key]
    bsz = layout.block_size
    ns_per_key = 4.0 * d * 1e-3  # a key's FLOPs per row and head, / 1e3: at X TFLOP/s, ns / X
    masked = (earlier_sum + 0.5 * rows) * bsz * ns_per_key / MASKED_TFLOPS
    entry_ns = GATHER_ENTRY_NS * d / 128  # measured at D=128; a row's loads and stores scale
    gather = (entries * (entry_ns + bsz * ns_per_key / GATHER_TFLOPS)
              + 0.5 * rows * bsz * ns_per_key / GATHER_TFLOPS)
    return masked <= gather


def _masked_config(d: int, block_size: int):
    """Tile shape ``(BM, BN, warps, stages)`` of the masked kernel; ``BN`` divides the
    block size, so a key tile lies in one block."""
    cap = _pow2_divisor(block_size)
    if MASKED_CONFIG is not None:
        bm, bn, warps, stages = MASKED_CONFIG
        return bm, min(bn, cap), warps, stages
    if _interpreting():
        return 32, min(32, cap), 4, 1
    if d > 128:
        return 64, min(32, cap), 4, 2
    # 128x128 tiles of 8 warps at blocks of 128 and 256, 64x64 of 4 below (H200 sweep,
    # 2026-11-29: benchmarks/RESULTS.md)
    return (128, 128, 8, 3) if cap >= 128 else (64, min(64, cap), 4, 3)


# ----------------------------------------------------------------------------- cu_seqlens memo
# Reading ``cu_seqlens`` on the host is a device sync. Every layer of a model step (and every
# timed call) passes the same tensors, so their host copy and the layouts built from them are
# kept per live tensor pair, keyed by identity and autograd version counter (an in-place
# change through torch bumps it; a freed tensor drops its entry).
_CU_MEMO: dict = {}
_CU_MEMO_MAX = 16


def _version(t: torch.Tensor):
    try:
        return t._version
    except Exception:  # noqa: BLE001  inference-mode tensors have no version counter
        return None


def _cu_entry(cu_q: torch.Tensor, cu_k: torch.Tensor) -> dict:
    key = (id(cu_q), id(cu_k))
    ver = (_version(cu_q), _version(cu_k))
    hit = _CU_MEMO.get(key)
    if (hit is not None and hit["ver"] == ver and hit["refs"][0]() is cu_q
            and hit["refs"][1]() is cu_k):
        return hit
    cq = cu_q.detach().to("cpu", torch.int64)
    ck = cq if cu_k is cu_q else cu_k.detach().to("cpu", torch.int64)
    ent = {"ver": ver, "cq": cq, "ck": ck, "layouts": {}, "dense": {}}
    if None in ver:
        return ent

    def drop(_ref, key=key, ent=ent):
        if _CU_MEMO.get(key) is ent:
            del _CU_MEMO[key]

    ent["refs"] = (weakref.ref(cu_q, drop), weakref.ref(cu_k, drop))
    if len(_CU_MEMO) >= _CU_MEMO_MAX:
        _CU_MEMO.pop(next(iter(_CU_MEMO)))
    _CU_MEMO[key] = ent
    return ent


def _layout_for(cu_q, cu_k, block_size: int) -> BlockLayout:
    """``BlockLayout.build(cu_q, cu_k, block_size)``, memoised (no sync on a hit)."""
    ent = _cu_entry(cu_q, cu_k)
    lay = ent["layouts"].get(block_size)
    if lay is None:
        lay = BlockLayout.build(ent["cq"], ent["ck"], block_size)
        dev = cu_q.device
        if dev.type != "cpu":
            lay = dataclasses.replace(
                lay, row_pos=lay.row_pos.to(dev), row_own=lay.row_own.to(dev),
                row_first=lay.row_first.to(dev), blk_start=lay.blk_start.to(dev),
                blk_len=lay.blk_len.to(dev))
        ent["layouts"][block_size] = lay
    return lay


def _dense_seqs(cu_q, cu_k, block_size: int, topk: int) -> int | None:
    """Number of (equal-length, Tq == Tk) sequences when MoBA is exactly dense causal."""
    ent = _cu_entry(cu_q, cu_k)
    key = (block_size, topk)
    if key not in ent["dense"]:
        lq = np.diff(ent["cq"].numpy())
        lk = np.diff(ent["ck"].numpy())
        ok = (lq.size > 0 and lk.max() <= topk * block_size and np.array_equal(lq, lk)
              and bool((lq == lq[0]).all()))
        ent["dense"][key] = int(lq.size) if ok else None
    return ent["dense"][key]


def _dense_cudnn(q, k, v, n_seqs: int, scale: float):
    """Dense causal attention of ``n_seqs`` equal sequences through cuDNN, with its LSE."""
    total, hq, d = q.shape
    hkv = k.shape[1]
    t = total // n_seqs
    q4 = q.view(n_seqs, t, hq, d).transpose(1, 2)
    k4 = k.view(n_seqs, t, hkv, d).transpose(1, 2)
    v4 = v.view(n_seqs, t, hkv, d).transpose(1, 2)
    if hkv != hq:
        k4 = k4.repeat_interleave(hq // hkv, dim=1)
        v4 = v4.repeat_interleave(hq // hkv, dim=1)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q4, k4, v4, None, True, 0.0, True, False, scale=scale)
    out = res[0].transpose(1, 2).reshape(total, hq, d)
    lse = res[1]
    if n_seqs == 1:
        lse = lse.reshape(hq, total)
    else:
        lse = lse.reshape(n_seqs, hq, t).transpose(0, 1).reshape(hq, total)
    if lse.dtype != torch.float32:
        lse = lse.float()
    return out.contiguous(), lse.contiguous()


def _try_dense(q, k, v, cu_q, cu_k, block_size, topk, scale):
    """cuDNN dense attention when MoBA is exactly dense causal, else ``None``."""
    if q.device.type != "cuda" or q.dtype == torch.float32 or q.shape[0] == 0:
        return None
    n_seqs = _dense_seqs(cu_q, cu_k, block_size, topk)
    if n_seqs is None:
        return None
    try:
        return _dense_cudnn(q, k, v, n_seqs, scale)
    except Exception as err:  # noqa: BLE001  cuDNN missing or refusing the shape: use the kernels
        _warn_once(f"cuDNN dense attention failed ({str(err).splitlines()[0][:120]})")
        return None


def dense_selection(layout: BlockLayout, hq: int, topk: int) -> torch.Tensor:
    """Selection of a call where every row takes all its earlier blocks (MoBA == dense)."""
    k1 = max(topk - 1, 0)
    j = torch.arange(k1, device=layout.row_own.device)
    n_earlier = (layout.row_own - layout.row_first)[:, None]
    s = torch.where(j[None, :] < n_earlier, layout.row_first[:, None] + j[None, :], -1)
    return s[:, None, :].expand(-1, hq, -1).contiguous()


def moba_forward_triton(q, k, v, layout: BlockLayout, topk: int, scale: float,
                        sel: torch.Tensor | None = None):
    """Gate (unless ``sel`` is given) and attend: ``(out, lse [Hq, T] fp32, sel)``."""
    if sel is None:
        sel = triton_gate.gate_triton(q, k, layout, topk)
    out, lse = _moba_forward(q, k, v, layout, sel, topk, scale)
    return out, lse, sel


def _backward_impl():
    try:
        from .triton_backward import moba_backward_triton

        return moba_backward_triton
    except Exception:  # noqa: BLE001  module absent or its kernels cannot load: exact torch backward
        from .torch_impl import _backward

        return _backward


# ----------------------------------------------------------------------------- autograd
class MobaTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, block_size, topk, scale, deterministic):
        global LAST_PATH
        layout = None  # the dense path needs no block layout until the backward
        with torch.no_grad():
            dense = _try_dense(q, k, v, cu_q, cu_k, block_size, topk, scale)
            if dense is not None:
                out, lse = dense
                sel = None
                LAST_PATH = "cudnn-dense"
            else:
                layout = _layout_for(cu_q, cu_k, block_size)
                out, lse, sel = moba_forward_triton(q, k, v, layout, topk, scale)
                LAST_PATH = "kernels"
        ctx.cu = (cu_q, cu_k, block_size)
        ctx.dense = sel is None
        ctx.save_for_backward(q, k, v, out, lse, sel if sel is not None else lse.new_empty(0))
        ctx.layout, ctx.topk, ctx.scale, ctx.deterministic = layout, topk, scale, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sel = ctx.saved_tensors
        if ctx.layout is None:
            ctx.layout = _layout_for(*ctx.cu)
        if ctx.dense:
            sel = dense_selection(ctx.layout, q.shape[1], ctx.topk)
        with torch.no_grad():
            dq, dk, dv = _backward_impl()(q, k, v, out, lse, dout.contiguous(), ctx.layout, sel,
                                          ctx.topk, ctx.scale, ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None, None


def moba_attn_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     *, block_size: int, topk: int, softmax_scale: float,
                     deterministic: bool = False):
    """Packed-batch MoBA with the Triton kernels (validated inputs, see ``moba_attn_varlen_func``).

    q: ``[total_q, Hq, D]``, k, v: ``[total_k, Hkv, D]``; returns
    ``(out [total_q, Hq, D] in q.dtype, lse [Hq, total_q] fp32)``. Differentiable (the backward
    is ``triton_backward.moba_backward_triton`` when present, else the exact torch backward).
    Configs the kernels do not cover (block_size not a multiple of 16, head dim not a power of
    two in [16, 256], topk > 257, float64, non-CUDA tensors) run the torch path after a
    one-time warning.
    """
    global LAST_PATH
    reason = unsupported_reason(q, block_size, topk)
    if reason is not None:
        _warn_once(reason)
        LAST_PATH = "torch"
        from .torch_impl import moba_attn_torch

        return moba_attn_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               block_size=block_size, topk=topk, softmax_scale=softmax_scale,
                               deterministic=deterministic)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if not deterministic:
        # exactly dense causal: cuDNN forward, and its backward through autograd (the sparse
        # backward would run every block of every row); deterministic mode keeps the kernels
        dense = _try_dense(q, k, v, cu_seqlens_q, cu_seqlens_k, block_size, topk,
                           float(softmax_scale))
        if dense is not None:
            LAST_PATH = "cudnn-dense"
            return dense
    return MobaTritonFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, block_size, topk,
                                    float(softmax_scale), deterministic)


__all__ = [
    "MobaTritonFunction",
    "dense_selection",
    "moba_attn_triton",
    "moba_forward_triton",
    "unsupported_reason",
]
