"""The public MoBA functions: validation at the boundary, the layout, the backend chosen once.

Each function validates its inputs (errors name the fix), prepares or checks the block
layout, resolves the backend with ``ops.backends.resolve`` and hands both to the ops layer
(``ops.function.moba_attention`` for the packed op, the backend's KV-cache functions for
``moba_attn_with_kvcache``). Nothing below this file validates or decides again.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .ops import backends
from .ops.config import MobaConfig, resolve_config
from .ops.function import MobaAttention, moba_attention
from .ops.layout import BlockLayout, batch_layout, check_cu_seqlens, prepare_layout

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = backends.BACKENDS
_HEADS_FIRST = (" If your tensors are heads-first ([batch, heads, seqlen, head_dim], as "
                "transformers passes them), pass q.transpose(1, 2) and the same for k and v.")


# ----------------------------------------------------------------------------- validation
def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_scale(softmax_scale, head_dim: int) -> float:
    """The softmax scale to use: ``head_dim ** -0.5`` by default, else a finite number > 0."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got "
                        f"{type(softmax_scale).__name__}")
    scale = float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"softmax_scale must be a finite number > 0 (or None for "
                         f"head_dim ** -0.5), got {softmax_scale!r}")
    return scale


def check_qkv(q, k, v, rank: int, layout: str, hint: str = "") -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have shape {layout} ({rank} dims), got "
                             f"{tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}: "
                        "cast them, e.g. k = k.to(q.dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError("head_dim must be >= 1, got 0")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number "
                         f"of key/value heads ({hkv}) for GQA/MQA.{hint}")


def _check_cu_device(name: str, cu: torch.Tensor, device: torch.device) -> None:
    check_cu_seqlens(name, cu)
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the tensors are on {device}: move it there")


def _resolve(backend: str, q: torch.Tensor, block_size: int, topk: int) -> backends.Backend:
    return backends.resolve(backend, q.device, q.dtype, q.shape[-1], block_size, topk)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.to(b.device, b.dtype), b))


def _meta_outputs(q: torch.Tensor, lse_shape: tuple[int, ...], return_lse: bool):
    out = torch.empty_like(q)
    return (out, q.new_empty(lse_shape, dtype=torch.float32)) if return_lse else out


