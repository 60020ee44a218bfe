"""The MoBA gate on the GPU: fp32 block centroids and a fused score + top-(k-1) kernel.

Same rule and output as ``ops/torch/gate.select_blocks``: for every (query row, query head)
the ``k-1`` strictly-earlier blocks of the row's sequence with the highest fp32 score
``<q, centroid>``, ties to the lower block index, NaN scores last, as global block ids sorted
by decreasing score, ``-1`` for unused slots. The score tile ``[BM rows, BN blocks]`` comes
from one ``tl.dot`` (TF32 tensor cores unless ``config.gate_precision == "ieee"``) and never
leaves registers: no ``[T, #blocks]`` matrix is written.
"""

from __future__ import annotations

import torch
import triton

from ..config import MobaConfig
from ..layout import BlockLayout
from . import kernels, schedule


def block_centroids(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean key of every block in fp32: ``[n_blocks, Hkv, D]``."""
    _, hkv, d = k.shape
    cent = torch.empty(layout.n_blocks, hkv, d, dtype=torch.float32, device=k.device)
    if layout.n_blocks == 0 or k.shape[0] == 0:
        return cent.zero_()
    if k.stride(2) != 1:
        k = k.contiguous()
    kernels._centroid_kernel[(layout.n_blocks, hkv)](
        K=k, C=cent, BLK_START=layout.blk_start, BLK_LEN=layout.blk_len,
        stride_kt=k.stride(0), stride_kh=k.stride(1), stride_cb=cent.stride(0),
        stride_ch=cent.stride(1), D=d, BT=32 if schedule.interpreting() else 64, num_warps=4,
    )
    return cent


def select_blocks(q: torch.Tensor, centroids: torch.Tensor, layout: BlockLayout, topk: int,
                  config: MobaConfig) -> torch.Tensor:
    """Top-(k-1) earlier blocks of every row: ``[total_q, Hq, k-1]`` int64 global ids, -1 unused.

    q: ``[total_q, Hq, D]`` (any float dtype; scored in fp32); centroids ``[n_blocks, Hkv, D]``
    fp32.
    """
    total_q, hq, d = q.shape
    hkv = centroids.shape[1]
    k1 = max(topk - 1, 0)
    sel = torch.empty(total_q, hq, k1, dtype=torch.int64, device=q.device)
    if k1 == 0 or total_q == 0:
        return sel
    if layout.n_blocks == 0:
        return sel.fill_(-1)
    if q.stride(2) != 1:
        q = q.contiguous()
    centroids = centroids.contiguous()
    bm, bn, warps = schedule.gate_tile(d, k1, config)
    kernels._gate_topk_kernel[(triton.cdiv(total_q, bm), hq)](
        Q=q, C=centroids, ROW_OWN=layout.row_own, ROW_FIRST=layout.row_first, SEL=sel,
        total_q=total_q, K1=k1, stride_qt=q.stride(0), stride_qh=q.stride(1),
        stride_cb=centroids.stride(0), stride_ch=centroids.stride(1), stride_st=sel.stride(0),
        stride_sh=sel.stride(1), GROUP=hq // hkv, D=d, BM=bm, BN=bn,
        KP=max(2, triton.next_power_of_2(k1)), IEEE=config.gate_precision == "ieee",
        num_warps=warps,
    )
    return sel


def gate(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, topk: int,
         config: MobaConfig) -> torch.Tensor:
    """Centroids and selection: ``[total_q, Hq, k-1]`` global block ids."""
    return select_blocks(q, block_centroids(k, layout), layout, topk, config)


__all__ = ["block_centroids", "gate", "select_blocks"]
