"""MoBA's compute as ``torch.library`` custom ops, for ``torch.compile`` (``fullgraph=True``).

``MobaAttention`` (``function.py``) calls these two opaque ops when it is being compiled;
they are its forward and backward compute, not a second autograd formula:

- ``moba_attn::fwd(q, k, v, cu_q, cu_k, seq_q, seq_k, block_size, topk, scale, backend,
  config) -> (out, lse, sel)``: gate + attention; ``sel [total_q, Hq, k-1]`` (int64 global
  block ids, -1 = unused) goes to the backward so it reuses the forward's exact routing;
- ``moba_attn::bwd(dout, q, k, v, out, lse, sel, cu_q, cu_k, seq_q, seq_k, block_size, topk,
  scale, deterministic, backend, config) -> (dq, dk, dv)``.

The layout is rebuilt inside each op: from the shapes when ``seq_q, seq_k >= 0`` (equal
lengths: no host sync, so CUDA graphs can capture it), else from ``cu_seqlens`` (one host
copy). ``backend`` is a resolved backend's name, ``config`` a ``MobaConfig`` as JSON.
``torch.library.triton_op`` is not used: it does not run under the Triton interpreter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import by_name
from .config import MobaConfig
from .layout import BlockLayout, batch_layout, prepare_layout


def _layout(q: Tensor, cu_q: Tensor, cu_k: Tensor, seq_q: int, seq_k: int, block_size: int,
            backend, topk: int) -> tuple[BlockLayout, int]:
    if seq_q >= 0:
        lay = batch_layout(cu_q.shape[0] - 1, seq_q, seq_k, block_size, q.device)
    else:
        lay = prepare_layout(cu_q, cu_k, block_size=block_size)
    return backend.plan(lay, topk)


@torch.library.custom_op("moba_attn::fwd", mutates_args=())
def moba_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, seq_q: int,
                seq_k: int, block_size: int, topk: int, scale: float, backend: str,
                config: str) -> tuple[Tensor, Tensor, Tensor]:
    be, cfg = by_name(backend), MobaConfig.from_json(config)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    layout, topk_run = _layout(q, cu_q, cu_k, seq_q, seq_k, block_size, be, topk)
    with torch.no_grad():
        sel = be.gate(q, k, layout, topk_run, cfg)
        out, lse = be.attend(q, k, v, layout, sel, topk_run, scale, cfg)
    if topk_run != topk:  # exactly dense as one own block: no selected slots to keep
        sel = torch.full((q.shape[0], q.shape[1], topk - 1), -1, dtype=torch.int64,
                         device=q.device)
    return out.contiguous(), lse.float().contiguous(), sel.to(torch.int64).contiguous()


@moba_fwd_op.register_fake
def _(q, k, v, cu_q, cu_k, seq_q, seq_k, block_size, topk, scale, backend, config):
    total_q, hq, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((hq, total_q), dtype=torch.float32),
            q.new_empty((total_q, hq, max(topk - 1, 0)), dtype=torch.int64))


@torch.library.custom_op("moba_attn::bwd", mutates_args=())
def moba_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                sel: Tensor, cu_q: Tensor, cu_k: Tensor, seq_q: int, seq_k: int,
                block_size: int, topk: int, scale: float, deterministic: bool, backend: str,
                config: str) -> tuple[Tensor, Tensor, Tensor]:
    be, cfg = by_name(backend), MobaConfig.from_json(config)
    q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
    layout, topk_run = _layout(q, cu_q, cu_k, seq_q, seq_k, block_size, be, topk)
    with torch.no_grad():
        dq, dk, dv = be.backward(q, k, v, out, lse, dout, layout, sel, topk_run, scale,
                                 deterministic, cfg)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@moba_bwd_op.register_fake
def _(dout, q, k, v, out, lse, sel, cu_q, cu_k, seq_q, seq_k, block_size, topk, scale,
      deterministic, backend, config):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


# ----------------------------------------------------------------------------- KV cache
@torch.library.custom_op("moba_attn::kvcache", mutates_args=())
def moba_kvcache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                    cache_leftpad: Tensor | None, centroids: Tensor | None, block_size: int,
                    topk: int, scale: float, backend: str,
                    config: str) -> tuple[Tensor, Tensor]:
    be, cfg = by_name(backend), MobaConfig.from_json(config)
    with torch.no_grad():
        out, lse = be.kvcache(q, k_cache, v_cache, cache_seqlens, cache_leftpad, centroids,
                              block_size=block_size, topk=topk, scale=scale, config=cfg)
    return out.contiguous(), lse.contiguous()


@moba_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cache_leftpad, centroids, block_size, topk, scale,
      backend, config):
    bsz, tq, hq, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((bsz * tq, hq), dtype=torch.float32))


@torch.library.custom_op("moba_attn::update_centroids", mutates_args=("centroids",))
def moba_update_centroids_op(centroids: Tensor, k_cache: Tensor, old_seqlens: Tensor,
                             new_seqlens: Tensor, cache_leftpad: Tensor | None, block_size: int,
                             max_new_blocks: int, backend: str) -> None:
    with torch.no_grad():
        by_name(backend).update_centroids(centroids, k_cache, old_seqlens, new_seqlens,
                                          cache_leftpad, block_size=block_size,
                                          max_new_blocks=max_new_blocks)


@moba_update_centroids_op.register_fake
def _(centroids, k_cache, old_seqlens, new_seqlens, cache_leftpad, block_size, max_new_blocks,
      backend):
    return None


__all__ = ["moba_bwd_op", "moba_fwd_op", "moba_kvcache_op", "moba_update_centroids_op"]
