"""Benchmark baselines compute the same MoBA (checked on CPU with stand-ins for CUDA-only ops)."""

import torch

from moba_attn import baselines
from moba_attn.ops.naive import moba_attn_naive

from .utils import packed_inputs


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """CPU stand-in for flash varlen: per-sequence dense attention with LSE ([T, H])."""
    outs, lses = [], []
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        s = torch.einsum("qhd,khd->hqk", q[a:b].double(), k[c:d].double()) * q.shape[-1] ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(b - a, d - c, dtype=torch.bool).triu(1 + (d - c) - (b - a)),
                              float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append(torch.einsum("hqk,khd->qhd", torch.exp(s - lse[..., None]), v[c:d].double()))
        lses.append(lse.t())
    return torch.cat(outs).to(q.dtype), torch.cat(lses).float()


def test_orig_algorithm_matches_reference(monkeypatch):
    monkeypatch.setattr(baselines, "_varlen", _varlen_reference)
    lens = [200, 64, 130]
    q, k, v, cu, _ = packed_inputs(lens, lens, 4, 2, 16, torch.float64)
    for topk in (1, 2, 4):
        out = baselines.orig_moba_varlen(q, k, v, cu, 200, 32, topk)
        ref, _ = moba_attn_naive(q, k, v, cu, cu, block_size=32, topk=topk, compute_dtype=torch.float64)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # merge uses fp32 LSEs


def test_flex_tiles_cover_every_attended_key():
    from moba_attn import moba_select
    from moba_attn.ops.naive import moba_mask_naive

    T, B, tile = 1536, 256, 128
    q, k, _, cu, _ = packed_inputs([T], [T], 2, 2, 16)
    q = 0.1 * q + q[:1]  # tokens mostly agree: a small union, so the mask is not causal-dense
    sel = moba_select(q, k, cu, cu, block_size=B, topk=2).view(1, T, 2, -1).permute(0, 2, 1, 3)
    need = baselines.flex_tiles(sel, T, B, tile)[0]  # [H, nt, nt]
    mask = moba_mask_naive(q, k, B, 2)  # [H, T, T]
    used = mask.view(2, T // tile, tile, T // tile, tile).any(4).any(2)
    assert not (used & ~need).any()  # every tile with an attended key is in the block mask
    assert need.sum() < torch.ones_like(need).tril().sum()  # and it is not simply causal-dense


def test_flex_moba_mask_is_exact_on_cpu_eager():
    """On CPU FlexAttention's eager path applies only mask_mod: the per-token rule."""
    T, B = 512, 128
    q, k, v, cu, _ = packed_inputs([T, T], [T, T], 2, 1, 16)
    from torch.nn.attention.flex_attention import flex_attention

    monkey = baselines._compiled_flex
    baselines._FLEX = flex_attention  # eager on CPU
    try:
        out = baselines.flex_moba_varlen(q, k, v, cu, T, B, 2)
    finally:
        baselines._FLEX = None
    ref, _ = moba_attn_naive(q, k, v, cu, cu, block_size=B, topk=2)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    assert monkey is baselines._compiled_flex
