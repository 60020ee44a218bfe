"""MoBA gating in PyTorch: packed-batch block layout, fp32 centroids, exact top-(k-1).

Shared by the torch path and the Triton launchers (which use the layout and, as a fallback
and in tests, the selection). The rule lives in ``naive.py``; this file computes the same
thing without a ``[T, T]`` mask and without a ``[T, #blocks]`` matrix for all rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Upper bound on the elements of one [rows, Hq, #blocks] score chunk.
GATE_CHUNK_ELEMS = 1 << 24
# Up to this many picks per row, top-k is done by repeated max (first index wins ties).
SMALL_TOPK = 4


@dataclass
class BlockLayout:
    """Where every key block and query row of a packed batch lives.

    Global block ids number the blocks of all sequences one after the other.
    Tensors are on the inputs' device; ``*_np`` twins are host copies for chunking.
    """

    block_size: int
    n_blocks: int  # total blocks over all sequences
    width: int  # padded block width = min(block_size, max key length)
    row_pos: torch.Tensor  # [total_q] key position of each query row inside its sequence
    row_own: torch.Tensor  # [total_q] global id of the row's own block
    row_first: torch.Tensor  # [total_q] global id of the first block of the row's sequence
    blk_start: torch.Tensor  # [n_blocks] first token (row of k) of each block
    blk_len: torch.Tensor  # [n_blocks] tokens in each block (< block_size only for a last block)
    row_own_np: np.ndarray
    row_first_np: np.ndarray
    all_full: bool  # every block has exactly ``width`` tokens
    max_seq_blocks: int  # most blocks in one sequence
    max_len_k: int  # longest key sequence

    @staticmethod
    def build(cu_q: torch.Tensor, cu_k: torch.Tensor, block_size: int) -> BlockLayout:
        dev = cu_q.device
        cq = cu_q.detach().to("cpu", torch.int64).numpy()
        ck = cu_k.detach().to("cpu", torch.int64).numpy()
        lq, lk = np.diff(cq), np.diff(ck)
        nb = (lk + block_size - 1) // block_size
        blk_off = np.concatenate([[0], np.cumsum(nb)])
        n_blocks = int(blk_off[-1])
        row_seq = np.repeat(np.arange(len(lq)), lq)
        row_pos = np.arange(int(cq[-1])) - cq[row_seq] + (lk - lq)[row_seq]
        row_first = blk_off[row_seq]
        row_own = row_first + row_pos // block_size
        blk_seq = np.repeat(np.arange(len(lk)), nb)
        blk_local = np.arange(n_blocks) - blk_off[blk_seq]
        blk_start = ck[blk_seq] + blk_local * block_size
        blk_len = np.minimum(block_size, lk[blk_seq] - blk_local * block_size)
        width = int(min(block_size, lk.max(initial=1)))

        def t(a):
            return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64).to(dev)

        return BlockLayout(block_size, n_blocks, max(width, 1), t(row_pos), t(row_own),
                           t(row_first), t(blk_start), t(blk_len), row_own, row_first,
                           bool((blk_len == max(width, 1)).all()), int(nb.max(initial=0)),
                           int(lk.max(initial=0)))

    def block_tokens(self, total_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token index [n_blocks, width], valid [n_blocks, width])`` of every block slot."""
        j = torch.arange(self.width, device=self.blk_start.device)
        valid = j[None, :] < self.blk_len[:, None]
        tok = (self.blk_start[:, None] + j[None, :]).clamp_(max=max(total_k - 1, 0))
        return tok, valid


def block_view(x: torch.Tensor, layout: BlockLayout, dtype=None) -> torch.Tensor:
    """Keys/values ``[total_k, H, D]`` -> blocks ``[n_blocks, width, H, D]`` (zero padded).

    A view (no copy) when every block is full and the dtype already matches.
    """
    dtype = x.dtype if dtype is None else dtype
    nb, w = layout.n_blocks, layout.width
    if nb * w == x.shape[0] and layout.all_full:
        return x.view(nb, w, *x.shape[1:]).to(dtype)
    _, valid = layout.block_tokens(x.shape[0])
    xb = x.new_zeros((nb * w,) + tuple(x.shape[1:]), dtype=dtype)
    xb[valid.reshape(-1).nonzero().squeeze(1)] = x.to(dtype)
    return xb.view(nb, w, *x.shape[1:])


