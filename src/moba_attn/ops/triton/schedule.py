"""Host-side planning of the Triton kernels: tile shapes, the forward's schedule (cost
model), partial-buffer passes, query tiles, backward and decode launch shapes.

Plain host code over a :class:`BlockLayout`'s host facts and a :class:`MobaConfig`; no
kernel is launched here (tested on CPU). Device arrays derived from a layout (query tiles,
row key ranges) are built with tensor ops only, so planning never syncs with the GPU, and
are kept on the layout object they belong to.

Measured constants say where they were measured (H200, bf16, D=128 unless stated).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..config import MobaConfig
from ..layout import BlockLayout

# Forward cost model (H200 sweep, 2026-11-29): the masked loop runs every causal key at
# about MASKED_TFLOPS; the gather pays GATHER_ENTRY_NS per (row, head, selected block)
# entry plus its keys at about GATHER_TFLOPS. Short sequences of blocks up to 256 keys go
# masked (FlashMoBA's setting at 8K), longer ones and larger blocks gather.
MASKED_TFLOPS = 360.0
GATHER_TFLOPS = 300.0
GATHER_ENTRY_NS = 0.75
# In place when a (slot, kv head, block) window averages at least this many entry tiles:
# 5% faster to 5% slower than partials at 32 tiles per window (paper 128K and 1M, GQA 8K
# and 32K) with 1.1-2.7x less peak memory; 8-61% slower at 2 tiles (blocks of 128).
IN_PLACE_MIN_TILES = 8
# Partial-buffer budget: a quarter of the output's bytes within these bounds, so the
# forward's peak stays within 1.5x dense attention's plus index-sized buffers at long T.
PART_MIN_BYTES = 256 << 20
PART_MAX_BYTES = 4 << 30
# Partial passes share one sort of every entry up to this many (row, head, slot) entries:
# its arrays and scratch take ~27 bytes per entry (0.31 GB more peak at 11.5M entries).
SHARED_SORT_MAX_ENTRIES = 1 << 24
INT16_KEYS_MAX = (1 << 15) - 1  # passes with fewer buckets sort int16 keys
MAX_GATE_SLOTS = 256  # k-1 above this is not covered (the running top set lives in registers)
LARGE_BLOCK = 512  # backward: blocks from here on use the "large" tile shapes
# Backward tiles ``(BLOCK_M, BLOCK_N, warps, stages)`` per kernel, block regime and padded
# head dim (H200 sweeps, 2026-11-28): dQ at D=128 (batch 2 x 16 heads x 128K, B=128, k=8;
# 8 heads x 128K, B=4096, k=12); dK/dV at D=128 in both regimes and D=64 large (batch 8 x
# 8K, 10/2 heads, B=512, k=3). Other head dims keep untuned shapes.
BWD_TILES = {
    ("dkdv", "small"): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 128, 8, 2),
                        128: (64, 64, 4, 3), 256: (32, 64, 8, 1)},
    ("dq", "small"): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2),
                      128: (64, 64, 4, 2), 256: (64, 32, 8, 1)},
    ("dkdv", "large"): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (32, 128, 4, 3),
                        128: (64, 64, 4, 3), 256: (32, 64, 8, 1)},
    ("dq", "large"): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (128, 64, 8, 2),
                      128: (128, 64, 8, 2), 256: (64, 32, 8, 1)},
}
DECODE_GATE_MIN_BLOCKS = 64  # fewest centroids one decode gate split scans
DECODE_MIN_CHUNK = 256  # fewest tokens one decode attention program reads


def interpreting() -> bool:
    """Kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``): small tiles."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supported(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int,
              topk: int) -> str | None:
    """Why the Triton kernels cannot run a call (``None`` when they can)."""
    if device.type != "cuda" and not interpreting():
        return (f"tensors are on {device.type}; the Triton kernels need CUDA "
                "(use backend='torch' or 'auto')")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (the Triton kernels take float16, bfloat16, float32)"
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not a power of two in [16, 256]"
    if block_size % 16:
        return f"block_size={block_size} is not a multiple of 16"
    if topk - 1 > MAX_GATE_SLOTS:
        return f"topk={topk} is above {MAX_GATE_SLOTS + 1}"
    return None


def pow2_divisor(x: int) -> int:
    return x & -x


