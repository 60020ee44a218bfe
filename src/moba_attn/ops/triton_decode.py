"""One MoBA decode step per batch row in Triton: gate over cached centroids, split-KV
attention over the union of the blocks a kv group chose, LSE combine.

Contract: ``integrations.transformers.moba_decode_attention`` (its PyTorch step
``_decode_rows`` is the reference). Row ``b`` of the HF cache ``key/value [B, Hkv, Tk, D]``
holds its real tokens in slots ``first[b] .. first[b] + n_real[b] - 1``; the query sits at
real position ``t = n_real[b] - 1`` (own block ``c = t // block_size``);
``centroids [B, NB, Hkv, D]`` fp32 are the mean keys of the row's full blocks. The rule is the
spec's: exact top-(k-1) over the blocks ``i < c`` (ties to the lower block), plus the own block
causally up to ``t``.

Launches per step (no host synchronisation, so a step can be captured in a CUDA graph):

1. ``_gate_kernel``, grid ``(B, Hkv, SG)``: the ``g = Hq / Hkv`` query heads of one kv group
   as one ``[GP, D]`` tile (GP = g padded to >= 16) scored in IEEE fp32 against ``BN``
   centroids at a time; a running top-(k-1) per head is kept in registers as int64 keys
   (order-preserving score bits, then ``2^32 - 1 - block``: a higher key is a higher score,
   then a lower block), so ties follow the spec in every split. With one split it writes the
   selection; when few (row, kv head) pairs cannot fill the GPU, the centroids are scanned in
   ``SG`` ranges, each writes its own top-(k-1) keys and ``_gate_merge_kernel`` (grid
   ``(B * Hq,)``) keeps the best k-1 of them.
2. ``_attend_kernel``, grid ``(B * Hkv, 1 + g * (k-1), NSUB)``: entry 0 is the own block
   (causal up to ``t``), entry ``1 + r * (k-1) + j`` is slot ``j`` of head ``r`` of the group.
   A block chosen by several heads of the group is read once, by its first entry (the later
   entries read nothing and write empty partials), with the heads that did not choose it
   masked out. Every block is cut
   into ``NSUB`` token chunks when few rows would leave SMs idle. Each program writes a partial
   output and its log2-domain LSE per head of the group.
3. ``_combine_kernel``, grid ``(B * Hq,)``: LSE merge of a head's partials into the output.

So each selected K/V block is read once per kv group, and a step is 3 launches (4 with a split
gate).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_gate import _insert_keys, _key_blocks, _score_keys

LOG2E = 1.4426950408889634
POISON = False  # debugging/tests: fill outputs and partial buffers with NaN (or -7) first
MAX_DECODE_SLOTS = 256  # k-1 above this is not supported (the running set lives in registers)
GATE_MIN_BLOCKS = 64  # fewest centroids one gate split scans
MIN_CHUNK = 256  # fewest tokens one attention program reads (unless the block is smaller)
GATE_SPLITS: int | None = None  # override of SG (a power of two), for tests and tuning
ATTN_SPLITS: int | None = None  # override of NSUB (a power of two dividing block_size / 16)
ATTN_TILE: tuple[int, int, int] | None = None  # override of (BN, num_warps, num_stages)
_SM_COUNT: dict[int, int] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _gate_kernel(Q, C, N_REAL, SEL, KEYS, hq, n_cent, K1, block_size, blocks_per_split,
                 stride_qb, stride_qh, stride_cb, stride_cn, stride_ch,
                 GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                 KP: tl.constexpr, SPLIT: tl.constexpr):
    """One (row, kv head, centroid range): fp32 scores of the group's query heads and a
    running top-(k-1) per head over the candidate blocks ``i < own`` of the range."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2).to(tl.int64)
    n = tl.load(N_REAL + b)
    own = tl.maximum(n - 1, 0) // block_size  # candidates are the blocks before the own one
    lo = sp * blocks_per_split
    hi = tl.minimum(tl.minimum(lo + blocks_per_split, own), n_cent)
    r = tl.arange(0, GP)
    rmask = r < GROUP
    h = hk * GROUP + r  # [GP] query heads of the group
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0).to(tl.float32)  # [GP, D]
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
        run = _insert_keys(run, tl.where(rmask[:, None] & jm[None, :], key, floor), floor)
    row = b * hq + h  # [GP] (row, query head) index
    if SPLIT:
        n_sp = tl.num_programs(2)
        tl.store(KEYS + (row[:, None] * n_sp + sp) * KP + cols[None, :], run,
                 mask=rmask[:, None])
    else:
        blk = _key_blocks(tl.sort(run, dim=1, descending=True), KP)  # best score first
        tl.store(SEL + row[:, None] * K1 + cols[None, :], blk.to(tl.int32),
                 mask=rmask[:, None] & (cols[None, :] < K1))


