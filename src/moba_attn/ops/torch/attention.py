"""Exact MoBA attention in pure PyTorch, given the selection (any device; the CPU path).

Schedule, per chunk of query rows (chunks are cut at own-block boundaries):
  1. the gate (``gate.py``) gives every (row, head) k slots: its own block plus up to k-1
     selected earlier blocks;
  2. own blocks: one causal attention over ``[blocks, Hq, W, D]`` with every row placed at its
     in-block offset (top-left causal == MoBA's own-block rule). A block with more rows than
     a chunk holds is cut into pieces: a piece attends its own rows' keys causally and the
     keys before it whole, so each piece costs only its rows;
  3. selected blocks: entries (slot, row, head) grouped by (block, kv head) and cut into tiles
     of R entries that all attend ONE whole key block; a batch of tiles is ONE dense call on
     rows and keys gathered for it;
  4. every row's final LSE over its slots first, then each slot's output weighted by
     ``exp(lse_slot - lse)``, summed in slot order.
Dense pieces run on PyTorch's fused CPU flash kernel when available, else on matmuls.
The backward re-runs the pieces with the FINAL out/LSE of each row (flash-attention backward:
``dS = P * (dP - rowsum(dO * O))``), which is exact for the merged attention.

Few, large ops on purpose: on a busy CPU every parallel op waits for its slowest thread (up
to a scheduler slice when other processes hold the cores), so loops of small ops per (block,
kv head) collapse. The op count grows with row chunks and tile batches, not with blocks or
heads.
Memory is O(rows * Hq * k * D) per row chunk plus one tile batch: never O(T^2), never a
``[T, #blocks]`` score matrix for all rows at once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..config import MobaConfig
from ..layout import BlockLayout
from .gate import block_view

TILE_ROWS_MAX = 256  # entries per selected-block tile: padding per group vs K/V gathered per tile


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- dense tiles
# Attention of a batch of independent tiles: q [C, H, R, D] against k/v [C, H, S, D], either
# whole (every row sees every key) or causal from the top-left (row i sees keys 0..i). Returns
# the tile-normalised output and its LSE [C, H, R]; the backward takes the FINAL out/lse of
# each row, which makes the per-tile flash gradient exact for the merged attention.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _use_cpu_flash(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and _CPU_FLASH is not None and _CPU_FLASH_BWD is not None


def _masked_scores(qt, kt, scale, causal):
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # [C, H, R, S]
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
    """Rows with ``dot == 0`` and ``lset == _PAD_LSE`` contribute nothing (padding)."""
    if _use_cpu_flash(qt):  # takes strided views as they are
        return _CPU_FLASH_BWD(dot, qt, kt, vt, ot, lset, 0.0, causal, scale=scale)
    s = _masked_scores(qt, kt, scale, causal)
    p = torch.exp(s - lset[..., None])
    dv = torch.matmul(p.transpose(-1, -2), dot)  # [C, H, S, D]
    dp = torch.matmul(dot, vt.transpose(-1, -2))  # [C, H, R, S]
    ds = p * (dp - (dot * ot).sum(-1, keepdim=True))
    return torch.matmul(ds, kt) * scale, torch.matmul(ds.transpose(-1, -2), qt) * scale, dv


def _merge2(o1, l1, o2, l2):
    """Two normalised parts of the same rows' attention ``(o [..., D], l [...])`` -> one."""
    l = torch.logaddexp(l1, l2)
    return o1 * torch.exp(l1 - l)[..., None] + o2 * torch.exp(l2 - l)[..., None], l


_PAD_LSE = 1e30  # lse of padding rows: exp(s - lse) == 0 without overflow


