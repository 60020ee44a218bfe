"""Public API: every bad input raises with a message that names the fix; backends resolve
once and an explicit backend that cannot run a call raises; edge shapes give outputs."""

import math

import pytest
import torch

from moba_attn import moba_attn_func, moba_attn_varlen_func, moba_select

from .utils import cu_seqlens, packed_inputs


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


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf"), -math.inf])
def test_bad_softmax_scale_is_rejected_in_every_backend(good, backend, scale):
    q, k, v, cu_q, cu_k = good
    with pytest.raises(ValueError, match="softmax_scale must be a finite number > 0"):
        _varlen(q, k, v, cu_q, cu_k, backend=backend, softmax_scale=scale)
    with pytest.raises(TypeError, match="softmax_scale"):
        _varlen(q, k, v, cu_q, cu_k, backend=backend, softmax_scale="0.5")


@pytest.mark.parametrize("kw,exc,match", [
    ({"block_size": 0}, ValueError, "block_size must be >= 1"),
    ({"topk": 0}, ValueError, "topk must be >= 1"),
    ({"topk": -2}, ValueError, "topk must be >= 1"),
    ({"block_size": 4.0}, TypeError, "block_size must be a Python int"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
])
def test_moba_select_validates_like_the_attention(good, kw, exc, match):
    q, k, _, cu_q, cu_k = good
    args = {"block_size": 16, "topk": 2, **kw}
    with pytest.raises(exc, match=match):
        moba_select(q, k, cu_q, cu_k, **args)


def test_moba_select_checks_tensors_and_cu_seqlens(good):
    q, k, _, cu_q, cu_k = good
    with pytest.raises(TypeError, match="int32 or int64"):
        moba_select(q, k, cu_q.float(), cu_k, block_size=16, topk=2)
    with pytest.raises(ValueError, match="multiple"):
        moba_select(q[:, :3], k, cu_q, cu_k, block_size=16, topk=2)
    with pytest.raises(ValueError, match="start at 0"):
        moba_select(q, k, cu_q + 1, cu_k, block_size=16, topk=2)


def test_edge_shapes():
    # head dim 0: a clear error; batch 0: an empty output; meta tensors: meta outputs
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        x = torch.randn(1, 8, 2, 0)
        moba_attn_func(x, x, x, block_size=4, topk=2)
    x = torch.randn(0, 8, 2, 16)
    out, lse = moba_attn_func(x, x, x, block_size=4, topk=2, return_lse=True)
    assert out.shape == x.shape and lse.shape == (0, 2, 8)
    m = torch.empty(2, 64, 4, 16, device="meta")
    out, lse = moba_attn_func(m, m[:, :, :2], m[:, :, :2], block_size=16, topk=2,
                              return_lse=True)
    assert out.device.type == "meta" and out.shape == m.shape and lse.shape == (2, 4, 64)
    mv = torch.empty(100, 4, 16, device="meta")
    cu = torch.tensor([0, 100], dtype=torch.int32, device="meta")
    out = moba_attn_varlen_func(mv, mv, mv, cu, cu, 100, 100, block_size=16, topk=2)
    assert out.device.type == "meta" and out.shape == mv.shape


def test_heads_first_input_gets_a_hint():
    # [B, H, T, D] passed as [B, T, H, D]: where a check trips, it suggests transpose(1, 2)
    q = torch.randn(1, 16, 8, 32)  # heads-first: 16 query heads, 8 positions
    k = torch.randn(1, 4, 8, 32)  # 4 kv heads
    with pytest.raises(ValueError, match=r"transpose\(1, 2\)"):
        moba_attn_func(q, k, k, block_size=16, topk=2)
    assert "sequence-first" in moba_attn_func.__doc__.split("Args")[0]


def test_triton_on_cpu_tensors_raises_instead_of_running_torch(good, monkeypatch):
    # without the interpreter, the Triton kernels cannot run CPU tensors: an explicit
    # backend="triton" raises (it never runs and labels the torch path instead)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, cu_q, cu_k = good
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: tensors are on cpu"):
        _varlen(q, k, v, cu_q, cu_k, backend="triton")
    assert _varlen(q, k, v, cu_q, cu_k, backend="auto").shape == q.shape


@pytest.mark.parametrize("name", ["return_lse", "deterministic", "validate"])
def test_flags_must_be_bools(good, name):
    q, k, v, cu_q, cu_k = good
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        _varlen(q, k, v, cu_q, cu_k, **{name: 1})
