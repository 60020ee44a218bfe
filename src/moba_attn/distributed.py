"""Context parallelism for MoBA: one sequence (or a packed batch) sharded over the ranks of a
``torch.distributed`` process group, with outputs and gradients equal to the single-device op.

Layout
------
Every sequence is cut into chunks whose boundaries are multiples of ``block_size`` (only the
last chunk of a sequence can end on a partial block), so every key block lives whole on one
rank. ``layout="zigzag"`` (default) cuts each sequence into ``2 * world`` chunks and gives rank
``r`` chunks ``r`` and ``2*world-1-r`` (causal work and the linear gate cost balance out);
``layout="contiguous"`` gives rank ``r`` chunk ``r`` of ``world``. Chunks get
``ceil`` or ``floor`` of ``#blocks / #chunks`` blocks, so sequences whose length is not a
multiple of ``#chunks * block_size`` (or even of ``block_size``) are fine; a rank may hold
fewer rows than another, or none of a short sequence. A rank's local rows are its chunks in
the order (sequence, chunk): for a batch ``[B, T, ...]`` sharded along ``T`` this is exactly
``x_local.reshape(B * T_local, ...)``.

Supported inputs: packed batches (flash-attn varlen, ``cu_seqlens``) and equal-length batches
``[B, T, H, D]``; K/V length equals Q length (training / prefill, no KV cache).

Modes
-----
``"allgather"``: K and V are all-gathered (one collective each); each local chunk
``[s, e)`` runs the public op with keys ``[0, e)`` of its sequence, which is exact because
queries are bottom-right aligned. The backward reduce-scatters dK/dV to their owners.
Per rank it receives about ``(T - T_local) * 2 * Hkv * D`` elements forward (ranks are padded
to the largest shard) and sends as much backward.

``"selective"``: uses MoBA's structure. Each rank computes the fp32 centroids of its own
blocks (whole blocks, see above), all-gathers only those (``#blocks * Hkv * D`` fp32), gates
its queries locally with exactly the single-device rule, all-gathers the ids of the remote
blocks it needs, and fetches just those K/V blocks from their owners with one
``all_to_all_single``. Attention then runs on a compact batch (fetched blocks + the local
chunk) with the selection fixed, so it is the same computation as on one device. The backward
sends dK/dV of the fetched blocks back to their owners with the reverse ``all_to_all_single``.
Bytes moved: ``comm_bytes`` (prediction / bound) and the ``stats`` argument of
:func:`moba_attn_cp` (what one call actually moved). The saving depends on the routing: a rank
fetches the *union* of the blocks its queries select, so when many queries route to different
blocks (random inputs, long shards) it fetches nearly every earlier block and moves about as
much as ``"allgather"`` (plus the centroids); when routing concentrates on few blocks it moves
far less.

Every rank must call :func:`moba_attn_cp` (and the backward) the same number of times, with
the same layout, shapes and settings: the collectives run in the same order on all ranks.

Quick use with torchrun (``torchrun --nproc-per-node 4 train.py``)::

    import torch.distributed as dist
    from moba_attn.distributed import cp_layout, moba_attn_cp, shard, unshard

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    lay = cp_layout([T], world, block_size=4096)          # or cu_seqlens of a packed batch
    q_l, k_l, v_l = (shard(x, lay, rank) for x in (q, k, v))   # [T_local, H, D]
    out_l = moba_attn_cp(q_l, k_l, v_l, layout=lay, block_size=4096, topk=12,
                         mode="selective")
    out_l.backward(grad_l)                                  # dq/dk/dv of the local rows
    out = unshard(out_l, lay)                               # [T, Hq, D] on every rank

Transformers recipe
-------------------
Shard the *tokens* (``input_ids``, ``position_ids``, ``labels`` shifted before sharding) with
the same layout; every layer's projections, norms and MLPs are per token, so only attention
needs the other ranks. Register a context-parallel attention function and a mask function
that builds no mask::

    from transformers import AttentionInterface, AttentionMaskInterface
    from moba_attn.distributed import cp_layout, make_cp_attention_forward, shard

    lay = cp_layout([T] * batch, world, block_size=4096)       # one entry per batch row
    one = cp_layout([T], world, block_size=4096)               # for shard(..., dim=1)
    fwd = make_cp_attention_forward(lay, block_size=4096, topk=12, mode="allgather",
                                    full_attn_layers=(29, 30, 31))
    AttentionInterface.register("moba_cp", fwd)
    AttentionMaskInterface.register("moba_cp", lambda *args, **kwargs: None)
    model.set_attn_implementation("moba_cp")                   # or config._attn_implementation
    ids_l = shard(input_ids, one, rank, dim=1)                 # [batch, T_local]
    pos_l = shard(torch.arange(T).expand(batch, T), one, rank, dim=1)
    lab_l = shard(labels_shifted, one, rank, dim=1)            # labels[:, 1:] padded with -100
    logits = model(input_ids=ids_l, position_ids=pos_l, use_cache=False).logits
    loss_sum = F.cross_entropy(logits.flatten(0, 1), lab_l.flatten(), reduction="sum")
    # normalise by the global token count (all-reduce it), then backward on every rank

Layers in ``full_attn_layers`` run MoBA with ``topk`` larger than any block count, which is
exactly dense causal attention (in ``"allgather"`` mode that is plain dense context
parallelism). Padding masks, KV caches and sliding windows are not supported here: use this
for training / prefill of packed or equal-length batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
import torch.distributed as dist

from .interface import check_int, check_qkv, check_scale, moba_attn_varlen_func
from .ops import backends
from .ops.config import DEFAULT_CONFIG
from .ops.function import moba_attention
from .ops.layout import BlockLayout, layout_from_lengths

# torch >= 2.13 renames the flat collectives; older releases only have the first names
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

LAYOUTS = ("zigzag", "contiguous")
MODES = ("allgather", "selective")


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class CPLayout:
    """Which rows of a packed batch each rank holds (the same object on every rank).

    ``bounds[i]`` are the chunk boundaries of sequence ``i`` (``n_chunks + 1`` positions,
    multiples of ``block_size`` except the final ``T_i``); ``chunk_ranks[c]`` is the rank that
    holds chunk ``c`` of every sequence.
    """

    world_size: int
    block_size: int
    kind: str
    seqlens: tuple[int, ...]
    bounds: tuple[tuple[int, ...], ...]
    chunk_ranks: tuple[int, ...]
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    # --- per-rank pieces
    def pieces(self, rank: int) -> list[tuple[int, int, int]]:
        """``(sequence, start, end)`` of the rank's chunks, in local row order (empty skipped)."""
        key = ("pieces", rank)
        if key not in self._cache:
            mine = [c for c, r in enumerate(self.chunk_ranks) if r == rank]
            out = []
            for i, b in enumerate(self.bounds):
                for c in mine:
                    if b[c + 1] > b[c]:
                        out.append((i, b[c], b[c + 1]))
            self._cache[key] = out
        return self._cache[key]

    @property
    def total(self) -> int:
        return sum(self.seqlens)

    def seq_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.seqlens, dtype=np.int64)]).astype(np.int64)

    def block_offsets(self) -> np.ndarray:
        """First global block id of every sequence (``n_seqs + 1`` entries)."""
        nb = [(n + self.block_size - 1) // self.block_size for n in self.seqlens]
        return np.concatenate([[0], np.cumsum(nb, dtype=np.int64)]).astype(np.int64)

    @property
    def n_blocks(self) -> int:
        return int(self.block_offsets()[-1])

    def local_rows(self, rank: int) -> np.ndarray:
        """Global packed row index of every local row of ``rank``."""
        key = ("rows", rank)
        if key not in self._cache:
            off = self.seq_offsets()
            parts = [np.arange(off[i] + s, off[i] + e) for i, s, e in self.pieces(rank)]
            self._cache[key] = np.concatenate(parts).astype(np.int64) if parts else \
                np.zeros(0, np.int64)
        return self._cache[key]

    def num_local(self, rank: int) -> int:
        return sum(e - s for _, s, e in self.pieces(rank))

    def local_positions(self, rank: int) -> np.ndarray:
        """Position inside its sequence of every local row (e.g. for RoPE ``position_ids``)."""
        return np.concatenate([np.arange(s, e) for _, s, e in self.pieces(rank)] or
                              [np.zeros(0, np.int64)]).astype(np.int64)

    def local_cu_seqlens(self, rank: int) -> np.ndarray:
        """Cumulative lengths of the rank's pieces (each piece is a run of one sequence)."""
        return np.concatenate([[0], np.cumsum([e - s for _, s, e in self.pieces(rank)],
                                              dtype=np.int64)]).astype(np.int64)

    def local_block_ids(self, rank: int) -> np.ndarray:
        """Global ids of the blocks held by ``rank``, in local order."""
        bo, bs = self.block_offsets(), self.block_size
        parts = [np.arange(bo[i] + s // bs, bo[i] + (e + bs - 1) // bs)
                 for i, s, e in self.pieces(rank)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def block_owner(self) -> np.ndarray:
        """Rank holding each global block ``[n_blocks]``."""
        if "owner" not in self._cache:
            own = np.full(self.n_blocks, -1, np.int64)
            for r in range(self.world_size):
                own[self.local_block_ids(r)] = r
            self._cache["owner"] = own
        return self._cache["owner"]

    def repeat(self, n: int) -> CPLayout:
        """The layout of ``n`` copies of this batch (a ``[B, T]`` batch as a packed one)."""
        return CPLayout(self.world_size, self.block_size, self.kind, self.seqlens * n,
                        self.bounds * n, self.chunk_ranks)


def _chunk_bounds(length: int, n_chunks: int, block_size: int) -> tuple[int, ...]:
    nb = (length + block_size - 1) // block_size
    base, extra = divmod(nb, n_chunks)
    blocks = [base + (1 if c < extra else 0) for c in range(n_chunks)]
    edges = np.concatenate([[0], np.cumsum(blocks)]) * block_size
    return tuple(int(min(x, length)) for x in edges)


def cp_layout(seqlens, world_size: int, block_size: int, kind: str = "zigzag") -> CPLayout:
    """Build the context-parallel layout of a batch.

    Args:
        seqlens: sequence lengths (list of ints) or ``cu_seqlens`` (a 1-D int tensor starting
            at 0), one entry per sequence; ``[T] * B`` for a ``[B, T]`` batch.
        world_size: ranks in the process group.
        block_size: MoBA block size; chunk boundaries are multiples of it.
        kind: ``"zigzag"`` (2 chunks per rank and sequence: ``r`` and ``2*world-1-r``) or
            ``"contiguous"`` (chunk ``r`` of ``world``).

    Raises:
        ValueError for a bad ``kind``, ``world_size``, ``block_size`` or lengths.
    """
    check_int("world_size", world_size)
    check_int("block_size", block_size)
    if kind not in LAYOUTS:
        raise ValueError(f"layout kind must be one of {LAYOUTS}, got {kind!r}")
    if isinstance(seqlens, torch.Tensor):
        cu = seqlens.detach().cpu().to(torch.int64).tolist()
        if not cu or cu[0] != 0 or any(b < a for a, b in pairwise(cu)):
            raise ValueError("cu_seqlens must start at 0 and be non-decreasing")
        lens = [b - a for a, b in pairwise(cu)]
    else:
        lens = [int(n) for n in seqlens]
    if any(n < 0 for n in lens) or not lens:
        raise ValueError(f"sequence lengths must be >= 0 (and at least one), got {lens[:8]}")
    if kind == "zigzag":
        ranks = tuple(list(range(world_size)) + list(range(world_size - 1, -1, -1)))
    else:
        ranks = tuple(range(world_size))
    bounds = tuple(_chunk_bounds(n, len(ranks), block_size) for n in lens)
    return CPLayout(world_size, block_size, kind, tuple(lens), bounds, ranks)


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("moba_attn.distributed needs an initialised process group: "
                           "call torch.distributed.init_process_group first (torchrun sets "
                           "the environment)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, layout: CPLayout, rank: int, dim: int = 0) -> torch.Tensor:
    """The rows of ``rank`` taken from a full tensor (no communication).

    ``x`` has the batch's tokens along ``dim``: ``layout.total`` for a packed batch, or ``T``
    for a ``[B, T, ...]`` batch with a one-sequence layout (``dim=1``).
    """
    if x.shape[dim] != layout.total:
        raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim}, the layout {layout.total}")
    idx = torch.as_tensor(layout.local_rows(rank), device=x.device)
    return x.index_select(dim, idx)


def unshard(x_local: torch.Tensor, layout: CPLayout, group=None, dim: int = 0) -> torch.Tensor:
    """All ranks' rows reassembled into the full tensor, on every rank (differentiable: the
    backward hands each rank the summed gradient of its own rows)."""
    rank, world = _group_info(group)
    if world != layout.world_size:
        raise ValueError(f"layout is for {layout.world_size} ranks, the group has {world}")
    x = x_local.movedim(dim, 0)
    if x.shape[0] != layout.num_local(rank):
        raise ValueError(f"rank {rank} holds {layout.num_local(rank)} rows, x has {x.shape[0]}")
    return _AllGatherRows.apply(x.contiguous(), layout, group).movedim(0, dim)


# ----------------------------------------------------------------------------- collectives
def _gather_index(layout: CPLayout, device) -> tuple[torch.Tensor, int]:
    """Flat slot (``rank * max_rows + local row``) of every global row, and ``max_rows``."""
    key = ("gidx", str(device))
    if key not in layout._cache:
        w = layout.world_size
        max_rows = max(layout.num_local(r) for r in range(w))
        idx = np.empty(layout.total, np.int64)
        for r in range(w):
            idx[layout.local_rows(r)] = r * max_rows + np.arange(layout.num_local(r))
        layout._cache[key] = (torch.as_tensor(idx, device=device), max_rows)
    return layout._cache[key]


def _all_gather_padded(x: torch.Tensor, rows: int, group) -> torch.Tensor:
    """``x [n <= rows, ...]`` of every rank -> ``[world * rows, ...]`` (rank-major, padded)."""
    world = dist.get_world_size(group)
    buf = x.new_zeros((rows,) + tuple(x.shape[1:]))
    buf[: x.shape[0]] = x
    out = x.new_empty((world * rows,) + tuple(x.shape[1:]))
    _all_gather_flat(out, buf, group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    """Local rows of every rank -> the full packed tensor; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, layout: CPLayout, group):
        idx, max_rows = _gather_index(layout, x.device)
        ctx.layout, ctx.group, ctx.n = layout, group, x.shape[0]
        return _all_gather_padded(x, max_rows, group)[idx]

    @staticmethod
    def backward(ctx, g):
        idx, max_rows = _gather_index(ctx.layout, g.device)
        world = dist.get_world_size(ctx.group)
        full = g.new_zeros((world * max_rows,) + tuple(g.shape[1:]))
        full[idx] = g
        mine = g.new_empty((max_rows,) + tuple(g.shape[1:]))
        _reduce_scatter_flat(mine, full.contiguous(), group=ctx.group)
        return mine[: ctx.n], None, None


class _RowSlices(torch.autograd.Function):
    """Row ranges of one tensor, as views; the backward adds every range's gradient into one
    buffer of the input's size (slicing in autograd would allocate a zero-filled full-size
    gradient for every range)."""

    @staticmethod
    def forward(ctx, x, bounds):
        ctx.bounds, ctx.shape = bounds, x.shape
        return tuple(x[a:b] for a, b in bounds)

    @staticmethod
    def backward(ctx, *grads):
        out = grads[0].new_zeros(ctx.shape) if grads else None
        for (a, b), g in zip(ctx.bounds, grads):
            if g is not None:
                out[a:b] += g
        return out, None


class _FetchBlocks(torch.autograd.Function):
    """Send rows ``send_idx`` of local K/V (split by destination) and receive the requested
    rows from their owners: ``[n_recv, 2 * Hkv, D]`` (K heads, then V heads). The backward
    returns the received rows' gradients to the owners and accumulates them."""

    @staticmethod
    def forward(ctx, k, v, send_idx, send_splits, recv_splits, group, deterministic):
        hkv = k.shape[1]
        send = torch.cat([k[send_idx], v[send_idx]], dim=1)  # [n_send, 2 Hkv, D]
        recv = send.new_empty((sum(recv_splits), 2 * hkv, k.shape[2]))
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
        ctx.save_for_backward(send_idx)
        ctx.meta = (k.shape, v.shape, send_splits, recv_splits, group, deterministic)
        return recv

    @staticmethod
    def backward(ctx, g):
        (send_idx,) = ctx.saved_tensors
        k_shape, v_shape, send_splits, recv_splits, group, deterministic = ctx.meta
        hkv = k_shape[1]
        back = g.new_empty((sum(send_splits), 2 * hkv, k_shape[2]))
        dist.all_to_all_single(back, g.contiguous(), send_splits, recv_splits, group=group)
        dk, dv = g.new_zeros(k_shape), g.new_zeros(v_shape)
        if deterministic and g.device.type != "cpu":
            s0 = 0  # one destination at a time: no row repeats inside one index_add_
            for n in send_splits:
                dk.index_add_(0, send_idx[s0 : s0 + n], back[s0 : s0 + n, :hkv])
                dv.index_add_(0, send_idx[s0 : s0 + n], back[s0 : s0 + n, hkv:])
                s0 += n
        else:
            dk.index_add_(0, send_idx, back[:, :hkv])
            dv.index_add_(0, send_idx, back[:, hkv:])
        return dk, dv, None, None, None, None, None


# ----------------------------------------------------------------------------- attention given a selection
def _host_layout(cu_q: np.ndarray, cu_k: np.ndarray, block_size: int, device) -> BlockLayout:
    """Layout of a local batch whose lengths are known on the host."""
    cq = torch.as_tensor(cu_q, device=device)
    ck = torch.as_tensor(cu_k, device=device)
    return layout_from_lengths(np.diff(cu_q), np.diff(cu_k), block_size, cq, ck)


def _local_centroids(k: torch.Tensor, layout: CPLayout, rank: int,
                     be: backends.Backend) -> torch.Tensor:
    cu = layout.local_cu_seqlens(rank)
    return be.centroids(k, _host_layout(cu, cu, layout.block_size, k.device))


def _selective(q, k, v, layout: CPLayout, group, rank, topk, scale, be, deterministic,
               stats):
    dev, world, bs = q.device, layout.world_size, layout.block_size
    hkv, d = k.shape[1], k.shape[2]
    pieces = layout.pieces(rank)
    bo = layout.block_offsets()
    n_blk = layout.n_blocks
    owner = layout.block_owner()

    # 1. centroids of every block: local ones computed here, all-gathered (fp32)
    with torch.no_grad():
        cent_loc = _local_centroids(k.detach(), layout, rank, be)  # [nb_loc, Hkv, D]
        max_nb = max(len(layout.local_block_ids(r)) for r in range(world))
        gathered = _all_gather_padded(cent_loc, max(max_nb, 1), group)
        slot = np.concatenate([r * max(max_nb, 1) + np.arange(len(layout.local_block_ids(r)))
                               for r in range(world)])
        ids = np.concatenate([layout.local_block_ids(r) for r in range(world)])
        cent = torch.empty(n_blk, hkv, d, dtype=torch.float32, device=dev)
        cent[torch.as_tensor(ids, device=dev)] = gathered[torch.as_tensor(slot, device=dev)]

        # 2. gate: piece [s, e) of sequence i is a query chunk over keys [0, e)
        cu_q = layout.local_cu_seqlens(rank)
        ends = [e for _, _, e in pieces]
        cu_kv = np.concatenate([[0], np.cumsum(ends, dtype=np.int64)]).astype(np.int64)
        vlay = _host_layout(cu_q, cu_kv, bs, dev)
        vblocks = np.concatenate([np.arange(bo[i], bo[i] + (e + bs - 1) // bs)
                                  for i, _, e in pieces] or [np.zeros(0, np.int64)])
        vcent = cent[torch.as_tensor(vblocks, device=dev)]
        sel_v = be.select(q.detach(), vcent, vlay, topk, DEFAULT_CONFIG) if q.shape[0] else \
            torch.empty(0, q.shape[1], max(topk - 1, 0), dtype=torch.int64, device=dev)
        sel_v += 1  # virtual block id + 1, 0 = unused slot (so it can index tables directly)

        # 3. blocks each piece needs from before its start; remote ones are fetched
        n_virt = vblocks.size
        used = torch.zeros(n_virt + 1, dtype=torch.bool, device=dev)
        used[sel_v.view(-1)] = True
        used = used[1:].cpu().numpy()
        vfirst = np.concatenate([[0], np.cumsum([(e + bs - 1) // bs for _, _, e in pieces])])
        vfirst = vfirst.astype(np.int64)
        earlier = []  # per piece: sorted ids (inside the sequence) of the blocks before it
        for p, (i, s, _) in enumerate(pieces):
            earlier.append(np.flatnonzero(used[vfirst[p] : vfirst[p] + s // bs]))
        need = np.unique(np.concatenate([bo[i] + earlier[p] for p, (i, _, _) in
                                         enumerate(pieces)] or [np.zeros(0, np.int64)]))
        need = need[owner[need] != rank] if need.size else need
        need = need[np.argsort(owner[need], kind="stable")] if need.size else need

        # 4. who needs what: all-gather the request lists (block ids, tiny)
        counts = _all_gather_padded(torch.tensor([need.size], device=dev), 1, group).cpu()
        max_need = max(int(counts.max()), 1)
        req = _all_gather_padded(torch.as_tensor(need, device=dev), max_need, group).cpu().numpy()
        traffic = np.zeros((world, world), np.int64)  # [owner, requester] blocks
        send_blocks = []
        for j in range(world):
            ids_j = req[j * max_need : j * max_need + int(counts[j])]
            for o in range(world):
                traffic[o, j] = int((owner[ids_j] == o).sum()) if ids_j.size else 0
            send_blocks.append(ids_j[owner[ids_j] == rank] if ids_j.size else ids_j)
        piece_start = np.concatenate([[0], np.cumsum([e - s for _, s, e in pieces])])
        loc_start = np.full(n_blk, -1, np.int64)  # local row of each local block's first key
        for p, (i, s, e) in enumerate(pieces):
            j = np.arange(s // bs, (e + bs - 1) // bs)
            loc_start[bo[i] + j] = piece_start[p] + j * bs - s
        send_rows = np.concatenate([(loc_start[b][:, None] + np.arange(bs)).reshape(-1)
                                    for b in send_blocks] or [np.zeros(0, np.int64)])
        send_splits = [int(traffic[rank, j]) * bs for j in range(world)]
        recv_splits = [int(traffic[o, rank]) * bs for o in range(world)]

    # 5. fetch (differentiable), then build the compact batch: [earlier blocks | own piece]
    n_loc = k.shape[0]
    if traffic.sum() > 0:
        recv = _FetchBlocks.apply(k, v, torch.as_tensor(send_rows, device=dev), send_splits,
                                  recv_splits, group, deterministic)
        src_k = torch.cat([k, recv[:, :hkv]])
        src_v = torch.cat([v, recv[:, hkv:]])
    else:
        recv, src_k, src_v = None, k, v
    recv_start = np.full(n_blk, -1, np.int64)
    recv_start[need] = n_loc + np.arange(need.size) * bs
    rows, cu_k, first = [], [0], 0
    lut = np.full(n_virt + 1, -1, np.int64)  # virtual id + 1 -> block id in the compact batch
    for p, (i, s, e) in enumerate(pieces):
        g = bo[i] + earlier[p]
        st = np.where(owner[g] == rank, loc_start[g], recv_start[g]) if g.size else g
        rows.append((st[:, None] + np.arange(bs)).reshape(-1))
        rows.append(np.arange(piece_start[p], piece_start[p + 1]))
        m, n_own = earlier[p].size, (e + bs - 1) // bs - s // bs
        cu_k.append(cu_k[-1] + m * bs + (e - s))
        lut[1 + vfirst[p] + earlier[p]] = first + np.arange(m)
        lut[1 + vfirst[p] + s // bs : 1 + vfirst[p + 1]] = first + m + np.arange(n_own)
        first += m + n_own
    idx = torch.as_tensor(np.concatenate(rows) if rows else np.zeros(0, np.int64), device=dev)
    k_c, v_c = src_k[idx], src_v[idx]
    sel_c = torch.as_tensor(lut, device=dev)[sel_v]
    del sel_v
    clay = _host_layout(cu_q, np.asarray(cu_k, np.int64), bs, dev)
    out, lse = moba_attention(q, k_c, v_c, clay, topk=topk, scale=scale, backend=be,
                              config=DEFAULT_CONFIG, deterministic=deterministic,
                              sel=sel_c.contiguous())
    if stats is not None:
        item = k.element_size()
        stats.update({
            "mode": "selective",
            "centroid_bytes_recv": int((world - 1) * max(max_nb, 1) * hkv * d * 4),
            "request_bytes_recv": int((world - 1) * (max_need + 1) * 8),
            "fetched_blocks": int(need.size),
            "sent_blocks": int(sum(x.size for x in send_blocks)),
            "kv_bytes_recv_fwd": int(sum(recv_splits) * 2 * hkv * d * item),
            "kv_bytes_sent_fwd": int(sum(send_splits) * 2 * hkv * d * item),
            "grad_bytes_sent_bwd": int(sum(recv_splits) * 2 * hkv * d * item),
        })
        stats["bytes_recv_fwd"] = (stats["centroid_bytes_recv"] + stats["request_bytes_recv"]
                                   + stats["kv_bytes_recv_fwd"])
        stats["bytes_sent_bwd"] = stats["grad_bytes_sent_bwd"]
    return out, lse


# ----------------------------------------------------------------------------- allgather mode
def _allgather(q, k, v, layout: CPLayout, group, rank, topk, scale, backend, deterministic,
               stats):
    hkv, d = k.shape[1], k.shape[2]
    # K and V gathered apart: contiguous [total, Hkv, D] each, so a piece's key range is a
    # contiguous view (no copy in the forward, one gradient buffer each in the backward)
    kf = _AllGatherRows.apply(k, layout, group)
    vf = _AllGatherRows.apply(v, layout, group)
    off = layout.seq_offsets()
    pieces = layout.pieces(rank)
    bounds = tuple((int(off[i]), int(off[i]) + e) for i, _, e in pieces)
    k_pieces = _RowSlices.apply(kf, bounds) if pieces else ()
    v_pieces = _RowSlices.apply(vf, bounds) if pieces else ()
    outs, lses, r0 = [], [], 0
    for (i, s, e), kp, vp in zip(pieces, k_pieces, v_pieces):
        n = e - s
        cu_q = torch.tensor([0, n], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, e], dtype=torch.int32, device=q.device)
        o, l = moba_attn_varlen_func(q[r0 : r0 + n], kp, vp, cu_q, cu_k, n, e,
                                     block_size=layout.block_size, topk=topk,
                                     softmax_scale=scale, return_lse=True,
                                     deterministic=deterministic, validate=False,
                                     backend=backend)
        outs.append(o)
        lses.append(l)
        r0 += n
    if stats is not None:
        _, max_rows = _gather_index(layout, q.device)
        b = int((layout.world_size - 1) * max_rows * 2 * hkv * d * k.element_size())
        stats.update({"mode": "allgather", "kv_bytes_recv_fwd": b, "bytes_recv_fwd": b,
                      "grad_bytes_sent_bwd": b, "bytes_sent_bwd": b})
    if not outs:  # no rows here: still depend on the gathers so that their backward runs
        return (q * 0 + (kf.sum() + vf.sum()) * 0,
                q.new_empty(q.shape[1], 0, dtype=torch.float32))
    return torch.cat(outs), torch.cat(lses, dim=1)


# ----------------------------------------------------------------------------- public API
def moba_attn_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    layout: CPLayout | None = None,
    group=None,
    mode: str = "allgather",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
    stats: dict | None = None,
):
    """Context-parallel causal MoBA: this rank's rows of a sharded batch, exactly as the
    single-device ``moba_attn_varlen_func`` computes them.

    Args:
        q: this rank's queries, ``[T_local, Hq, D]`` (packed: the rows
            ``layout.local_rows(rank)`` of the full batch) or ``[B, T_local, Hq, D]`` (every
            batch row sharded along T with a one-sequence layout; see :func:`shard`).
        k, v: this rank's keys/values of the same rows, ``[..., Hkv, D]``, ``Hq % Hkv == 0``.
        block_size: tokens per key block; topk: blocks per query *counting its own block*.
        layout: the :class:`CPLayout` of the batch (from :func:`cp_layout`, with this
            ``block_size``). ``None``: one sequence per batch row of length
            ``T_local * world`` with the zigzag layout (an error if that does not give every
            rank ``T_local`` rows).
        group: the process group (default: the world).
        mode: ``"allgather"`` (all-gather K/V) or ``"selective"`` (all-gather centroids,
            fetch only the selected blocks). Same results; different traffic.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return ``lse`` (``[Hq, T_local]``, or ``[B, Hq, T_local]`` for 4-D).
        deterministic: passed to the attention kernels (fixed-order reductions).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` (``"naive"`` only in allgather mode).
        stats: a dict to fill with this rank's communication of the call (bytes received in
            the forward, bytes sent in the backward, fetched blocks).

    Returns:
        ``out`` in q's shape and dtype, or ``(out, lse)``.

    Raises:
        TypeError / ValueError for bad shapes, dtypes, settings or a layout that does not
        match the group or the local row count; RuntimeError without a process group.
    """
    rank, world = _group_info(group)
    four_d = q.dim() == 4
    check_qkv(q, k, v, 4 if four_d else 3,
               "[B, T_local, heads, head_dim]" if four_d else "[T_local, heads, head_dim]")
    check_int("block_size", block_size)
    check_int("topk", topk)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"q and k/v must hold the same local rows, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)} (K/V caches are not supported here)")
    batch = q.shape[0] if four_d else 1
    t_local = q.shape[1] if four_d else q.shape[0]
    if layout is None:
        layout = cp_layout([t_local * world], world, block_size)
        if any(layout.num_local(r) != t_local for r in range(world)):
            raise ValueError(
                f"cannot infer the layout from T_local={t_local}: pass layout=cp_layout(...) "
                "(needed when T is not a multiple of 2 * world * block_size)")
    if layout.world_size != world:
        raise ValueError(f"layout is for {layout.world_size} ranks, the group has {world}")
    if layout.block_size != block_size:
        raise ValueError(f"layout was built for block_size={layout.block_size}, the call uses "
                         f"{block_size}: build it with cp_layout(..., block_size={block_size})")
    if four_d:
        if len(layout.seqlens) == 1 and batch > 1:
            layout = layout.repeat(batch)
        if len(layout.seqlens) != batch:
            raise ValueError(f"a [B, T_local, H, D] input needs a one-sequence layout (or one "
                             f"with B={batch} sequences), got {len(layout.seqlens)}")
        q, k, v = (x.reshape(batch * t_local, x.shape[2], x.shape[3]) for x in (q, k, v))
    if q.shape[0] != layout.num_local(rank):
        raise ValueError(f"rank {rank} holds {layout.num_local(rank)} rows in this layout, "
                         f"q has {q.shape[0]}: shard with moba_attn.distributed.shard")
    scale = check_scale(softmax_scale, q.shape[-1])
    be = backends.resolve(backend, q.device, q.dtype, q.shape[-1], block_size, topk)
    if mode == "allgather":
        out, lse = _allgather(q, k, v, layout, group, rank, topk, scale, be.name, deterministic,
                              stats)
    else:
        if be is backends.NAIVE:
            raise ValueError("mode='selective' runs the torch or triton path, not 'naive'")
        out, lse = _selective(q, k, v, layout, group, rank, topk, scale, be, deterministic,
                              stats)
    if four_d:
        out = out.reshape(batch, t_local, *out.shape[1:])
        lse = lse.reshape(lse.shape[0], batch, t_local).transpose(0, 1)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- bytes moved
def comm_bytes(layout: CPLayout, mode: str, *, n_kv_heads: int, head_dim: int,
               itemsize: int = 2, topk: int | None = None, n_q_heads: int | None = None,
               fetched_blocks: list[int] | None = None) -> list[dict]:
    """Bytes each rank receives in the forward / sends in the backward, per mode.

    ``"allgather"``: exact (padded all-gather of K/V; the backward reduce-scatter moves the
    same amount). ``"selective"``: centroids and request lists, plus the fetched K/V blocks:
    ``fetched_blocks[r]`` (e.g. ``stats["fetched_blocks"]`` of a real call) when given, else
    an upper bound (every remote block before the rank's last chunk, capped by
    ``rows * Hq * (topk - 1)``). Returns one dict per rank.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    w, bs = layout.world_size, layout.block_size
    row_bytes = 2 * n_kv_heads * head_dim * itemsize
    out = []
    if mode == "allgather":
        max_rows = max(layout.num_local(r) for r in range(w))
        for _ in range(w):
            b = (w - 1) * max_rows * row_bytes
            out.append({"bytes_recv_fwd": b, "bytes_sent_bwd": b})
        return out
    if fetched_blocks is None and topk is None:
        raise ValueError("selective mode needs topk (for the bound) or fetched_blocks")
    owner, bo = layout.block_owner(), layout.block_offsets()
    max_nb = max(len(layout.local_block_ids(r)) for r in range(w))
    for r in range(w):
        if fetched_blocks is not None:
            n = int(fetched_blocks[r])
        else:
            cand = set()
            for i, _, e in layout.pieces(r):
                last = bo[i] + (e - 1) // bs  # candidates are strictly earlier blocks
                cand.update(b for b in range(int(bo[i]), int(last)) if owner[b] != r)
            cap = layout.num_local(r) * (n_q_heads or n_kv_heads) * max(topk - 1, 0)
            n = min(len(cand), cap)
        cent = (w - 1) * max_nb * n_kv_heads * head_dim * 4
        kv = n * bs * row_bytes
        out.append({"bytes_recv_fwd": cent + kv, "centroid_bytes_recv": cent,
                    "kv_bytes_recv_fwd": kv, "bytes_sent_bwd": kv, "fetched_blocks": n})
    return out


# ----------------------------------------------------------------------------- transformers
def make_cp_attention_forward(layout: CPLayout, *, block_size: int, topk: int,
                              mode: str = "allgather", group=None,
                              full_attn_layers: tuple[int, ...] = (), backend: str = "auto"):
    """An ``AttentionInterface`` function running context-parallel MoBA (see the module doc).

    The returned ``fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
    **kwargs)`` takes transformers' ``[B, H, T_local, D]`` tensors of the local shard and
    returns ``(out [B, T_local, Hq, D], None)``. ``layout`` describes the ``[B, T]`` batch
    (one sequence, or ``B`` of them). Layers whose ``module.layer_idx`` is in
    ``full_attn_layers`` run dense causal attention. Raises ValueError for a padding mask, a
    KV cache (more keys than queries) or attention dropout in training.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    full = {int(i) for i in full_attn_layers}
    # topk covering every block of the longest sequence: MoBA == dense causal attention
    dense_topk = max(1, max((n + block_size - 1) // block_size for n in layout.seqlens))

    def cp_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
        if attention_mask is not None and not (
                isinstance(attention_mask, torch.Tensor) and bool(attention_mask.all())):
            raise ValueError("context-parallel MoBA takes no padding mask: pack or use "
                             "equal-length rows and register a mask function returning None")
        if key.shape[2] != query.shape[2]:
            raise ValueError("context-parallel MoBA has no KV cache: call with use_cache=False")
        if dropout and module.training:
            raise ValueError(f"attention dropout is not supported (got p={dropout})")
        k_eff = dense_topk if getattr(module, "layer_idx", None) in full else topk
        out = moba_attn_cp(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           block_size=block_size, topk=k_eff, layout=layout, group=group,
                           mode=mode, softmax_scale=scaling, backend=backend)
        return out, None

    return cp_attention_forward


__all__ = [
    "CPLayout",
    "comm_bytes",
    "cp_layout",
    "make_cp_attention_forward",
    "moba_attn_cp",
    "shard",
    "unshard",
]
