"""The backends and the one place where a call picks one.

Each backend says with one ``supports(...)`` predicate whether it can run a call (``None``)
or why not (a reason naming the fix). ``resolve`` turns the user's ``backend=`` into a
:class:`Backend` once per call; everything below it receives that object and never decides
again:

- ``"naive"``: ``ops/naive.py``, the ground truth (plain autograd, slow on purpose);
- ``"torch"``: ``ops/torch/`` (any device; the CPU path);
- ``"triton"``: ``ops/triton/`` (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``);
- ``"auto"``: Triton for CUDA tensors it supports, else torch.

An explicit name that cannot run the call raises ``ValueError``: nothing falls back
silently to something other than what was asked for.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from .layout import BlockLayout, with_block_size

BACKENDS = ("auto", "naive", "torch", "triton")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class Backend:
    """One implementation of MoBA: the modules that hold its gate, attention and KV-cache
    functions (imported when first used)."""

    name: str

    def supports(self, device: torch.device, dtype: torch.dtype, head_dim: int,
                 block_size: int, topk: int) -> str | None:
        """None when this backend runs the call, else why not (naming the fix)."""
        if self.name == "triton":
            return _triton_reason(device.type, dtype, head_dim, block_size, topk,
                                  os.environ.get("TRITON_INTERPRET", "0"))
        return None  # naive and torch run everything the public functions accept

    # ----------------------------------------------------------------- implementation modules
    def _module(self, role: str):
        return _implementation("torch" if self.name == "naive" else self.name, role)

    def gate(self, q, k, layout: BlockLayout, topk: int, config):
        """``sel [total_q, Hq, k-1]`` int64 global block ids (-1 = unused)."""
        return self._module("gate").gate(q, k, layout, topk, config)

    def centroids(self, k, layout: BlockLayout):
        return self._module("gate").block_centroids(k, layout)

    def select(self, q, centroids, layout: BlockLayout, topk: int, config):
        return self._module("gate").select_blocks(q, centroids, layout, topk, config)

    def attend(self, q, k, v, layout: BlockLayout, sel, topk: int, scale: float, config):
        """Attention given the selection: ``(out, lse [Hq, T])``."""
        if self.name == "triton":
            return self._module("forward").attend(q, k, v, layout, sel, topk, scale, config)
        return self._module("attention").forward(q, k, v, layout, sel, topk, scale, config)

    def backward(self, q, k, v, out, lse, dout, layout: BlockLayout, sel, topk: int,
                 scale: float, deterministic: bool, config):
        mod = self._module("backward" if self.name == "triton" else "attention")
        return mod.backward(q, k, v, out, lse, dout, layout, sel, topk, scale, deterministic,
                            config)

    def plan(self, layout: BlockLayout, topk: int) -> tuple[BlockLayout, int]:
        """The layout and ``topk`` the kernels run: the torch path runs an exactly-dense call
        as one causal own block per sequence (no gate, one pass)."""
        if self.name == "torch" and layout.is_dense(topk) and topk > 1:
            return with_block_size(layout, max(layout.max_len_k, 1)), 1
        return layout, topk

    # ----------------------------------------------------------------- KV cache
    def kvcache(self, q, k_cache, v_cache, cache_seqlens, cache_leftpad, centroids, *,
                block_size: int, topk: int, scale: float, config):
        """``(out [B, Tq, Hq, D], lse [B * Tq, Hq])`` over the cache; ``centroids`` None
        computes them from every full block of the cache first."""
        if centroids is None:
            centroids = self.compute_centroids(k_cache, cache_seqlens, cache_leftpad,
                                               block_size=block_size)
        if self.name == "triton":
            mod = self._module("decode")
            sel = mod.select(q, centroids, cache_seqlens, cache_leftpad, block_size=block_size,
                             topk=topk, config=config)
            return mod.attend(q, k_cache, v_cache, cache_seqlens, cache_leftpad, sel,
                              block_size=block_size, scale=scale, config=config)
        return self._module("decode").kvcache(q, k_cache, v_cache, cache_seqlens, cache_leftpad,
                                              centroids, block_size=block_size, topk=topk,
                                              scale=scale, config=config)

    def compute_centroids(self, k_cache, cache_seqlens, cache_leftpad, *, block_size: int):
        """fp32 ``[B, Tmax // block_size, Hkv, D]`` mean keys of every full block of every
        cache row: every block the rows' valid slots fill, from their first real slot."""
        bsz, tmax, hkv, d = k_cache.shape
        n_blocks = tmax // block_size
        cent = torch.zeros(bsz, n_blocks, hkv, d, dtype=torch.float32, device=k_cache.device)
        start = torch.zeros_like(cache_seqlens) if cache_leftpad is None else cache_leftpad
        return self.update_centroids(cent, k_cache, start, cache_seqlens, cache_leftpad,
                                     block_size=block_size, max_new_blocks=n_blocks)

    def update_centroids(self, centroids, k_cache, old_seqlens, new_seqlens, cache_leftpad, *,
                         block_size: int, max_new_blocks: int):
        return self._module("decode").update_centroids(
            centroids, k_cache, old_seqlens, new_seqlens, cache_leftpad, block_size=block_size,
            max_new_blocks=max_new_blocks)


@functools.cache
def _implementation(pkg: str, role: str):
    """The module ``ops/<pkg>/<role>.py``, imported when first used."""
    return importlib.import_module(f"{__package__}.{pkg}.{role}")


NAIVE, TORCH, TRITON = Backend("naive"), Backend("torch"), Backend("triton")
_BY_NAME = {"naive": NAIVE, "torch": TORCH, "triton": TRITON}


def resolve(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
            block_size: int, topk: int) -> Backend:
    """The backend that runs a call: the named one (``ValueError`` naming why it cannot run
    the call), or for ``"auto"`` Triton for CUDA tensors it supports and torch otherwise."""
    return _BY_NAME[_resolved_name(backend, device.type, dtype, head_dim, block_size, topk,
                                   os.environ.get("TRITON_INTERPRET", "0"))]


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=256)
def _resolved_name(backend, device_type, dtype, head_dim, block_size, topk, interpret) -> str:
    """The decision of :func:`resolve`: a pure function of the call's kind (kept per kind;
    a constant to the compiler)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        ok = device_type == "cuda" and _triton_reason(device_type, dtype, head_dim, block_size,
                                                      topk, interpret) is None
        return "triton" if ok else "torch"
    if backend == "triton":
        reason = _triton_reason(device_type, dtype, head_dim, block_size, topk, interpret)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
    return backend


@functools.lru_cache(maxsize=256)
def _triton_reason(device_type, dtype, head_dim, block_size, topk, interpret) -> str | None:
    if not _HAS_TRITON:
        return "the triton package is not installed (pip install 'moba-attn[triton]')"
    try:
        from .triton import schedule
    except Exception as err:  # noqa: BLE001  a triton build that cannot load
        return f"triton cannot be imported ({str(err).splitlines()[0][:120]})"
    return schedule.supported(torch.device(device_type), dtype, head_dim, block_size, topk)


def by_name(name: str) -> Backend:
    """A resolved backend from its name (custom ops carry names, not objects)."""
    return _BY_NAME[name]


__all__ = ["BACKENDS", "NAIVE", "TORCH", "TRITON", "Backend", "by_name", "resolve"]