@triton.jit
def _gate_merge_kernel(KEYS, SEL, K1, NK: tl.constexpr, KP: tl.constexpr):
    """One (row, query head): the best k-1 of the gate splits' top-(k-1) keys."""
    rh = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NK)
    blk = _key_blocks(tl.sort(tl.load(KEYS + rh * NK + i), descending=True), KP)  # [NK]
    tl.store(SEL + rh * K1 + i, blk.to(tl.int32), mask=i < K1)


@triton.jit
def _attend_kernel(Q, K, V, FIRST, N_REAL, SEL, PO, PL, hq, hkv, K1, block_size, chunk, scale2,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt,
                   GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                   KP: tl.constexpr, HAS_SEL: tl.constexpr, IEEE: tl.constexpr):
    """One (row, kv head, entry, chunk): the group's heads against one token chunk of the
    entry's block; writes a partial output and log2-domain LSE per head of the group."""
    bk = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64)
    sub = tl.program_id(2).to(tl.int64)
    n_sub = tl.num_programs(2)
    n_part = tl.num_programs(1) * n_sub
    b = bk // hkv
    hk = bk % hkv
    n = tl.load(N_REAL + b)
    first = tl.load(FIRST + b)
    t = n - 1  # real position of the query
    own = tl.maximum(t, 0) // block_size
    r = tl.arange(0, GP)
    rmask = r < GROUP
    h = hk * GROUP + r  # [GP] query heads of the group
    blk = own
    use = rmask  # [GP] heads that attend this entry's block
    live = n > 0
    if HAS_SEL:
        cols = tl.arange(0, KP)
        sel = tl.load(SEL + (b * hq + h)[:, None] * K1 + cols[None, :],
                      mask=rmask[:, None] & (cols[None, :] < K1), other=-1)  # [GP, KP]
        f = tl.maximum(e - 1, 0)  # (head, slot) index of a selected-block entry
        mine = tl.load(SEL + (b * hq + hk * GROUP + f // K1) * K1 + f % K1).to(tl.int64)
        blk = tl.where(e > 0, mine, own)
        hit = sel.to(tl.int64) == blk  # [GP, KP]
        earlier = (r[:, None] * K1 + cols[None, :]) < f
        n_before = tl.sum(tl.sum((hit & earlier).to(tl.int32), axis=1), axis=0)
        live = live & ((e == 0) | ((blk >= 0) & (n_before == 0)))  # first entry of a block
        use = tl.where(e > 0, tl.sum(hit.to(tl.int32), axis=1) > 0, rmask)
    lo = blk * block_size + sub * chunk  # real positions [lo, hi) of this chunk
    hi = tl.minimum(lo + chunk, t + 1)  # selected blocks end before t; the own block at t
    hi = tl.where(live, hi, lo)
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0).to(K.dtype.element_ty)  # [GP, D]
    kbase = K + b * stride_kb + hk * stride_kh
    vbase = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for p0 in range(lo, hi, BN):
        pos = p0 + tl.arange(0, BN)  # [BN] int64 real positions
        pm = pos < hi
        slot = first + pos
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
    part = (b * hq + h) * n_part + e * n_sub + sub  # [GP]
    tl.store(PL + part, lse, mask=rmask)
    tl.store(PO + part[:, None] * D + d[None, :], o, mask=(rmask & ok)[:, None])


@triton.jit
def _combine_kernel(PO, PL, O, n_part, hq, stride_ob, stride_oh,
                    D: tl.constexpr, BP: tl.constexpr):
    """One (row, query head): LSE merge of its partials (lane-wise, then across lanes).
    Partials with LSE ``-inf`` are skipped (their output was never written); a row with no
    keys at all gets zeros."""
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
    b = rh // hq
    h = rh % hq
    tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty))


# ----------------------------------------------------------------------------- launchers
def unsupported_reason(q: torch.Tensor, key: torch.Tensor, block_size: int,
                       topk: int) -> str | None:
    """Why the decode kernels cannot run this call (``None`` when they can)."""
    if q.device.type != "cuda" and not _interpreting():
        return f"tensors are on {q.device.type}; the kernels need CUDA (or TRITON_INTERPRET=1)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"q dtype {q.dtype} (the kernels take float16, bfloat16, float32)"
    if key.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"cache dtype {key.dtype} (the kernels take float16, bfloat16, float32)"
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return f"head dim {d} is not a power of two in [16, 256]"
    if block_size % 16:
        return f"block_size={block_size} is not a multiple of 16"
    if topk - 1 > MAX_DECODE_SLOTS:
        return f"topk={topk} is above {MAX_DECODE_SLOTS + 1}"
    return None


