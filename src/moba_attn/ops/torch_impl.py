"""Efficient exact MoBA in pure PyTorch (any device; the CPU path and the fallback).

Schedule (key-block-major "gather" schedule, like the original release's varlen calls):
  1. gate each chunk of query rows -> for every (row, head) k slots: its own block + up to
     k-1 selected earlier blocks, each with a key limit (own block: causal; others: whole);
  2. group the (row, head, slot) entries by (block, kv head) and cut each group into tiles of
     up to R rows; a tile is a dense ``[R, D] x [D, W]`` attention against ONE key block;
  3. per tile: scores, local max / sum -> a normalised partial output and its LSE, written to
     the entry's slot; 4. merge the k slots of each row with their LSEs.
The backward recomputes the tiles and applies the flash-attention gradient with the final
LSE: ``dS = P * (dP - rowsum(dO * O))``. Memory is O(T * H * k * D) per row chunk plus one
tile batch, never O(T^2) and never a ``[T, #blocks]`` matrix for all rows at once.
"""

from __future__ import annotations

import torch

from .gate import BlockLayout, block_centroids, gate_chunk_rows, pad_blocks, select_blocks

PART_CHUNK_ELEMS = 1 << 26  # floats of per-slot partials ([rows, Hq, k, D]) per row chunk
TILE_CHUNK_ELEMS = 1 << 23  # floats of one batch of [C, R, W] score tiles


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan:
    """Entries and tiles of one chunk of query rows ``r0:r1``."""

    def __init__(self, layout: BlockLayout, sel: torch.Tensor, r0: int, r1: int, hq: int,
                 hkv: int, topk: int):
        dev = sel.device
        n = r1 - r0
        self.r0, self.n, self.k = r0, n, topk
        own = layout.row_own[r0:r1, None, None].expand(n, hq, 1)
        gb = torch.cat([own, sel.long()], dim=2)  # [n, Hq, k] global block of each slot
        limit = torch.full_like(gb, layout.block_size)
        limit[:, :, 0] = (layout.row_pos[r0:r1] % layout.block_size + 1)[:, None]
        valid = gb >= 0
        head = torch.arange(hq, device=dev)[None, :, None]
        key = gb * hkv + head // (hq // hkv)  # tile group: (block, kv head)
        self.limit = limit.reshape(-1)
        self.valid = valid

        ent = valid.reshape(-1).nonzero().squeeze(1)  # valid entry ids
        keys = key.reshape(-1)[ent]
        keys, order = torch.sort(keys, stable=True)
        ent = ent[order]
        groups, counts = torch.unique_consecutive(keys, return_counts=True)
        mean = max(1, ent.numel() // max(groups.numel(), 1))
        rows = 16
        while rows < 128 and rows < mean:
            rows *= 2
        self.rows = rows
        tiles_per_group = (counts + rows - 1) // rows
        tile_start = torch.cumsum(tiles_per_group, 0) - tiles_per_group
        group_start = torch.cumsum(counts, 0) - counts
        gid = torch.repeat_interleave(torch.arange(groups.numel(), device=dev), counts)
        rank = torch.arange(ent.numel(), device=dev) - group_start[gid]
        tile = tile_start[gid] + rank // rows
        n_tiles = int(tiles_per_group.sum())
        self.tile_entry = torch.full((n_tiles, rows), -1, dtype=torch.int64, device=dev)
        self.tile_entry[tile, rank % rows] = ent
        self.tile_key = torch.repeat_interleave(groups, tiles_per_group)
        self.tile_rank = rank.new_zeros(n_tiles)  # tile's index inside its group (determinism)
        self.tile_rank[tile] = rank // rows

    def tiles(self, width: int):
        step = max(1, TILE_CHUNK_ELEMS // (self.rows * width))
        for c0 in range(0, self.tile_entry.shape[0], step):
            ent = self.tile_entry[c0 : c0 + step]
            yield c0, c0 + ent.shape[0], ent

    def rows_of(self, ent: torch.Tensor, hq: int) -> torch.Tensor:
        """Flat ``row * Hq + head`` index (into ``[total_q * Hq]``) of each entry."""
        return (self.r0 + ent // (hq * self.k)) * hq + (ent // self.k) % hq


def _tile_scores(qt, kt, limit, scale):
    s = torch.matmul(qt, kt.transpose(1, 2)) * scale  # [C, R, W]
    cols = torch.arange(kt.shape[1], device=qt.device)
    return s.masked_fill(cols[None, None, :] >= limit[:, :, None], float("-inf"))


def _gate_all(q, k, layout, topk):
    """Selections for all rows, chunked: ``[total_q, Hq, k-1]`` global block ids."""
    cent = block_centroids(k, layout)
    out, r0, total = [], 0, q.shape[0]
    while r0 < total:
        r1 = gate_chunk_rows(layout, r0, total, q.shape[1])
        out.append(select_blocks(q, cent, layout, r0, r1, topk))
        r0 = r1
    if not out:
        return torch.empty(0, q.shape[1], max(topk - 1, 0), dtype=torch.int64, device=q.device)
    return torch.cat(out)


def _row_chunks(total_q: int, hq: int, topk: int, d: int):
    step = max(1, PART_CHUNK_ELEMS // (hq * topk * d))
    for r0 in range(0, total_q, step):
        yield r0, min(total_q, r0 + step)


def _forward(q, k, v, layout, sel, topk, scale):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    kb, vb = pad_blocks(k, layout, cdt), pad_blocks(v, layout, cdt)  # [nb*Hkv, W, D]
    qf = q.reshape(total_q * hq, d)
    out = torch.empty(total_q, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(total_q, hq, dtype=cdt, device=q.device)
    for r0, r1 in _row_chunks(total_q, hq, topk, d):
        plan = _Plan(layout, sel[r0:r1], r0, r1, hq, hkv, topk)
        n = r1 - r0
        part_out = torch.zeros(n * hq * topk, d, dtype=cdt, device=q.device)
        part_lse = torch.full((n * hq * topk,), float("-inf"), dtype=cdt, device=q.device)
        for c0, c1, ent in plan.tiles(layout.width):
            pad = ent < 0
            e = ent.clamp(min=0)
            qt = qf[plan.rows_of(e, hq)].to(cdt)  # [C, R, D]
            key = plan.tile_key[c0:c1]
            s = _tile_scores(qt, kb[key], plan.limit[e].masked_fill(pad, 1), scale)
            m = s.amax(-1, keepdim=True)  # [C, R, 1]
            p = torch.exp(s - m)
            l = p.sum(-1, keepdim=True)
            o = torch.matmul(p, vb[key]) / l  # [C, R, D]
            keep = ~pad
            part_out[ent[keep]] = o[keep]
            part_lse[ent[keep]] = (m + torch.log(l)).squeeze(-1)[keep]
        part_lse = part_lse.view(n, hq, topk)
        row_lse = torch.logsumexp(part_lse, dim=-1)  # [n, Hq]
        w = torch.exp(part_lse - row_lse[..., None])  # 0 for empty slots
        out[r0:r1] = (w[..., None] * part_out.view(n, hq, topk, d)).sum(2).to(q.dtype)
        lse[r0:r1] = row_lse
    return out, lse.t().contiguous()  # lse in the compute dtype, [Hq, total_q]


def _add_rows(dst, index, src, rank, deterministic):
    """``dst[index] += src`` where ``index`` repeats; fixed order when ``deterministic``."""
    if not deterministic or dst.device.type == "cpu":
        dst.index_add_(0, index, src)  # sequential (so deterministic) on CPU
        return
    for r in range(int(rank.max()) + 1 if rank.numel() else 0):
        pick = rank == r  # one tile per group per round: no two writes to one row
        dst.index_add_(0, index[pick], src[pick])


def _backward(q, k, v, out, lse, dout, layout, sel, topk, scale, deterministic):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    kb, vb = pad_blocks(k, layout, cdt), pad_blocks(v, layout, cdt)
    dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
    qf = q.reshape(total_q * hq, d)
    dof = dout.reshape(total_q * hq, d)
    lse_f = lse.t().reshape(-1).to(cdt)  # [total_q * Hq]
    delta = (dout.to(cdt) * out.to(cdt)).sum(-1).reshape(-1)  # rowsum(dO * O)
    dq = torch.empty(total_q, hq, d, dtype=cdt, device=q.device)
    for r0, r1 in _row_chunks(total_q, hq, topk, d):
        plan = _Plan(layout, sel[r0:r1], r0, r1, hq, hkv, topk)
        n = r1 - r0
        dq_part = torch.zeros(n * hq * topk, d, dtype=cdt, device=q.device)
        for c0, c1, ent in plan.tiles(layout.width):
            pad = ent < 0
            e = ent.clamp(min=0)
            rows = plan.rows_of(e, hq)
            qt, dot = qf[rows].to(cdt), dof[rows].to(cdt)  # [C, R, D]
            key = plan.tile_key[c0:c1]
            kt, vt = kb[key], vb[key]  # [C, W, D]
            s = _tile_scores(qt, kt, plan.limit[e].masked_fill(pad, 1), scale)
            p = torch.exp(s - lse_f[rows][..., None]).masked_fill(pad[..., None], 0)
            dv_t = torch.matmul(p.transpose(1, 2), dot)  # [C, W, D]
            dp = torch.matmul(dot, vt.transpose(1, 2))  # [C, R, W]
            ds = p * (dp - delta[rows][..., None])
            dq_t = torch.matmul(ds, kt) * scale  # [C, R, D]
            dk_t = torch.matmul(ds.transpose(1, 2), qt) * scale  # [C, W, D]
            keep = ~pad
            dq_part[ent[keep]] = dq_t[keep]
            rank = plan.tile_rank[c0:c1]
            _add_rows(dkb, key, dk_t, rank, deterministic)
            _add_rows(dvb, key, dv_t, rank, deterministic)
        dq[r0:r1] = dq_part.view(n, hq, topk, d).sum(2)

    def unpad(xb, like):
        nb, w = layout.n_blocks, layout.width
        x = xb.view(nb, hkv, w, d).permute(0, 2, 1, 3).reshape(nb * w, hkv, d)
        _, valid = layout.block_tokens(like.shape[0])
        return x[valid.reshape(-1)].to(like.dtype)

    return dq.to(q.dtype), unpad(dkb, k), unpad(dvb, v)


class MobaTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, block_size, topk, scale, deterministic):
        layout = BlockLayout.build(cu_q, cu_k, block_size)
        with torch.no_grad():
            sel = _gate_all(q, k, layout, topk)
            out, lse = _forward(q, k, v, layout, sel, topk, scale)
        ctx.save_for_backward(q, k, v, out, lse, sel)
        ctx.layout, ctx.topk, ctx.scale, ctx.deterministic = layout, topk, scale, deterministic
        lse32 = lse.float()
        ctx.mark_non_differentiable(lse32)
        return out, lse32

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sel = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv = _backward(q, k, v, out, lse, dout.contiguous(), ctx.layout, sel,
                                   ctx.topk, ctx.scale, ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None, None


def moba_attn_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                    block_size: int, topk: int, softmax_scale: float, deterministic: bool = False):
    """Packed-batch MoBA in PyTorch: ``(out [total_q, Hq, D], lse [Hq, total_q] fp32)``.

    Inputs are assumed validated (see ``moba_attn_varlen_func``).
    """
    return MobaTorchFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q,
                                   cu_seqlens_k, block_size, topk, softmax_scale, deterministic)
