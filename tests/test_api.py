"""Public API: every bad input raises with a message that names the fix; backends resolve."""

import pytest
import torch

from moba_attn import moba_attn_func, moba_attn_varlen_func

from .helpers import cu_seqlens, packed_inputs


def _varlen(q, k, v, cu_q, cu_k, mq=100, mk=100, **kw):
    kw.setdefault("block_size", 16)
    kw.setdefault("topk", 2)
    kw.setdefault("backend", "torch")
    return moba_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, **kw)


@pytest.fixture
def good():
    return packed_inputs([40, 60], [40, 60], 4, 2, 16)


def test_good_input_runs(good):
    q, k, v, cu_q, cu_k = good
    assert _varlen(q, k, v, cu_q, cu_k).shape == q.shape


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v, a, b: (q[0], k, v, a, b), ValueError, "shape"),
    (lambda q, k, v, a, b: (q, k[..., :8], v[..., :8], a, b), ValueError, "head dims"),
    (lambda q, k, v, a, b: (q[:, :3], k, v, a, b), ValueError, "multiple"),
    (lambda q, k, v, a, b: (q, k, v[:, :1], a, b), ValueError, "same shape"),
    (lambda q, k, v, a, b: (q, k.half(), v.half(), a, b), TypeError, "one dtype"),
    (lambda q, k, v, a, b: (q.long(), k, v, a, b), TypeError, "float16"),
    (lambda q, k, v, a, b: (q, k, v, a.float(), b), TypeError, "int32 or int64"),
    (lambda q, k, v, a, b: (q, k, v, a + 1, b), ValueError, "start at 0"),
    (lambda q, k, v, a, b: (q, k, v, torch.tensor([0, 70, 60, 100], dtype=torch.int32), b),
     ValueError, "non-decreasing|same number"),
    (lambda q, k, v, a, b: (q, k, v, a, cu_seqlens([40, 50])), ValueError, "end at the token count"),
    (lambda q, k, v, a, b: (q, k, v, a, cu_seqlens([40])), ValueError, "end at the token count|same number"),
    (lambda q, k, v, a, b: (q, k, v, a[None], b), ValueError, "1-D"),
    (lambda q, k, v, a, b: (q, k[:80], v[:80], cu_seqlens([50, 50]), cu_seqlens([40, 40])), ValueError, "Tq <= Tk"),
])
def test_bad_inputs_raise_with_fix(good, mutate, exc, match):
    with pytest.raises(exc, match=match):
        _varlen(*mutate(*good))


def test_decreasing_cu_seqlens(good):
    q, k, v, _, _ = good
    bad = torch.tensor([0, 60, 50, 100], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        _varlen(q, k, v, bad, bad)


@pytest.mark.parametrize("kw,exc,match", [
    ({"block_size": 0}, ValueError, "block_size must be >= 1"),
    ({"topk": 0}, ValueError, "topk must be >= 1"),
    ({"block_size": 16.0}, TypeError, "block_size must be a Python int"),
    ({"topk": True}, TypeError, "topk must be a Python int"),
    ({"backend": "cuda-magic"}, ValueError, "backend must be one of"),
    ({"mq": 10}, ValueError, "max_seqlen_q"),
])
def test_bad_settings(good, kw, exc, match):
    q, k, v, cu_q, cu_k = good
    with pytest.raises(exc, match=match):
        _varlen(q, k, v, cu_q, cu_k, **kw)


def test_validate_false_skips_value_checks_only(good):
    q, k, v, cu_q, cu_k = good
    _varlen(q, k, v, cu_q, cu_k, mq=1, mk=1, validate=False)  # max_seqlen not checked
    with pytest.raises(TypeError):  # dtype checks always run
        _varlen(q, k, v, cu_q.float(), cu_k, validate=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mixed_devices(good):
    q, k, v, cu_q, cu_k = good
    with pytest.raises(ValueError, match="one device"):
        _varlen(q.cuda(), k, v, cu_q, cu_k)


def test_cu_seqlens_on_other_device_message(good):
    q, k, v, cu_q, cu_k = good
    if not torch.cuda.is_available():
        q, k, v = (t.to("meta") for t in (q, k, v))
    with pytest.raises(ValueError, match="move it there"):
        _varlen(q, k, v, cu_q, cu_k)


def test_batch_api_errors():
    q = torch.randn(2, 10, 4, 16)
    k = torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        moba_attn_func(q, k, k, block_size=4, topk=2)
    with pytest.raises(ValueError, match="batch"):
        moba_attn_func(q, torch.randn(1, 10, 2, 16), torch.randn(1, 10, 2, 16), block_size=4, topk=2)
    with pytest.raises(ValueError, match="4 dims"):
        moba_attn_func(q[0], k[0], k[0], block_size=4, topk=2)
    with pytest.raises(TypeError, match="keyword|positional"):
        moba_attn_func(q, q, q, 4, 2)  # block_size/topk are keyword-only


def test_int64_cu_seqlens_and_backends_agree():
    q, k, v, cu_q, cu_k = packed_inputs([70, 30], [70, 30], 2, 2, 16, torch.float64)
    a = _varlen(q, k, v, cu_q.long(), cu_k.long(), backend="torch")
    b = _varlen(q, k, v, cu_q, cu_k, backend="naive")
    c = _varlen(q, k, v, cu_q, cu_k, backend="auto")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_default_scale_and_custom_scale():
    q, k, v, cu_q, cu_k = packed_inputs([50], [50], 2, 2, 16, torch.float64)
    a = _varlen(q, k, v, cu_q, cu_k, backend="torch")
    b = _varlen(q, k, v, cu_q, cu_k, backend="torch", softmax_scale=16 ** -0.5)
    c = _varlen(q, k, v, cu_q, cu_k, backend="torch", softmax_scale=0.5)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    ref = _varlen(q, k, v, cu_q, cu_k, backend="naive", softmax_scale=0.5)
    torch.testing.assert_close(c, ref)


def test_public_function_compiles_fullgraph_and_matches_eager():
    q, k, v, cu_q, cu_k = packed_inputs([90, 40], [90, 40], 4, 2, 16, grad=True)

    def f(q, k, v):
        return moba_attn_varlen_func(q, k, v, cu_q, cu_k, 90, 90, block_size=16, topk=3,
                                     backend="torch")

    eager = f(q, k, v)
    g_eager = torch.autograd.grad(eager.square().sum(), (q, k, v))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    g_comp = torch.autograd.grad(compiled.square().sum(), (q, k, v))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)
