"""MoBA gating in Triton: fp32 block centroids and a fused score + top-(k-1) kernel.

Same rule and output as ``gate.select_blocks`` (see ``naive.py``): for every (query row,
query head) the ``k-1`` strictly-earlier blocks of the row's sequence with the highest fp32
score ``<q, centroid>``, ties to the lower block index, as global block ids sorted by
decreasing score, ``-1`` for unused slots.

The score tile ``[BM rows, BN blocks]`` comes from one ``tl.dot`` (TF32 tensor cores by
default; ``MOBA_GATE_PRECISION=ieee`` or ``set_gate_precision("ieee")`` forces full fp32)
and never leaves registers: each score becomes an int64 key
``(order-preserving fp32 bits << 32) | (2^32 - 1 - block)``, so "higher key" is exactly
"higher score, then lower block index", and a running top-(k-1) per row is kept in
registers. No ``[T, #blocks]`` matrix is written to memory.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gate import BlockLayout

_PRECISIONS = ("tf32", "ieee")
_gate_precision = os.environ.get("MOBA_GATE_PRECISION", "tf32").strip().lower() or "tf32"
if _gate_precision not in _PRECISIONS:
    raise ValueError(f"MOBA_GATE_PRECISION must be one of {_PRECISIONS}, got {_gate_precision!r}")

POISON = False  # debugging/tests: fill outputs with garbage before the kernels write them
GATE_TILE: tuple[int, int, int] | None = None  # (BM, BN, num_warps) override, for tuning
MAX_GATE_SLOTS = 256  # k-1 above this uses the torch gate (the running set lives in registers)


def set_gate_precision(precision: str) -> None:
    """Gate score precision on the GPU: ``"tf32"`` (tensor cores, default) or ``"ieee"``."""
    global _gate_precision
    p = str(precision).strip().lower()
    if p not in _PRECISIONS:
        raise ValueError(f"gate precision must be one of {_PRECISIONS}, got {precision!r}")
    _gate_precision = p


def get_gate_precision() -> str:
    return _gate_precision


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernels
# Top-(k-1) building blocks, shared with the decode gate (``triton_decode``). A key is
# ``(order-preserving fp32 bits << 32) | (2^32 - 1 - block)``: distinct per block, and
# "higher key" is "higher score, then lower block". The running set starts with distinct
# sentinels ``-2^63 + 1 + j`` below every real key.
@triton.jit
def _score_keys(s, bidx):
    """int64 keys of fp32 scores ``s`` for block ids ``bidx`` (broadcast to ``s``'s shape)."""
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(s == 0.0, 0, bits)  # -0.0 and +0.0 are one score
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
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


# ----------------------------------------------------------------------------- launchers
def block_centroids_triton(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean key of every block in fp32: ``[n_blocks, Hkv, D]`` (as ``gate.block_centroids``)."""
    _, hkv, d = k.shape
    cent = torch.empty(layout.n_blocks, hkv, d, dtype=torch.float32, device=k.device)
    if POISON:
        cent.fill_(float("nan"))
    if layout.n_blocks == 0 or k.shape[0] == 0:
        return cent.zero_()
    if k.stride(2) != 1:
        k = k.contiguous()
    bt = 32 if _interpreting() else 64
    _centroid_kernel[(layout.n_blocks, hkv)](
        k, cent, layout.blk_start, layout.blk_len, k.stride(0), k.stride(1),
        cent.stride(0), cent.stride(1), D=d, BT=bt, num_warps=4,
    )
    return cent


def gate_supported(d: int, topk: int) -> str | None:
    """``None`` when the Triton gate handles this config, else the reason it does not."""
    if d < 16 or d > 256 or d & (d - 1):
        return f"head dim {d} is not a power of two in [16, 256]"
    if topk - 1 > MAX_GATE_SLOTS:
        return f"topk={topk} is above {MAX_GATE_SLOTS + 1}"
    return None


def select_blocks_triton(q: torch.Tensor, centroids: torch.Tensor, layout: BlockLayout,
                         topk: int, precision: str | None = None) -> torch.Tensor:
    """Top-(k-1) earlier blocks of every row: ``[total_q, Hq, k-1]`` int64 global ids, -1 unused.

    q: ``[total_q, Hq, D]`` (any float dtype; scored in fp32); centroids: ``[n_blocks, Hkv, D]``
    fp32. ``precision``: ``"tf32"`` or ``"ieee"``; defaults to the module setting.
    """
    total_q, hq, d = q.shape
    hkv = centroids.shape[1]
    k1 = max(topk - 1, 0)
    sel = torch.empty(total_q, hq, k1, dtype=torch.int64, device=q.device)
    if POISON:
        sel.fill_(-7)
    if k1 == 0 or total_q == 0:
        return sel
    if layout.n_blocks == 0:
        return sel.fill_(-1)
    prec = _gate_precision if precision is None else precision
    if prec not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if q.stride(2) != 1:
        q = q.contiguous()
    centroids = centroids.contiguous()
    kp = max(2, triton.next_power_of_2(k1))
    if _interpreting():
        bm, bn, warps = 32, 16, 4
    else:
        bm = 64 if kp <= 64 else 32
        bn = 32 if d <= 128 else 16
        warps = 4
        if GATE_TILE is not None:
            bm, bn, warps = GATE_TILE
    grid = (triton.cdiv(total_q, bm), hq)
    _gate_topk_kernel[grid](
        q, centroids, layout.row_own, layout.row_first, sel, total_q, k1,
        q.stride(0), q.stride(1), centroids.stride(0), centroids.stride(1),
        sel.stride(0), sel.stride(1),
        GROUP=hq // hkv, D=d, BM=bm, BN=bn, KP=kp, IEEE=(prec == "ieee"), num_warps=warps,
    )
    return sel


def gate_triton(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, topk: int,
                precision: str | None = None) -> torch.Tensor:
    """Centroids + selection in Triton; same output as ``torch_impl._gate_all``."""
    return select_blocks_triton(q, block_centroids_triton(k, layout), layout, topk, precision)


__all__ = [
    "block_centroids_triton",
    "gate_supported",
    "gate_triton",
    "get_gate_precision",
    "select_blocks_triton",
    "set_gate_precision",
]