# ----------------------------------------------------------------------------- varlen
def moba_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    block_size: int,
    topk: int,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    validate: bool = True,
    backend: str = "auto",
    layout: BlockLayout | None = None,
    config: MobaConfig | None = None,
):
    """Causal MoBA over a packed batch of sequences (flash-attn's varlen layout).

    Args:
        q: ``[total_q, Hq, D]``; the queries of sequence ``i`` are rows
            ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and are the *last* ``Tq_i`` positions of
            that sequence (bottom-right alignment: chunked prefill and decode use this too).
        k, v: ``[total_k, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA; K/V are not repeated).
        cu_seqlens_q, cu_seqlens_k: ``[n_seqs + 1]`` int32/int64 cumulative lengths starting at
            0; zero-length sequences are allowed; ``Tq_i <= Tk_i``.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence.
        block_size: tokens per key block (>= 1); blocks never cross sequences.
        topk: blocks each query attends, *counting its own block* (>= 1). ``topk=1`` is
            block-local causal attention; ``topk >= ceil(Tk / block_size)`` is dense causal.
        softmax_scale: a finite number > 0; defaults to ``D ** -0.5``.
        return_lse: also return ``lse [Hq, total_q]`` (fp32, natural log, over attended keys).
        deterministic: bit-identical results run to run (matters for GPU backward passes).
        validate: check the values of ``cu_seqlens_*`` (a device-to-host copy on GPUs). Shape,
            dtype and device checks always run.
        backend: ``"auto"`` (Triton for CUDA tensors it supports, else torch), ``"torch"``,
            ``"triton"`` or ``"naive"`` (the slow reference). A named backend that cannot run
            the call raises ``ValueError``.
        layout: the batch's layout from :func:`moba_attn.prepare_layout` (prepare it once,
            pass it to every layer: no host work or sync per call). Without it the layout is
            built here, which reads ``cu_seqlens`` to the host (one sync on GPUs).
        config: a :class:`moba_attn.MobaConfig` (kernel tiles, schedule, gate precision);
            None uses the measured defaults.

    Returns:
        ``out [total_q, Hq, D]`` in q's dtype, or ``(out, lse)`` when ``return_lse``.

    Raises:
        TypeError / ValueError with the fix in the message for bad shapes, dtypes, devices,
        ``cu_seqlens``, ``block_size``, ``topk``, ``softmax_scale``, ``Tq > Tk``, a backend
        that cannot run the call, or a ``layout`` that does not match the call.

    Under ``torch.compile`` the call runs through the ``moba_attn::fwd/bwd`` custom ops
    (``fullgraph=True`` works; ``cu_seqlens`` values are not re-checked there).
    """
    check_qkv(q, k, v, 3, "[total_tokens, heads, head_dim]")
    check_int("block_size", block_size)
    check_int("topk", topk)
    check_int("max_seqlen_q", max_seqlen_q, 0)
    check_int("max_seqlen_k", max_seqlen_k, 0)
    for name, val in (("return_lse", return_lse), ("deterministic", deterministic),
                      ("validate", validate)):
        check_bool(name, val)
    scale = check_scale(softmax_scale, q.shape[-1])
    cfg = resolve_config(config)
    _check_cu_device("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_device("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got {cu_seqlens_q.numel() - 1} and "
                         f"{cu_seqlens_k.numel() - 1}")
    be = _resolve(backend, q, block_size, topk)
    if q.device.type == "meta":
        return _meta_outputs(q, (q.shape[1], q.shape[0]), return_lse)

    if torch.compiler.is_compiling() and be is not backends.NAIVE:
        # opaque custom ops: the layout is rebuilt inside them, values are not re-checked
        cu_q, cu_k = (cu_seqlens_q, cu_seqlens_k) if layout is None else \
            (layout.cu_seqlens_q, layout.cu_seqlens_k)
        out, lse = MobaAttention.apply(q, k, v, None, (cu_q, cu_k, -1, -1), None, block_size,
                                       topk, scale, be.name, cfg.to_json(), deterministic)
        return (out, lse) if return_lse else out

    if layout is None:
        layout = prepare_layout(cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                total_q=q.shape[0], total_k=k.shape[0])
    else:
        _check_layout(layout, q, k, cu_seqlens_q, cu_seqlens_k, block_size, validate)
    if layout.max_len_q > max_seqlen_q and validate:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} is smaller than the longest query "
                         f"sequence {layout.max_len_q}")
    if layout.max_len_k > max_seqlen_k and validate:
        raise ValueError(f"max_seqlen_k={max_seqlen_k} is smaller than the longest key "
                         f"sequence {layout.max_len_k}")
    out, lse = moba_attention(q, k, v, layout, topk=topk, scale=scale, backend=be, config=cfg,
                              deterministic=deterministic)
    return (out, lse) if return_lse else out


def _check_layout(layout, q, k, cu_q, cu_k, block_size: int, validate: bool) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must come from moba_attn.prepare_layout, got "
                        f"{type(layout).__name__}")
    if layout.block_size != block_size:
        raise ValueError(f"layout was prepared for block_size={layout.block_size}, the call uses "
                         f"{block_size}: prepare it with block_size={block_size}")
    if layout.total_q != q.shape[0] or layout.total_k != k.shape[0]:
        raise ValueError(f"layout describes {layout.total_q} query and {layout.total_k} key rows, "
                         f"but q has {q.shape[0]} and k {k.shape[0]}: prepare the layout of "
                         "this batch")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but the tensors are on {q.device}")
    if validate and not (_same_values(cu_q, layout.cu_seqlens_q)
                         and _same_values(cu_k, layout.cu_seqlens_k)):
        raise ValueError("cu_seqlens_q/k differ from the ones the layout was prepared from: "
                         "call moba_attn.prepare_layout again after changing them")


