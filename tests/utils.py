"""The tests' one oracle and one tolerance rule.

- Oracle: ``ops/naive.py`` in fp64 (``reference``), fed the fast path's own selection when
  attention is compared apart from the gate (the gate is tested on its own, where fp32 near
  ties are the only allowed difference). ``rows_reference`` is the same math for chosen rows
  of long sequences (it gathers each row's keys instead of building a ``[T, T]`` mask); it is
  itself tested against ``reference``.
- Tolerance (flash-attn's rule): the fast path's error against the fp64 oracle is at most
  ``2x`` (outputs, LSE) or ``3x`` (gradients) PyTorch's own error when the same reference
  runs in the fast path's dtype, plus a small floor.
"""

from __future__ import annotations

import torch

from moba_attn import moba_select
from moba_attn.ops.naive import moba_attn_naive

OUT_FACTOR, GRAD_FACTOR = 2, 3


def cu_seqlens(lengths, device="cpu", dtype=torch.int32) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=dtype, device=device)


def packed_inputs(lens_q, lens_k, hq, hkv, d, dtype=torch.float32, device="cpu", grad=False):
    """Random q/k/v (never zeros) for a packed batch: ``(q, k, v, cu_q, cu_k)``."""
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, device=device).to(dtype)
    k = torch.randn(tk, hkv, d, device=device).to(dtype)
    v = torch.randn(tk, hkv, d, device=device).to(dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)


def case_id(lens_q, lens_k, hq, hkv, d, block, topk, extra="") -> str:
    """Ids like ``T300-n1-Tq300-H4-Hkv4-D16-B16-k3``."""
    return (f"T{sum(lens_k)}-n{len(lens_k)}-Tq{sum(lens_q)}-H{hq}-Hkv{hkv}-D{d}-B{block}-k{topk}"
            + (f"-{extra}" if extra else ""))


def selection(q, k, cu_q, cu_k, block_size, topk, backend="torch", config=None):
    """The backend's own gate (per-sequence block ids), for feeding the oracle."""
    return moba_select(q.detach(), k.detach(), cu_q, cu_k, block_size=block_size, topk=topk,
                       backend=backend, config=config)


def reference(q, k, v, cu_q, cu_k, block_size, topk, dtype=torch.float64, sel=None, scale=None):
    """Naive MoBA in ``dtype`` (q/k/v cast to it), with the given per-sequence selection (or
    the naive gate when None): ``(out, lse)``. Differentiable."""
    return moba_attn_naive(q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k,
                           block_size=block_size, topk=topk, softmax_scale=scale,
                           compute_dtype=dtype, selection=sel)


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_within_rule(x, ref64, baseline, factor, floor=1e-6, what="output"):
    """Error vs the fp64 reference <= factor x PyTorch's own error in the same dtype
    (``baseline``: the reference computed in the low dtype), plus a small floor."""
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    e, b = max_err(x, ref64), max_err(baseline, ref64)
    assert e <= factor * b + floor, f"{what}: error {e:.3e} > {factor} x PyTorch's {b:.3e}"


def outputs_and_grads(fn, q, k, v, dout):
    """``[out, dq, dk, dv]`` of ``fn(q, k, v)`` (fresh leaves, so inputs stay untouched)."""
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*xs)
    if isinstance(out, tuple):
        out = out[0]
    grads = torch.autograd.grad(out, xs, dout.to(out.dtype))
    return [out.detach()] + list(grads)


def check_against_reference(fn, q, k, v, cu_q, cu_k, block_size, topk, sel, grads=True,
                            floor=None):
    """``fn(q, k, v) -> out`` (packed) against the fp64 oracle with the selection ``sel``, by
    the tolerance rule, outputs and (``grads``) all three gradients."""
    dtype = q.dtype
    floor = (1e-6 if dtype in (torch.float32, torch.float64) else 1e-3) if floor is None else floor
    dout = torch.randn(q.shape, dtype=torch.float64, device=q.device)

    def ref(dt):
        return lambda a, b, c: reference(a, b, c, cu_q, cu_k, block_size, topk, dt, sel)[0]

    if not grads:
        with torch.no_grad():
            got = fn(q, k, v)
            got = got[0] if isinstance(got, tuple) else got
            want, base = ref(torch.float64)(q, k, v), ref(dtype)(q, k, v)
        assert_within_rule(got, want, base, OUT_FACTOR, floor)
        return got
    got = outputs_and_grads(fn, q, k, v, dout)
    want = outputs_and_grads(ref(torch.float64), q.double(), k.double(), v.double(), dout)
    base = outputs_and_grads(ref(dtype), q, k, v, dout)
    for i, name in enumerate(("output", "dq", "dk", "dv")):
        assert_within_rule(got[i], want[i], base[i], OUT_FACTOR if i == 0 else GRAD_FACTOR,
                           floor, name)
    return got


def rows_reference(q, k, v, layout, sel, scale, dtype, rows=None, chunk=64):
    """Output and LSE of ``rows`` given the selection (GLOBAL block ids of ``layout``),
    computed in ``dtype`` by gathering each row's keys (own block causal + selected blocks):
    ``(out [R, Hq, D], lse [Hq, R])``. For long sequences where ``reference``'s ``[T, T]``
    mask does not fit."""
    total_q, hq, _ = q.shape
    group = hq // k.shape[1]
    bsz = layout.block_size
    rows = torch.arange(total_q, device=q.device) if rows is None else rows
    hk = (torch.arange(hq, device=q.device) // group)[None, :, None]
    j = torch.arange(bsz, device=q.device)
    outs, lses = [], []
    for c0 in range(0, rows.numel(), chunk):
        r = rows[c0:c0 + chunk]
        n = r.numel()
        blocks = torch.cat([layout.row_own[r][:, None, None].expand(n, hq, 1), sel[r].long()], 2)
        b = blocks.clamp(min=0)
        valid = (blocks >= 0)[..., None] & (j < layout.blk_len[b][..., None])  # [n, Hq, k, B]
        valid[:, :, 0] &= j[None, None, :] <= (layout.row_pos[r] % bsz)[:, None, None]
        tok = (layout.blk_start[b][..., None] + j).clamp(max=k.shape[0] - 1).reshape(n, hq, -1)
        valid = valid.reshape(n, hq, -1)
        kk, vv = k[tok, hk].to(dtype), v[tok, hk].to(dtype)  # [n, Hq, k*B, D]
        s = torch.einsum("nhd,nhkd->nhk", q[r].to(dtype), kk) * scale
        s = s.masked_fill(~valid, float("-inf"))
        lse = torch.logsumexp(s.float(), -1)
        p = torch.softmax(s, -1)
        outs.append(torch.einsum("nhk,nhkd->nhd", p, vv))
        lses.append(lse.t())
    return torch.cat(outs), torch.cat(lses, 1)


def global_selection(sel_local: torch.Tensor, layout) -> torch.Tensor:
    """Per-sequence block ids (``moba_select``) -> global ids of ``layout`` (-1 kept)."""
    return torch.where(sel_local >= 0, sel_local + layout.row_first[:, None, None], sel_local)
