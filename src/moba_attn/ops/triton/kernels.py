"""Every Triton kernel of moba-attn (``@triton.jit`` only: no launch logic, no dispatch).

Launchers live beside this file (``gate.py``, ``forward.py``, ``backward.py``,
``decode.py``) and call these kernels with keyword arguments; the host-side planning is in
``schedule.py``. Conventions: int64 address math (``.to(tl.int64)`` on program ids and row
ids), masks on every ragged edge, shape comments ``# [BM, BN]``, log2-domain softmax
(``scale2 = softmax_scale * log2(e)``), natural-log LSE in memory.
"""

import triton
import triton.language as tl


# ----------------------------------------------------------------------------- gate
# Top-(k-1) building blocks, shared by the prefill gate and the decode gate. A key is
# ``(order-preserving fp32 bits << 32) | (2^32 - 1 - block)``: distinct per block, and
# "higher key" is "higher score, then lower block". A NaN score gets the lowest order value,
# below -inf (the gate's NaN rule, as ``torch/gate.sortable_key``). The running set starts
# with distinct sentinels ``-2^63 + 1 + j`` below every real key.
@triton.jit
def _score_keys(s, bidx):
    """int64 keys of fp32 scores ``s`` for block ids ``bidx`` (broadcast to ``s``'s shape)."""
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(s == 0.0, 0, bits)  # -0.0 and +0.0 are one score
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    ordered = tl.where(s != s, -2147483648, ordered)  # noqa: PLR0124  NaN: below every number
    two32 = 4294967296
    return ordered * two32 + (two32 - 1 - bidx.to(tl.int64))

@triton.jit
def _insert_keys(run, key, floor):
    """Running top set ``run [R, KP]`` after inserting the chunk ``key [R, BN]`` (``floor``
    marks non-candidates): the chunk's best keys that beat the current worst, best first."""
    cmax = tl.max(key, axis=1)  # [R] best of the chunk
    rmin = tl.min(run, axis=1)  # [R] worst kept so far
    while tl.max((cmax > rmin).to(tl.int32), axis=0) > 0:
        ins = cmax > rmin
        run = tl.where((run == rmin[:, None]) & ins[:, None], cmax[:, None], run)
        key = tl.where((key == cmax[:, None]) & ins[:, None], floor, key)
        cmax = tl.max(key, axis=1)
        rmin = tl.min(run, axis=1)
    return run

@triton.jit
def _key_blocks(key, KP: tl.constexpr):
    """Block id of every key, ``-1`` for the sentinels."""
    two32 = 4294967296
    low = key - ((key >> 32) << 32)  # 2^32 - 1 - block, in [0, 2^32)
    return tl.where(key > -9223372036854775807 + KP, two32 - 1 - low, -1)