# ----------------------------------------------------------------------------- batch
def moba_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    validate: bool = True,
    backend: str = "auto",
    config: MobaConfig | None = None,
):
    """Causal MoBA over a batch of equal-length sequences (flash-attn's batch layout).

    Tensors are **sequence-first**, as in flash-attn: ``[batch, seqlen, heads, head_dim]``.
    Heads-first tensors (``[batch, heads, seqlen, head_dim]``, what transformers and SDPA
    use) whose shapes happen to fit are silently wrong: transpose them with
    ``.transpose(1, 2)`` first.

    Args:
        q: ``[batch, Tq, Hq, D]``; k, v: ``[batch, Tk, Hkv, D]`` with ``Tq <= Tk`` (the queries
            are the last ``Tq`` positions) and ``Hq % Hkv == 0``.
        validate: kept for symmetry with the varlen function; the layout comes from the
            shapes, so there is nothing to copy or check.
        Other arguments as in :func:`moba_attn_varlen_func`.

    Returns:
        ``out [batch, Tq, Hq, D]``, or ``(out, lse)`` with ``lse [batch, Hq, Tq]`` fp32.

    The block layout comes from the shapes alone: no device-to-host copy, no host sync, so
    repeated calls and CUDA graph capture work. Raises as :func:`moba_attn_varlen_func`.
    """
    check_qkv(q, k, v, 4, "[batch, seqlen, heads, head_dim]", _HEADS_FIRST)
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    if k.shape[0] != b:
        raise ValueError(f"q has batch {b} but k/v have batch {k.shape[0]}")
    if tq > tk:
        raise ValueError(f"q has {tq} positions but k/v only {tk}: MoBA needs Tq <= Tk (queries "
                         f"are the last Tq positions of the sequence).{_HEADS_FIRST}")
    check_int("block_size", block_size)
    check_int("topk", topk)
    for name, val in (("return_lse", return_lse), ("deterministic", deterministic),
                      ("validate", validate)):
        check_bool(name, val)
    scale = check_scale(softmax_scale, d)
    cfg = resolve_config(config)
    be = _resolve(backend, q, block_size, topk)
    if q.device.type == "meta" or b == 0:
        out = q.new_empty(q.shape) if b == 0 else torch.empty_like(q)
        return (out, q.new_empty((b, hq, tq), dtype=torch.float32)) if return_lse else out
    qf, kf, vf = q.reshape(b * tq, hq, d), k.reshape(b * tk, -1, d), v.reshape(b * tk, -1, d)
    if torch.compiler.is_compiling() and be is not backends.NAIVE:
        steps = torch.arange(b + 1, dtype=torch.int32, device=q.device)
        out, lse = MobaAttention.apply(qf, kf, vf, None, (steps * tq, steps * tk, tq, tk), None,
                                       block_size, topk, scale, be.name, cfg.to_json(),
                                       deterministic)
    else:
        layout = batch_layout(b, tq, tk, block_size, q.device)
        out, lse = moba_attention(qf, kf, vf, layout, topk=topk, scale=scale, backend=be,
                                  config=cfg, deterministic=deterministic)
    out = out.reshape(b, tq, hq, d)
    if return_lse:
        return out, lse.reshape(hq, b, tq).transpose(0, 1)
    return out