def block_centroids(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean key of every block, fp32: ``[n_blocks, Hkv, D]``."""
    _, hkv, d = k.shape
    cent = torch.zeros(layout.n_blocks, hkv, d, dtype=torch.float32, device=k.device)
    if k.shape[0] == 0 or layout.n_blocks == 0:
        return cent
    blk = torch.repeat_interleave(
        torch.arange(layout.n_blocks, device=k.device), layout.blk_len
    )  # [total_k] block of each token
    step = max(1, (1 << 22) // max(hkv * d, 1))
    for s in range(0, k.shape[0], step):  # chunked so k is never copied to fp32 at once
        cent.index_add_(0, blk[s : s + step], k[s : s + step].float())
    return cent / layout.blk_len.clamp(min=1).to(torch.float32)[:, None, None]


def sortable_key(scores: torch.Tensor, index_bits: int = 32) -> torch.Tensor:
    """int64 keys ordered like ``scores`` (fp32), ties broken towards the LOWER column index.

    One ``topk`` on these keys gives the spec's tie rule exactly, on every device.
    """
    s = (scores + 0.0).contiguous()  # -0.0 -> +0.0 so equal scores get equal bits
    bits = s.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    col = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
    return ordered * (1 << index_bits) + ((1 << index_bits) - 1 - col)


def _topk_lowest_index_ties(scores: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``m`` largest scores per row (``-inf`` = not a candidate) and whether
    each pick is real; among equal scores the lower index wins. ``scores`` may be
    overwritten.

    Small ``m``: repeated ``max`` (which returns the FIRST maximal index, i.e. the tie rule).
    Otherwise a float ``topk`` is exact unless the m-th and (m+1)-th values tie (ties inside
    the chosen set do not change the set); only those rows are redone with the int64 keys.
    """
    if m <= SMALL_TOPK:
        s = scores  # the caller's own buffer: overwritten
        picks, found = [], []
        for _ in range(m):
            vals, idx = s.max(dim=-1)
            picks.append(idx)
            found.append(vals > float("-inf"))
            s.scatter_(-1, idx[..., None], float("-inf"))
        return torch.stack(picks, -1), torch.stack(found, -1)
    if m >= scores.shape[-1]:
        idx = sortable_key(scores).topk(m, dim=-1).indices
        return idx, torch.ones_like(idx, dtype=torch.bool)
    vals, idx = scores.topk(m + 1, dim=-1)
    idx = idx[..., :m]
    tie = (vals[..., m - 1] == vals[..., m]) & torch.isfinite(vals[..., m - 1])
    if bool(tie.any()):
        rows = tie.nonzero(as_tuple=True)
        idx[rows] = sortable_key(scores[rows]).topk(m, dim=-1).indices
    return idx, torch.ones_like(idx, dtype=torch.bool)


def gate_chunk_rows(layout: BlockLayout, r0: int, total_q: int, heads: int,
                    budget: int = GATE_CHUNK_ELEMS) -> int:
    """Rows ``r0:r1`` whose ``[rows, heads, #candidate blocks]`` score chunk fits ``budget``."""
    n = max(1, min(total_q - r0, budget // max(heads, 1)))
    while n > 1:
        span = int(layout.row_own_np[r0 + n - 1] - layout.row_first_np[r0])
        if n * heads * max(span, 1) <= budget:
            break
        n //= 2
    return r0 + n


def select_blocks(q: torch.Tensor, centroids: torch.Tensor, layout: BlockLayout, r0: int, r1: int,
                  topk: int) -> torch.Tensor:
    """Top-(k-1) earlier blocks for query rows ``r0:r1``: ``[n, Hq, k-1]`` global ids, -1 = none.

    Exact fp32 scores ``<q, centroid>``; candidates are the strictly earlier blocks of the
    row's sequence; equal scores go to the lower block index.
    """
    n, hq, d = q[r0:r1].shape
    hkv = centroids.shape[1]
    sel = torch.full((n, hq, max(topk - 1, 0)), -1, dtype=torch.int64, device=q.device)
    if topk == 1 or n == 0:
        return sel
    b_lo = int(layout.row_first_np[r0])
    b_hi = int(layout.row_own_np[r1 - 1])
    span = b_hi - b_lo
    if span <= 0:
        return sel
    qg = q[r0:r1].float().reshape(n, hkv, hq // hkv, d)
    cent = centroids[b_lo:b_hi]  # [span, Hkv, D]
    scores = torch.einsum("nkgd,bkd->nkgb", qg, cent).reshape(n, hq, span)
    gblk = torch.arange(b_lo, b_hi, device=q.device)
    cand = (gblk[None, :] >= layout.row_first[r0:r1, None]) & (gblk[None, :] < layout.row_own[r0:r1, None])
    scores.masked_fill_(~cand[:, None, :], float("-inf"))
    m = min(topk - 1, span)
    idx, found = _topk_lowest_index_ties(scores, m)  # [n, Hq, m]
    ok = torch.gather(cand[:, None, :].expand(n, hq, span), -1, idx) & found
    sel[..., :m] = torch.where(ok, idx + b_lo, torch.full_like(idx, -1))
    return sel


def select_all(q: torch.Tensor, centroids: torch.Tensor, layout: BlockLayout,
               topk: int) -> torch.Tensor:
    """:func:`select_blocks` for every row, in bounded chunks: ``[total_q, Hq, k-1]`` global
    block ids (-1 = unused slot)."""
    out, r0, total = [], 0, q.shape[0]
    while r0 < total and topk > 1:
        r1 = gate_chunk_rows(layout, r0, total, q.shape[1])
        out.append(select_blocks(q, centroids, layout, r0, r1, topk))
        r0 = r1
    if not out:
        return torch.full((q.shape[0], q.shape[1], max(topk - 1, 0)), -1, dtype=torch.int64,
                          device=q.device)
    return torch.cat(out)


def moba_select(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, *, block_size: int, topk: int) -> torch.Tensor:
    """Blocks each query row picks, ``[total_q, Hq, k-1]``, as indices *within its sequence*
    (-1 = unused slot), sorted by decreasing gate score. For tests, telemetry and pictures."""
    layout = BlockLayout.build(cu_seqlens_q, cu_seqlens_k, block_size)
    sel = select_all(q, block_centroids(k, layout), layout, topk)
    return torch.where(sel >= 0, sel - layout.row_first[:, None, None], sel)


def n_attended_keys(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_size: int,
                    topk: int) -> int:
    """Keys attended summed over query rows (per head): the useful work MoBA does.

    Exact for any routing: every row sees ``pos % B + 1`` keys of its own block plus
    ``min(k-1, #earlier blocks)`` full blocks.
    """
    layout = BlockLayout.build(cu_seqlens_q.cpu(), cu_seqlens_k.cpu(), block_size)
    pos = layout.row_pos.numpy()
    earlier = (layout.row_own - layout.row_first).numpy()
    return int((pos % block_size + 1).sum() + (np.minimum(topk - 1, earlier) * block_size).sum())


def dense_causal_keys(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> int:
    """Keys attended summed over query rows by dense causal attention (bottom-right)."""
    layout = BlockLayout.build(cu_seqlens_q.cpu(), cu_seqlens_k.cpu(), 1)
    return int((layout.row_pos.numpy() + 1).sum())


__all__ = [
    "BlockLayout",
    "block_centroids",
    "block_view",
    "dense_causal_keys",
    "gate_chunk_rows",
    "moba_select",
    "n_attended_keys",
    "select_all",
    "select_blocks",
    "sortable_key",
]