@triton.jit
def _centroid_kernel(K, C, BLK_START, BLK_LEN, stride_kt, stride_kh, stride_cb, stride_ch,
                     D: tl.constexpr, BT: tl.constexpr):
    """One (block, kv head) per program: fp32 mean of the block's keys."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    start = tl.load(BLK_START + b)  # int64
    length = tl.load(BLK_LEN + b)
    t = tl.arange(0, BT)
    d = tl.arange(0, D)
    acc = tl.zeros([BT, D], dtype=tl.float32)
    for t0 in range(0, length, BT):
        tok = start + t0 + t  # [BT] int64
        ptr = K + tok[:, None] * stride_kt + hk * stride_kh + d[None, :]
        acc += tl.load(ptr, mask=(t0 + t < length)[:, None], other=0.0).to(tl.float32)
    cent = tl.sum(acc, axis=0) / length.to(tl.float32)  # [D]
    tl.store(C + b * stride_cb + hk * stride_ch + d, cent)

@triton.jit
def _gate_topk_kernel(Q, C, ROW_OWN, ROW_FIRST, SEL, total_q, K1,
                      stride_qt, stride_qh, stride_cb, stride_ch, stride_st, stride_sh,
                      GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      KP: tl.constexpr, IEEE: tl.constexpr):
    """BM query rows x one query head: fused scores and running top-(k-1) over past blocks."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    hk = h // GROUP
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)  # [BM]
    rmask = rows < total_q
    own = tl.load(ROW_OWN + rows, mask=rmask, other=0)  # [BM] global id of the own block
    first = tl.load(ROW_FIRST + rows, mask=rmask, other=0)  # [BM] first block of the sequence
    has = rmask & (own > first)
    lo = tl.min(tl.where(has, first, 9223372036854775807), axis=0)
    hi = tl.max(tl.where(has, own, 0), axis=0)

    d = tl.arange(0, D)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0).to(tl.float32)  # [BM, D]
    cols = tl.arange(0, KP)
    # Running set [BM, KP]: distinct sentinels below every real key (-2^63 + 1 + j).
    sent = tl.full([BM, KP], -9223372036854775807, tl.int64)
    run = sent + cols[None, :].to(tl.int64)
    floor = tl.full([BM, BN], -9223372036854775807, tl.int64)  # key of a non-candidate
    for b0 in range(lo, hi, BN):
        bidx = b0 + tl.arange(0, BN)  # [BN] int64 global block ids
        c = tl.load(C + bidx[:, None] * stride_cb + hk * stride_ch + d[None, :],
                    mask=(bidx < hi)[:, None], other=0.0)  # [BN, D] fp32
        if IEEE:
            s = tl.dot(q, tl.trans(c), input_precision="ieee")  # [BM, BN]
        else:
            s = tl.dot(q, tl.trans(c))  # TF32 tensor cores
        key = _score_keys(s, bidx[None, :])  # [BM, BN] int64
        cand = (bidx[None, :] >= first[:, None]) & (bidx[None, :] < own[:, None])
        run = _insert_keys(run, tl.where(cand, key, floor), floor)

    blk = _key_blocks(tl.sort(run, dim=1, descending=True), KP)  # best score first
    ptr = SEL + rows[:, None] * stride_st + h * stride_sh + cols[None, :]
    tl.store(ptr, blk, mask=rmask[:, None] & (cols[None, :] < K1))


# ----------------------------------------------------------------------------- forward attention
@triton.jit
def _online_softmax_step(qk, vt, scale2, m_i, l_i, acc, IEEE: tl.constexpr):
    """One key tile of the online softmax: raw scores ``qk [BM, BN]`` (``-inf`` where masked),
    values ``vt [BN, D]``; returns the new running max (log2 domain), sum and accumulator.
    The scale folds into the exponent's argument (one fused multiply-add per score) and
    P @ V accumulates into ``acc`` inside the MMA."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale2)  # scale2 > 0: max commutes
    p = tl.math.exp2(qk * scale2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p.to(vt.dtype), vt, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(vt.dtype), vt, acc)
    return m_new, l_i, acc


@triton.jit
def _attend_key_tile(q, K, V, kidx, kmask, ok, hk, stride_kt, stride_kh, stride_vt, stride_vh,
                     scale2, m_i, l_i, acc, D: tl.constexpr, IEEE: tl.constexpr,
                     LOAD_MASK: tl.constexpr):
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
    return _online_softmax_step(qk, vt, scale2, m_i, l_i, acc, IEEE)

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
                      IEEE: tl.constexpr, MERGE: tl.constexpr):
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
            m_i, l_i, acc = _online_softmax_step(qk, vt, scale2, m_i, l_i, acc, IEEE)
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
                       K1P: tl.constexpr, IEEE: tl.constexpr):
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
                                         True)
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
                        BN: tl.constexpr, K1P: tl.constexpr, IEEE: tl.constexpr):
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
                                         m_i, l_i, acc, D, IEEE, False)
    # keys from the first own block on: own-block causal keys, or (rows whose own block
    # starts later, with blocks shorter than the tile) a selected block
    for n0 in range(own_lo, hi, BN):
        b = first + (n0 - kseq0) // block_size
        hit = tl.max((blk == b).to(tl.int32), axis=1) > 0
        kidx = n0 + n
        ok = ((kidx[None, :] >= ks[:, None]) & (kidx[None, :] < ke[:, None])) | hit[:, None]
        m_i, l_i, acc = _attend_key_tile(q, K, V, kidx, kidx < hi, ok, hk, stride_kt, stride_kh,
                                         stride_vt, stride_vh, scale2, m_i, l_i, acc, D, IEEE,
                                         True)
    _store_tile(O, LSE, rows, rmask, h, total_q, stride_ot, stride_oh, m_i, l_i, acc, D)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _delta_kernel(OUT, DO, DELTA, n_rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """DELTA[r] = sum_d O[r, d] * DO[r, d] in fp32 over ``[n_rows, D]`` contiguous rows."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    offs_d = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < n_rows) & (offs_d[None, :] < D)
    ptr = rows[:, None] * D + offs_d[None, :]  # int64 [BR, BD]
    o = tl.load(OUT + ptr, mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + ptr, mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, axis=1), mask=rows < n_rows)

