"""The block layout of a packed batch: where every key block and query row lives.

A :class:`BlockLayout` is built once per batch and block size and then read by every layer,
the backward pass and the kernels' planners (tiles, sort buckets). It is immutable: it owns
copies of the lengths it was built from, so changing a ``cu_seqlens`` tensor afterwards
cannot make it stale, and nothing is remembered between calls anywhere else.

Two constructors:

- :func:`batch_layout` (equal-length sequences, the ``[batch, T, H, D]`` layout) derives
  everything from shapes: no device-to-host copy, so it is safe inside CUDA graph capture.
- :func:`prepare_layout` (varlen ``cu_seqlens``) reads the lengths to the host once (one
  device sync on GPUs) and builds the rest on the device. Call it once per packed batch and
  pass the result to every layer (``moba_attn_varlen_func(..., layout=layout)``).

Host facts (per-sequence lengths, block counts) stay on the host as small numpy arrays; the
per-row and per-block index tensors are computed on the device with tensor ops only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Where the key blocks and query rows of one packed batch live.

    Blocks are numbered over all sequences one after the other (global block ids); block
    ``i`` of a sequence covers its keys ``[i*B, min((i+1)*B, Tk))``. Query rows are the last
    ``Tq`` positions of their sequence (bottom-right alignment).

    Host (numpy int64, ``[n_seqs]``): ``lens_q``, ``lens_k``. Device (int64):
    ``row_pos [total_q]`` key position of each query row inside its sequence, ``row_own``
    global id of its own block, ``row_first`` global id of its sequence's first block,
    ``blk_start [n_blocks]`` first key row of each block, ``blk_len`` its token count;
    ``cu_seqlens_q/k`` int32, the layout's own copies.
    """

    block_size: int
    lens_q: np.ndarray
    lens_k: np.ndarray
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    row_pos: torch.Tensor
    row_own: torch.Tensor
    row_first: torch.Tensor
    blk_start: torch.Tensor
    blk_len: torch.Tensor
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ host facts
    # computed once from the lengths (``_facts``): every call reads them, none recomputes
    @property
    def device(self) -> torch.device:
        return self.row_pos.device

    def _fact(self, name: str):
        facts = self._memo.get("facts")
        if facts is None:
            facts = self._memo["facts"] = _facts(self.lens_q, self.lens_k, self.block_size)
        return facts[name]

    n_seqs = property(lambda self: self._fact("n_seqs"))
    total_q = property(lambda self: self._fact("total_q"))
    total_k = property(lambda self: self._fact("total_k"))
    n_blocks = property(lambda self: self._fact("n_blocks"))
    max_len_q = property(lambda self: self._fact("max_len_q"))
    max_len_k = property(lambda self: self._fact("max_len_k"))
    max_seq_blocks = property(lambda self: self._fact("max_seq_blocks"))
    width = property(lambda self: self._fact("width"), doc="Padded block width: "
                     "``min(block_size, longest key sequence)`` (at least 1).")
    all_full = property(lambda self: self._fact("all_full"),
                        doc="Every block has exactly ``width`` tokens.")
    equal_lengths = property(lambda self: self._fact("equal_lengths"), doc="All sequences "
                             "have the same query length and the same key length.")
    self_attention = property(lambda self: self._fact("self_attention"),
                              doc="Every sequence has as many queries as keys.")

    @property
    def seq_blocks(self) -> np.ndarray:
        """Blocks of every sequence (host, ``[n_seqs]``)."""
        return (self.lens_k + self.block_size - 1) // self.block_size

    def is_dense(self, topk: int) -> bool:
        """MoBA with this ``topk`` is exactly dense causal attention for every query: no
        sequence has more than ``topk`` blocks."""
        return self.max_seq_blocks <= topk

    def memo(self, key, build):
        """``build()`` once per layout and ``key``: arrays the planners derive from it. While
        a CUDA graph is being captured nothing is kept (tensors made there hold their values
        only once the graph replays)."""
        hit = self._memo.get(key)
        if hit is None:
            hit = build()
            if not _capturing():
                self._memo[key] = hit
        return hit

    # ------------------------------------------------------------------ host per-row views
    def host_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(row_pos, row_own, row_first)`` on the host, from the lengths (no device copy)."""

        def build():
            lq, lk, bsz = self.lens_q, self.lens_k, self.block_size
            cq = np.concatenate([[0], np.cumsum(lq)])
            blk_off = np.concatenate([[0], np.cumsum(self.seq_blocks)])
            row_seq = np.repeat(np.arange(self.n_seqs), lq)
            pos = np.arange(self.total_q) - cq[row_seq] + (lk - lq)[row_seq]
            first = blk_off[row_seq]
            return pos, first + pos // bsz, first

        return self.memo("host_rows", build)

    def sum_earlier_blocks(self, cap: int | None = None) -> int:
        """Sum over query rows of the number of earlier blocks of the row's sequence,
        ``min(own block index, cap)`` each (host arithmetic over the sequences)."""
        bsz = self.block_size

        def prefix(n):  # sum_{p < n} min(p // B, cap)
            n = np.asarray(n, dtype=np.int64)
            if cap is not None:
                m = np.minimum(n, cap * bsz)
                return _floor_sum(m, bsz) + cap * (n - m)
            return _floor_sum(n, bsz)

        return int((prefix(self.lens_k) - prefix(self.lens_k - self.lens_q)).sum())

    def attended_keys(self, topk: int) -> int:
        """Keys attended summed over query rows (per head): the useful work MoBA does,
        exact for any routing (own block causal plus ``min(k-1, earlier)`` whole blocks)."""
        bsz = self.block_size
        lk, lq = self.lens_k, self.lens_q

        def own_prefix(n):  # sum_{p < n} (p % B + 1)
            q, r = n // bsz, n % bsz
            return q * bsz * (bsz + 1) // 2 + r * (r + 1) // 2

        own = int((own_prefix(lk) - own_prefix(lk - lq)).sum())
        return own + self.sum_earlier_blocks(max(topk - 1, 0)) * bsz

    def dense_keys(self) -> int:
        """Keys attended summed over query rows by dense causal attention (bottom-right)."""
        lk, lq = self.lens_k, self.lens_q
        return int((lk * (lk + 1) // 2 - (lk - lq) * (lk - lq + 1) // 2).sum())

    def local_blocks(self, sel: torch.Tensor) -> torch.Tensor:
        """Selections ``[total_q, Hq, k-1]`` as global block ids -> block indices inside each
        row's sequence (-1 kept)."""
        return torch.where(sel >= 0, sel - self.row_first[:, None, None], sel)

    # ------------------------------------------------------------------ block tokens
    def block_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token index [n_blocks, width], valid [n_blocks, width])`` of every block slot."""
        j = torch.arange(self.width, device=self.device)
        valid = j[None, :] < self.blk_len[:, None]
        tok = (self.blk_start[:, None] + j[None, :]).clamp_(max=max(self.total_k - 1, 0))
        return tok, valid


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _facts(lens_q: np.ndarray, lens_k: np.ndarray, block_size: int) -> dict:
    nb = (lens_k + block_size - 1) // block_size
    max_k = int(lens_k.max(initial=0))
    width = max(1, min(block_size, max_k))
    lk = lens_k[lens_k > 0]
    all_full = bool((lk % block_size == 0).all()) if max_k >= block_size else \
        bool((lk == max_k).all())
    n = int(lens_q.shape[0])
    equal = n == 0 or bool((lens_q == lens_q[0]).all() and (lens_k == lens_k[0]).all())
    return {"n_seqs": n, "total_q": int(lens_q.sum()), "total_k": int(lens_k.sum()),
            "n_blocks": int(nb.sum()), "max_len_q": int(lens_q.max(initial=0)),
            "max_len_k": max_k, "max_seq_blocks": int(nb.max(initial=0)), "width": width,
            "all_full": all_full, "equal_lengths": equal,
            "self_attention": bool((lens_q == lens_k).all())}


def _floor_sum(n: np.ndarray, b: int) -> np.ndarray:
    """``sum_{p < n} p // b`` elementwise."""
    q, r = n // b, n % b
    return b * q * (q - 1) // 2 + q * r


