"""The one autograd Function of MoBA, and the call path above it.

:func:`moba_attention` is what every caller of the packed op goes through (the public
functions, the transformers integration, context parallelism): given a prepared layout and a
resolved backend it decides the exactly-dense shortcut once, then runs
:class:`MobaAttention`, whose forward gates (unless a selection is given) and attends, and
whose backward is the exact gradient of attention restricted to the selected keys (the gate
is not differentiable).

Under ``torch.compile`` the same Function calls the ``moba_attn::fwd`` / ``moba_attn::bwd``
custom ops (``custom_op.py``), which are opaque to the compiler and rebuild the layout from
``cu_seqlens`` or from the equal-length shapes inside.
"""

from __future__ import annotations

import warnings

import torch

from .backends import NAIVE, TRITON, Backend
from .config import MobaConfig
from .layout import BlockLayout
from .naive import moba_attn_naive


class MobaAttention(torch.autograd.Function):
    """Exact MoBA attention of a packed batch: ``(out [T, Hq, D], lse [Hq, T] fp32)``.

    Eager: ``layout`` is a :class:`BlockLayout`; ``sel`` (``[T, Hq, k-1]`` global block ids,
    -1 = unused) fixes the routing, or None to run the backend's gate. Compiled: ``layout``
    is None, ``source = (cu_q, cu_k, seq_q, seq_k)`` describes the batch to the custom ops
    (``seq_q, seq_k >= 0``: equal-length sequences, shapes only), and ``backend`` and
    ``config`` arrive as their name and JSON text.
    """

    @staticmethod
    def forward(ctx, q, k, v, layout, source, sel, block_size, topk, scale, backend,
                config, deterministic):
        if layout is None:
            from .custom_op import moba_fwd_op

            cu_q, cu_k, seq_q, seq_k = source
            out, lse, sel = moba_fwd_op(q, k, v, cu_q, cu_k, seq_q, seq_k, block_size, topk,
                                        scale, backend, config)
        else:
            with torch.no_grad():
                if sel is None:
                    sel = backend.gate(q, k, layout, topk, config)
                out, lse = backend.attend(q, k, v, layout, sel, topk, scale, config)
        ctx.save_for_backward(q, k, v, out, lse, sel)
        ctx.meta = (layout, source, block_size, topk, scale, backend, config, deterministic)
        lse32 = lse.float()
        ctx.mark_non_differentiable(lse32)
        return out, lse32

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sel = ctx.saved_tensors
        layout, source, block_size, topk, scale, backend, config, deterministic = ctx.meta
        dout = dout.contiguous()
        if layout is None:
            from .custom_op import moba_bwd_op

            cu_q, cu_k, seq_q, seq_k = source
            dq, dk, dv = moba_bwd_op(dout, q, k, v, out, lse, sel, cu_q, cu_k, seq_q, seq_k,
                                     block_size, topk, scale, deterministic, backend, config)
        else:
            with torch.no_grad():
                dq, dk, dv = backend.backward(q, k, v, out, lse, dout, layout, sel, topk, scale,
                                              deterministic, config)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _cudnn_dense(q, k, v, layout: BlockLayout, scale: float):
    """Dense causal attention of the layout's equal sequences through cuDNN, with its LSE
    (differentiable through cuDNN's own backward)."""
    total, hq, d = q.shape
    hkv = k.shape[1]
    n = layout.n_seqs
    t = total // n
    q4 = q.view(n, t, hq, d).transpose(1, 2)
    k4 = k.view(n, t, hkv, d).transpose(1, 2)
    v4 = v.view(n, t, hkv, d).transpose(1, 2)
    if hkv != hq:
        k4 = k4.repeat_interleave(hq // hkv, dim=1)
        v4 = v4.repeat_interleave(hq // hkv, dim=1)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q4, k4, v4, None, True, 0.0, True, False, scale=scale)
    out = res[0].transpose(1, 2).reshape(total, hq, d)
    lse = res[1].reshape(n, hq, t).transpose(0, 1).reshape(hq, total).float()
    return out, lse


def _dense_shortcut(q, layout: BlockLayout, topk: int, backend: Backend,
                    deterministic: bool) -> bool:
    """Exactly-dense calls on CUDA in fp16/bf16 run cuDNN's causal attention, forward and
    backward (the sparse backward would run every block of every row); ``deterministic``
    keeps the kernels (fixed-order reductions)."""
    return (backend is TRITON and q.device.type == "cuda" and not deterministic
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 128
            and layout.is_dense(topk) and layout.total_q > 0 and layout.equal_lengths
            and layout.self_attention)


def moba_attention(q, k, v, layout: BlockLayout, *, topk: int, scale: float, backend: Backend,
                   config: MobaConfig, deterministic: bool = False,
                   sel: torch.Tensor | None = None):
    """Exact MoBA of a validated packed batch: ``(out [T, Hq, D], lse [Hq, T] fp32)``.

    q ``[T, Hq, D]``, k/v ``[Tk, Hkv, D]``; ``layout`` from ``prepare_layout`` or
    ``batch_layout``; ``backend`` from ``backends.resolve``; ``sel`` fixes the routing
    (global block ids of ``layout``), None runs the gate.
    """
    if backend is NAIVE:
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = moba_attn_naive(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k,
                                   block_size=layout.block_size, topk=topk, softmax_scale=scale,
                                   compute_dtype=dtype, selection=None if sel is None else
                                   layout.local_blocks(sel))
        return out.to(q.dtype), lse
    q, k, v = (x.contiguous() for x in (q, k, v))
    if sel is None and _dense_shortcut(q, layout, topk, backend, deterministic):
        try:
            return _cudnn_dense(q, k, v, layout, scale)
        except RuntimeError as err:  # cuDNN missing or refusing the shape: the same math
            reason = str(err).splitlines()[0][:120]
            warnings.warn(f"moba_attn: cuDNN dense attention failed ({reason}); running the "
                          "MoBA kernels", stacklevel=3)
    if sel is None:
        layout, topk = backend.plan(layout, topk)
    return MobaAttention.apply(q, k, v, layout, None, sel, layout.block_size, topk, scale,
                               backend, config, deterministic)


__all__ = ["MobaAttention", "moba_attention"]