@triton.jit
def _load_entries(ERH, ELIM, LSE2, DELTA, e, e_mask):
    """Pre-decoded entries ``e`` -> (flat row*Hq+head, causal key limit, lse*log2e, delta):
    two contiguous loads, then two gathers by row."""
    rh = tl.load(ERH + e, mask=e_mask, other=0).to(tl.int64)
    lim = tl.load(ELIM + e, mask=e_mask, other=0)
    lse2 = tl.load(LSE2 + rh, mask=e_mask, other=0.0)
    delta = tl.load(DELTA + rh, mask=e_mask, other=0.0)
    return rh, lim, lse2, delta

@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, ERH, ELIM, BLK_START, BLK_LEN, GRP_OFF,
                 sm_scale, scale_log2, HKV, D, N_SUB,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    # sub-tiles of one group are neighbours in launch order: they run together and share the
    # gathered q/dO rows through L2
    pid = tl.program_id(0).to(tl.int64)
    g = pid // N_SUB  # group = block * Hkv + kv head
    n0 = (pid - g * N_SUB).to(tl.int32) * BLOCK_N  # first key of this sub-tile in the block
    blk = g // HKV
    kvh = g - blk * HKV
    blen = tl.load(BLK_LEN + blk)
    if n0 >= blen:
        return
    bstart = tl.load(BLK_START + blk)  # int64 token row of the block's first key
    offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN] key offsets inside the block
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < blen
    d_ok = offs_d < D
    kv_ptr = ((bstart + offs_n) * HKV + kvh)[:, None] * D + offs_d[None, :]  # int64 [BN, BD]
    kv_m = n_ok[:, None] & d_ok[None, :]
    kt = tl.load(K + kv_ptr, mask=kv_m, other=0.0)  # [BN, BD]
    vt = tl.load(V + kv_ptr, mask=kv_m, other=0.0)  # [BN, BD]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    e_lo = tl.load(GRP_OFF + g)
    e_hi = tl.load(GRP_OFF + g + 1)
    for e0 in range(e_lo, e_hi, BLOCK_M):
        e = e0 + offs_m
        e_ok = e < e_hi
        rh, lim, lse2, delta = _load_entries(ERH, ELIM, LSE2, DELTA, e, e_ok)
        q_m = e_ok[None, :] & d_ok[:, None]
        qT = tl.load(Q + rh[None, :] * D + offs_d[:, None], mask=q_m, other=0.0)  # [BD, BM]
        do = tl.load(DO + rh[:, None] * D + offs_d[None, :],
                     mask=e_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
        sT = tl.dot(kt, qT, input_precision=PRECISION)  # [BN, BM]
        ok = (offs_n[:, None] < lim[None, :]) & n_ok[:, None]
        pT = tl.where(ok, tl.exp2(sT * scale_log2 - lse2[None, :]), 0.0)  # [BN, BM]
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)  # [BN, BD]
        dpT = tl.dot(vt, tl.trans(do), input_precision=PRECISION)  # [BN, BM]
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)  # [BN, BD]
    tl.store(DK + kv_ptr, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_m)
    tl.store(DV + kv_ptr, dv.to(DV.dtype.element_ty), mask=kv_m)