# ----------------------------------------------------------------------------- KV cache
def _check_seqlens(name: str, t, bsz: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor of shape [batch], got "
                        f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if t.shape != (bsz,):
        raise ValueError(f"{name} must have shape [batch] = [{bsz}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: move it there")


def moba_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    softmax_scale: float | None = None,
    centroids: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    return_lse: bool = False,
    validate: bool = True,
    backend: str = "auto",
    config: MobaConfig | None = None,
):
    """MoBA for the last ``Tq`` positions of each row of a KV cache (decode, chunked prefill,
    speculative decoding), shaped like flash-attn's ``flash_attn_with_kvcache``.

    Args:
        q: ``[B, Tq, Hq, D]``: the last ``Tq`` positions of each row's valid cache, whose keys
            and values are already in the cache (decode is ``Tq = 1``).
        k_cache, v_cache: ``[B, Tmax, Hkv, D]``, ``Hq % Hkv == 0``; strided views are fine
            (e.g. a transformers cache ``[B, Hkv, Tmax, D]`` transposed), the last dim must be
            contiguous.
        cache_seqlens: ``[B]`` int32/int64: row ``b``'s valid slots end at
            ``cache_seqlens[b]`` (each ``>= Tq``).
        block_size, topk: as in :func:`moba_attn_varlen_func` (``topk`` counts the own block).
        softmax_scale: a finite number > 0; defaults to ``D ** -0.5``.
        centroids: optional fp32 ``[B, NB, Hkv, D]``: the mean keys of each row's full blocks
            (block ``j`` = real tokens ``j*B .. (j+1)*B - 1``), read only; ``NB`` must cover
            every block before a query's own block. None computes them from the cache (reads
            every full block). Keep them with :func:`moba_attn.update_centroids`.
        cache_leftpad: optional ``[B]``: row ``b``'s real tokens start at slot
            ``cache_leftpad[b]`` (left padding); blocks count from there.
        return_lse: also return ``lse [B, Hq, Tq]`` (fp32, natural log).
        validate: check values (``cache_seqlens - cache_leftpad >= Tq``, ``<= Tmax``, the
            centroids cover the rows): a device-to-host copy. ``False`` skips them; every
            other check always runs, and then the call never syncs with the host.
        backend, config: as in :func:`moba_attn_varlen_func`.

    Returns:
        ``out [B, Tq, Hq, D]`` in q's dtype, or ``(out, lse)``. Not differentiable.

    Same rule as the packed functions with bottom-right alignment per row: query ``i`` of
    row ``b`` sits at real position ``cache_seqlens[b] - cache_leftpad[b] - Tq + i``.
    """
    check_qkv(q, k_cache, v_cache, 4, "[batch, seqlen, heads, head_dim]", _HEADS_FIRST)
    bsz, tq, hq, d = q.shape
    tmax, hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != bsz:
        raise ValueError(f"q has batch {bsz} but the caches have batch {k_cache.shape[0]}")
    if tq > tmax:
        raise ValueError(f"q has {tq} positions but the cache only {tmax} slots.{_HEADS_FIRST}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last dim (head_dim)")
    check_int("block_size", block_size)
    check_int("topk", topk)
    check_bool("return_lse", return_lse)
    check_bool("validate", validate)
    scale = check_scale(softmax_scale, d)
    cfg = resolve_config(config)
    _check_seqlens("cache_seqlens", cache_seqlens, bsz, q.device)
    if cache_leftpad is not None:
        _check_seqlens("cache_leftpad", cache_leftpad, bsz, q.device)
    if centroids is not None:
        want = (bsz, centroids.shape[1] if centroids.dim() == 4 else -1, hkv, d)
        if (not isinstance(centroids, torch.Tensor) or centroids.dim() != 4
                or tuple(centroids.shape) != want or centroids.dtype != torch.float32):
            raise ValueError(f"centroids must be fp32 [B, NB, Hkv, D] = [{bsz}, NB, {hkv}, {d}], "
                             f"got {tuple(centroids.shape)} {centroids.dtype}")
        if centroids.device != q.device or centroids.stride(-1) != 1:
            raise ValueError("centroids must be on q's device with a contiguous last dim")
    be = _resolve(backend, q, block_size, topk)
    if q.device.type == "meta" or bsz == 0 or tq == 0:
        out = torch.empty_like(q)
        return (out, q.new_empty((bsz, hq, tq), dtype=torch.float32)) if return_lse else out
    if validate:
        ends = cache_seqlens.detach().to("cpu", torch.int64).numpy()
        starts = np.zeros_like(ends) if cache_leftpad is None else \
            cache_leftpad.detach().to("cpu", torch.int64).numpy()
        lens = ends - starts
        for cond, msg in ((starts < 0, "cache_leftpad must be >= 0"),
                          (ends > tmax, f"cache_seqlens must be <= the cache's {tmax} slots"),
                          (lens < tq, (f"each row needs >= Tq={tq} valid slots "
                                       "(cache_seqlens - cache_leftpad >= Tq)"))):
            if cond.any():
                i = int(np.flatnonzero(cond)[0])
                raise ValueError(f"{msg}; row {i} has cache_leftpad={int(starts[i])}, "
                                 f"cache_seqlens={int(ends[i])}")
        if centroids is not None and (lens.max(initial=1) - 1) // block_size > centroids.shape[1]:
            raise ValueError(f"centroids hold {centroids.shape[1]} blocks but a row has "
                             f"{int(lens.max())} tokens: they must cover every block before "
                             f"the last query's own block")
    if be is backends.NAIVE:
        from .ops.naive import moba_attn_with_kvcache_naive

        out, lse = moba_attn_with_kvcache_naive(
            q, k_cache, v_cache, cache_seqlens, block_size=block_size, topk=topk,
            softmax_scale=scale, cache_leftpad=cache_leftpad,
            compute_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        out = out.to(q.dtype)
    else:
        from .ops.custom_op import moba_kvcache_op

        run = moba_kvcache_op if torch.compiler.is_compiling() else _kvcache
        out, lse = run(q, k_cache, v_cache, cache_seqlens, cache_leftpad, centroids, block_size,
                       topk, scale, be.name, cfg.to_json() if run is moba_kvcache_op else cfg)
        lse = lse.view(bsz, tq, hq).transpose(1, 2)
    return (out, lse) if return_lse else out


def _kvcache(q, k_cache, v_cache, cache_seqlens, cache_leftpad, centroids, block_size, topk,
             scale, backend_name, cfg):
    with torch.no_grad():
        return backends.by_name(backend_name).kvcache(
            q, k_cache, v_cache, cache_seqlens, cache_leftpad, centroids, block_size=block_size,
            topk=topk, scale=scale, config=cfg)


def update_centroids(centroids: torch.Tensor, k_cache: torch.Tensor, old_seqlens: torch.Tensor,
                     new_seqlens: torch.Tensor, *, block_size: int, max_new_blocks: int = 1,
                     cache_leftpad: torch.Tensor | None = None, backend: str = "auto"):
    """Update (in place) the centroid cache of :func:`moba_attn_with_kvcache` after new keys
    were written: the blocks that became full between ``old_seqlens`` and ``new_seqlens``.

    Args:
        centroids: fp32 ``[B, NB, Hkv, D]``, written in place.
        k_cache: ``[B, Tmax, Hkv, D]`` (the new keys already in it).
        old_seqlens, new_seqlens: ``[B]`` valid lengths before and after (``cache_seqlens``).
        max_new_blocks: the most blocks one row can complete in this update: 1 for a decode
            step, ``ceil(tokens / block_size) + 1`` for a chunk of ``tokens``.
        cache_leftpad: as in :func:`moba_attn_with_kvcache`.

    Device-side only (one kernel on CUDA, tensor ops elsewhere): no host sync. Returns
    ``centroids``.
    """
    check_int("block_size", block_size)
    check_int("max_new_blocks", max_new_blocks, 0)
    if not isinstance(centroids, torch.Tensor) or centroids.dtype != torch.float32 or \
            centroids.dim() != 4:
        raise ValueError("centroids must be an fp32 [B, NB, Hkv, D] tensor")
    if k_cache.dim() != 4 or centroids.shape[0] != k_cache.shape[0] or \
            centroids.shape[2:] != k_cache.shape[2:]:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not fit k_cache "
                         f"{tuple(k_cache.shape)} ([B, NB, Hkv, D] vs [B, Tmax, Hkv, D])")
    bsz = k_cache.shape[0]
    for name, t in (("old_seqlens", old_seqlens), ("new_seqlens", new_seqlens)):
        _check_seqlens(name, t, bsz, k_cache.device)
    if cache_leftpad is not None:
        _check_seqlens("cache_leftpad", cache_leftpad, bsz, k_cache.device)
    be = backends.resolve(backend, k_cache.device, k_cache.dtype, k_cache.shape[-1],
                          block_size, 1)
    if be is backends.NAIVE:
        be = backends.TORCH
    if torch.compiler.is_compiling():
        from .ops.custom_op import moba_update_centroids_op

        moba_update_centroids_op(centroids, k_cache, old_seqlens, new_seqlens, cache_leftpad,
                                 block_size, max_new_blocks, be.name)
        return centroids
    with torch.no_grad():
        return be.update_centroids(centroids, k_cache, old_seqlens, new_seqlens, cache_leftpad,
                                   block_size=block_size, max_new_blocks=max_new_blocks)


