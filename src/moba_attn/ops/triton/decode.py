"""Launchers of the KV-cache kernels: MoBA for the last ``Tq`` positions of each cache row.

A query row is one (cache row, query) pair; each runs the decode step: an exact fp32 gate
over the row's cached centroids, then split-KV attention over the union of the blocks its
kv group chose, then an LSE combine:

1. ``_kv_gate_kernel``, grid ``(rows, Hkv, SG)``: the ``g = Hq / Hkv`` query heads of one kv
   group as one ``[GP, D]`` tile scored in IEEE fp32 against ``BN`` centroids at a time, a
   running top-(k-1) per head in registers (int64 keys: ties to the lower block, NaN last).
   When few (row, kv head) pairs cannot fill the GPU the centroids are scanned in ``SG``
   ranges and ``_kv_gate_merge_kernel`` keeps the best k-1 of them.
2. ``_kv_attend_kernel``, grid ``(rows * Hkv, 1 + g * (k-1), NSUB)``: the own block (causal)
   and every chosen block, each read once per kv group, cut into ``NSUB`` token chunks when
   few rows would leave SMs idle; partial outputs and log2-domain LSEs.
3. ``_kv_combine_kernel``, grid ``(rows * Hq,)``: LSE merge into the output and its LSE.

Three launches (four with a split gate), no host synchronisation: a step can be captured in
a CUDA graph. ``update_centroids`` adds the centroids of blocks that filled (one launch).
"""

from __future__ import annotations

import torch
import triton

from ..config import MobaConfig
from . import kernels, schedule

LOG2E = 1.4426950408889634


def _rows_view(q: torch.Tensor) -> torch.Tensor:
    """``[B, Tq, Hq, D]`` -> ``[B * Tq, Hq, D]`` with a unit last stride."""
    b, tq, hq, d = q.shape
    q = q.reshape(b * tq, hq, d)
    return q if q.stride(-1) == 1 else q.contiguous()


def select(q, centroids, cache_seqlens, cache_leftpad, *, block_size: int, topk: int,
           config: MobaConfig) -> torch.Tensor:
    """Blocks each (query row, query head) picks: ``[B * Tq, Hq, k-1]`` int32 block indices
    (inside the cache row) sorted by decreasing score, ``-1`` unused, ``k-1 = min(topk - 1,
    NB)``. q ``[B, Tq, Hq, D]``; centroids ``[B, NB, Hkv, D]`` fp32."""
    bsz, tq, hq, d = q.shape
    n_cent, hkv = centroids.shape[1], centroids.shape[2]
    rows = bsz * tq
    k1 = min(topk - 1, n_cent)
    sel = torch.empty(rows, hq, max(k1, 0), dtype=torch.int32, device=q.device)
    if k1 <= 0 or rows == 0:
        return sel
    qr = _rows_view(q)
    if centroids.stride(-1) != 1:
        centroids = centroids.contiguous()
    group = hq // hkv
    gp = max(16, triton.next_power_of_2(group))
    kp = max(2, triton.next_power_of_2(k1))
    bn = 16 if schedule.interpreting() else (64 if d <= 128 else 32)
    sg = schedule.decode_gate_splits(rows * hkv, n_cent, schedule.sm_count(q.device), config)
    per_split = triton.cdiv(triton.cdiv(n_cent, sg), bn) * bn
    keys = torch.empty(rows * hq * sg * kp if sg > 1 else 1, dtype=torch.int64,
                       device=q.device)
    pad = cache_leftpad is not None
    kernels._kv_gate_kernel[(rows, hkv, sg)](
        Q=qr, C=centroids, SEQLENS=cache_seqlens, LEFTPAD=cache_leftpad if pad else cache_seqlens,
        SEL=sel, KEYS=keys, hq=hq, n_cent=n_cent, K1=k1, block_size=block_size,
        blocks_per_split=per_split, TQ=tq, stride_qr=qr.stride(0), stride_qh=qr.stride(1),
        stride_cb=centroids.stride(0), stride_cn=centroids.stride(1),
        stride_ch=centroids.stride(2), GROUP=group, GP=gp, D=d, BN=bn, KP=kp, SPLIT=sg > 1,
        HAS_PAD=pad, num_warps=4,
    )
    if sg > 1:
        kernels._kv_gate_merge_kernel[(rows * hq,)](KEYS=keys, SEL=sel, K1=k1, NK=sg * kp, KP=kp,
                                                   num_warps=4)
    return sel


