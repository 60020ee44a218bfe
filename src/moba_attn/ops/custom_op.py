"""MoBA as ``torch.library`` custom ops: ``torch.compile(fullgraph=True)`` and checkpointing.

Two opaque ops with fake (meta) kernels, joined by ``register_autograd``:

- ``moba_attn::varlen_fwd(q, k, v, cu_q, cu_k, block_size, topk, scale, deterministic,
  backend) -> (out, lse, sel)``: gate + attention; ``sel [total_q, Hq, k-1]`` (int64 global
  block ids, -1 = unused) is returned so the backward reuses the forward's exact selection.
- ``moba_attn::varlen_bwd(dout, q, k, v, out, lse, sel, cu_q, cu_k, block_size, topk, scale,
  deterministic, backend) -> (dq, dk, dv)``.

``backend`` is ``"torch"`` (any device) or ``"triton"`` (CUDA, or CPU under
``TRITON_INTERPRET=1``): the Triton forward of ``triton_attention`` when it can run the call,
and the Triton backward of ``triton_backward``; both fall back to the torch path on their own.
The ops are opaque to the compiler, so the host-side work inside them (block layout from
``cu_seqlens``, plan sizes) never breaks the graph. ``torch.library.triton_op`` is not used:
it does not run under the Triton interpreter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import torch_impl
from .gate import BlockLayout

_BACKENDS = ("torch", "triton")


def _triton_forward():
    """``triton_attention`` when it imports, else ``None``."""
    try:
        from . import triton_attention
    except Exception:  # noqa: BLE001  no triton, or a build that cannot load
        return None
    return triton_attention


def _triton_backward():
    try:
        from .triton_backward import moba_backward_triton
    except Exception:  # noqa: BLE001  no triton, or a build that cannot load
        return None
    return moba_backward_triton


# ----------------------------------------------------------------------------- forward op
@torch.library.custom_op("moba_attn::varlen_fwd", mutates_args=())
def varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
               block_size: int, topk: int, softmax_scale: float, deterministic: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    layout = BlockLayout.build(cu_seqlens_q, cu_seqlens_k, block_size)
    with torch.no_grad():
        ta = _triton_forward() if backend == "triton" else None
        if ta is not None and ta.unsupported_reason(q, block_size, topk) is None:
            out, lse, sel = ta.moba_forward_triton(q, k, v, layout, topk, softmax_scale)
        else:
            sel = torch_impl._gate_all(q, k, layout, topk)
            out, lse = torch_impl._forward(q, k, v, layout, sel, topk, softmax_scale)
    return (out.contiguous(), lse.to(torch.float32).contiguous(),
            sel.to(torch.int64).contiguous())


@varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, block_size, topk, softmax_scale,
                     deterministic, backend):
    total_q, hq, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((hq, total_q), dtype=torch.float32),
            q.new_empty((total_q, hq, max(topk - 1, 0)), dtype=torch.int64))


# ----------------------------------------------------------------------------- backward op
@torch.library.custom_op("moba_attn::varlen_bwd", mutates_args=())
def varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               sel: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, block_size: int,
               topk: int, softmax_scale: float, deterministic: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
    layout = BlockLayout.build(cu_seqlens_q, cu_seqlens_k, block_size)
    bwd = _triton_backward() if backend == "triton" else None
    if bwd is None:
        bwd = torch_impl._backward
    with torch.no_grad():
        dq, dk, dv = bwd(q, k, v, out, lse, dout, layout, sel, topk, softmax_scale, deterministic)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, sel, cu_seqlens_q, cu_seqlens_k, block_size, topk,
                     softmax_scale, deterministic, backend):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, block_size, topk, scale, deterministic, backend = inputs
    out, lse, sel = output
    ctx.save_for_backward(q, k, v, out, lse, sel, cu_q, cu_k)
    ctx.args = (block_size, topk, scale, deterministic, backend)
    ctx.mark_non_differentiable(lse, sel)


def _backward(ctx, dout, _dlse, _dsel):
    q, k, v, out, lse, sel, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, sel, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public
def default_backend(device: torch.device) -> str:
    """``"triton"`` on CUDA when the Triton backward imports, else ``"torch"``."""
    if torch.device(device).type == "cuda" and _triton_backward() is not None:
        return "triton"
    return "torch"


def moba_attn_varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                        cu_seqlens_k: Tensor, *, block_size: int, topk: int,
                        softmax_scale: float | None = None, deterministic: bool = False,
                        backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Packed-batch causal MoBA through the custom ops (compile- and checkpoint-friendly).

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]``, ``Hq % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: ``[n_seqs + 1]`` int32/int64 cumulative lengths (queries
            are the last ``Tq_i`` positions of sequence i). Not validated here: validate them
            once outside the compiled region (``interface.validate_varlen``).
        block_size, topk: as in ``moba_attn_varlen_func`` (topk counts the own block).
        softmax_scale: defaults to ``D ** -0.5``.
        deterministic: fixed-order gradient reductions.
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"``,
            ``"triton"``.

    Returns:
        ``(out [total_q, Hq, D] in q.dtype, lse [Hq, total_q] fp32)``; ``lse`` carries no
        gradient.

    Raises:
        ValueError for an unknown backend.
    """
    if backend == "auto":
        backend = default_backend(q.device)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, lse, _ = varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(block_size), int(topk),
                             scale, bool(deterministic), backend)
    return out, lse


__all__ = ["default_backend", "moba_attn_varlen_op", "varlen_bwd", "varlen_fwd"]
