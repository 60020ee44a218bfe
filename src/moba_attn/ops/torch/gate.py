"""The MoBA gate in PyTorch: fp32 block centroids and an exact top-(k-1) with the tie rule.

Same rule as ``ops/naive.py`` without a ``[T, T]`` mask and without a ``[T, #blocks]``
matrix for all rows at once: rows are scored in chunks of at most
``config.gate_chunk_elems`` scores.
"""

from __future__ import annotations

import torch

from ..config import MobaConfig
from ..layout import BlockLayout

# Up to this many picks per row, top-k is done by repeated max (first index wins ties).
SMALL_TOPK = 4


def block_view(x: torch.Tensor, layout: BlockLayout, dtype=None) -> torch.Tensor:
    """Keys/values ``[total_k, H, D]`` -> blocks ``[n_blocks, width, H, D]`` (zero padded).

    A view (no copy) when every block is full and the dtype already matches.
    """
    dtype = x.dtype if dtype is None else dtype
    nb, w = layout.n_blocks, layout.width
    if nb * w == x.shape[0] and layout.all_full:
        return x.view(nb, w, *x.shape[1:]).to(dtype)
    _, valid = layout.block_tokens()
    xb = x.new_zeros((nb * w,) + tuple(x.shape[1:]), dtype=dtype)
    xb[valid.reshape(-1).nonzero().squeeze(1)] = x.to(dtype)
    return xb.view(nb, w, *x.shape[1:])