def attend(q, k_cache, v_cache, cache_seqlens, cache_leftpad, sel, *, block_size: int,
           scale: float, config: MobaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention given the selection (as :func:`select` returns): ``(out [B, Tq, Hq, D] in
    q's dtype, lse [B * Tq, Hq] fp32 natural log)``. k/v_cache ``[B, Tmax, Hkv, D]``, any
    strides with a unit last stride."""
    bsz, tq, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    rows = bsz * tq
    k1 = sel.shape[-1]
    out = torch.empty(rows, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(rows, hq, dtype=torch.float32, device=q.device)
    if rows == 0:
        return out.view(bsz, tq, hq, d), lse
    qr = _rows_view(q)
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    sms = schedule.sm_count(q.device)
    entries = 1 + group * k1
    n_sub = schedule.decode_attn_splits(rows * hkv, 1 + k1, block_size, sms, config)
    chunk = block_size // n_sub
    bn, warps, stages = schedule.decode_attn_tile(d, chunk, config)
    n_part = entries * n_sub
    part_o = torch.empty(rows * hq * n_part, d, dtype=torch.float32, device=q.device)
    part_l = torch.empty(rows * hq * n_part, dtype=torch.float32, device=q.device)
    pad = cache_leftpad is not None
    kernels._kv_attend_kernel[(rows * hkv, entries, n_sub)](
        Q=qr, K=k_cache, V=v_cache, SEQLENS=cache_seqlens,
        LEFTPAD=cache_leftpad if pad else cache_seqlens, SEL=sel if k1 else cache_seqlens,
        PO=part_o, PL=part_l, hq=hq, hkv=hkv, K1=max(k1, 1), block_size=block_size,
        chunk=chunk, scale2=float(scale) * LOG2E, TQ=tq, stride_qr=qr.stride(0),
        stride_qh=qr.stride(1), stride_kb=k_cache.stride(0), stride_kt=k_cache.stride(1),
        stride_kh=k_cache.stride(2), stride_vb=v_cache.stride(0), stride_vt=v_cache.stride(1),
        stride_vh=v_cache.stride(2), GROUP=group, GP=max(16, triton.next_power_of_2(group)),
        D=d, BN=bn, KP=max(2, triton.next_power_of_2(k1)), HAS_SEL=k1 > 0,
        IEEE=k_cache.dtype == torch.float32, HAS_PAD=pad, num_warps=warps, num_stages=stages,
    )
    kernels._kv_combine_kernel[(rows * hq,)](
        PO=part_o, PL=part_l, O=out, LSE=lse, n_part=n_part, hq=hq, stride_or=out.stride(0),
        stride_oh=out.stride(1), D=d, BP=16 if d <= 128 else 8, num_warps=4,
    )
    return out.view(bsz, tq, hq, d), lse


def update_centroids(centroids, k_cache, old_seqlens, new_seqlens, cache_leftpad, *,
                     block_size: int, max_new_blocks: int) -> torch.Tensor:
    """Write (in place) the centroids of the blocks that became full between ``old`` and
    ``new`` valid lengths, at most ``max_new_blocks`` per row."""
    bsz, _, hkv, d = k_cache.shape
    if bsz == 0 or max_new_blocks <= 0 or centroids.shape[1] == 0:
        return centroids
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    pad = cache_leftpad is not None
    kernels._kv_centroid_kernel[(max_new_blocks, bsz, hkv)](
        K=k_cache, C=centroids, OLD=old_seqlens, NEW=new_seqlens,
        LEFTPAD=cache_leftpad if pad else new_seqlens, n_cent=centroids.shape[1],
        block_size=block_size, stride_kb=k_cache.stride(0), stride_kt=k_cache.stride(1),
        stride_kh=k_cache.stride(2), stride_cb=centroids.stride(0),
        stride_cn=centroids.stride(1), stride_ch=centroids.stride(2), D=d,
        BT=32 if schedule.interpreting() else 64, HAS_PAD=pad, num_warps=4,
    )
    return centroids


__all__ = ["attend", "select", "update_centroids"]