# ----------------------------------------------------------------------------- forward shapes
def fwd_tiles(d: int, block_size: int, dense_entries: float, config: MobaConfig):
    """``(sel BM, sel BN, sel warps, diag BM, diag BN, diag warps, stages)``."""
    bn_cap = pow2_divisor(block_size)
    if config.fwd_tiles is not None:
        sbm, sbn, sw, dbm, dbn, dw, st = config.fwd_tiles
        return sbm, min(sbn, bn_cap), sw, dbm, dbn, dw, st
    if interpreting():
        return 32, min(32, bn_cap), 4, 32, 32, 4, 1
    bn = 128 if d <= 64 else (64 if d <= 128 else 32)
    # 64-entry tiles of 4 warps at blocks of 128 and 512; larger blocks keep 128-row tiles
    # (their loops are long) and 128-key tiles (3.7% faster at the paper's 1M, 5.5% at 256K)
    small = block_size <= 512
    sel_bm = 128 if (dense_entries >= 128 and d <= 128 and not small) else 64
    sel_bn = min(128 if (d <= 128 and not small) else bn, bn_cap)
    diag_bm = 128 if (block_size >= 128 and d <= 128 and not small) else 64
    return (sel_bm, sel_bn, 8 if sel_bm == 128 else 4, diag_bm, min(bn, 64),
            8 if diag_bm == 128 else 4, 2 if d > 128 else 3)


def masked_tile(d: int, block_size: int, config: MobaConfig):
    """``(BM, BN, warps, stages)`` of the masked kernel; ``BN`` divides the block size, so a
    key tile lies in one block."""
    cap = pow2_divisor(block_size)
    if config.masked_tile is not None:
        bm, bn, warps, stages = config.masked_tile
        return bm, min(bn, cap), warps, stages
    if interpreting():
        return 32, min(32, cap), 4, 1
    if d > 128:
        return 64, min(32, cap), 4, 2
    # 128x128 tiles of 8 warps at blocks of 128 and 256, 64x64 of 4 below (2026-11-29)
    return (128, 128, 8, 3) if cap >= 128 else (64, min(64, cap), 4, 3)


def gate_tile(d: int, k1: int, config: MobaConfig) -> tuple[int, int, int]:
    """``(BM rows, BN blocks, warps)`` of the gate kernel."""
    if config.gate_tile is not None:
        return config.gate_tile
    if interpreting():
        return 32, 16, 4
    kp = max(2, 1 << max(k1 - 1, 0).bit_length())
    return (64 if kp <= 64 else 32), (32 if d <= 128 else 16), 4


# ----------------------------------------------------------------------------- forward schedule
def masked_wins(layout: BlockLayout, k1: int, d: int) -> bool:
    """Whether the masked schedule's modelled time is at most the gather's, summed over
    rows: masked runs every key from the sequence's first block (random routing: some row
    of the tile chose it) to the row, ``earlier * B + B / 2``, at ``MASKED_TFLOPS``; the
    gather runs ``min(earlier, k1)`` entries of ``B`` keys, at ``GATHER_ENTRY_NS`` each (at
    D=128) plus ``GATHER_TFLOPS``, and the own block's ``B / 2`` keys."""
    earlier_sum = layout.sum_earlier_blocks()
    entries = layout.sum_earlier_blocks(k1)
    rows = layout.total_q
    bsz = layout.block_size
    ns_per_key = 4.0 * d * 1e-3  # a key's FLOPs per row and head, / 1e3: at X TFLOP/s, ns / X
    masked = (earlier_sum + 0.5 * rows) * bsz * ns_per_key / MASKED_TFLOPS
    entry_ns = GATHER_ENTRY_NS * d / 128  # measured at D=128; a row's loads and stores scale
    gather = (entries * (entry_ns + bsz * ns_per_key / GATHER_TFLOPS)
              + 0.5 * rows * bsz * ns_per_key / GATHER_TFLOPS)
    return masked <= gather


