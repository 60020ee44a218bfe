"""Triton backward pass of exact MoBA: ``dq, dk, dv`` from the forward's ``out`` and ``lse``.

Math (flash-attention backward, exact because ``lse`` is the row's final LSE over *all* the
keys it attends): for every (query row, head) and every key it attends,
``P = exp(scale * q.k - lse)``, ``dV += P dO``, ``dP = dO . v``, ``dS = P * (dP - Delta)``
with ``Delta = rowsum(dO * O)``, ``dQ += scale * dS K``, ``dK += scale * dS^T Q``.

Schedule. An *entry* is one (row, head, slot): slot 0 is the row's own block (keys up to the
row's position, causal), slots 1..k-1 the selected earlier blocks (whole). Entry id
``e = (row * Hq + head) * k + slot``. Entries are sorted by *group* = (key block, kv head),
row-major inside a group (a CSR list, built on the device by one sort), and decoded once into
contiguous per-entry arrays (flat row*Hq+head, causal key limit), so that the kernels' inner
loops do no integer division and no dependent gather before the q/dO rows (4-5x faster dK/dV
than decoding ids in the loop, H200 sweep):

- ``_dkdv_kernel``: one program per (group, key sub-tile of ``BLOCK_N`` keys), the sub-tiles
  of a group adjacent in launch order. It loads that
  K/V tile once, streams the group's entries in tiles of ``BLOCK_M`` gathered query rows and
  accumulates dK/dV in registers. Every key token belongs to exactly one block, so each output
  row is written by exactly one program: no atomics, deterministic, GQA summed for free
  (the group holds the entries of every query head of that kv head).
- ``_dq_kernel``: one program per tile of ``BLOCK_M`` entries of one group; it loops over the
  block's keys (only up to the furthest causal limit for own-block tiles) and produces the
  entries' dQ. Default: ``atomic_add`` into an fp32 ``[total_q * Hq, D]`` buffer (at most k
  adds per row). ``deterministic=True``: each entry's dQ goes to its own slot of a
  ``[rows, Hq, k, D]`` fp32 buffer (row-chunked to bound memory), summed in slot order.
- ``_delta_kernel``: ``Delta = rowsum(dO * O)`` in fp32 without materialising fp32 copies.

Unsupported cases (fp64, head dim > 256, tensors neither on CUDA nor under the interpreter)
fall back to ``torch_impl._backward`` with a one-time warning naming the reason.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from .gate import BlockLayout

LOG2E = 1.4426950408889634
# Bytes of the fp32 per-slot dQ buffer of deterministic mode before it is cut into row chunks.
DQ_PART_BYTES = 1 << 31
MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Tile shapes ``(BLOCK_M entries, BLOCK_N keys, num_warps, num_stages)`` per kernel, per
# block-size regime ("small": B < 512, where programs are short and gather-bound; "large":
# long compute-bound loops) and per padded head dim. ``KERNEL_CONFIG`` is overridable
# (benchmarks/gpu_backward.py sweeps it). From its H200 sweeps (2026-11-28): dQ at D=128 (batch
# 2 x 16 heads x 128K, B=128, k=8; 8 heads x 128K, B=4096, k=12); dK/dV with pre-decoded
# entries (``--dkdv-tiles``) at D=128 in both regimes (the same two cases) and at D=64, large
# (batch 8 x 8K, 10/2 heads, B=512, k=3). The other head dims keep untuned shapes.
KERNEL_CONFIG = {
    ("dkdv", "small"): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 128, 8, 2),
                        128: (64, 64, 4, 3), 256: (32, 64, 8, 1)},
    ("dq", "small"): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2),
                      128: (64, 64, 4, 2), 256: (64, 32, 8, 1)},
    ("dkdv", "large"): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (32, 128, 4, 3),
                        128: (64, 64, 4, 3), 256: (32, 64, 8, 1)},
    ("dq", "large"): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (128, 64, 8, 2),
                      128: (128, 64, 8, 2), 256: (64, 32, 8, 1)},
}
LARGE_BLOCK = 512
_INTERPRET_CONFIG = (32, 32, 4, 1)  # small tiles keep the CPU interpreter quick
_empty_like = torch.empty_like  # outputs every element of which a kernel writes (tests poison it)


# ----------------------------------------------------------------------------- kernels
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
               TILE_GRP, TILE_START, sm_scale, scale_log2, HKV, D,
               EID_BASE, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    t = tl.program_id(0)
    g = tl.load(TILE_GRP + t)  # int64 group of this tile
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


# ----------------------------------------------------------------------------- launchers
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"moba_backward_triton: {reason}; using the torch backward instead",
                      stacklevel=3)


def _unsupported(q: torch.Tensor) -> str | None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported by the Triton kernels (fp16/bf16/fp32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the Triton kernels"
    if q.device.type != "cuda" and not _interpreting():
        return f"tensors on {q.device.type} need CUDA (or TRITON_INTERPRET=1)"
    return None


def _config(kernel: str, block_d: int, block_size: int):
    if _interpreting():
        return _INTERPRET_CONFIG
    return KERNEL_CONFIG[(kernel, "large" if block_size >= LARGE_BLOCK else "small")][block_d]


class _Entries:
    """Entries of query rows ``r0:r1`` sorted by group (block, kv head), as a CSR list.

    ``grp_off [n_groups + 1]``: each group's range. Decoded once here so the kernels' inner
    loops read them contiguously: ``rh`` (flat ``row * Hq + head``; int32 when it fits) and
    ``lim`` (int32 causal key limit inside the block: the row's offset + 1 for its own block,
    the block size for a selected one). ``ent``: the sorted entry ids (int64, global), kept
    only with ``keep_ids`` (the deterministic dQ writes each entry to its own slot).
    """

    def __init__(self, layout: BlockLayout, sel: torch.Tensor, r0: int, r1: int, hq: int,
                 hkv: int, topk: int, keep_ids: bool = True):
        dev = sel.device
        n = r1 - r0
        n_groups = layout.n_blocks * hkv
        gb = torch.empty(n, hq, topk, dtype=torch.int64, device=dev)
        gb[:, :, 0] = layout.row_own[r0:r1, None]
        if topk > 1:
            gb[:, :, 1:] = sel[r0:r1]
        head_kv = torch.arange(hq, device=dev) // (hq // hkv)
        grp = gb * hkv + head_kv[None, :, None]
        grp = torch.where(gb >= 0, grp, n_groups).reshape(-1)  # unused slots sort last
        del gb
        n_ent = n * hq * topk
        # one sort on (group, local entry id): unique keys, so a plain (radix) sort is exact
        key = grp * n_ent + torch.arange(n_ent, device=dev)
        del grp
        key = torch.sort(key).values
        grp_sorted = key // n_ent
        self.ent = key - grp_sorted * n_ent + r0 * hq * topk  # global entry ids
        del key
        self.grp_off = torch.searchsorted(
            grp_sorted, torch.arange(n_groups + 1, device=dev, dtype=torch.int64))
        del grp_sorted
        self.n_groups = n_groups
        rh = torch.div(self.ent, topk, rounding_mode="floor")
        slot = self.ent - rh * topk
        lim = torch.where(slot == 0, layout.row_pos[torch.div(rh, hq, rounding_mode="floor")]
                          % layout.block_size + 1, layout.block_size)
        del slot
        self.lim = lim.to(torch.int32)
        del lim
        self.rh = rh.to(torch.int32) if layout.row_pos.numel() * hq < 2**31 else rh
        if not keep_ids:
            self.ent = None

    def tiles(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(group, first entry)`` of every tile of ``block_m`` entries (tiles never span
        two groups)."""
        counts = self.grp_off[1:] - self.grp_off[:-1]
        per = (counts + block_m - 1) // block_m
        first = torch.cumsum(per, 0) - per
        n_tiles = int(per.sum())  # one device -> host sync (the grid size)
        grp = torch.repeat_interleave(torch.arange(self.n_groups, device=per.device), per,
                                      output_size=n_tiles)
        rank = torch.arange(n_tiles, device=per.device) - first[grp]
        start = self.grp_off[grp] + rank * block_m
        return grp, start


