"""Tuning of the MoBA kernels: one frozen object, passed explicitly (``config=``).

``None`` fields mean the measured defaults, chosen per call by the planners
(``ops/triton/schedule.py`` for the GPU kernels, ``ops/torch/attention.py`` for the torch
path). Benchmarks sweep these fields and tests pin them; nothing reads a module global or an
environment variable during a call.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

GATE_PRECISIONS = ("tf32", "ieee")
SCHEDULES = ("masked", "in-place", "partials")


@dataclass(frozen=True)
class MobaConfig:
    """Kernel and chunking settings. Every field changes speed or memory, never the rule.

    Gate:
        gate_precision: GPU gate scores on TF32 tensor cores (``"tf32"``, default: about
            9x faster than IEEE fp32 at 512K tokens of blocks of 128) or in full IEEE fp32
            (``"ieee"``). TF32 can flip a selection where two blocks' scores are within its
            rounding; the CPU and torch paths always score in IEEE fp32.
        gate_tile: ``(BM rows, BN blocks, warps)`` of the Triton gate kernel.
    Triton forward:
        schedule: ``"masked"`` (query-tile-major), ``"in-place"`` or ``"partials"``
            (key-block-major gather); None: the cost model decides.
        part_budget_bytes: bytes of partial outputs one pass may hold (``"partials"``);
            None: a quarter of the output's bytes, within [256 MB, 4 GB].
        fwd_tiles: ``(sel BM, sel BN, sel warps, diag BM, diag BN, diag warps, stages)``.
        masked_tile: ``(BM, BN, warps, stages)`` of the masked schedule.
    Triton backward:
        dkdv_tile, dq_tile: ``(BLOCK_M, BLOCK_N, warps, stages)``.
        dq_part_bytes: bytes of the per-slot dQ buffer of ``deterministic=True`` before it
            is cut into row chunks.
    Triton decode:
        decode_gate_splits: centroid ranges per (row, kv head) (a power of two).
        decode_attn_splits: token chunks per block (a power of two dividing block/16).
        decode_attn_tile: ``(BN, warps, stages)``.
    Torch path:
        torch_part_elems: elements of the slot outputs ``[rows, Hq, k, D]`` of one row chunk
            (plus, off the CPU flash kernel, its own-block scores ``[rows, Hq, W]``).
        torch_tile_elems: elements of the tensors one batch of selected-block tiles holds:
            its gathered and computed rows ``[C, R, D]`` and keys ``[C, W, D]`` (plus, off the
            CPU flash kernel, its scores ``[C, R, W]``). The default keeps each fp32 tensor
            of a batch under 32 MB, the largest size glibc reuses from its heap: bigger ones
            are fresh pages every batch (about 0.5 ms/MB of page faults on the 2-core dev VM,
            more than the gather itself).
        gate_chunk_elems: elements of one ``[rows, Hq, #blocks]`` gate score chunk.
    """

    gate_precision: str = "tf32"
    gate_tile: tuple[int, int, int] | None = None
    schedule: str | None = None
    part_budget_bytes: int | None = None
    fwd_tiles: tuple[int, int, int, int, int, int, int] | None = None
    masked_tile: tuple[int, int, int, int] | None = None
    dkdv_tile: tuple[int, int, int, int] | None = None
    dq_tile: tuple[int, int, int, int] | None = None
    dq_part_bytes: int = 1 << 31
    decode_gate_splits: int | None = None
    decode_attn_splits: int | None = None
    decode_attn_tile: tuple[int, int, int] | None = None
    torch_part_elems: int = 1 << 26
    torch_tile_elems: int = 1 << 23
    gate_chunk_elems: int = 1 << 24

    def __post_init__(self):
        if self.gate_precision not in GATE_PRECISIONS:
            raise ValueError(f"gate_precision must be one of {GATE_PRECISIONS}, got "
                             f"{self.gate_precision!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or None, got {self.schedule!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):  # from JSON: tuples come back as lists
                object.__setattr__(self, f.name, tuple(v))
        for name in ("dq_part_bytes", "torch_part_elems", "torch_tile_elems", "gate_chunk_elems"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        # the custom ops take the settings as text; kept ready so compiled code only reads it
        object.__setattr__(self, "_json", json.dumps(asdict(self), sort_keys=True))

    def to_json(self) -> str:
        return self._json

    @staticmethod
    def from_json(text: str) -> MobaConfig:
        return _from_json(text)


@lru_cache(maxsize=64)
def _from_json(text: str) -> MobaConfig:  # immutable values: a cache cannot go stale
    return MobaConfig(**json.loads(text))


DEFAULT_CONFIG = MobaConfig()


def resolve_config(config: MobaConfig | None) -> MobaConfig:
    if config is None:
        return DEFAULT_CONFIG
    if not isinstance(config, MobaConfig):
        raise TypeError(f"config must be a moba_attn.MobaConfig or None, got "
                        f"{type(config).__name__}")
    return config


__all__ = ["DEFAULT_CONFIG", "GATE_PRECISIONS", "SCHEDULES", "MobaConfig", "resolve_config"]
