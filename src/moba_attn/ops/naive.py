"""Ground truth for MoBA: one sequence at a time, a dense boolean mask, plain softmax.

Readable in a minute and slow on purpose (O(Tq * Tk) memory per sequence). Every fast path
is tested against this file. The rule (see ops/README.md):

  query at key position t, own block c = t // B, query head h (kv head h // (Hq // Hkv))
  1. centroid of block i = mean of its keys, in fp32
  2. gate score s_i = <q_t, centroid_i> in fp32 (unscaled)
  3. candidates: blocks i < c of the same sequence
  4. pick all candidates if c <= k - 1, else the k - 1 best (ties -> lower block index;
     a NaN score ranks below every number)
  5. attend to the picked blocks (whole) and to keys c*B .. t of the own block
"""

from __future__ import annotations

import math

import torch


def moba_mask_naive(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int,
                    selection: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask ``[Hq, Tq, Tk]`` of the keys each query attends, for ONE sequence.

    q: ``[Tq, Hq, D]`` (the last Tq positions of the sequence), k: ``[Tk, Hkv, D]``.
    ``selection`` ``[Tq, Hq, k-1]`` (block indices, -1 = none) replaces steps 1-4, so tests
    can check attention apart from the gate.
    """
    Tq, Hq, _ = q.shape
    Tk, Hkv, _ = k.shape
    group = Hq // Hkv
    n_blocks = math.ceil(Tk / block_size)
    pos_q = torch.arange(Tk - Tq, Tk, device=q.device)  # bottom-right alignment
    pos_k = torch.arange(Tk, device=q.device)
    own_q = pos_q // block_size  # [Tq]
    blk_k = pos_k // block_size  # [Tk]

    # 1. centroids in fp32, one per (block, kv head), expanded to the query heads
    centroids = torch.stack(
        [k[i * block_size : (i + 1) * block_size].float().mean(0) for i in range(n_blocks)]
    )  # [n_blocks, Hkv, D]
    centroids = centroids.repeat_interleave(group, dim=1)  # [n_blocks, Hq, D]
    # 2. gate scores in fp32
    gate = torch.einsum("qhd,nhd->hqn", q.float(), centroids)  # [Hq, Tq, n_blocks]
    # 3. candidates: strictly earlier blocks
    blocks = torch.arange(n_blocks, device=q.device)
    candidate = (blocks[None, None, :] < own_q[None, :, None]).expand_as(gate)  # [Hq, Tq, nb]
    # 4. top-(k-1) with the tie rule: stable descending sorts keep lower indices first;
    #    candidates with a number, then candidates scored NaN, then non-candidates
    n_pick = min(topk - 1, n_blocks)
    nan = torch.isnan(gate)
    by_score = torch.sort(gate.masked_fill(nan, float("-inf")), dim=-1, descending=True,
                          stable=True).indices
    rank = (candidate.long() + (candidate & ~nan).long()).gather(-1, by_score)
    order = by_score.gather(-1, torch.sort(rank, dim=-1, descending=True, stable=True).indices)
    order = order[..., :n_pick]
    if selection is not None:  # external routing: [Tq, Hq, k-1] -> [Hq, Tq, k-1]
        order = selection.permute(1, 0, 2).long()
        order = torch.where(order >= 0, order, own_q[None, :, None].expand_as(order))
    chosen = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, order, True) & candidate
    # 5. chosen blocks + own block, causal at the token level
    own = blocks[None, None, :] == own_q[None, :, None]
    block_ok = chosen | own  # [Hq, Tq, n_blocks]
    causal = pos_k[None, None, :] <= pos_q[None, :, None]  # [1, Tq, Tk]
    return block_ok[..., blk_k] & causal


def moba_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    softmax_scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    selection: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MoBA over a packed batch. Returns ``(out [total_q, Hq, D], lse [Hq, total_q])``.

    Attention runs in ``compute_dtype`` (fp32 or fp64); the gate always runs in fp32 on the
    inputs as given. Differentiable by plain autograd (the mask is not). ``selection``
    ``[total_q, Hq, k-1]`` (per-sequence block indices, -1 = none, as ``moba_select`` returns)
    overrides the gate.
    """
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    out = q.new_zeros(q.shape, dtype=compute_dtype)
    lse = q.new_zeros((Hq, q.shape[0]), dtype=torch.float32)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(cq) - 1):
        qs, ks, vs = q[cq[s] : cq[s + 1]], k[ck[s] : ck[s + 1]], v[ck[s] : ck[s + 1]]
        if qs.shape[0] == 0:
            continue
        sel_s = None if selection is None else selection[cq[s] : cq[s + 1]]
        mask = moba_mask_naive(qs, ks, block_size, topk, sel_s)  # [Hq, Tq, Tk]
        qc = qs.to(compute_dtype)
        kc = ks.to(compute_dtype).repeat_interleave(group, dim=1)
        vc = vs.to(compute_dtype).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qc, kc) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        lse_s = torch.logsumexp(scores, dim=-1)  # [Hq, Tq]
        probs = torch.exp(scores - lse_s[..., None])
        outs.append((slice(cq[s], cq[s + 1]), torch.einsum("hqk,khd->qhd", probs, vc)))
        lses.append((slice(cq[s], cq[s + 1]), lse_s))
    if outs:  # assemble without in-place writes so autograd sees every piece
        pieces = [o for _, o in outs]
        index = torch.cat([torch.arange(sl.start, sl.stop, device=q.device) for sl, _ in outs])
        out = out.index_put((index,), torch.cat(pieces))
        lse[:, index] = torch.cat([l for _, l in lses], 1).detach().float()
    return out, lse


def moba_attn_with_kvcache_naive(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    softmax_scale: float | None = None,
    cache_leftpad: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MoBA over a KV cache: ``(out [B, Tq, Hq, D], lse [B, Hq, Tq])``.

    Row ``b``'s keys are slots ``cache_leftpad[b] .. cache_seqlens[b] - 1`` of
    ``k_cache/v_cache [B, Tmax, Hkv, D]``; its ``Tq`` queries are the last ``Tq`` of them
    (bottom-right alignment), so this is :func:`moba_attn_naive` on each row.
    """
    bsz, tq = q.shape[:2]
    ends = cache_seqlens.tolist()
    starts = [0] * bsz if cache_leftpad is None else cache_leftpad.tolist()
    outs, lses = [], []
    for b in range(bsz):
        keys = ends[b] - starts[b]
        cu_q = torch.tensor([0, tq], device=q.device)
        cu_k = torch.tensor([0, keys], device=q.device)
        o, l = moba_attn_naive(q[b], k_cache[b, starts[b] : ends[b]], v_cache[b, starts[b] : ends[b]],
                               cu_q, cu_k, block_size=block_size, topk=topk,
                               softmax_scale=softmax_scale, compute_dtype=compute_dtype)
        outs.append(o)
        lses.append(l)
    return torch.stack(outs), torch.stack(lses)