@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, ERH, ELIM, ENT, BLK_START, BLK_LEN, GRP_OFF,
               TILE_GRP, TILE_START, sm_scale, scale_log2, HKV, D, N_GROUPS,
               EID_BASE, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    t = tl.program_id(0)
    g = tl.load(TILE_GRP + t)  # int64 group of this tile; n_groups for an idle program
    if g >= N_GROUPS:  # the grid is an upper bound of the tile count (no host sync)
        return
    e0 = tl.load(TILE_START + t)
    e_hi = tl.load(GRP_OFF + g + 1)
    blk = g // HKV
    kvh = g - blk * HKV
    blen = tl.load(BLK_LEN + blk)
    bstart = tl.load(BLK_START + blk)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    e = e0 + offs_m
    e_ok = e < e_hi
    rh, lim, lse2, delta = _load_entries(ERH, ELIM, LSE2, DELTA, e, e_ok)
    r_m = e_ok[:, None] & d_ok[None, :]
    r_ptr = rh[:, None] * D + offs_d[None, :]  # int64 [BM, BD]
    q = tl.load(Q + r_ptr, mask=r_m, other=0.0)  # [BM, BD]
    do = tl.load(DO + r_ptr, mask=r_m, other=0.0)  # [BM, BD]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_end = tl.minimum(tl.max(lim, axis=0), blen)  # own-block tiles stop at their last row
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < blen
        kv_ptr = ((bstart + offs_n) * HKV + kvh)[None, :] * D + offs_d[:, None]  # [BD, BN]
        kv_m = n_ok[None, :] & d_ok[:, None]
        kT = tl.load(K + kv_ptr, mask=kv_m, other=0.0)  # [BD, BN]
        vT = tl.load(V + kv_ptr, mask=kv_m, other=0.0)  # [BD, BN]
        s = tl.dot(q, kT, input_precision=PRECISION)  # [BM, BN]
        ok = (offs_n[None, :] < lim[:, None]) & n_ok[None, :]
        p = tl.where(ok, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)  # [BM, BD]
    dq = dq * sm_scale
    if ATOMIC:
        tl.atomic_add(DQ + r_ptr, dq, mask=r_m)
    else:
        eid = tl.load(ENT + e, mask=e_ok, other=0)  # int64 global entry id
        tl.store(DQ + ((eid - EID_BASE)[:, None] * D + offs_d[None, :]), dq, mask=r_m)


# ----------------------------------------------------------------------------- decode (KV cache)
# A *query row* ``r`` of the KV-cache kernels is query ``i = r % TQ`` of cache row
# ``b = r // TQ``: the real tokens of cache row ``b`` are slots ``[start_b, end_b)``
# (``start`` = ``cache_leftpad``, 0 without it; ``end`` = ``cache_seqlens``), and query ``i``
# sits at real position ``t = end_b - start_b - TQ + i``.
@triton.jit
def _kv_row(SEQLENS, LEFTPAD, r, TQ, HAS_PAD: tl.constexpr):
    """``(cache row, first real slot, real tokens up to and including the query)``."""
    b = r // TQ
    end = tl.load(SEQLENS + b).to(tl.int64)
    if HAS_PAD:
        start = tl.load(LEFTPAD + b).to(tl.int64)
    else:
        start = end * 0
    n = end - start - (TQ - 1 - r % TQ)
    return b, start, n


@triton.jit
def _kv_gate_kernel(Q, C, SEQLENS, LEFTPAD, SEL, KEYS, hq, n_cent, K1, block_size,
                    blocks_per_split, TQ, stride_qr, stride_qh, stride_cb, stride_cn, stride_ch,
                    GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                    KP: tl.constexpr, SPLIT: tl.constexpr, HAS_PAD: tl.constexpr):
    """One (query row, kv head, centroid range): fp32 scores of the group's query heads and a
    running top-(k-1) per head over the candidate blocks ``i < own`` of the range."""
    r = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2).to(tl.int64)
    b, _, n = _kv_row(SEQLENS, LEFTPAD, r, TQ, HAS_PAD)
    own = tl.maximum(n - 1, 0) // block_size  # candidates are the blocks before the own one
    lo = sp * blocks_per_split
    hi = tl.minimum(tl.minimum(lo + blocks_per_split, own), n_cent)
    g = tl.arange(0, GP)
    gmask = g < GROUP
    h = hk * GROUP + g  # [GP] query heads of the group
    d = tl.arange(0, D)
    q = tl.load(Q + r * stride_qr + h[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None], other=0.0).to(tl.float32)  # [GP, D]
    cols = tl.arange(0, KP)
    # Running set [GP, KP]: distinct sentinels below every real key (-2^63 + 1 + j).
    run = tl.full([GP, KP], -9223372036854775807, tl.int64) + cols[None, :].to(tl.int64)
    floor = tl.full([GP, BN], -9223372036854775807, tl.int64)  # key of a non-candidate
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)  # [BN] int64 block ids
        jm = j < hi
        c = tl.load(C + b * stride_cb + j[:, None] * stride_cn + hk * stride_ch + d[None, :],
                    mask=jm[:, None], other=0.0)  # [BN, D] fp32
        s = tl.dot(q, tl.trans(c), input_precision="ieee")  # [GP, BN], full fp32
        key = _score_keys(s, j[None, :])  # [GP, BN] int64
        run = _insert_keys(run, tl.where(gmask[:, None] & jm[None, :], key, floor), floor)
    rh = r * hq + h  # [GP] (query row, query head) index
    if SPLIT:
        n_sp = tl.num_programs(2)
        tl.store(KEYS + (rh[:, None] * n_sp + sp) * KP + cols[None, :], run,
                 mask=gmask[:, None])
    else:
        blk = _key_blocks(tl.sort(run, dim=1, descending=True), KP)  # best score first
        tl.store(SEL + rh[:, None] * K1 + cols[None, :], blk.to(tl.int32),
                 mask=gmask[:, None] & (cols[None, :] < K1))


