"""Other ways to compute MoBA, for benchmarks only (CUDA): every one computes the same exact
per-token MoBA as ``moba_attn_varlen_func``; none is used by the library itself.

- ``orig-moba``: a re-implementation of the original release's algorithm (not its code):
  K/V repeated to the query heads, the gate materialised as an fp32 ``[#blocks, H, T]``
  matrix, one varlen flash call for the own blocks (causal), one varlen flash call for the
  gathered (block, head) groups, and an LSE merge. Runs on ``torch.nn.attention.varlen``.
- ``flex-moba``: FlexAttention with a ``BlockMask`` built from the union of the blocks the
  128 queries of each tile chose, plus a ``mask_mod`` that applies each token's own choice.
"""

from __future__ import annotations

import inspect

import torch

from .interface import moba_select
from .ops.layout import prepare_layout
from .ops.torch.gate import block_centroids


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool):
    """``torch.nn.attention.varlen.varlen_attn`` with LSE, across the torch versions' APIs."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw = {"return_aux": AuxRequest(lse=True)}
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw["is_causal"] = causal
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    if lse.shape[0] != q.shape[0]:  # [H, T] -> [T, H]
        lse = lse.transpose(0, 1)
    return out, lse.float()


def orig_moba_varlen(q, k, v, cu, max_len, block_size, topk):
    """The original release's MoBA algorithm (re-implemented), packed layout, causal."""
    n, hq, d = q.shape
    g = hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # as the original does
    layout = prepare_layout(cu, cu, block_size=block_size)
    cu_blk = torch.cat([layout.blk_start, layout.blk_start.new_tensor([n])]).to(torch.int32)
    self_out, self_lse = _varlen(q, k, v, cu_blk, cu_blk, block_size, block_size, causal=True)
    if topk == 1 or layout.max_seq_blocks <= 1:
        return self_out
    cent = block_centroids(k, layout)  # [nb, H, D] fp32
    gate = torch.einsum("nhd,bhd->bhn", q.float(), cent)  # [nb, H, T] fp32, materialised
    blocks = torch.arange(layout.n_blocks, device=q.device)
    valid = (blocks[:, None] >= layout.row_first[None, :]) & (blocks[:, None] < layout.row_own[None, :])
    gate.masked_fill_(~valid[:, None, :], float("-inf"))
    m = min(topk - 1, layout.n_blocks)
    idx = gate.topk(m, dim=0).indices  # [m, H, T]
    chosen = torch.zeros_like(gate, dtype=torch.bool).scatter_(0, idx, True) & valid[:, None, :]
    b, h, t = chosen.nonzero(as_tuple=True)  # sorted by (block, head): one varlen "sequence" each
    pair = b * hq + h
    counts = torch.bincount(pair, minlength=layout.n_blocks * hq)
    cu_q = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    kb = k.new_zeros(layout.n_blocks, block_size, hq, d)
    vb = v.new_zeros(layout.n_blocks, block_size, hq, d)
    tok, ok = layout.block_tokens()
    kb[ok] = k[tok[ok]]
    vb[ok] = v[tok[ok]]
    kb = kb.permute(0, 2, 1, 3).reshape(-1, 1, d)  # [(block, head, key), 1, D]
    vb = vb.permute(0, 2, 1, 3).reshape(-1, 1, d)
    cu_k = torch.arange(0, (layout.n_blocks * hq + 1) * block_size, block_size, device=q.device,
                        dtype=torch.int32)
    moba_out, moba_lse = _varlen(q[t, h][:, None], kb, vb, cu_q, cu_k, int(counts.max()), block_size,
                                 causal=False)
    moba_out, moba_lse = moba_out[:, 0].float(), moba_lse[:, 0]
    # LSE merge of the own-block part and the selected parts
    mx = _lse_max(self_lse, t, h, moba_lse)  # [T, H]
    s = torch.exp(self_lse - mx).index_put((t, h), torch.exp(moba_lse - mx[t, h]), accumulate=True)
    lse = mx + torch.log(s)
    out = self_out.float() * torch.exp(self_lse - lse)[..., None]
    out = out.index_put((t, h), moba_out * torch.exp(moba_lse - lse[t, h])[:, None], accumulate=True)
    return out.to(q.dtype)