# ----------------------------------------------------------------------------- selection
def moba_select(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, *, block_size: int, topk: int,
                backend: str = "auto", layout: BlockLayout | None = None,
                config: MobaConfig | None = None) -> torch.Tensor:
    """The blocks each query row's gate picks: ``[total_q, Hq, k-1]`` int64 block indices
    *within the row's sequence* (-1 = unused slot), sorted by decreasing gate score.

    Same arguments and validation as :func:`moba_attn_varlen_func` (``k`` gives the
    centroids). The GPU gate scores in TF32 by default (``config.gate_precision``), so near
    ties may pick differently than the fp32 CPU gate. For tests, telemetry and pictures.
    """
    check_qkv(q, k, k, 3, "[total_tokens, heads, head_dim]")
    check_int("block_size", block_size)
    check_int("topk", topk)
    cfg = resolve_config(config)
    _check_cu_device("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_device("cu_seqlens_k", cu_seqlens_k, q.device)
    be = _resolve(backend, q, block_size, topk)
    if be is backends.NAIVE:
        be = backends.TORCH  # the torch gate is the reference's rule, tested against it
    if layout is None:
        layout = prepare_layout(cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                total_q=q.shape[0], total_k=k.shape[0])
    else:
        _check_layout(layout, q, k, cu_seqlens_q, cu_seqlens_k, block_size, True)
    with torch.no_grad():
        sel = be.gate(q, k, layout, topk, cfg)
    return layout.local_blocks(sel)


__all__ = [
    "BACKENDS",
    "moba_attn_func",
    "moba_attn_varlen_func",
    "moba_attn_with_kvcache",
    "moba_select",
    "prepare_layout",
    "update_centroids",
]
