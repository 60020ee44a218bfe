"""MoBA as a drop-in attention function: batch and packed layouts, GQA, gradients, routing.

Shows the three facts users rely on: (1) with topk covering every block MoBA is dense causal
attention, (2) with small topk each query attends its own block plus topk-1 chosen ones,
(3) packed sequences never see each other.

    python examples/attention_basics.py --seqlen 2048 --block-size 128 --topk 3
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from moba_attn import moba_attn_func, moba_attn_varlen_func, moba_select

    a = parse_args(argv)
    g = torch.Generator(device=a.device).manual_seed(0)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=a.device).to(dtype).requires_grad_()

    T, hq, hkv, d = a.seqlen, a.heads, a.kv_heads, a.head_dim
    q, k, v = rand(1, T, hq, d), rand(1, T, hkv, d), rand(1, T, hkv, d)

    # (1) sparse MoBA, with gradients
    out, lse = moba_attn_func(q, k, v, block_size=a.block_size, topk=a.topk, return_lse=True)
    out.float().square().sum().backward()
    print(f"MoBA out {tuple(out.shape)}, lse {tuple(lse.shape)}, |dq| {q.grad.norm():.3f}")

    # (2) topk >= #blocks is exactly dense causal attention (GQA: no K/V repetition needed)
    n_blocks = math.ceil(T / a.block_size)
    full = moba_attn_func(q, k, v, block_size=a.block_size, topk=n_blocks)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True).transpose(1, 2)
    dense_err = (full.float() - dense.float()).abs().max().item()
    sparse_gap = (out.float() - dense.float()).abs().max().item()
    print(f"topk={n_blocks} vs dense causal SDPA: max diff {dense_err:.2e}; "
          f"topk={a.topk}: max diff {sparse_gap:.2e} (sparse attention differs, as it should)")

    # (3) routing: which earlier blocks the last query picked, per head
    cu = torch.tensor([0, T], dtype=torch.int32, device=a.device)
    sel = moba_select(q[0].detach(), k[0].detach(), cu, cu, block_size=a.block_size, topk=a.topk)
    print(f"last query (own block {(T - 1) // a.block_size}) picked blocks:",
          {h: sorted(x for x in sel[-1, h].tolist() if x >= 0) for h in range(hq)})

    # (4) packed sequences: each one alone gives the same rows
    lens = [T // 2, 1, T - T // 2 - 1]
    cu = torch.tensor([0, lens[0], lens[0] + 1, T], dtype=torch.int32, device=a.device)
    packed = moba_attn_varlen_func(q[0], k[0], v[0], cu, cu, max(lens), max(lens),
                                   block_size=a.block_size, topk=a.topk)
    alone = moba_attn_func(q[:, : lens[0]], k[:, : lens[0]], v[:, : lens[0]],
                           block_size=a.block_size, topk=a.topk)[0]
    packed_err = (packed[: lens[0]].float() - alone.float()).abs().max().item()
    print(f"packed vs alone (first sequence): max diff {packed_err:.2e}")
    return {"dense_err": dense_err, "sparse_gap": sparse_gap, "packed_err": packed_err}


if __name__ == "__main__":
    main()