def _lse_max(self_lse, t, h, moba_lse):
    """Row-wise max over the own-block LSE and every selected block's LSE: ``[T, H]``."""
    flat = self_lse.reshape(-1).clone()
    flat.scatter_reduce_(0, t * self_lse.shape[1] + h, moba_lse, reduce="amax")
    return flat.view_as(self_lse)


def flex_tiles(sel: torch.Tensor, T: int, block_size: int, tile: int = 128) -> torch.Tensor:
    """Key tiles each query tile needs: ``[b, H, nt, nt]`` bool, the union over the tile's
    tokens of their chosen blocks (``sel [b, H, T, k-1]``) plus the own block up to the tile."""
    n_seq, hq = sel.shape[0], sel.shape[1]
    nt = (T + tile - 1) // tile
    per = block_size // tile
    # tiles each query tile needs: union of its tokens' blocks (as 128-key tiles) + own tile(s)
    need = torch.zeros(n_seq, hq, nt * nt, dtype=torch.int8, device=sel.device)
    rows = torch.arange(T, device=sel.device) // tile
    for j in range(sel.shape[-1]):
        chosen = sel[..., j]  # [b, H, T]
        ok = (chosen >= 0).to(torch.int8)
        for r in range(per):
            kt = chosen.clamp(min=0) * per + r
            need.scatter_reduce_(2, (rows * nt + kt).long(), ok, reduce="amax")
    need = need.view(n_seq, hq, nt, nt).bool()
    tiles = torch.arange(nt, device=sel.device)
    own_first = (tiles * tile // block_size) * per
    for r in range(per):  # own block: its tiles up to the query tile (causal)
        kt = own_first + r
        ok = kt <= tiles
        need[..., tiles[ok], kt[ok]] = True
    return need


def flex_moba_varlen(q, k, v, cu, max_len, block_size, topk, tile: int = 128):
    """Exact per-token MoBA on FlexAttention (batch of equal-length sequences only)."""
    from torch.nn.attention.flex_attention import BlockMask

    n, hq, d = q.shape
    hkv = k.shape[1]
    n_seq = cu.numel() - 1
    T = n // n_seq
    if T * n_seq != n or block_size % tile:
        raise ValueError("flex-moba: equal-length sequences and block_size % 128 == 0 only")
    sel = moba_select(q, k, cu, cu, block_size=block_size, topk=topk)  # [n, H, k-1], -1 = none
    sel = sel.view(n_seq, T, hq, -1).permute(0, 2, 1, 3).contiguous()  # [b, H, T, k-1]
    need = flex_tiles(sel, T, block_size, tile)  # [b, H, nt, nt]
    kv_num = need.sum(-1).to(torch.int32)
    kv_idx = need.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b, h, qi, ki):
        qb, kb = qi // block_size, ki // block_size
        m = (qb == kb) & (ki <= qi)
        for j in range(sel.shape[-1]):
            m = m | (sel[b, h, qi, j] == kb)
        return m

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=tile, mask_mod=mask_mod,
                                  seq_lengths=(T, T))
    qb = q.view(n_seq, T, hq, d).transpose(1, 2)
    kb = k.view(n_seq, T, hkv, d).transpose(1, 2)
    vb = v.view(n_seq, T, hkv, d).transpose(1, 2)
    fn = _compiled_flex()
    out = fn(qb, kb, vb, block_mask=bm, enable_gqa=hq != hkv)
    return out.transpose(1, 2).reshape(n, hq, d)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def extra_providers():
    """Benchmark providers (see ``moba_attn.bench``): name -> (factory, device type)."""

    def make(fn):
        def factory(cfg, q, k, v, cu, T):
            return lambda: fn(q, k, v, cu, T, cfg.block_size, cfg.topk)
        return factory

    return {"orig-moba": (make(orig_moba_varlen), "cuda"), "flex-moba": (make(flex_moba_varlen), "cuda")}