def _launch_dq(q, k, v, dout, dq_buf, lse2, delta, layout, ents, scale, atomic, eid_base,
               block_d, precision):
    bm, bn, warps, stages = _config("dq", block_d, layout.block_size)
    grp, start = ents.tiles(bm)
    if grp.numel() == 0:
        return
    hkv, d = k.shape[1], q.shape[2]
    _dq_kernel[(grp.numel(),)](
        q, k, v, dout, dq_buf, lse2, delta, ents.rh, ents.lim,
        ents.rh if atomic else ents.ent,  # the ids are read only without atomics
        layout.blk_start, layout.blk_len, ents.grp_off, grp, start, scale, scale * LOG2E, hkv,
        d, eid_base, ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        PRECISION=precision, num_warps=warps, num_stages=stages)


def _launch_dkdv(q, k, v, dout, dk, dv, lse2, delta, layout, ents, scale, block_d, precision):
    bm, bn, warps, stages = _config("dkdv", block_d, layout.block_size)
    n_sub = triton.cdiv(layout.width, bn)
    hkv, d = k.shape[1], q.shape[2]
    _dkdv_kernel[(ents.n_groups * n_sub,)](
        q, k, v, dout, dk, dv, lse2, delta, ents.rh, ents.lim, layout.blk_start, layout.blk_len,
        ents.grp_off, scale, scale * LOG2E, hkv, d, n_sub,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PRECISION=precision, num_warps=warps,
        num_stages=stages)


