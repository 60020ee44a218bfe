"""Launchers of the MoBA backward kernels: ``dq, dk, dv`` from the forward's ``out`` and ``lse``.

Math (flash-attention backward, exact because ``lse`` is each row's final LSE over *all* the
keys it attends): ``P = exp(scale * q.k - lse)``, ``dV += P dO``, ``dP = dO . v``,
``dS = P * (dP - Delta)`` with ``Delta = rowsum(dO * O)``, ``dQ += scale * dS K``,
``dK += scale * dS^T Q``.

Schedule. An *entry* is one (row, head, slot): slot 0 is the row's own block (causal),
slots 1..k-1 the selected earlier blocks (whole). Entries are sorted by *group* = (key
block, kv head) with one device sort into a CSR list and decoded once into contiguous arrays
(flat row*Hq+head, causal key limit), so the kernels' inner loops gather q/dO rows without a
dependent decode:

- ``_dkdv_kernel``: one program per (group, key sub-tile); it streams the group's entries
  and accumulates dK/dV in registers. Each key row is written by exactly one program: no
  atomics, deterministic, GQA summed for free.
- ``_dq_kernel``: one program per tile of entries of one group. Default: ``atomic_add``
  into an fp32 ``[total_q * Hq, D]`` buffer; ``deterministic=True``: each entry's dQ to its
  own slot of a ``[rows, Hq, k, D]`` buffer (row-chunked), summed in slot order. Its grid is
  an upper bound of the tile count (idle programs exit), so no launch syncs with the host.
- ``_delta_kernel``: ``Delta`` in fp32 without fp32 copies of O and dO.
"""

from __future__ import annotations

import torch
import triton

from ..config import MobaConfig
from ..layout import BlockLayout
from . import kernels, schedule

LOG2E = 1.4426950408889634


class Entries:
    """Entries of query rows ``r0:r1`` sorted by group (block, kv head), as a CSR list.

    ``grp_off [n_groups + 1]``: each group's range. ``rh``: flat ``row * Hq + head`` of each
    entry (int32 when it fits); ``lim``: int32 causal key limit inside the block (the row's
    offset + 1 for its own block, the block size for a selected one); ``ent``: the sorted
    global entry ids ``(row * Hq + head) * k + slot``, kept only with ``keep_ids``.
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
        self.ent = key - grp_sorted * n_ent + r0 * hq * topk
        del key
        self.grp_off = torch.searchsorted(
            grp_sorted, torch.arange(n_groups + 1, device=dev, dtype=torch.int64))
        del grp_sorted
        self.n_groups = n_groups
        self.n_ent = n_ent
        rh = torch.div(self.ent, topk, rounding_mode="floor")
        slot = self.ent - rh * topk
        lim = torch.where(slot == 0, layout.row_pos[torch.div(rh, hq, rounding_mode="floor")]
                          % layout.block_size + 1, layout.block_size)
        del slot
        self.lim = lim.to(torch.int32)
        del lim
        self.rh = rh.to(torch.int32) if layout.total_q * hq < 2**31 else rh
        if not keep_ids:
            self.ent = None

    def tiles(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(group, first entry)`` of every tile of ``block_m`` entries (tiles never span
        two groups) for a grid of ``cdiv(n_ent, block_m) + n_groups`` programs, an upper
        bound of the tile count; the group of an idle program is ``n_groups``."""
        counts = self.grp_off[1:] - self.grp_off[:-1]
        per = (counts + block_m - 1) // block_m
        tile_end = torch.cumsum(per, 0)
        n_ub = triton.cdiv(self.n_ent, block_m) + min(self.n_groups, self.n_ent)
        t = torch.arange(n_ub, device=per.device)
        grp = torch.searchsorted(tile_end, t, right=True)
        g = grp.clamp(max=max(self.n_groups - 1, 0))
        start = self.grp_off[g] + (t - (tile_end[g] - per[g])) * block_m
        return grp, start


