"""Exact MoBA attention in pure PyTorch, given the selection (any device; the CPU path).

Schedule (key-block-major gather, like the original release's varlen calls):
  1. the gate (``gate.py``) gives every (row, head) k slots: its own block plus up to k-1
     selected earlier blocks;
  2. own blocks: one causal attention over ``[blocks, Hq, W, D]`` with every row placed at its
     in-block offset (top-left causal == MoBA's own-block rule);
  3. selected blocks: entries grouped by (block, kv head); each group is a dense attention
     of its gathered query rows against ONE whole key block (one call per key block on CPU, or
     padded tiles of up to R rows batched together);
  4. each slot gives a normalised partial output and its LSE; rows merge their k slots by LSE.
Dense pieces run on PyTorch's fused CPU flash kernel when available, else on matmuls.
The backward re-runs the pieces with the FINAL out/LSE of each row (flash-attention backward:
``dS = P * (dP - rowsum(dO * O))``), which is exact for the merged attention.
Memory is O(T * H * k * D) per row chunk plus one tile batch: never O(T^2), never a
``[T, #blocks]`` score matrix for all rows at once.
"""

from __future__ import annotations

import torch

from ..config import MobaConfig
from ..layout import BlockLayout
from .gate import block_view

TILE_ROWS_MAX = 256
GROUP_LOOP_MIN_WORK = 1 << 16  # mean entries per group x block width


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan:
    """Tiles of the *selected* blocks (slots 1..k-1) of query rows ``r0:r1``.

    Entry id ``e = (slot * n + row) * Hq + head`` (slot-major, so each slot of the partial
    buffers is contiguous; slot 0, the own block, is handled by the block-diagonal pass). Entries are grouped by (block, kv head) and each group is cut into
    tiles of ``rows`` entries that all attend the same whole key block.
    """

    def __init__(self, sel: torch.Tensor, r0: int, hq: int, hkv: int, topk: int):
        dev = sel.device
        n = sel.shape[0]
        self.r0, self.n, self.k = r0, n, topk
        gb = torch.cat([torch.full((1, n, hq), -1, dtype=torch.int64, device=dev),
                        sel.long().permute(2, 0, 1)])  # [k, n, Hq]
        head = torch.arange(hq, device=dev)
        key = gb * hkv + head // (hq // hkv)  # tile group: (block, kv head)
        ent = (gb >= 0).reshape(-1).nonzero().squeeze(1)
        keys, order = torch.sort(key.reshape(-1)[ent], stable=True)
        ent = ent[order]
        groups, counts = torch.unique_consecutive(keys, return_counts=True)
        self.ent, self.groups, self.counts = ent, groups, counts
        self.mean = max(1, ent.numel() // max(groups.numel(), 1))

    def batches(self, width: int, tile_elems: int):
        """Yield ``(ent [C, R], key [C], rank [C])``: C tiles of up to R entries (-1 = padding)
        that each attend one whole key block ``key`` (= block * Hkv + kv head); ``rank`` is
        the tile's index inside its group."""
        rows = 16
        while rows < TILE_ROWS_MAX and rows * 4 < self.mean:
            rows *= 2
        dev, counts = self.ent.device, self.counts
        tiles_per_group = (counts + rows - 1) // rows
        tile_start = torch.cumsum(tiles_per_group, 0) - tiles_per_group
        group_start = torch.cumsum(counts, 0) - counts
        gid = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts)
        rank = torch.arange(self.ent.numel(), device=dev) - group_start[gid]
        tile = tile_start[gid] + rank // rows
        n_tiles = int(tiles_per_group.sum())
        tile_entry = torch.full((n_tiles, rows), -1, dtype=torch.int64, device=dev)
        tile_entry[tile, rank % rows] = self.ent
        tile_key = torch.repeat_interleave(self.groups, tiles_per_group)
        tile_rank = rank.new_zeros(n_tiles)
        tile_rank[tile] = rank // rows
        step = max(1, tile_elems // (rows * width))
        for c0 in range(0, n_tiles, step):
            yield tile_entry[c0 : c0 + step], tile_key[c0 : c0 + step], tile_rank[c0 : c0 + step]

    def rows_of(self, ent: torch.Tensor, hq: int) -> torch.Tensor:
        """Flat ``row * Hq + head`` index (into ``[total_q * Hq]``) of each entry."""
        return self.r0 * hq + ent % (self.n * hq)


# ----------------------------------------------------------------------------- dense tiles
# Attention of a batch of independent tiles: q [C, H, R, D] against k/v [C, H, W, D], either
# whole (every row sees every key) or causal from the top-left (row i sees keys 0..i). Returns
# the tile-normalised output and its LSE [C, H, R]; the backward takes the FINAL out/lse of
# each row, which makes the per-tile flash gradient exact for the merged attention.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _use_cpu_flash(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and _CPU_FLASH is not None and _CPU_FLASH_BWD is not None


def _masked_scores(qt, kt, scale, causal):
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # [C, H, R, W]
    if causal:
        r = torch.arange(qt.shape[-2], device=qt.device)
        c = torch.arange(kt.shape[-2], device=qt.device)
        s = s.masked_fill(c[None, :] > r[:, None], float("-inf"))
    return s


def tile_attn_fwd(qt, kt, vt, scale: float, causal: bool):
    if _use_cpu_flash(qt):
        return _CPU_FLASH(qt, kt, vt, 0.0, causal, scale=scale)
    s = _masked_scores(qt, kt, scale, causal)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    return torch.matmul(p, vt) / l, (m + torch.log(l)).squeeze(-1)


def tile_attn_bwd(dot, qt, kt, vt, ot, lset, scale: float, causal: bool):
    """Rows with ``dot == 0`` and ``ot == 0`` contribute nothing (use them as padding)."""
    if _use_cpu_flash(qt):
        c = [x.contiguous() for x in (dot, qt, kt, vt, ot, lset)]
        return _CPU_FLASH_BWD(*c, 0.0, causal, scale=scale)
    s = _masked_scores(qt, kt, scale, causal)
    p = torch.exp(s - lset[..., None])
    dv = torch.matmul(p.transpose(-1, -2), dot)  # [C, H, W, D]
    dp = torch.matmul(dot, vt.transpose(-1, -2))  # [C, H, R, W]
    ds = p * (dp - (dot * ot).sum(-1, keepdim=True))
    return torch.matmul(ds, kt) * scale, torch.matmul(ds.transpose(-1, -2), qt) * scale, dv


_PAD_LSE = 1e30  # lse of padding rows: exp(s - lse) == 0 without overflow


# ----------------------------------------------------------------------------- own block
class _Diag:
    """The own-block pass for rows ``r0:r1``: each row placed at its in-block offset inside a
    ``[n_diag_blocks, Hq, W, D]`` layout, so top-left causal attention is exactly MoBA's.
    For a full prefill the layout is a view of the rows (no copy)."""

    def __init__(self, layout: BlockLayout, r0: int, r1: int, hq: int):
        own = layout.row_own[r0:r1]
        self.blocks, inv = torch.unique_consecutive(own, return_inverse=True)
        self.n_blocks, self.width, self.hq, self.n = self.blocks.numel(), layout.width, hq, r1 - r0
        # slots are strictly increasing, so n == nd * W means slot == arange(n)
        self.identity = self.n == self.n_blocks * self.width
        self.slot = None if self.identity else inv * layout.width + layout.row_pos[r0:r1] % layout.block_size
        b0 = int(self.blocks[0]) if self.n_blocks else 0
        self.contiguous = self.n_blocks == 0 or int(self.blocks[-1]) - b0 + 1 == self.n_blocks
        self.b0 = b0

    def scatter(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Rows ``[n, Hq, ...]`` -> ``[nd, Hq, W, ...]`` (padding = ``fill``)."""
        rest = tuple(x.shape[2:])
        if self.identity:
            buf = x
        else:
            buf = x.new_full((self.n_blocks * self.width, self.hq) + rest, fill)
            buf[self.slot] = x
        return buf.view((self.n_blocks, self.width, self.hq) + rest).transpose(1, 2)

    def gather(self, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`scatter`: ``[nd, Hq, W, ...]`` -> rows ``[n, Hq, ...]`` (written
        into ``out`` when given: one copy)."""
        rest = tuple(y.shape[3:])
        if out is not None and self.identity:
            out.view((self.n_blocks, self.width, self.hq) + rest).copy_(y.transpose(1, 2))
            return out
        y = y.transpose(1, 2).reshape((self.n_blocks * self.width, self.hq) + rest)
        y = y if self.identity else y[self.slot]
        return y if out is None else out.copy_(y)

    def kv(self, xb: torch.Tensor) -> torch.Tensor:
        """Blocks ``[nb, W, Hkv, D]`` -> this pass's ``[nd, Hq, W, D]`` (GQA: heads repeated)."""
        x = xb[self.b0 : self.b0 + self.n_blocks] if self.contiguous else xb[self.blocks]
        x = x.transpose(1, 2)  # [nd, Hkv, W, D]
        hkv = x.shape[1]
        if hkv == self.hq:
            return x
        nd, _, w, d = x.shape
        return x[:, :, None].expand(nd, hkv, self.hq // hkv, w, d).reshape(nd, self.hq, w, d)

    def reduce_kv(self, dx: torch.Tensor, dxb: torch.Tensor) -> None:
        """Add gradients ``[nd, Hq, W, D]`` into ``dxb [nb, W, Hkv, D]`` (GQA: summed)."""
        nd, _, w, d = dx.shape
        hkv = dxb.shape[2]
        dx = dx.view(nd, hkv, self.hq // hkv, w, d).sum(2).transpose(1, 2)  # [nd, W, Hkv, D]
        if self.contiguous:
            dxb[self.b0 : self.b0 + nd] += dx
        else:
            dxb.index_add_(0, self.blocks, dx)  # blocks are unique


def _per_group(plan: _Plan, layout: BlockLayout) -> bool:
    """One fused CPU call per key block (its kv heads as the heads dim) instead of padded tile
    batches: no K/V gather, worth it for the CPU forward once a group carries enough work."""
    return _use_cpu_flash(plan.ent) and plan.mean * layout.width >= GROUP_LOOP_MIN_WORK


def _row_chunks(total_q: int, hq: int, topk: int, d: int, width: int, budget: int):
    step = max(1, budget // (hq * max(topk * d, width)))
    for r0 in range(0, total_q, step):
        yield r0, min(total_q, r0 + step)


def _block_heads(xb: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``xb [nb, W, Hkv, D]``, key = block * Hkv + kv head ``[C]`` -> ``[C, 1, W, D]``."""
    hkv = xb.shape[2]
    return xb[key // hkv, :, key % hkv][:, None]


def _selected_fwd(q, kb, vb, plan, layout, scale, cdt, po, pl, config):
    """Partial outputs/LSEs of the selected blocks, written to entry slots ``po``/``pl``."""
    hq, d = q.shape[1], q.shape[2]
    qf = q.reshape(-1, d)
    if _per_group(plan, layout):
        qf = qf if qf.dtype == cdt else qf.to(cdt)
        rows = plan.rows_of(plan.ent, hq)  # [N] query rows in (block, kv head) order
        os_, ls = qf.new_empty(rows.shape[0], d), qf.new_empty(rows.shape[0])
        hkv = kb.shape[2]
        counts = plan.counts.tolist()
        blocks = (plan.groups // hkv).tolist()
        heads = (plan.groups % hkv).tolist()
        i = start = 0
        while i < len(blocks):  # one call per key block, its kv heads as the heads dim
            j = i
            while j < len(blocks) and blocks[j] == blocks[i]:
                j += 1
            b, cnt = blocks[i], counts[i:j]
            qpad = qf.new_zeros(j - i, max(cnt), d)  # [heads, rows, D], rows padded
            offs = [start]
            for h, c in enumerate(cnt):
                torch.index_select(qf, 0, rows[offs[-1] : offs[-1] + c], out=qpad[h, :c])
                offs.append(offs[-1] + c)
            kj, vj = kb[b].transpose(0, 1), vb[b].transpose(0, 1)  # [Hkv, W, D] views
            if j - i != hkv:
                kj, vj = kj[heads[i:j]], vj[heads[i:j]]
            o, l = _CPU_FLASH(qpad[None], kj[None], vj[None], 0.0, False, scale=scale)
            for h, c in enumerate(cnt):
                os_[offs[h] : offs[h] + c], ls[offs[h] : offs[h] + c] = o[0, h, :c], l[0, h, :c]
            start = offs[-1]
            i = j
        po.index_copy_(0, plan.ent, os_)
        pl.index_copy_(0, plan.ent, ls)
        return
    for ent, key, _ in plan.batches(layout.width, config.torch_tile_elems):
        keep = ent >= 0
        qt = qf[plan.rows_of(ent.clamp(min=0), hq)].to(cdt)[:, None]  # [C, 1, R, D]
        o, l = tile_attn_fwd(qt, _block_heads(kb, key), _block_heads(vb, key), scale, False)
        po[ent[keep]] = o[:, 0][keep]
        pl[ent[keep]] = l[:, 0][keep]


def forward(q, k, v, layout: BlockLayout, sel, topk: int, scale: float, config: MobaConfig):
    """Attention given the selection: ``(out [T, Hq, D] q.dtype, lse [Hq, T])`` (lse in the
    compute dtype)."""
    total_q, hq, d = q.shape
    cdt = _compute_dtype(q.dtype)
    kb, vb = block_view(k, layout, cdt), block_view(v, layout, cdt)  # [nb, W, Hkv, D]
    out = torch.empty(total_q, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(total_q, hq, dtype=cdt, device=q.device)
    for r0, r1 in _row_chunks(total_q, hq, topk, d, layout.width, config.torch_part_elems):
        n = r1 - r0
        diag = _Diag(layout, r0, r1, hq)
        o, l = tile_attn_fwd(diag.scatter(q[r0:r1].to(cdt)), diag.kv(kb), diag.kv(vb), scale,
                             causal=True)
        if topk == 1:
            out[r0:r1], lse[r0:r1] = diag.gather(o).to(q.dtype), diag.gather(l)
            continue
        part_out = torch.empty(topk, n, hq, d, dtype=cdt, device=q.device)  # slot-major
        part_lse = torch.empty(topk, n, hq, dtype=cdt, device=q.device)
        diag.gather(o, out=part_out[0])
        diag.gather(l, out=part_lse[0])
        empty = sel[r0:r1].permute(2, 0, 1) < 0  # unused slots: weight 0, value 0
        part_out[1:][empty] = 0
        part_lse[1:][empty] = float("-inf")
        plan = _Plan(sel[r0:r1], r0, hq, k.shape[1], topk)
        _selected_fwd(q, kb, vb, plan, layout, scale, cdt, part_out.view(-1, d), part_lse.view(-1),
                      config)
        row_lse = torch.logsumexp(part_lse, dim=0)  # [n, Hq]
        w = torch.exp(part_lse - row_lse)[..., None]  # [k, n, Hq, 1]
        acc = part_out[0] * w[0]
        for j in range(1, topk):  # k small: a few fused passes beat a batched [1, k] matmul
            acc.addcmul_(part_out[j], w[j])
        out[r0:r1] = acc.to(q.dtype)
        lse[r0:r1] = row_lse
    return out, lse.t().contiguous()  # lse in the compute dtype, [Hq, total_q]


def _add_rows(dst, index, src, rank, deterministic):
    """``dst[index] += src`` where ``index`` repeats; fixed order when ``deterministic``."""
    if not deterministic or dst.device.type == "cpu":
        dst.index_add_(0, index, src)  # sequential (so deterministic) on CPU
    else:
        _add_rows_in_rounds(dst, index, src, rank)


def _add_rows_in_rounds(dst, index, src, rank):
    """Deterministic ``dst[index] += src`` without relying on atomics' order: round ``r`` adds
    the rows of every tile whose rank inside its group is ``r`` (one tile per group, so no two
    writes of one round hit the same row of ``dst``)."""
    for r in range(int(rank.max()) + 1 if rank.numel() else 0):
        pick = rank == r
        dst.index_add_(0, index[pick], src[pick])


def backward(q, k, v, out, lse, dout, layout: BlockLayout, sel, topk: int, scale: float,
             deterministic: bool, config: MobaConfig):
    """Exact gradients ``(dq, dk, dv)`` from the forward's final ``out`` and ``lse``."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    kb, vb = block_view(k, layout, cdt), block_view(v, layout, cdt)  # [nb, W, Hkv, D]
    dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
    qf, dof, of = (x.reshape(total_q * hq, d) for x in (q, dout, out))
    lse_rows = lse.t().to(cdt).contiguous()  # [total_q, Hq]
    lse_f = lse_rows.reshape(-1)
    dq = torch.empty(total_q, hq, d, dtype=cdt, device=q.device)
    nb, w = layout.n_blocks, layout.width
    dk_flat, dv_flat = dkb.view(nb * w * hkv, d), dvb.view(nb * w * hkv, d)
    for r0, r1 in _row_chunks(total_q, hq, topk, d, layout.width, config.torch_part_elems):
        n = r1 - r0
        diag = _Diag(layout, r0, r1, hq)
        dq_d, dk_d, dv_d = tile_attn_bwd(
            diag.scatter(dout[r0:r1].to(cdt)), diag.scatter(q[r0:r1].to(cdt)),
            diag.kv(kb), diag.kv(vb), diag.scatter(out[r0:r1].to(cdt)),
            diag.scatter(lse_rows[r0:r1], _PAD_LSE), scale, causal=True)
        dq_chunk = diag.gather(dq_d)  # [n, Hq, D]
        diag.reduce_kv(dk_d, dkb)
        diag.reduce_kv(dv_d, dvb)
        if topk > 1:
            plan = _Plan(sel[r0:r1], r0, hq, hkv, topk)
            dq_part = torch.zeros(n * hq * topk, d, dtype=cdt, device=q.device)
            for ent, key, rank in plan.batches(layout.width, config.torch_tile_elems):
                keep = ent >= 0
                rows = plan.rows_of(ent.clamp(min=0), hq)
                z = ~keep[..., None]
                dot = dof[rows].to(cdt).masked_fill(z, 0)[:, None]  # padding rows: dO = O = 0
                ot = of[rows].to(cdt).masked_fill(z, 0)[:, None]
                dq_t, dk_t, dv_t = tile_attn_bwd(
                    dot, qf[rows].to(cdt)[:, None], _block_heads(kb, key), _block_heads(vb, key),
                    ot, lse_f[rows].masked_fill(~keep, _PAD_LSE)[:, None], scale, causal=False)
                dq_part[ent[keep]] = dq_t[:, 0][keep]
                # rows of (block, :, kv head) in the flat [nb * W * Hkv, D] gradient buffers
                tok = ((key // hkv)[:, None] * w + torch.arange(w, device=q.device)) * hkv
                tok = (tok + (key % hkv)[:, None]).reshape(-1)
                rank_t = rank[:, None].expand(-1, w).reshape(-1)
                _add_rows(dk_flat, tok, dk_t[:, 0].reshape(-1, d), rank_t, deterministic)
                _add_rows(dv_flat, tok, dv_t[:, 0].reshape(-1, d), rank_t, deterministic)
            dq_chunk = dq_chunk + dq_part.view(topk, n, hq, d).sum(0)
        dq[r0:r1] = dq_chunk

    def unpad(xb, like):
        _, valid = layout.block_tokens()
        return xb.reshape(nb * w, hkv, d)[valid.reshape(-1)].to(like.dtype)

    return dq.to(q.dtype), unpad(dkb, k), unpad(dvb, v)


__all__ = ["backward", "forward", "tile_attn_bwd", "tile_attn_fwd"]