def moba_backward_triton(q, k, v, out, lse, dout, layout: BlockLayout, sel, topk: int,
                         scale: float, deterministic: bool):
    """Exact MoBA gradients with Triton kernels; same contract as ``torch_impl._backward``.

    Args:
        q, out, dout: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]``.
        lse: ``[Hq, total_q]`` natural-log LSE over the attended keys (fp32).
        layout: the batch's ``BlockLayout``; sel: ``[total_q, Hq, k-1]`` global block ids of
            the selected earlier blocks (-1 = unused; order irrelevant); the own block is
            implied (causal inside it).
        topk: blocks per query counting the own block; scale: softmax scale.
        deterministic: fixed-order dQ reduction (no atomics anywhere); dK/dV never use atomics.

    Returns:
        ``(dq, dk, dv)`` in the dtypes of ``q, k, v``.
    """
    reason = _unsupported(q)
    if reason is not None:
        _warn_once(reason)
        from .torch_impl import _backward

        return _backward(q, k, v, out, lse, dout, layout, sel, topk, scale, deterministic)

    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    if total_q == 0 or total_k == 0 or layout.n_blocks == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
    block_d = max(16, triton.next_power_of_2(d))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    dev = q.device
    sel = sel.to(device=dev, dtype=torch.int64)

    lse2 = (lse.t().to(torch.float32) * LOG2E).contiguous()  # [total_q, Hq], log2 units
    delta = torch.empty(total_q * hq, dtype=torch.float32, device=dev)
    block_r = 64
    _delta_kernel[(triton.cdiv(total_q * hq, block_r),)](
        out, dout, delta, total_q * hq, d, BLOCK_R=block_r, BLOCK_D=block_d)

    ents = _Entries(layout, sel, 0, total_q, hq, hkv, topk,
                    keep_ids=deterministic)

    dk = _empty_like(k)
    dv = _empty_like(v)
    _launch_dkdv(q, k, v, dout, dk, dv, lse2, delta, layout, ents, scale, block_d, precision)

    if not deterministic:
        dq = torch.zeros(total_q, hq, d, dtype=torch.float32, device=dev)
        _launch_dq(q, k, v, dout, dq, lse2, delta, layout, ents, scale, True, 0, block_d,
                   precision)
        return dq.to(q.dtype), dk, dv

    dq = _empty_like(q)
    step = max(1, DQ_PART_BYTES // (hq * topk * d * 4))
    for r0 in range(0, total_q, step):
        r1 = min(total_q, r0 + step)
        part_ents = ents if (r0 == 0 and r1 == total_q) else _Entries(
            layout, sel, r0, r1, hq, hkv, topk)
        part = torch.zeros(r1 - r0, hq, topk, d, dtype=torch.float32, device=dev)
        _launch_dq(q, k, v, dout, part, lse2, delta, layout, part_ents, scale, False,
                   r0 * hq * topk, block_d, precision)
        dq[r0:r1] = part.sum(2).to(q.dtype)  # fixed slot order: deterministic
    return dq, dk, dv


__all__ = ["KERNEL_CONFIG", "moba_backward_triton"]