def _device_arrays(cu_q: torch.Tensor, cu_k: torch.Tensor, block_size: int, total_q: int,
                   n_blocks: int) -> tuple[torch.Tensor, ...]:
    """The per-row and per-block index tensors, with tensor ops only (no host sync: every
    output size is passed in)."""
    dev = cu_q.device
    cq, ck = cu_q.long(), cu_k.long()
    lq, lk = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    nb = torch.div(lk + block_size - 1, block_size, rounding_mode="floor")
    blk_off = torch.cumsum(nb, 0) - nb  # first global block of every sequence
    seq = torch.arange(lq.shape[0], device=dev)
    row_seq = torch.repeat_interleave(seq, lq, output_size=total_q)
    row_pos = torch.arange(total_q, device=dev) - cq[row_seq] + (lk - lq)[row_seq]
    row_first = blk_off[row_seq]
    row_own = row_first + torch.div(row_pos, block_size, rounding_mode="floor")
    blk_seq = torch.repeat_interleave(seq, nb, output_size=n_blocks)
    blk_local = (torch.arange(n_blocks, device=dev) - blk_off[blk_seq]) * block_size
    blk_start = ck[blk_seq] + blk_local
    blk_len = (lk[blk_seq] - blk_local).clamp_(max=block_size)
    return row_pos, row_own, row_first, blk_start, blk_len