def part_budget_elems(out_bytes: int, part_itemsize: int, config: MobaConfig) -> int:
    """Elements of partial output one pass may hold."""
    if config.part_budget_bytes is not None:
        return max(1, config.part_budget_bytes // part_itemsize)
    return min(max(out_bytes // 4, PART_MIN_BYTES), PART_MAX_BYTES) // part_itemsize


def part_floored(out_bytes: int, config: MobaConfig) -> bool:
    """Whether ``PART_MIN_BYTES`` lifts the partial budget above a quarter of the output's
    bytes: the partials would then take the forward's peak over 1.5x dense attention's."""
    return config.part_budget_bytes is None and out_bytes // 4 < PART_MIN_BYTES


def choose_schedule(layout: BlockLayout, est: float, sel_bm: int, k1: int, d: int,
                    floored: bool, config: MobaConfig) -> str:
    """``config.schedule`` when set, else: "masked" where :func:`masked_wins`; "in-place"
    when the (slot, kv head, block) windows are long, or when they fill at least one entry
    tile and the partial buffer would be ``floored`` above its share of the peak bound;
    "partials" otherwise. ``est``: entries per (kv head, block) bucket; one launch per slot
    cuts every bucket into ``k1`` windows with a ragged last tile each."""
    if config.schedule is not None:
        return config.schedule
    if masked_wins(layout, k1, d):
        return "masked"
    window = est / k1
    if window >= IN_PLACE_MIN_TILES * sel_bm or (floored and window >= sel_bm):
        return "in-place"
    return "partials"


def passes(ts_np: np.ndarray, te_np: np.ndarray, hq: int, hkv: int, k1: int, d: int,
           budget: int) -> list[tuple[int, int, int, int, int, int]]:
    """Work split ``[(hk0, n_kv_heads, tile_lo, tile_hi, r0, r1)]`` so that one pass's
    partials (``rows * n_kv_heads * group * k1 * d`` elements) fit ``budget``: all kv heads
    and all rows in one pass when they fit, else groups of kv heads over all rows, else one
    kv head at a time over row chunks (long T)."""
    group = hq // hkv
    n_tiles = ts_np.shape[0]
    total = int(te_np[-1]) if n_tiles else 0
    per_head = total * group * k1 * d  # one kv head, all rows
    if per_head <= budget:
        khs = hkv if per_head * hkv <= budget else max(1, budget // max(per_head, 1))
        n_pass = -(-hkv // khs)
        khs = -(-hkv // n_pass)  # balanced groups
        return [(h, min(khs, hkv - h), 0, n_tiles, 0, total) for h in range(0, hkv, khs)]
    rows_cap = max(1, budget // (group * k1 * d))
    chunk_id = ts_np // rows_cap
    cut = np.flatnonzero(chunk_id[1:] != chunk_id[:-1]) + 1
    t_lo = np.concatenate([[0], cut]).astype(np.int64)
    t_hi = np.concatenate([cut, [n_tiles]]).astype(np.int64)
    return [(hk, 1, int(a), int(b), int(ts_np[a]), int(te_np[b - 1]))
            for hk in range(hkv) for a, b in zip(t_lo, t_hi)]


# ----------------------------------------------------------------------------- query tiles
@dataclass(frozen=True)
class QueryTiles:
    """Query tiles of at most ``bm`` rows that never cross a sequence (nor, with
    ``split_blocks``, an own-block) boundary: host bounds and their device twins."""

    start_np: np.ndarray
    end_np: np.ndarray
    start: torch.Tensor
    end: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.start_np.shape[0])


class _Numpy:
    @staticmethod
    def arange(n):
        return np.arange(n, dtype=np.int64)

    @staticmethod
    def repeat(x, counts, total):
        return np.repeat(x, counts)

    minimum = staticmethod(np.minimum)

    @staticmethod
    def relu(x):
        return np.maximum(x, 0)


class _Torch:
    def __init__(self, device):
        self.device = device

    def arange(self, n):
        return torch.arange(n, device=self.device)

    @staticmethod
    def repeat(x, counts, total):
        return torch.repeat_interleave(x, counts, output_size=total)

    minimum = staticmethod(torch.minimum)

    @staticmethod
    def relu(x):
        return x.clamp(min=0)


def _tile_bounds(xp, lq, lk, cq, bsz: int, bm: int, split: bool, n_seg: int | None = None,
                 n_tiles: int | None = None):
    """Tile ``(start, end)`` rows in ``xp`` arithmetic (numpy on the host, torch on the
    device; the same formulas). With ``split`` a segment is the query rows of one own block,
    else of one sequence; each segment is cut into tiles of ``bm`` rows."""
    p0 = lk - lq  # position of each sequence's first query
    has = (lq > 0) * 1
    c_lo = p0 // bsz
    nseg = ((lk - 1) // bsz - c_lo + 1) * has if split else has
    seq = xp.repeat(xp.arange(lq.shape[0]), nseg, n_seg)
    n_seg = int(seq.shape[0])
    j = xp.arange(n_seg) - (nseg.cumsum(0) - nseg)[seq]
    s0 = cq[seq]
    if split:
        c = c_lo[seq] + j
        s = s0 + xp.relu(c * bsz - p0[seq])
        e = s0 + xp.minimum((c + 1) * bsz - p0[seq], lq[seq])
    else:
        s, e = s0, s0 + lq[seq]
    ntile = (e - s + bm - 1) // bm
    seg = xp.repeat(xp.arange(n_seg), ntile, n_tiles)
    rank = xp.arange(int(seg.shape[0])) - (ntile.cumsum(0) - ntile)[seg]
    ts = s[seg] + rank * bm
    return ts, xp.minimum(ts + bm, e[seg]), n_seg


def query_tiles(layout: BlockLayout, bm: int, split_blocks: bool) -> QueryTiles:
    """The layout's query tiles of ``bm`` rows (memoised on the layout)."""

    def build():
        lq, lk = layout.lens_q, layout.lens_k
        cq = np.concatenate([[0], np.cumsum(lq)])[:-1]
        ts_np, te_np, n_seg = _tile_bounds(_Numpy, lq, lk, cq, layout.block_size, bm,
                                           split_blocks)
        cu_q, cu_k = layout.cu_seqlens_q.long(), layout.cu_seqlens_k.long()
        ts, te, _ = _tile_bounds(_Torch(layout.device), cu_q[1:] - cu_q[:-1],
                                 cu_k[1:] - cu_k[:-1], cu_q[:-1], layout.block_size, bm,
                                 split_blocks, n_seg, int(ts_np.shape[0]))
        return QueryTiles(ts_np, te_np, ts, te)

    return layout.memo(("query_tiles", bm, split_blocks), build)


def row_key_ranges(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ks, ke)`` per query row: its own block's first key row and one past its own key."""

    def build():
        ks = layout.blk_start[layout.row_own]
        return ks, ks + layout.row_pos % layout.block_size + 1

    return layout.memo("row_key_ranges", build)


# ----------------------------------------------------------------------------- backward shapes
def bwd_tile(kernel: str, block_d: int, block_size: int, config: MobaConfig):
    """``(BLOCK_M, BLOCK_N, warps, stages)`` of the dK/dV (``"dkdv"``) or dQ (``"dq"``)
    kernel."""
    override = config.dkdv_tile if kernel == "dkdv" else config.dq_tile
    if override is not None:
        return override
    if interpreting():
        return 32, 32, 4, 1
    return BWD_TILES[(kernel, "large" if block_size >= LARGE_BLOCK else "small")][block_d]


# ----------------------------------------------------------------------------- decode shapes
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:  # a property of the hardware
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def decode_gate_splits(pairs: int, n_cent: int, sms: int, config: MobaConfig) -> int:
    """Centroid ranges per (query row, kv head): enough programs for two per SM, each
    scanning at least ``DECODE_GATE_MIN_BLOCKS`` centroids."""
    if config.decode_gate_splits is not None:
        return config.decode_gate_splits
    if pairs >= 2 * sms:
        return 1
    want = _next_pow2(-(-2 * sms // pairs))
    return max(1, min(want, _pow2_floor(n_cent // DECODE_GATE_MIN_BLOCKS)))


def decode_attn_splits(pairs: int, entries: int, block_size: int, sms: int,
                       config: MobaConfig) -> int:
    """Token chunks per block: about four programs per SM even if every head of a group
    chose the same blocks, chunks of at least ``DECODE_MIN_CHUNK`` tokens, a multiple of 16."""
    if config.decode_attn_splits is not None:
        return config.decode_attn_splits
    most = 1
    while block_size % (32 * most) == 0 and block_size // (2 * most) >= DECODE_MIN_CHUNK:
        most *= 2
    want = _next_pow2(-(-4 * sms // (pairs * entries)))
    return min(want, most)


def decode_attn_tile(d: int, chunk: int, config: MobaConfig) -> tuple[int, int, int]:
    """``(BN, warps, stages)`` of the decode attention kernel; tiles never straddle a chunk."""
    if config.decode_attn_tile is not None:
        return config.decode_attn_tile
    cap = chunk & -chunk
    if interpreting():
        return min(32, cap), 4, 1
    return min(64 if d <= 128 else 32, cap), 4, 3 if d <= 128 else 2


__all__ = [
    "QueryTiles",
    "bwd_tile",
    "choose_schedule",
    "decode_attn_splits",
    "decode_attn_tile",
    "decode_gate_splits",
    "fwd_tiles",
    "gate_tile",
    "interpreting",
    "masked_tile",
    "masked_wins",
    "part_budget_elems",
    "part_floored",
    "passes",
    "query_tiles",
    "row_key_ranges",
    "sm_count",
    "supported",
]