def block_centroids(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean key of every block, fp32: ``[n_blocks, Hkv, D]``."""
    _, hkv, d = k.shape
    cent = torch.zeros(layout.n_blocks, hkv, d, dtype=torch.float32, device=k.device)
    if k.shape[0] == 0 or layout.n_blocks == 0:
        return cent
    blk = torch.repeat_interleave(torch.arange(layout.n_blocks, device=k.device), layout.blk_len,
                                  output_size=layout.total_k)  # [total_k] block of each token
    step = max(1, (1 << 22) // max(hkv * d, 1))
    for s in range(0, k.shape[0], step):  # chunked so k is never copied to fp32 at once
        cent.index_add_(0, blk[s : s + step], k[s : s + step].float())
    return cent / layout.blk_len.clamp(min=1).to(torch.float32)[:, None, None]


NOT_CANDIDATE = -(2**63)  # key of a block that is not a candidate: below every real key
_NAN_ORDER = -(2**31)  # order value of a NaN score: below every number, -inf included


def sortable_key(scores: torch.Tensor, candidate: torch.Tensor | None = None) -> torch.Tensor:
    """int64 keys ordered like the fp32 ``scores``, ties broken towards the LOWER column index.

    One ``topk`` on these keys gives the spec's tie rule exactly, on every device. A NaN
    score ranks below every number (so a block whose centroid is NaN is picked only when no
    other candidate is left); ``candidate`` (broadcast to ``scores``) masks the others to
    :data:`NOT_CANDIDATE`. The Triton gates build the same keys.
    """
    s = (scores.float() + 0.0).contiguous()  # -0.0 -> +0.0 so equal scores get equal bits
    bits = s.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    ordered = torch.where(torch.isnan(s), torch.full_like(ordered, _NAN_ORDER), ordered)
    col = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
    key = ordered * (1 << 32) + ((1 << 32) - 1 - col)
    if candidate is not None:
        key = key.masked_fill(~candidate, NOT_CANDIDATE)
    return key


def _all_finite(x: torch.Tensor) -> bool:
    """A min and a max (which propagate NaN) instead of boolean masks of ``x``'s size."""
    return x.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def top_blocks(scores: torch.Tensor, candidate: torch.Tensor,
               m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` best candidate columns per row and whether each pick is a candidate (rows
    with fewer candidates leave slots empty), sorted by decreasing score; equal scores go to
    the lower index. ``scores [..., n]`` fp32 (may be overwritten), ``candidate`` broadcast.

    Rows whose candidate scores are all finite take a float path: repeated ``max`` for small
    ``m`` (it returns the first maximal index: the tie rule), else a float ``topk`` that is
    exact unless the m-th and (m+1)-th values tie; only those rows use the int64 keys. Any
    non-finite candidate score sends the call to the int64 keys, which rank NaN last.
    """
    if not _all_finite(scores.masked_fill(~candidate, 0.0)):
        keys = sortable_key(scores, candidate)
        kv, idx = keys.topk(m, dim=-1)
        return idx, kv > NOT_CANDIDATE
    scores.masked_fill_(~candidate, float("-inf"))
    if m <= SMALL_TOPK:
        picks, found = [], []
        for _ in range(m):
            vals, idx = scores.max(dim=-1)
            picks.append(idx)
            found.append(vals > float("-inf"))
            scores.scatter_(-1, idx[..., None], float("-inf"))
        return torch.stack(picks, -1), torch.stack(found, -1)
    if m >= scores.shape[-1]:
        kv, idx = sortable_key(scores, candidate).topk(m, dim=-1)
        return idx, kv > NOT_CANDIDATE
    vals, idx = scores.topk(m + 1, dim=-1)
    found = vals[..., :m] > float("-inf")
    idx = idx[..., :m]
    tie = (vals[..., m - 1] == vals[..., m]) & torch.isfinite(vals[..., m - 1])
    if bool(tie.any()):
        rows = tie.nonzero(as_tuple=True)
        idx[rows] = sortable_key(scores[rows]).topk(m, dim=-1).indices
    return idx, found


def _chunk_end(layout: BlockLayout, r0: int, heads: int, budget: int) -> int:
    """Rows ``r0:r1`` whose ``[rows, heads, #candidate blocks]`` score chunk fits ``budget``."""
    _, own, first = layout.host_rows()
    total = own.shape[0]
    n = max(1, min(total - r0, budget // max(heads, 1)))
    while n > 1:
        span = int(own[r0 + n - 1] - first[r0])
        if n * heads * max(span, 1) <= budget:
            break
        n //= 2
    return r0 + n


def _select_rows(q: torch.Tensor, centroids: torch.Tensor, layout: BlockLayout, r0: int, r1: int,
                 topk: int) -> torch.Tensor:
    """Top-(k-1) earlier blocks for query rows ``r0:r1``: ``[n, Hq, k-1]`` global ids, -1 = none."""
    n, hq, d = q[r0:r1].shape
    hkv = centroids.shape[1]
    sel = torch.full((n, hq, topk - 1), -1, dtype=torch.int64, device=q.device)
    _, own, first = layout.host_rows()
    b_lo, b_hi = int(first[r0]), int(own[r1 - 1])
    span = b_hi - b_lo
    if span <= 0:
        return sel
    qg = q[r0:r1].float().reshape(n, hkv, hq // hkv, d)
    cent = centroids[b_lo:b_hi]  # [span, Hkv, D]
    scores = torch.einsum("nkgd,bkd->nkgb", qg, cent).reshape(n, hq, span)
    gblk = torch.arange(b_lo, b_hi, device=q.device)
    cand = (gblk[None, :] >= layout.row_first[r0:r1, None]) & \
        (gblk[None, :] < layout.row_own[r0:r1, None])
    m = min(topk - 1, span)
    idx, ok = top_blocks(scores, cand[:, None, :], m)  # [n, Hq, m]
    sel[..., :m] = torch.where(ok, idx + b_lo, torch.full_like(idx, -1))
    return sel


def select_blocks(q: torch.Tensor, centroids: torch.Tensor, layout: BlockLayout, topk: int,
                  config: MobaConfig) -> torch.Tensor:
    """Selections of every row: ``[total_q, Hq, k-1]`` int64 global block ids (-1 = unused),
    sorted by decreasing score. Exact fp32 scores ``<q, centroid>`` over the strictly earlier
    blocks of the row's sequence; equal scores go to the lower block index; NaN scores are
    never picked."""
    total, hq = q.shape[0], q.shape[1]
    if topk == 1 or total == 0:
        return torch.full((total, hq, max(topk - 1, 0)), -1, dtype=torch.int64, device=q.device)
    out, r0 = [], 0
    while r0 < total:
        r1 = _chunk_end(layout, r0, hq, config.gate_chunk_elems)
        out.append(_select_rows(q, centroids, layout, r0, r1, topk))
        r0 = r1
    return torch.cat(out)


def gate(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, topk: int,
         config: MobaConfig) -> torch.Tensor:
    """Centroids and selection: ``[total_q, Hq, k-1]`` global block ids."""
    if topk == 1:
        return torch.empty(q.shape[0], q.shape[1], 0, dtype=torch.int64, device=q.device)
    return select_blocks(q, block_centroids(k, layout), layout, topk, config)


__all__ = ["NOT_CANDIDATE", "block_centroids", "block_view", "gate", "select_blocks", "sortable_key",
           "top_blocks"]
