"""Shared test utilities: packed inputs, the reference in fp64, the tolerance rule."""

from __future__ import annotations

import torch

from moba_attn.ops.gate import moba_select
from moba_attn.ops.naive import moba_attn_naive


def cu_seqlens(lengths, device="cpu", dtype=torch.int32) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=dtype, device=device)


def packed_inputs(lens_q, lens_k, hq, hkv, d, dtype=torch.float32, device="cpu", grad=False):
    """Random q/k/v (never zeros) for a packed batch with the given per-sequence lengths."""
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, device=device).to(dtype)
    k = torch.randn(tk, hkv, d, device=device).to(dtype)
    v = torch.randn(tk, hkv, d, device=device).to(dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)


def reference(q, k, v, cu_q, cu_k, block_size, topk, dtype=torch.float64, same_routing=True,
              scale=None):
    """fp64 naive MoBA; with ``same_routing`` it uses the fast gate's selection so that
    attention is compared apart from near-tie gate decisions (the gate is tested alone)."""
    sel = moba_select(q.detach(), k.detach(), cu_q, cu_k, block_size=block_size, topk=topk) \
        if same_routing else None
    return moba_attn_naive(q, k, v, cu_q, cu_k, block_size=block_size, topk=topk,
                           softmax_scale=scale, compute_dtype=dtype, selection=sel)


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_within_rule(x, ref64, baseline, factor, floor=1e-6, what="output"):
    """STYLE rule: error vs the fp64 reference <= factor x PyTorch's own error in the same
    dtype (``baseline``: the reference computed in the low dtype), plus a tiny floor."""
    e, b = max_err(x, ref64), max_err(baseline, ref64)
    assert e <= factor * b + floor, f"{what}: error {e:.3e} > {factor} x PyTorch's {b:.3e}"
