"""The compiled path: the custom ops pass opcheck, ``torch.compile(fullgraph=True)`` of the
public functions equals eager (forward and gradients), new lengths compile without graph
breaks, activation checkpointing, and the KV-cache ops."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moba_attn import (
    MobaConfig,
    moba_attn_func,
    moba_attn_varlen_func,
    moba_attn_with_kvcache,
    update_centroids,
)
from moba_attn.ops.custom_op import (
    moba_bwd_op,
    moba_fwd_op,
    moba_kvcache_op,
    moba_update_centroids_op,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = MobaConfig().to_json()


def _inputs(lens, hq=4, hkv=2, d=32, dtype=torch.float32, device=DEVICE):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    t = int(cu[-1])
    return (torch.randn(t, hq, d, dtype=dtype, device=device, requires_grad=True),
            torch.randn(t, hkv, d, dtype=dtype, device=device, requires_grad=True),
            torch.randn(t, hkv, d, dtype=dtype, device=device, requires_grad=True), cu)


def _varlen_loss(backend, bsz=16, topk=3, deterministic=False):
    def f(q, k, v, cu, w):
        out = moba_attn_varlen_func(q, k, v, cu, cu, 4096, 4096, block_size=bsz, topk=topk,
                                    backend=backend, deterministic=deterministic,
                                    validate=False)
        return (out * w).sum(), out
    return f


def _grads(f, *args):
    loss, out = f(*args)
    return [out.detach()] + list(torch.autograd.grad(loss, args[:3]))


def test_opcheck_forward_and_backward():
    q, k, v, cu = _inputs([40, 1, 25])
    q, k, v = q.detach(), k.detach(), v.detach()
    args = (q, k, v, cu, cu, -1, -1, 16, 3, 32 ** -0.5, "torch", CONFIG)
    torch.library.opcheck(moba_fwd_op, args)
    out, lse, sel = moba_fwd_op(*args)
    torch.library.opcheck(moba_bwd_op, (torch.randn_like(out), q, k, v, out, lse, sel, cu, cu,
                                        -1, -1, 16, 3, 32 ** -0.5, False, "torch", CONFIG))
    qb = torch.randn(2, 8, 2, 16)
    kc = torch.randn(2, 64, 1, 16)
    lens = torch.tensor([64, 30])
    torch.library.opcheck(moba_kvcache_op, (qb.reshape(2, 8, 2, 16)[:, :1], kc, kc, lens, None,
                                            None, 16, 3, 0.25, "torch", CONFIG))
    cent = torch.zeros(2, 4, 1, 16)
    torch.library.opcheck(moba_update_centroids_op, (cent, kc, lens - 1, lens, None, 16, 1,
                                                     "torch"))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_equals_eager(compiler):
    torch._dynamo.reset()
    q, k, v, cu = _inputs([64, 3, 45])
    w = torch.randn(q.shape, device=DEVICE)
    f = _varlen_loss("torch")
    eager = _grads(f, q, k, v, cu, w)
    compiled = _grads(torch.compile(f, fullgraph=True, backend=compiler), q, k, v, cu, w)
    assert torch.equal(eager[0], compiled[0])
    for a, b in zip(eager[1:], compiled[1:]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_compile_batch_api_and_triton_backend():
    torch._dynamo.reset()
    q = torch.randn(2, 60, 2, 16, requires_grad=True)
    k = torch.randn(2, 60, 1, 16, requires_grad=True)
    v = torch.randn(2, 60, 1, 16, requires_grad=True)
    for backend in ("torch", "triton"):
        def f(q, k, v, backend=backend):
            out = moba_attn_func(q, k, v, block_size=16, topk=3, backend=backend)
            return out.square().sum(), out

        eager = _grads(f, q, k, v)
        compiled = _grads(torch.compile(f, fullgraph=True, backend="aot_eager"), q, k, v)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_compile_new_lengths_without_graph_breaks():
    torch._dynamo.reset()
    f = torch.compile(_varlen_loss("torch"), fullgraph=True, backend="aot_eager", dynamic=True)
    for lens in ([50, 20], [33, 1, 90]):
        q, k, v, cu = _inputs(lens)
        w = torch.randn(q.shape, device=DEVICE)
        eager = _grads(_varlen_loss("torch"), q, k, v, cu, w)
        compiled = _grads(f, q, k, v, cu, w)
        assert torch.equal(eager[0], compiled[0])
        for a, b in zip(eager[1:], compiled[1:]):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_exactly_dense_calls_compile_too():
    torch._dynamo.reset()
    q, k, v, cu = _inputs([40, 20])
    w = torch.randn(q.shape, device=DEVICE)
    f = _varlen_loss("torch", bsz=16, topk=9)  # every sequence has <= 9 blocks
    eager = _grads(f, q, k, v, cu, w)
    compiled = _grads(torch.compile(f, fullgraph=True, backend="aot_eager"), q, k, v, cu, w)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_activation_checkpointing_equals_plain_and_compiles():
    torch._dynamo.reset()
    q, k, v, cu = _inputs([80, 17])
    w = torch.randn(q.shape, device=DEVICE)
    f = _varlen_loss("torch")
    plain = _grads(f, q, k, v, cu, w)

    def ckpt(q, k, v, cu, w):
        return checkpoint(f, q, k, v, cu, w, use_reentrant=False)

    for fn in (ckpt, torch.compile(ckpt, fullgraph=True, backend="aot_eager")):
        got = _grads(fn, q, k, v, cu, w)
        for a, b in zip(plain[1:], got[1:]):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_kvcache_compiles_without_graph_breaks():
    torch._dynamo.reset()
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 96, 2, 16), torch.randn(2, 96, 2, 16)
    lens = torch.tensor([96, 40])
    cent = torch.zeros(2, 6, 2, 16)
    update_centroids(cent, kc, lens * 0, lens, block_size=16, max_new_blocks=6)

    def step(q, kc, vc, lens, cent):
        update_centroids(cent, kc, lens - 1, lens, block_size=16)
        return moba_attn_with_kvcache(q, kc, vc, lens, block_size=16, topk=3, centroids=cent,
                                      validate=False)

    eager = step(q, kc, vc, lens, cent.clone())
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc, lens,
                                                                         cent.clone())
    torch.testing.assert_close(compiled, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_compile_equals_eager_bf16(deterministic):
    torch._dynamo.reset()
    q, k, v, cu = _inputs([1, 700, 2100], hq=8, hkv=2, d=128, dtype=torch.bfloat16)
    w = torch.randn(q.shape, device=DEVICE, dtype=torch.bfloat16)
    f = _varlen_loss("triton", bsz=128, topk=4, deterministic=deterministic)
    eager = _grads(f, q, k, v, cu, w)
    compiled = _grads(torch.compile(f, fullgraph=True), q, k, v, cu, w)
    assert torch.equal(eager[0], compiled[0])
    for a, b in zip(eager[1:], compiled[1:]):
        if deterministic:
            assert torch.equal(a, b)
        else:
            assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 1e-2