def _from_lengths(lens_q: np.ndarray, lens_k: np.ndarray, block_size: int,
                  cu_q: torch.Tensor, cu_k: torch.Tensor) -> BlockLayout:
    lens_q = np.ascontiguousarray(lens_q, dtype=np.int64)
    lens_k = np.ascontiguousarray(lens_k, dtype=np.int64)
    n_blocks = int(((lens_k + block_size - 1) // block_size).sum())
    arrays = _device_arrays(cu_q, cu_k, block_size, int(lens_q.sum()), n_blocks)
    return BlockLayout(block_size, lens_q, lens_k, cu_q, cu_k, *arrays)


def batch_layout(batch: int, seqlen_q: int, seqlen_k: int, block_size: int,
                 device: torch.device | str) -> BlockLayout:
    """Layout of ``batch`` sequences of ``seqlen_q`` queries over ``seqlen_k`` keys each,
    from the shapes alone (no device-to-host copy; safe under CUDA graph capture).

    The shapes determine the layout entirely, so layouts are kept by shape (a few of them):
    a model's layers and every step reuse one, with the tiles and plans derived from it.
    Under CUDA graph capture a fresh one is built (its tensors get filled only when the
    graph replays)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _build_batch_layout(batch, seqlen_q, seqlen_k, block_size, dev)
    return _cached_batch_layout(batch, seqlen_q, seqlen_k, block_size, dev)


def _build_batch_layout(batch: int, seqlen_q: int, seqlen_k: int, block_size: int,
                        dev: torch.device) -> BlockLayout:
    steps = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    cu_q = steps * seqlen_q
    cu_k = cu_q if seqlen_k == seqlen_q else steps * seqlen_k
    return _from_lengths(np.full(batch, seqlen_q), np.full(batch, seqlen_k), block_size,
                         cu_q, cu_k)


_cached_batch_layout = functools.lru_cache(maxsize=16)(_build_batch_layout)


def check_cu_seqlens(name: str, cu: torch.Tensor) -> None:
    """Type, dtype and rank checks of a ``cu_seqlens`` tensor (no device copy)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32/int64, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}: use {name}.to(torch.int32)")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with n_seqs + 1 >= 2 entries, got shape "
                         f"{tuple(cu.shape)}")


def _check_values(name: str, vals: np.ndarray, total: int | None) -> None:
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {int(vals[0])}")
    if (np.diff(vals) < 0).any():
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got "
                         f"{vals[:8].tolist()}...")
    if total is not None and vals[-1] != total:
        raise ValueError(f"{name} must end at the token count {total} (the first dim of the "
                         f"tensor), got {int(vals[-1])}")


def prepare_layout(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None = None, *,
                   block_size: int, total_q: int | None = None,
                   total_k: int | None = None) -> BlockLayout:
    """Prepare the block layout of a packed batch once, for every layer and the backward.

    Args:
        cu_seqlens_q: ``[n_seqs + 1]`` int32/int64 cumulative query lengths (starting at 0).
        cu_seqlens_k: the same for keys; ``None`` means equal to ``cu_seqlens_q``.
        block_size: tokens per key block (>= 1).
        total_q, total_k: when given, the last entries must equal them (the token counts of
            your q and k tensors).

    Returns:
        a :class:`BlockLayout` to pass as ``layout=`` to ``moba_attn_varlen_func``. It keeps
        its own copies of the lengths: later in-place changes of the tensors do not reach it.

    Reads the lengths to the host once (one device sync on GPUs); every later call that
    receives the layout does no host work that depends on the values. Raises ``TypeError`` /
    ``ValueError`` (naming the fix) for bad dtypes, shapes, values or ``Tq > Tk``.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be a Python int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    same = cu_seqlens_k is None or cu_seqlens_k is cu_seqlens_q
    if not same:
        check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
        if cu_seqlens_k.device != cu_seqlens_q.device:
            raise ValueError(f"cu_seqlens_k is on {cu_seqlens_k.device} but cu_seqlens_q on "
                             f"{cu_seqlens_q.device}: move them to one device")
        if cu_seqlens_k.numel() != cu_seqlens_q.numel():
            raise ValueError(
                f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                f"got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    cq = cu_seqlens_q.detach().to("cpu", torch.int64).numpy()
    ck = cq if same else cu_seqlens_k.detach().to("cpu", torch.int64).numpy()
    _check_values("cu_seqlens_q", cq, total_q)
    _check_values("cu_seqlens_k", ck, total_k)
    lq, lk = np.diff(cq), np.diff(ck)
    bad = np.flatnonzero(lq > lk)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"sequence {i} has {int(lq[i])} queries but only {int(lk[i])} keys: MoBA needs "
            "Tq <= Tk (queries are the last Tq positions of their sequence)")
    cu_q = cu_seqlens_q.detach().to(torch.int32).clone()
    cu_k = cu_q if same else cu_seqlens_k.detach().to(torch.int32).clone()
    return _from_lengths(lq, lk, block_size, cu_q, cu_k)


def layout_from_lengths(lens_q, lens_k, block_size: int, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor) -> BlockLayout:
    """Layout from lengths already known on the host and their ``cu_seqlens`` already on
    the device (no copy either way). The caller guarantees that they agree."""
    return _from_lengths(np.asarray(lens_q), np.asarray(lens_k), block_size,
                         cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32))


def with_block_size(layout: BlockLayout, block_size: int) -> BlockLayout:
    """The same batch cut into blocks of another size (no host sync)."""
    if block_size == layout.block_size:
        return layout
    return _from_lengths(layout.lens_q, layout.lens_k, block_size, layout.cu_seqlens_q,
                         layout.cu_seqlens_k)


__all__ = ["BlockLayout", "batch_layout", "check_cu_seqlens", "layout_from_lengths", "prepare_layout",
           "with_block_size"]
