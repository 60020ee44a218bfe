"""The custom-op path: opcheck, torch.compile(fullgraph=True) == eager, activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moba_attn.ops import torch_impl
from moba_attn.ops.custom_op import moba_attn_varlen_op, varlen_bwd, varlen_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(lens, hq=4, hkv=2, d=32, dtype=torch.float32, device=DEVICE, grad=True):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    t = int(cu[-1])
    q = torch.randn(t, hq, d, dtype=dtype, device=device, requires_grad=grad)
    k = torch.randn(t, hkv, d, dtype=dtype, device=device, requires_grad=grad)
    v = torch.randn(t, hkv, d, dtype=dtype, device=device, requires_grad=grad)
    return q, k, v, cu


def _loss_fn(backend, block_size=16, topk=3, deterministic=False):
    def f(q, k, v, cu, w):
        out, lse = moba_attn_varlen_op(q, k, v, cu, cu, block_size=block_size, topk=topk,
                                       deterministic=deterministic, backend=backend)
        return (out * w).sum() + lse.sum() * 0.0, out
    return f


def _grads(f, q, k, v, cu, w):
    loss, out = f(q, k, v, cu, w)
    g = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), g


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_opcheck_forward_and_backward():
    q, k, v, cu = _inputs([40, 1, 25], grad=True)
    args = (q, k, v, cu, cu, 16, 3, 32 ** -0.5, False, "torch")
    torch.library.opcheck(varlen_fwd, args)
    out, lse, sel = varlen_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    dout = torch.randn_like(out)
    torch.library.opcheck(varlen_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, sel,
                                       cu, cu, 16, 3, 32 ** -0.5, False, "torch"))


def test_eager_equals_torch_function():
    q, k, v, cu = _inputs([70, 1, 50])
    w = torch.randn(q.shape, device=DEVICE)
    out, g = _grads(_loss_fn("torch"), q, k, v, cu, w)
    ref_out, _ = torch_impl.moba_attn_torch(q, k, v, cu, cu, block_size=16, topk=3,
                                            softmax_scale=32 ** -0.5)
    ref_g = torch.autograd.grad((ref_out * w).sum(), (q, k, v))
    assert torch.equal(out, ref_out.detach())
    for a, b in zip(g, ref_g):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_equals_eager(compiler):
    torch._dynamo.reset()
    q, k, v, cu = _inputs([64, 3, 45])
    w = torch.randn(q.shape, device=DEVICE)
    f = _loss_fn("torch")
    out, g = _grads(f, q, k, v, cu, w)
    cf = torch.compile(f, fullgraph=True, backend=compiler)
    c_out, c_g = _grads(cf, q, k, v, cu, w)
    assert torch.equal(out, c_out)
    for a, b in zip(g, c_g):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_compile_new_lengths_without_graph_breaks():
    torch._dynamo.reset()
    f = torch.compile(_loss_fn("torch"), fullgraph=True, backend="aot_eager", dynamic=True)
    for lens in ([50, 20], [33, 1, 90]):
        q, k, v, cu = _inputs(lens)
        w = torch.randn(q.shape, device=DEVICE)
        c_out, c_g = _grads(f, q, k, v, cu, w)
        out, g = _grads(_loss_fn("torch"), q, k, v, cu, w)
        assert torch.equal(out, c_out)
        for a, b in zip(g, c_g):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_activation_checkpointing_equals_plain():
    q, k, v, cu = _inputs([80, 17])
    w = torch.randn(q.shape, device=DEVICE)
    f = _loss_fn("torch")
    _, g = _grads(f, q, k, v, cu, w)
    loss, _ = checkpoint(f, q, k, v, cu, w, use_reentrant=False)
    g_ckpt = torch.autograd.grad(loss, (q, k, v))
    for a, b in zip(g, g_ckpt):
        assert torch.equal(a, b)


def test_compiled_checkpointed_block():
    """A compiled function that checkpoints the attention: the common training setup."""
    torch._dynamo.reset()
    q, k, v, cu = _inputs([48, 30])
    w = torch.randn(q.shape, device=DEVICE)
    f = _loss_fn("torch")

    def ckpt(q, k, v, cu, w):
        return checkpoint(f, q, k, v, cu, w, use_reentrant=False)

    _, g = _grads(f, q, k, v, cu, w)
    _, c_g = _grads(torch.compile(ckpt, fullgraph=True, backend="aot_eager"), q, k, v, cu, w)
    for a, b in zip(g, c_g):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_triton_backend_matches_torch():
    """backend='triton' (the interpreter on CPU) gives the torch path's gradients."""
    q, k, v, cu = _inputs([60, 1, 40], hq=2, hkv=1)
    w = torch.randn(q.shape, device=DEVICE)
    out_t, g_t = _grads(_loss_fn("torch"), q, k, v, cu, w)
    out_x, g_x = _grads(_loss_fn("triton"), q, k, v, cu, w)
    assert _rel(out_x, out_t) < 1e-5
    for a, b in zip(g_x, g_t):
        assert _rel(a, b) < 1e-5


def test_unknown_backend_raises():
    q, k, v, cu = _inputs([8], grad=False)
    with pytest.raises(ValueError, match="backend"):
        moba_attn_varlen_op(q, k, v, cu, cu, block_size=16, topk=2, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_compile_equals_eager_bf16(deterministic):
    torch._dynamo.reset()
    q, k, v, cu = _inputs([1, 700, 2100], hq=8, hkv=2, d=128, dtype=torch.bfloat16)
    w = torch.randn(q.shape, device=DEVICE, dtype=torch.bfloat16)
    f = _loss_fn("triton", block_size=128, topk=4, deterministic=deterministic)
    out, g = _grads(f, q, k, v, cu, w)
    c_out, c_g = _grads(torch.compile(f, fullgraph=True), q, k, v, cu, w)
    assert torch.equal(out, c_out)
    for a, b in zip(g, c_g):
        if deterministic:
            assert torch.equal(a, b)
        else:
            assert _rel(b, a) < 1e-2
