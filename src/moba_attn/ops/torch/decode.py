"""MoBA over a KV cache in PyTorch: the last ``Tq`` positions of every cache row.

Same contract as ``ops/triton/decode.py``. Each query gathers only the keys of its own block
(causal) and of the ``k-1`` blocks its gate picks from the cached centroids, so a step reads
O(Tk / B) centroids and O(k * B) keys per head; rows are processed in chunks whose gathered
keys fit ``config.torch_part_elems``.
"""

from __future__ import annotations

import torch

from ..config import MobaConfig
from .gate import top_blocks


def _positions(cache_seqlens, cache_leftpad, tq: int):
    """``(start [B], t [B, Tq])``: first real slot of each row and each query's position."""
    end = cache_seqlens.long()
    start = torch.zeros_like(end) if cache_leftpad is None else cache_leftpad.long()
    i = torch.arange(tq, device=end.device)
    return start, (end - start)[:, None] - tq + i[None, :]


def update_centroids(centroids, k_cache, old_seqlens, new_seqlens, cache_leftpad, *,
                     block_size: int, max_new_blocks: int) -> torch.Tensor:
    """Write (in place) the centroids of the blocks that became full between ``old`` and
    ``new`` valid lengths, at most ``max_new_blocks`` per row (tensor ops only: no sync)."""
    bsz, tmax, _, _ = k_cache.shape
    n_cent = centroids.shape[1]
    if bsz == 0 or n_cent == 0:
        return centroids
    start = torch.zeros_like(new_seqlens.long()) if cache_leftpad is None else cache_leftpad.long()
    old = old_seqlens.long() - start
    new = new_seqlens.long() - start
    rows = torch.arange(bsz, device=k_cache.device)
    off = torch.arange(block_size, device=k_cache.device)
    for o in range(max_new_blocks):
        j = torch.div(old, block_size, rounding_mode="floor") + o  # [B]
        full = (j < torch.div(new, block_size, rounding_mode="floor")) & (j < n_cent) & (old >= 0)
        jc = j.clamp(0, n_cent - 1)
        slot = (start[:, None] + jc[:, None] * block_size + off).clamp_(0, tmax - 1)  # [B, bs]
        mean = k_cache[rows[:, None], slot].sum(1, dtype=torch.float32) / block_size
        centroids[rows, jc] = torch.where(full[:, None, None], mean, centroids[rows, jc])
    return centroids


def kvcache(q, k_cache, v_cache, cache_seqlens, cache_leftpad, centroids, *, block_size: int,
            topk: int, scale: float, config: MobaConfig):
    """``(out [B, Tq, Hq, D] in q's dtype, lse [B * Tq, Hq] fp32)`` of MoBA over the cache.

    q ``[B, Tq, Hq, D]``; k/v_cache ``[B, Tmax, Hkv, D]``; the real tokens of row ``b`` are
    slots ``[cache_leftpad[b], cache_seqlens[b])``; centroids ``[B, NB, Hkv, D]`` fp32."""
    bsz, tq, hq, d = q.shape
    tmax, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    start, t = _positions(cache_seqlens, cache_leftpad, tq)  # [B], [B, Tq]
    nb = centroids.shape[1]
    m = max(min(topk - 1, nb), 0)
    n_sel = 1 + m
    step = max(1, config.torch_part_elems // max(tq * hq * n_sel * block_size * d, 1))
    outs, lses = [], []
    for b0 in range(0, bsz, step):
        b1 = min(bsz, b0 + step)
        o, l_ = _rows(q[b0:b1], k_cache[b0:b1], v_cache[b0:b1], start[b0:b1], t[b0:b1],
                      centroids[b0:b1], block_size, m, scale, cdt, tmax, hkv, g)
        outs.append(o)
        lses.append(l_)
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses) if lses else q.new_zeros(0, hq, dtype=torch.float32)
    return out.to(q.dtype), lse.reshape(bsz * tq, hq)


def _rows(q, kc, vc, start, t, cent, block_size, m, scale, cdt, tmax, hkv, g):
    bsz, tq, hq, d = q.shape
    dev = q.device
    own = t.clamp(min=0) // block_size  # [B, Tq]
    blocks = own[:, :, None, None, None].expand(bsz, tq, hkv, g, 1)
    ok = torch.ones_like(blocks, dtype=torch.bool)
    if m > 0:
        qg = q.float().view(bsz, tq, hkv, g, d)
        scores = torch.einsum("btkgd,bnkd->btkgn", qg, cent)  # [B, Tq, Hkv, g, NB] fp32
        cand = torch.arange(cent.shape[1], device=dev) < own[..., None]  # strictly earlier
        idx, found = top_blocks(scores, cand[:, :, None, None, :], m)
        blocks = torch.cat([blocks, idx], -1)
        ok = torch.cat([ok, found], -1)
    n_sel = blocks.shape[-1]
    pos = blocks[..., None] * block_size + torch.arange(block_size, device=dev)  # [..., S, bs]
    tok_ok = ok[..., None] & (pos <= t[:, :, None, None, None, None])
    slot = (start[:, None, None, None, None, None] + pos).clamp_(0, max(tmax - 1, 0))
    slot = slot.reshape(bsz, tq, hkv, g, n_sel * block_size)
    bi = torch.arange(bsz, device=dev)[:, None, None, None, None]
    hi = torch.arange(hkv, device=dev)[None, None, :, None, None]
    ks = kc[bi, slot, hi].to(cdt)  # [B, Tq, Hkv, g, N, D]
    vs = vc[bi, slot, hi].to(cdt)
    qc = q.to(cdt).view(bsz, tq, hkv, g, 1, d)
    s = (qc * ks).sum(-1) * scale  # [B, Tq, Hkv, g, N]
    s = s.masked_fill(~tok_ok.reshape(s.shape), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for a query with no keys
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.einsum("btkgn,btkgnd->btkgd", p, vs).reshape(bsz, tq, hq, d)
    return out, lse.reshape(bsz, tq, hq).float()


__all__ = ["kvcache", "update_centroids"]