@triton.jit
def _kv_gate_merge_kernel(KEYS, SEL, K1, NK: tl.constexpr, KP: tl.constexpr):
    """One (query row, query head): the best k-1 of the gate splits' top-(k-1) keys."""
    rh = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NK)
    blk = _key_blocks(tl.sort(tl.load(KEYS + rh * NK + i), descending=True), KP)  # [NK]
    tl.store(SEL + rh * K1 + i, blk.to(tl.int32), mask=i < K1)


@triton.jit
def _kv_attend_kernel(Q, K, V, SEQLENS, LEFTPAD, SEL, PO, PL, hq, hkv, K1, block_size, chunk,
                      scale2, TQ, stride_qr, stride_qh, stride_kb, stride_kt, stride_kh,
                      stride_vb, stride_vt, stride_vh,
                      GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                      BN: tl.constexpr, KP: tl.constexpr, HAS_SEL: tl.constexpr,
                      IEEE: tl.constexpr, HAS_PAD: tl.constexpr):
    """One (query row, kv head, entry, chunk): the group's heads against one token chunk of
    the entry's block; writes a partial output and log2-domain LSE per head of the group.
    Entry 0 is the own block (causal up to the query); entry ``1 + g * (k-1) + j`` is slot
    ``j`` of head ``g`` of the group. A block chosen by several heads of the group is read
    once, by its first entry, with the heads that did not choose it masked out."""
    rk = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64)
    sub = tl.program_id(2).to(tl.int64)
    n_sub = tl.num_programs(2)
    n_part = tl.num_programs(1) * n_sub
    r = rk // hkv
    hk = rk % hkv
    b, start, n = _kv_row(SEQLENS, LEFTPAD, r, TQ, HAS_PAD)
    t = n - 1  # real position of the query
    own = tl.maximum(t, 0) // block_size
    g = tl.arange(0, GP)
    gmask = g < GROUP
    h = hk * GROUP + g  # [GP] query heads of the group
    blk = own
    use = gmask  # [GP] heads that attend this entry's block
    live = n > 0
    if HAS_SEL:
        cols = tl.arange(0, KP)
        sel = tl.load(SEL + (r * hq + h)[:, None] * K1 + cols[None, :],
                      mask=gmask[:, None] & (cols[None, :] < K1), other=-1)  # [GP, KP]
        f = tl.maximum(e - 1, 0)  # (head, slot) index of a selected-block entry
        mine = tl.load(SEL + (r * hq + hk * GROUP + f // K1) * K1 + f % K1).to(tl.int64)
        blk = tl.where(e > 0, mine, own)
        hit = sel.to(tl.int64) == blk  # [GP, KP]
        earlier = (g[:, None] * K1 + cols[None, :]) < f
        n_before = tl.sum(tl.sum((hit & earlier).to(tl.int32), axis=1), axis=0)
        live = live & ((e == 0) | ((blk >= 0) & (n_before == 0)))  # first entry of a block
        use = tl.where(e > 0, tl.sum(hit.to(tl.int32), axis=1) > 0, gmask)
    lo = blk * block_size + sub * chunk  # real positions [lo, hi) of this chunk
    hi = tl.minimum(lo + chunk, t + 1)  # selected blocks end before t; the own block at t
    hi = tl.where(live, hi, lo)
    d = tl.arange(0, D)
    q = tl.load(Q + r * stride_qr + h[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None], other=0.0).to(K.dtype.element_ty)  # [GP, D]
    kbase = K + b * stride_kb + hk * stride_kh
    vbase = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for p0 in range(lo, hi, BN):
        pos = p0 + tl.arange(0, BN)  # [BN] int64 real positions
        pm = pos < hi
        slot = start + pos
        kt = tl.load(kbase + slot[:, None] * stride_kt + d[None, :], mask=pm[:, None],
                     other=0.0)  # [BN, D]
        if IEEE:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale2
        else:
            s = tl.dot(q, tl.trans(kt)) * scale2  # [GP, BN], log2 domain
        s = tl.where(use[:, None] & pm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: m_i starts at -1e30
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(vbase + slot[:, None] * stride_vt + d[None, :], mask=pm[:, None],
                     other=0.0)  # [BN, D]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    ok = l_i > 0  # heads that saw at least one key here
    o = acc / tl.where(ok, l_i, 1.0)[:, None]
    lse = tl.where(ok, m_i + tl.math.log2(l_i), float("-inf"))
    part = (r * hq + h) * n_part + e * n_sub + sub  # [GP]
    tl.store(PL + part, lse, mask=gmask)
    tl.store(PO + part[:, None] * D + d[None, :], o, mask=(gmask & ok)[:, None])


@triton.jit
def _kv_combine_kernel(PO, PL, O, LSE, n_part, hq, stride_or, stride_oh,
                       D: tl.constexpr, BP: tl.constexpr):
    """One (query row, query head): LSE merge of its partials (lane-wise, then across
    lanes) into the output and its natural-log LSE. Partials with LSE ``-inf`` are skipped
    (their output was never written); a row with no keys gets zeros and LSE ``-inf``."""
    rh = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BP)
    d = tl.arange(0, D)
    m_i = tl.full([BP], -1.0e30, tl.float32)
    l_i = tl.zeros([BP], dtype=tl.float32)
    acc = tl.zeros([BP, D], dtype=tl.float32)
    for p0 in range(0, n_part, BP):
        p = rh * n_part + p0 + i  # [BP]
        lse = tl.load(PL + p, mask=p0 + i < n_part, other=float("-inf"))
        has = lse > float("-inf")
        o = tl.load(PO + p[:, None] * D + d[None, :], mask=has[:, None], other=0.0)  # [BP, D]
        m_new = tl.maximum(m_i, lse)
        alpha = tl.math.exp2(m_i - m_new)
        w = tl.math.exp2(lse - m_new)  # 0 for -inf
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m_i = m_new
    m = tl.max(m_i, axis=0)
    w = tl.math.exp2(m_i - m)
    l = tl.sum(l_i * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(l > 0, l, 1.0)  # [D]
    r = rh // hq
    h = rh % hq
    tl.store(O + r * stride_or + h * stride_oh + d, out.to(O.dtype.element_ty))
    lse_out = tl.where(l > 0, (m + tl.math.log2(tl.where(l > 0, l, 1.0))) / 1.4426950408889634,
                       float("-inf"))
    tl.store(LSE + rh, lse_out)


@triton.jit
def _kv_centroid_kernel(K, C, OLD, NEW, LEFTPAD, n_cent, block_size, stride_kb, stride_kt,
                        stride_kh, stride_cb, stride_cn, stride_ch, D: tl.constexpr,
                        BT: tl.constexpr, HAS_PAD: tl.constexpr):
    """One (new-block slot, cache row, kv head): if block ``OLD // B + slot`` of the row
    became full between ``OLD`` and ``NEW`` real tokens, write its fp32 mean key."""
    j = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2).to(tl.int64)
    if HAS_PAD:
        start = tl.load(LEFTPAD + b).to(tl.int64)
    else:
        start = b * 0
    old = tl.load(OLD + b).to(tl.int64) - start
    new = tl.load(NEW + b).to(tl.int64) - start
    blk = old // block_size + j
    if (blk < new // block_size) & (blk < n_cent) & (old >= 0):
        t = tl.arange(0, BT)
        d = tl.arange(0, D)
        acc = tl.zeros([BT, D], dtype=tl.float32)
        base = K + b * stride_kb + hk * stride_kh
        for t0 in range(0, block_size, BT):
            slot = start + blk * block_size + t0 + t  # [BT] int64
            acc += tl.load(base + slot[:, None] * stride_kt + d[None, :],
                           mask=(t0 + t < block_size)[:, None], other=0.0).to(tl.float32)
        cent = tl.sum(acc, axis=0) / block_size  # [D]
        tl.store(C + b * stride_cb + blk * stride_cn + hk * stride_ch + d, cent)