def _check(q, key, value, first, n_real, centroids, block_size, topk):
    if q.dim() != 3 or key.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and key [B, Hkv, Tk, D]; got {tuple(q.shape)} "
                         f"and {tuple(key.shape)}")
    bsz, hq, d = q.shape
    if value.shape != key.shape or value.dtype != key.dtype:
        raise ValueError(f"value {tuple(value.shape)} {value.dtype} must match key "
                         f"{tuple(key.shape)} {key.dtype}")
    if key.shape[0] != bsz or key.shape[3] != d or hq % key.shape[1]:
        raise ValueError(f"key {tuple(key.shape)} does not fit q {tuple(q.shape)} (batch, head "
                         "dim, and Hq a multiple of Hkv)")
    if (centroids.dim() != 4 or centroids.shape[0] != bsz or centroids.shape[2:] != key.shape[1:2]
            + key.shape[3:] or centroids.dtype != torch.float32):
        raise ValueError(f"centroids must be fp32 [B, NB, Hkv, D] = [{bsz}, NB, {key.shape[1]}, "
                         f"{d}]; got {tuple(centroids.shape)} {centroids.dtype}")
    if first.shape != (bsz,) or n_real.shape != (bsz,):
        raise ValueError(f"first and n_real must be [B] = [{bsz}]; got {tuple(first.shape)} "
                         f"and {tuple(n_real.shape)}")
    reason = unsupported_reason(q, key, block_size, topk)
    if reason is not None:
        raise ValueError(f"the Triton decode kernels do not cover this call: {reason}")


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter (tests force the split paths: GATE_SPLITS, ATTN_SPLITS)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def _gate_splits(pairs: int, n_cent: int, sms: int) -> int:
    """Centroid ranges per (row, kv head): enough programs for two per SM, each scanning
    at least ``GATE_MIN_BLOCKS`` centroids."""
    if GATE_SPLITS is not None:
        return GATE_SPLITS
    if pairs >= 2 * sms:
        return 1
    want = triton.next_power_of_2(triton.cdiv(2 * sms, pairs))
    return max(1, min(want, _pow2_floor(n_cent // GATE_MIN_BLOCKS)))


def _attn_splits(pairs: int, entries: int, block_size: int, sms: int) -> int:
    """Token chunks per block: about four programs per SM even if every head of a group chose
    the same blocks, chunks of at least ``MIN_CHUNK`` tokens and a multiple of 16."""
    if ATTN_SPLITS is not None:
        return ATTN_SPLITS
    most = 1
    while block_size % (32 * most) == 0 and block_size // (2 * most) >= MIN_CHUNK:
        most *= 2
    want = triton.next_power_of_2(triton.cdiv(4 * sms, pairs * entries))
    return min(want, most)


def decode_select_triton(q: torch.Tensor, centroids: torch.Tensor, n_real: torch.Tensor, *,
                         block_size: int, topk: int) -> torch.Tensor:
    """Blocks each (row, query head) picks: ``[B, Hq, k-1]`` int32 block indices sorted by
    decreasing gate score, ``-1`` for unused slots, with ``k-1 = min(topk - 1, NB)``.

    Exact fp32 scores ``<q, centroid>`` over the blocks before the query's own block
    (``(n_real - 1) // block_size``); equal scores go to the lower block.
    """
    bsz, hq, d = q.shape
    n_cent, hkv = centroids.shape[1], centroids.shape[2]
    k1 = min(topk - 1, n_cent)
    sel = torch.empty(bsz, hq, max(k1, 0), dtype=torch.int32, device=q.device)
    if POISON:
        sel.fill_(-7)
    if k1 <= 0 or bsz == 0:
        return sel
    if q.stride(-1) != 1:
        q = q.contiguous()
    if centroids.stride(-1) != 1:
        centroids = centroids.contiguous()
    n_real = n_real.to(torch.int64).contiguous()
    group = hq // hkv
    gp = max(16, triton.next_power_of_2(group))
    kp = max(2, triton.next_power_of_2(k1))
    bn = 16 if _interpreting() else (64 if d <= 128 else 32)
    sg = _gate_splits(bsz * hkv, n_cent, _sm_count(q.device))
    per_split = triton.cdiv(triton.cdiv(n_cent, sg), bn) * bn
    keys = torch.empty(bsz * hq * sg * kp if sg > 1 else 1, dtype=torch.int64, device=q.device)
    _gate_kernel[(bsz, hkv, sg)](
        q, centroids, n_real, sel, keys, hq, n_cent, k1, block_size, per_split,
        q.stride(0), q.stride(1), centroids.stride(0), centroids.stride(1), centroids.stride(2),
        GROUP=group, GP=gp, D=d, BN=bn, KP=kp, SPLIT=sg > 1, num_warps=4,
    )
    if sg > 1:
        _gate_merge_kernel[(bsz * hq,)](keys, sel, k1, NK=sg * kp, KP=kp, num_warps=4)
    return sel


def _attn_tile(d: int, chunk: int) -> tuple[int, int, int]:
    if ATTN_TILE is not None:
        return ATTN_TILE
    cap = chunk & -chunk  # tiles never straddle a chunk
    if _interpreting():
        return min(32, cap), 4, 1
    return min(64 if d <= 128 else 32, cap), 4, 3 if d <= 128 else 2


def decode_attend_triton(q, key, value, first, n_real, sel, *, block_size: int,
                         scale: float) -> torch.Tensor:
    """Attention of one decode step given the selection ``sel [B, Hq, k-1]`` (block indices,
    -1 unused, as :func:`decode_select_triton` returns): ``[B, Hq, D]`` in q's dtype."""
    bsz, hq, d = q.shape
    hkv = key.shape[1]
    group = hq // hkv
    k1 = sel.shape[-1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if POISON:
        out.fill_(float("nan"))
    if bsz == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    first = first.to(torch.int64).contiguous()
    n_real = n_real.to(torch.int64).contiguous()
    sel = sel.contiguous()
    sms = _sm_count(q.device)
    entries = 1 + group * k1
    n_sub = _attn_splits(bsz * hkv, 1 + k1, block_size, sms)
    chunk = block_size // n_sub
    bn, warps, stages = _attn_tile(d, chunk)
    n_part = entries * n_sub
    part_o = torch.empty(bsz * hq * n_part, d, dtype=torch.float32, device=q.device)
    part_l = torch.empty(bsz * hq * n_part, dtype=torch.float32, device=q.device)
    if POISON:
        part_o.fill_(float("nan"))
        part_l.fill_(float("nan"))
    gp = max(16, triton.next_power_of_2(group))
    _attend_kernel[(bsz * hkv, entries, n_sub)](
        q, key, value, first, n_real, sel if k1 else n_real, part_o, part_l,
        hq, hkv, max(k1, 1), block_size, chunk, float(scale) * LOG2E,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        GROUP=group, GP=gp, D=d, BN=bn, KP=max(2, triton.next_power_of_2(k1)), HAS_SEL=k1 > 0,
        IEEE=key.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    combine_partials(part_o, part_l, out, n_part)
    return out


def combine_partials(part_o: torch.Tensor, part_l: torch.Tensor, out: torch.Tensor,
                     n_part: int) -> torch.Tensor:
    """``out [B, Hq, D]`` = LSE merge of ``n_part`` partials per (row, head):
    ``part_o [B*Hq*n_part, D]`` fp32 normalised outputs, ``part_l [B*Hq*n_part]`` their
    log2-domain LSE (``-inf``: empty partial, output not read)."""
    bsz, hq, d = out.shape
    _combine_kernel[(bsz * hq,)](
        part_o, part_l, out, n_part, hq, out.stride(0), out.stride(1),
        D=d, BP=16 if d <= 128 else 8, num_warps=4,
    )
    return out


def moba_decode_triton(q, key, value, first, n_real, centroids, *, block_size: int, topk: int,
                       scale: float) -> torch.Tensor:
    """One MoBA decode step per row with the Triton kernels (contract of
    ``integrations.transformers.moba_decode_attention``).

    Args:
        q: ``[B, Hq, D]``, the query at real position ``n_real[b] - 1`` of row ``b``.
        key, value: ``[B, Hkv, Tk, D]`` cache (float16, bfloat16 or float32, last dim
            contiguous); the real tokens of row ``b`` are slots
            ``first[b] .. first[b] + n_real[b] - 1``.
        first, n_real: ``[B]`` integer tensors on q's device.
        centroids: ``[B, NB, Hkv, D]`` fp32 mean keys of the row's full blocks; every block
            before the query's own block must be there (more columns are ignored).
        block_size: a multiple of 16. topk: blocks attended, counting the own block
            (``topk - 1 <= 256``). scale: softmax scale.

    q is scored against the centroids in fp32 and cast to the cache dtype for attention.
    Returns ``[B, Hq, D]`` in q's dtype; rows with ``n_real == 0`` get zeros. Raises
    ``ValueError`` for shapes that do not fit together or configs the kernels do not cover
    (head dim not a power of two in [16, 256], other dtypes, non-CUDA tensors outside the
    interpreter). No host synchronisation.
    """
    _check(q, key, value, first, n_real, centroids, block_size, topk)
    sel = decode_select_triton(q, centroids, n_real, block_size=block_size, topk=topk)
    return decode_attend_triton(q, key, value, first, n_real, sel, block_size=block_size,
                                scale=scale)


__all__ = [
    "combine_partials",
    "decode_attend_triton",
    "decode_select_triton",
    "moba_decode_triton",
    "unsupported_reason",
]