def _launch_dq(q, k, v, dout, dq_buf, lse2, delta, layout, ents, scale, atomic, eid_base,
               block_d, precision, config):
    bm, bn, warps, stages = schedule.bwd_tile("dq", block_d, layout.block_size, config)
    grp, start = ents.tiles(bm)
    if grp.numel() == 0:
        return
    kernels._dq_kernel[(grp.numel(),)](
        Q=q, K=k, V=v, DO=dout, DQ=dq_buf, LSE2=lse2, DELTA=delta, ERH=ents.rh, ELIM=ents.lim,
        ENT=ents.rh if atomic else ents.ent,  # the ids are read only without atomics
        BLK_START=layout.blk_start, BLK_LEN=layout.blk_len, GRP_OFF=ents.grp_off,
        TILE_GRP=grp, TILE_START=start, sm_scale=scale, scale_log2=scale * LOG2E,
        HKV=k.shape[1], D=q.shape[2], N_GROUPS=ents.n_groups, EID_BASE=eid_base,
        ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PRECISION=precision,
        num_warps=warps, num_stages=stages)


def _launch_dkdv(q, k, v, dout, dk, dv, lse2, delta, layout, ents, scale, block_d, precision,
                 config):
    bm, bn, warps, stages = schedule.bwd_tile("dkdv", block_d, layout.block_size, config)
    n_sub = triton.cdiv(layout.width, bn)
    kernels._dkdv_kernel[(ents.n_groups * n_sub,)](
        Q=q, K=k, V=v, DO=dout, DK=dk, DV=dv, LSE2=lse2, DELTA=delta, ERH=ents.rh,
        ELIM=ents.lim, BLK_START=layout.blk_start, BLK_LEN=layout.blk_len,
        GRP_OFF=ents.grp_off, sm_scale=scale, scale_log2=scale * LOG2E, HKV=k.shape[1],
        D=q.shape[2], N_SUB=n_sub, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        PRECISION=precision, num_warps=warps, num_stages=stages)


def backward(q, k, v, out, lse, dout, layout: BlockLayout, sel, topk: int, scale: float,
             deterministic: bool, config: MobaConfig):
    """Exact MoBA gradients ``(dq, dk, dv)`` in the dtypes of ``q, k, v``.

    q, out, dout ``[total_q, Hq, D]``; k, v ``[total_k, Hkv, D]``; lse ``[Hq, total_q]``
    (natural log, fp32); sel ``[total_q, Hq, k-1]`` global block ids (-1 = unused; order
    irrelevant), the own block implied. ``deterministic``: fixed-order dQ reduction (no
    atomics anywhere; dK/dV never use atomics).
    """
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
    kernels._delta_kernel[(triton.cdiv(total_q * hq, block_r),)](
        OUT=out, DO=dout, DELTA=delta, n_rows=total_q * hq, D=d, BLOCK_R=block_r,
        BLOCK_D=block_d)

    ents = Entries(layout, sel, 0, total_q, hq, hkv, topk, keep_ids=deterministic)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _launch_dkdv(q, k, v, dout, dk, dv, lse2, delta, layout, ents, scale, block_d, precision,
                 config)

    if not deterministic:
        dq = torch.zeros(total_q, hq, d, dtype=torch.float32, device=dev)
        _launch_dq(q, k, v, dout, dq, lse2, delta, layout, ents, scale, True, 0, block_d,
                   precision, config)
        return dq.to(q.dtype), dk, dv

    dq = torch.empty_like(q)
    step = max(1, config.dq_part_bytes // (hq * topk * d * 4))
    for r0 in range(0, total_q, step):
        r1 = min(total_q, r0 + step)
        part_ents = ents if (r0 == 0 and r1 == total_q) else Entries(
            layout, sel, r0, r1, hq, hkv, topk)
        part = torch.zeros(r1 - r0, hq, topk, d, dtype=torch.float32, device=dev)
        _launch_dq(q, k, v, dout, part, lse2, delta, layout, part_ents, scale, False,
                   r0 * hq * topk, block_d, precision, config)
        dq[r0:r1] = part.sum(2).to(q.dtype)  # fixed slot order: deterministic
    return dq, dk, dv


__all__ = ["Entries", "backward"]