# ----------------------------------------------------------------------------- row chunks
def _chunk_rows(hq: int, topk: int, d: int, width: int, budget: int, flash: bool) -> int:
    """Rows per chunk: its slot outputs ``[rows, Hq, k, D]`` (and off the CPU kernel its
    own-block scores ``[rows, Hq, W]``) fit ``budget`` elements."""
    return max(1, budget // (hq * (topk * d + (0 if flash else width))))


def _row_chunks(layout: BlockLayout, rows_max: int):
    """Row ranges ``(r0, r1)`` of at most ``rows_max`` rows, cut at own-block boundaries; a
    block with more rows is cut into near-equal pieces, one chunk each."""
    _, own, _ = layout.host_rows()
    total = own.shape[0]
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(own)) + 1, [total]])
    r0 = 0
    while r0 < total:
        i = int(np.searchsorted(bounds, r0, side="right"))  # r0 is in block bounds[i-1]:bounds[i]
        lo, hi = int(bounds[i - 1]), int(bounds[i])
        if hi - lo > rows_max:
            pieces = -(-(hi - lo) // rows_max)
            r1 = min(hi, r0 + -(-(hi - lo) // pieces))
        else:  # as many whole blocks as fit
            r1 = int(bounds[np.searchsorted(bounds, r0 + rows_max, side="right") - 1])
        yield r0, r1
        r0 = r1


# ----------------------------------------------------------------------------- own block
class _OwnBlocks:
    """The own-block pass of rows ``r0:r1``: causal query tiles ``[nd, Hq, rows, D]`` against
    their blocks' keys from the in-block offset ``shift`` on.

    A chunk of whole blocks places every row at its in-block offset (``rows = W``, shift 0:
    top-left causal is MoBA's rule), a view of the rows when the blocks are full. A chunk
    inside one block (a piece of a large block, or the last rows of a chunked prefill) is its
    rows as they are (``rows = n``, ``shift`` = its first in-block offset): causal against the
    block's keys ``shift..`` plus whole against its keys ``0..shift`` (the *prefix*), so the
    pass costs only the chunk's rows.
    """

    def __init__(self, layout: BlockLayout, r0: int, r1: int, hq: int):
        pos, own, _ = layout.host_rows()
        blocks, inv = np.unique(own[r0:r1], return_inverse=True)
        offset = pos[r0:r1] % layout.block_size
        n, nd = r1 - r0, blocks.shape[0]
        self.hq, self.n_blocks, self.b0 = hq, nd, int(blocks[0])
        self.shift = int(offset[0]) if nd == 1 else 0
        self.rows = n if nd == 1 else layout.width
        # slots are strictly increasing, so n == nd * rows means slot == arange(n)
        self.identity = n == nd * self.rows
        slot = inv * self.rows + offset - self.shift
        self.slot = None if self.identity else torch.from_numpy(slot).to(layout.device)
        contiguous = int(blocks[-1]) - self.b0 + 1 == nd
        self.blocks = None if contiguous else torch.from_numpy(blocks).to(layout.device)

    def scatter(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Rows ``[n, Hq, ...]`` -> ``[nd, Hq, rows, ...]`` (padding = ``fill``)."""
        rest = tuple(x.shape[2:])
        if self.identity:
            buf = x
        else:
            buf = x.new_full((self.n_blocks * self.rows, self.hq) + rest, fill)
            buf[self.slot] = x
        return buf.view((self.n_blocks, self.rows, self.hq) + rest).transpose(1, 2)

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scatter`: ``[nd, Hq, rows, ...]`` -> rows ``[n, Hq, ...]`` (a view
        of the CPU kernel's output when the layout is the identity)."""
        rest = tuple(y.shape[3:])
        y = y.transpose(1, 2).reshape((self.n_blocks * self.rows, self.hq) + rest)
        return y if self.identity else y[self.slot]

    def _keys(self, prefix: bool) -> slice:
        return slice(0, self.shift) if prefix else slice(self.shift, self.shift + self.rows)

    def kv(self, xb: torch.Tensor, prefix: bool = False) -> torch.Tensor:
        """Blocks ``[nb, W, Hkv, D]`` -> this pass's keys ``[nd, Hq, S, D]`` (the causal part,
        or with ``prefix`` the keys before ``shift``; GQA: heads repeated)."""
        x = xb[self.b0 : self.b0 + self.n_blocks] if self.blocks is None else xb[self.blocks]
        x = x[:, self._keys(prefix)].transpose(1, 2)  # [nd, Hkv, S, D]
        nd, hkv, s, d = x.shape
        if hkv == self.hq:
            return x
        return x[:, :, None].expand(nd, hkv, self.hq // hkv, s, d).reshape(nd, self.hq, s, d)

    def add_kv(self, dx: torch.Tensor, dxb: torch.Tensor, prefix: bool = False) -> None:
        """Add the gradients of :meth:`kv`'s keys ``[nd, Hq, S, D]`` into the blocks
        ``dxb [nb, W, Hkv, D]`` (GQA: summed over each kv head's query heads)."""
        nd, _, s, d = dx.shape
        hkv = dxb.shape[2]
        if hkv != self.hq:
            dx = dx.reshape(nd, hkv, self.hq // hkv, s, d).sum(2)
        dx = dx.transpose(1, 2)  # [nd, S, Hkv, D]
        if self.blocks is None:
            dxb[self.b0 : self.b0 + nd, self._keys(prefix)] += dx
        else:  # whole blocks (shift 0, S == W), unique; by rows (see _gather)
            rows = (self.blocks[:, None] * s + torch.arange(s, device=dx.device)).reshape(-1)
            dxb.view(-1, hkv * d).index_add_(0, rows, dx.reshape(-1, hkv * d))


# ----------------------------------------------------------------------------- selected blocks
class _Batch(NamedTuple):
    """Tiles ``t0:t1`` of a :class:`_Tiles`, ``n`` of them (flat per tile slot unless noted)."""

    n: int
    ent: torch.Tensor
    row: torch.Tensor
    src: torch.Tensor
    kv: torch.Tensor  # [n * W]
    rank: torch.Tensor  # [n]


class _Tiles:
    """The selected blocks (slots 1..k-1) of one chunk's ``n`` rows, as tiles of ``rows``
    entries that all attend one whole key block.

    An entry is a (slot, row, head) whose slot holds a block: ``e = (j * n + row) * Hq + head``
    for slot ``j + 1``, ``n_ent = (k-1) * n * Hq`` ids. Entries are grouped by (block, kv head)
    and each group is cut into tiles. Per tile: ``rank``, its index inside its group, and the
    rows ``kv`` of its keys in the blocks ``[nb, W, Hkv, D]`` seen as rows of D. Per tile slot
    (flat ``[n_tiles * rows]``): ``ent`` and ``row`` = row * Hq + head of its entry; padding
    slots hold ``n_ent`` and ``n * Hq``, one past the end, so they write to a trash slot and
    read a padding row, or with ``src`` any real row.
    """

    def __init__(self, sel: torch.Tensor, hq: int, w: int, hkv: int):
        n, _, m = sel.shape
        dev = sel.device
        blk = sel.long().permute(2, 0, 1).reshape(-1)  # [n_ent] block of every entry, -1 = none
        ent = (blk >= 0).nonzero().squeeze(1)
        group, order = torch.sort(blk[ent] * hkv + ent % hq // (hq // hkv), stable=True)
        ent = ent[order]
        keys, counts = torch.unique_consecutive(group, return_counts=True)
        rows = 16
        while rows < TILE_ROWS_MAX and rows * 4 < ent.numel() // max(keys.numel(), 1):
            rows *= 2
        tiles = (counts + rows - 1) // rows  # per group
        first_tile = torch.cumsum(tiles, 0) - tiles
        first_ent = torch.cumsum(counts, 0) - counts
        gid = torch.repeat_interleave(torch.arange(keys.numel(), device=dev), counts,
                                      output_size=ent.numel())
        slot = (first_tile * rows - first_ent)[gid] + torch.arange(ent.numel(), device=dev)
        self.n_tiles, self.rows, self.n_ent, self.w = int(tiles.sum()), rows, m * n * hq, w
        self.ent = torch.full((self.n_tiles * rows,), self.n_ent, dtype=torch.int64, device=dev)
        self.ent[slot] = ent
        self.row = torch.full_like(self.ent, n * hq)
        self.row[slot] = ent % (n * hq)
        self.src = self.row.clamp(max=n * hq - 1)
        key = torch.repeat_interleave(keys, tiles, output_size=self.n_tiles)
        first_key = (key // hkv) * (w * hkv) + key % hkv  # row of key 0 of the tile's block
        self.kv = (first_key[:, None] + torch.arange(w, device=dev) * hkv).reshape(-1)
        self.rank = torch.arange(self.n_tiles, device=dev) - \
            torch.repeat_interleave(first_tile, tiles, output_size=self.n_tiles)

    def batches(self, d: int, budget: int, flash: bool, copies: int):
        """:class:`_Batch` es whose tensors fit ``budget`` elements: ``copies`` of the tiles'
        rows ``[R, D]`` and keys ``[W, D]`` (gathered, or made by the kernel), and off the
        CPU kernel as many ``[R, W]`` scores."""
        per_tile = copies * ((self.rows + self.w) * d + (0 if flash else self.rows * self.w))
        step = max(1, budget // per_tile)
        r, w = self.rows, self.w
        for t0 in range(0, self.n_tiles, step):
            t1 = min(self.n_tiles, t0 + step)
            e = slice(t0 * r, t1 * r)
            yield _Batch(t1 - t0, self.ent[e], self.row[e], self.src[e],
                         self.kv[t0 * w : t1 * w], self.rank[t0:t1])


def _padded(x: torch.Tensor, fill: float) -> torch.Tensor:
    """Rows ``[n, Hq, ...]`` -> ``[n * Hq + 1, ...]`` with one extra row ``fill``, what tile
    padding reads."""
    rest = tuple(x.shape[2:])
    out = x.new_empty((x.shape[0] * x.shape[1] + 1,) + rest)
    out[:-1] = x.reshape((-1,) + rest)
    out[-1] = fill
    return out


def _gather(x: torch.Tensor, index: torch.Tensor, tiles: int) -> torch.Tensor:
    """Rows ``x [N, ...]`` at ``index [C * R]`` -> tiles ``[C, 1, R, ...]``. By rows of D (or
    of one LSE): ``index_select``/``index_add_`` over slices of >= 32K elements run one
    parallel op per index, which crawls on a busy CPU."""
    return x.index_select(0, index).view((tiles, 1, -1) + tuple(x.shape[1:]))


def _add_rows(dst, index, src, rank):
    """``dst[index] += src`` where ``index`` repeats: with ``rank`` (no two sources of one
    rank share an index) in a fixed order on any device, else by one ``index_add_`` (in order
    on CPU)."""
    if rank is None:
        dst.index_add_(0, index, src)
        return
    for r in range(int(rank.max()) + 1 if rank.numel() else 0):
        pick = rank == r
        dst.index_add_(0, index[pick], src[pick])


def _merge_selected(o, l, qc, kb, vb, sel, scale, config, flash):
    """The chunk's own-block result ``(o [n, Hq, D], l [n, Hq])`` merged with its selected
    slots: ``(out, lse)`` in the compute dtype."""
    n, hq, d = o.shape
    tiles = _Tiles(sel, hq, kb.shape[1], kb.shape[2])
    if tiles.n_tiles == 0:
        return o, l
    q_rows, k_rows, v_rows = qc.reshape(-1, d), kb.view(-1, d), vb.view(-1, d)
    # slot outputs and LSEs by entry id, + the padding slot; empty slots weigh 0
    part_out = o.new_zeros(tiles.n_ent + 1, d)
    part_lse = l.new_full((tiles.n_ent + 1,), float("-inf"))
    for b in tiles.batches(d, config.torch_tile_elems, flash, copies=2):  # q, o; k, v
        ot, lt = tile_attn_fwd(_gather(q_rows, b.src, b.n), _gather(k_rows, b.kv, b.n),
                               _gather(v_rows, b.kv, b.n), scale, causal=False)
        part_out.index_copy_(0, b.ent, ot.reshape(-1, d))
        part_lse.index_copy_(0, b.ent, lt.reshape(-1))
    slot_lse = torch.cat([l.reshape(1, -1), part_lse[:-1].view(-1, n * hq)])  # [k, n * Hq]
    lse = torch.logsumexp(slot_lse, dim=0)
    w = torch.exp(slot_lse - lse)[..., None]
    acc = o.reshape(-1, d) * w[0]
    for j, part in enumerate(part_out[:-1].view(-1, n * hq, d), 1):
        acc.addcmul_(part, w[j])  # k small: a few fused passes beat a batched [1, k] matmul
    return acc.view(n, hq, d), lse.view(n, hq)


def forward(q, k, v, layout: BlockLayout, sel, topk: int, scale: float, config: MobaConfig):
    """Attention given the selection: ``(out [T, Hq, D] q.dtype, lse [Hq, T])`` (lse in the
    compute dtype)."""
    total_q, hq, d = q.shape
    cdt = _compute_dtype(q.dtype)
    flash = _use_cpu_flash(q)
    kb, vb = block_view(k, layout, cdt), block_view(v, layout, cdt)  # [nb, W, Hkv, D]
    out = torch.empty(total_q, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(total_q, hq, dtype=cdt, device=q.device)
    rows_max = _chunk_rows(hq, topk, d, layout.width, config.torch_part_elems, flash)
    for r0, r1 in _row_chunks(layout, rows_max):
        own = _OwnBlocks(layout, r0, r1, hq)
        qc = q[r0:r1].to(cdt)
        qt = own.scatter(qc)
        o, l = tile_attn_fwd(qt, own.kv(kb), own.kv(vb), scale, causal=True)
        if own.shift:
            o, l = _merge2(o, l, *tile_attn_fwd(qt, own.kv(kb, prefix=True),
                                                own.kv(vb, prefix=True), scale, causal=False))
        o, l = own.gather(o), own.gather(l)  # [n, Hq, D], [n, Hq]
        if topk > 1:
            o, l = _merge_selected(o, l, qc, kb, vb, sel[r0:r1], scale, config, flash)
        out[r0:r1], lse[r0:r1] = o, l
    return out, lse.t().contiguous()  # lse in the compute dtype, [Hq, total_q]


def _selected_bwd(dqc, qc, oc, doc, lc, kb, vb, dkb, dvb, sel, scale, config, flash,
                  deterministic):
    """The chunk's selected-slot gradients: ``dqc [n, Hq, D]`` plus theirs (returned); dK/dV
    added into the blocks ``dkb``/``dvb [nb, W, Hkv, D]``."""
    n, hq, d = qc.shape
    tiles = _Tiles(sel, hq, kb.shape[1], kb.shape[2])
    if tiles.n_tiles == 0:
        return dqc
    q_rows, o_rows = qc.reshape(-1, d), oc.reshape(-1, d)
    # padding rows read dO = 0 and an LSE that zeroes P, so they contribute nothing
    do_pad, l_pad = _padded(doc, 0.0), _padded(lc, _PAD_LSE)
    k_rows, v_rows, dk_rows, dv_rows = (x.view(-1, d) for x in (kb, vb, dkb, dvb))
    dq_part = dqc.new_zeros(tiles.n_ent + 1, d)  # by entry id, + the padding slot
    ordered = deterministic and dqc.device.type != "cpu"  # index_add_ is in order on CPU
    for b in tiles.batches(d, config.torch_tile_elems, flash, copies=4):  # q o dO dq, k v dk dv
        dq_t, dk_t, dv_t = tile_attn_bwd(
            _gather(do_pad, b.row, b.n), _gather(q_rows, b.src, b.n), _gather(k_rows, b.kv, b.n),
            _gather(v_rows, b.kv, b.n), _gather(o_rows, b.src, b.n), _gather(l_pad, b.row, b.n),
            scale, causal=False)
        dq_part.index_copy_(0, b.ent, dq_t.reshape(-1, d))
        rank = b.rank.repeat_interleave(tiles.w) if ordered else None
        _add_rows(dk_rows, b.kv, dk_t.reshape(-1, d), rank)
        _add_rows(dv_rows, b.kv, dv_t.reshape(-1, d), rank)
    return dqc + dq_part[:-1].view(-1, n, hq, d).sum(0)


def backward(q, k, v, out, lse, dout, layout: BlockLayout, sel, topk: int, scale: float,
             deterministic: bool, config: MobaConfig):
    """Exact gradients ``(dq, dk, dv)`` from the forward's final ``out`` and ``lse``."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    flash = _use_cpu_flash(q)
    kb, vb = block_view(k, layout, cdt), block_view(v, layout, cdt)  # [nb, W, Hkv, D]
    nb, w = layout.n_blocks, layout.width
    dkb = torch.zeros(nb, w, hkv, d, dtype=cdt, device=q.device)
    dvb = torch.zeros_like(dkb)
    lse_rows = lse.t().to(cdt).contiguous()  # [total_q, Hq]
    dq = torch.empty(total_q, hq, d, dtype=q.dtype, device=q.device)
    rows_max = _chunk_rows(hq, topk, d, w, config.torch_part_elems, flash)
    for r0, r1 in _row_chunks(layout, rows_max):
        own = _OwnBlocks(layout, r0, r1, hq)
        qc, oc, doc = (x[r0:r1].to(cdt) for x in (q, out, dout))
        lc = lse_rows[r0:r1]
        dot_qt = own.scatter(doc), own.scatter(qc)
        ot_lt = own.scatter(oc), own.scatter(lc, _PAD_LSE)
        dq_o, dk_o, dv_o = tile_attn_bwd(*dot_qt, own.kv(kb), own.kv(vb), *ot_lt, scale,
                                         causal=True)
        own.add_kv(dk_o, dkb)
        own.add_kv(dv_o, dvb)
        if own.shift:
            dq_p, dk_p, dv_p = tile_attn_bwd(*dot_qt, own.kv(kb, prefix=True),
                                             own.kv(vb, prefix=True), *ot_lt, scale, causal=False)
            dq_o = dq_o + dq_p
            own.add_kv(dk_p, dkb, prefix=True)
            own.add_kv(dv_p, dvb, prefix=True)
        dqc = own.gather(dq_o)  # [n, Hq, D]
        if topk > 1:
            dqc = _selected_bwd(dqc, qc, oc, doc, lc, kb, vb, dkb, dvb, sel[r0:r1], scale,
                                config, flash, deterministic)
        dq[r0:r1] = dqc

    def unpad(xb, like):  # blocks -> tokens [total_k, Hkv, D]
        x = xb.view(nb * w, hkv, d)
        if not (layout.all_full and nb * w == like.shape[0]):
            x = x[layout.block_tokens()[1].reshape(-1)]
        return x.to(like.dtype)

    return dq, unpad(dkb, k), unpad(dvb, v)


__all__ = ["backward", "forward", "tile_attn_bwd", "tile_attn_fwd"]
