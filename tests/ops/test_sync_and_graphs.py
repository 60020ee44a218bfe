"""No host synchronisation in steady state, and CUDA-graph capture of forward, backward and
decode (GPU only): repeated calls run under ``torch.cuda.set_sync_debug_mode("error")``, and
a captured call replays to the eager result (bitwise with ``deterministic=True``)."""

import contextlib

import pytest
import torch

from moba_attn import (
    MobaConfig,
    moba_attn_func,
    moba_attn_varlen_func,
    moba_attn_with_kvcache,
    prepare_layout,
    update_centroids,
)

pytestmark = pytest.mark.gpu
DEV = "cuda"


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _qkv(b, t, hq, hkv, d=128, grad=False):
    q = torch.randn(b, t, hq, d, device=DEV, dtype=torch.bfloat16, requires_grad=grad)
    k = torch.randn(b, t, hkv, d, device=DEV, dtype=torch.bfloat16, requires_grad=grad)
    v = torch.randn(b, t, hkv, d, device=DEV, dtype=torch.bfloat16, requires_grad=grad)
    return q, k, v


SETTINGS = {  # (batch, T, Hq, Hkv, block, topk, config)
    "masked": (2, 8192, 16, 16, 128, 8, MobaConfig(schedule="masked")),
    "in-place": (1, 8192, 32, 8, 512, 3, MobaConfig(schedule="in-place")),
    "partials": (2, 8192, 16, 16, 128, 8, MobaConfig(schedule="partials",
                                                     part_budget_bytes=8 << 20)),
    "auto": (2, 8192, 16, 16, 128, 8, None),
    "dense-cudnn": (1, 8192, 8, 8, 4096, 12, None),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_forward_backward_never_sync(name, deterministic):
    b, t, hq, hkv, bsz, topk, cfg = SETTINGS[name]
    q, k, v = _qkv(b, t, hq, hkv, grad=True)
    g = torch.randn_like(q)

    def step():
        out = moba_attn_func(q, k, v, block_size=bsz, topk=topk, config=cfg,
                             deterministic=deterministic)
        out.backward(g)
        return out

    step()  # compile the kernels first
    with no_sync():
        for _ in range(3):
            step()


def test_varlen_with_a_prepared_layout_never_syncs():
    lens = [1, 3000, 0, 777, 4096]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    n = sum(lens)
    q = torch.randn(n, 8, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, 2, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(n, 2, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    lay = prepare_layout(cu, cu, block_size=128)  # the one host copy

    def step():
        out = moba_attn_varlen_func(q, k, v, cu, cu, 4096, 4096, block_size=128, topk=4,
                                    layout=lay, validate=False)
        out.sum().backward()

    step()
    with no_sync():
        for _ in range(3):
            step()


@pytest.mark.parametrize("rows", [1, 16])
def test_kvcache_step_never_syncs(rows):
    tmax, bsz = 32768, 512
    kc = torch.randn(rows, tmax, 8, 128, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(rows, 1, 32, 128, device=DEV, dtype=torch.bfloat16)
    lens = torch.full((rows,), tmax - 100, device=DEV, dtype=torch.int64)
    cent = torch.zeros(rows, tmax // bsz, 8, 128, device=DEV)
    update_centroids(cent, kc, lens * 0, lens, block_size=bsz, max_new_blocks=tmax // bsz)

    def step():
        update_centroids(cent, kc, lens - 1, lens, block_size=bsz)
        return moba_attn_with_kvcache(q, kc, vc, lens, block_size=bsz, topk=8, centroids=cent,
                                      validate=False)

    step()
    with no_sync():
        for _ in range(5):
            step()


def _capture(fn):
    """Warm up on a side stream, then capture ``fn`` into a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("name", ["masked", "in-place", "partials"])
def test_forward_and_backward_replay_from_a_cuda_graph(name, deterministic):
    b, t, hq, hkv, bsz, topk, cfg = SETTINGS[name]
    q, k, v = _qkv(b, t, hq, hkv, grad=True)
    g = torch.randn_like(q)

    def step():
        for x in (q, k, v):
            x.grad = None
        out = moba_attn_func(q, k, v, block_size=bsz, topk=topk, config=cfg,
                             deterministic=deterministic)
        out.backward(g)
        return out.detach(), q.grad, k.grad, v.grad

    eager = [x.clone() for x in step()]
    graph, captured = _capture(step)
    for x, src in zip((q, k, v), _qkv(b, t, hq, hkv)):  # new inputs, same buffers
        with torch.no_grad():
            x.copy_(src)
    graph.replay()
    fresh = [x.clone() for x in step()]
    for got, want, old in zip(captured, fresh, eager):
        assert not torch.equal(want, old)  # the replay really saw the new inputs
        if deterministic:
            assert torch.equal(got, want)
        else:
            assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_decode_replays_from_a_cuda_graph_bitwise():
    rows, tmax, bsz = 4, 65536, 512
    kc = torch.randn(rows, tmax, 8, 128, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(rows, 1, 32, 128, device=DEV, dtype=torch.bfloat16)
    lens = torch.tensor([tmax, tmax - 1000, 5000, 513], device=DEV)
    cent = torch.zeros(rows, tmax // bsz, 8, 128, device=DEV)
    update_centroids(cent, kc, lens * 0, lens, block_size=bsz, max_new_blocks=tmax // bsz)

    def step():
        return moba_attn_with_kvcache(q, kc, vc, lens, block_size=bsz, topk=8, centroids=cent,
                                      validate=False)

    graph, out = _capture(step)
    q.copy_(torch.randn_like(q))
    lens.sub_(1)
    graph.replay()
    assert torch.equal(out, step())
