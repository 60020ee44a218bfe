"""``moba_attn_with_kvcache`` and ``update_centroids`` against the naive reference: ragged
``cache_seqlens``, left padding, ``Tq > 1``, with and without centroids, strided caches, the
gate splits, ties, and a decode step equal to the last row of a full forward."""

import pytest
import torch

from moba_attn import MobaConfig, moba_attn_func, moba_attn_with_kvcache, update_centroids
from moba_attn.ops.naive import moba_attn_with_kvcache_naive

from ..utils import assert_within_rule, max_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TMAX = 96
LENS, PADS = [96, 43, 70], [0, 5, 10]  # valid slots [pad, len): not multiples of the block


def _cache(b, hkv, d, dtype, device=DEVICE, tmax=TMAX):
    kc = torch.randn(b, tmax, hkv, d, device=device).to(dtype)
    vc = torch.randn(b, tmax, hkv, d, device=device).to(dtype)
    return kc, vc


def _centroids(kc, lens, pads, bsz):
    """fp32 mean keys of every full block of every row, by a plain loop."""
    b, tmax, hkv, d = kc.shape
    cent = torch.zeros(b, tmax // bsz, hkv, d, device=kc.device)
    for i in range(b):
        for j in range((lens[i] - pads[i]) // bsz):
            s = pads[i] + j * bsz
            cent[i, j] = kc[i, s:s + bsz].float().mean(0)
    return cent


CASES = [  # (Hq, Hkv, D, block, topk, dtype, config)
    (8, 2, 16, 16, 3, torch.float32, MobaConfig()),
    (8, 2, 32, 32, 2, torch.float16, MobaConfig(decode_gate_splits=2, decode_attn_splits=2)),
    (2, 2, 16, 16, 2, torch.float32, MobaConfig(decode_gate_splits=4)),  # MHA
    (4, 1, 16, 32, 1, torch.float32, MobaConfig(decode_attn_splits=2)),  # block-local
    (4, 2, 16, 16, 9, torch.float16, MobaConfig()),  # topk above the number of blocks
]


def _cid(c):
    hq, hkv, d, bs, k, dt, cfg = c
    return (f"H{hq}-Hkv{hkv}-D{d}-B{bs}-k{k}-{str(dt).split('.')[-1]}"
            f"-sg{cfg.decode_gate_splits}-ns{cfg.decode_attn_splits}")


@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_matches_reference(case, backend, tq):
    hq, hkv, d, bsz, topk, dtype, cfg = case
    kc, vc = _cache(3, hkv, d, dtype)
    q = torch.randn(3, tq, hq, d, device=DEVICE).to(dtype)
    lens = torch.tensor(LENS, device=DEVICE)
    pads = torch.tensor(PADS, device=DEVICE)
    cent = _centroids(kc, LENS, PADS, bsz)
    truth, truth_lse = moba_attn_with_kvcache_naive(q, kc, vc, lens, block_size=bsz, topk=topk,
                                                    cache_leftpad=pads,
                                                    compute_dtype=torch.float64)
    lowp, _ = moba_attn_with_kvcache_naive(q, kc, vc, lens, block_size=bsz, topk=topk,
                                           cache_leftpad=pads, compute_dtype=dtype)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    for given in (cent, None):
        out, lse = moba_attn_with_kvcache(q, kc, vc, lens, block_size=bsz, topk=topk,
                                          centroids=given, cache_leftpad=pads, return_lse=True,
                                          backend=backend, config=cfg)
        assert out.dtype == dtype and out.shape == q.shape and lse.shape == (3, hq, tq)
        assert_within_rule(out, truth, lowp, 2, floor)
        assert max_err(lse, truth_lse) < 1e-3
    if topk < 9:  # a sparse step really differs from dense attention over the row
        dense, _ = moba_attn_with_kvcache_naive(q, kc, vc, lens, block_size=bsz, topk=99,
                                                cache_leftpad=pads)
        assert max_err(out[0], dense[0]) > 1e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_cache_and_no_padding(backend):
    # a transformers cache is [B, Hkv, T, D]; its transpose is a strided [B, T, Hkv, D]
    b, hq, hkv, d, bsz = 2, 4, 2, 16, 16
    hf_k = torch.randn(b, hkv, TMAX, d, device=DEVICE)
    hf_v = torch.randn(b, hkv, TMAX, d, device=DEVICE)
    kc, vc = hf_k.transpose(1, 2), hf_v.transpose(1, 2)
    q = torch.randn(b, 1, hq, d, device=DEVICE)
    lens = torch.tensor([96, 50], device=DEVICE, dtype=torch.int32)
    out = moba_attn_with_kvcache(q, kc, vc, lens, block_size=bsz, topk=3, backend=backend)
    ref, _ = moba_attn_with_kvcache_naive(q, kc, vc, lens, block_size=bsz, topk=3,
                                          compute_dtype=torch.float64)
    assert max_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ties_go_to_the_lower_block(backend):
    """Every block has the same integer keys: every gate score ties exactly, the lowest
    earlier blocks win, in every gate split."""
    bsz, topk, hq, hkv, d = 16, 4, 8, 2, 16
    one = torch.randint(-2, 3, (1, 1, hkv, d), device=DEVICE).float()
    kc = one.expand(3, 128, hkv, d).contiguous()
    vc = torch.randn(3, 128, hkv, d, device=DEVICE)
    q = torch.randint(-3, 4, (3, 1, hq, d), device=DEVICE).float()
    lens = torch.tensor([110, 70, 128], device=DEVICE)
    for cfg in (MobaConfig(), MobaConfig(decode_gate_splits=2)):
        out = moba_attn_with_kvcache(q, kc, vc, lens, block_size=bsz, topk=topk,
                                     backend=backend, config=cfg)
        ref, _ = moba_attn_with_kvcache_naive(q, kc, vc, lens, block_size=bsz, topk=topk,
                                              compute_dtype=torch.float64)
        assert max_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_equals_last_row_of_full_forward(backend):
    bsz, topk, hq, hkv, d, t = 16, 3, 4, 2, 32, 90
    q = torch.randn(2, t, hq, d, device=DEVICE)
    k = torch.randn(2, t, hkv, d, device=DEVICE)
    v = torch.randn(2, t, hkv, d, device=DEVICE)
    full = moba_attn_func(q, k, v, block_size=bsz, topk=topk, backend="torch")
    lens = torch.tensor([t, t], device=DEVICE)
    step = moba_attn_with_kvcache(q[:, -1:], k, v, lens, block_size=bsz, topk=topk,
                                  backend=backend)
    assert max_err(step, full[:, -1:]) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_update_centroids_keeps_up_with_the_cache(backend):
    # a cache that grows by a 37-token chunk, then token by token: the incrementally kept
    # centroids equal the ones computed from scratch at every step
    b, hkv, d, bsz, tmax = 2, 2, 16, 16, 160
    kc, _ = _cache(b, hkv, d, torch.float32, tmax=tmax)
    pads = [0, 3]
    lens = torch.tensor([20, 30], device=DEVICE)
    leftpad = torch.tensor(pads, device=DEVICE)
    cent = torch.zeros(b, tmax // bsz, hkv, d, device=DEVICE)
    update_centroids(cent, kc, leftpad, lens, block_size=bsz, max_new_blocks=3,
                     cache_leftpad=leftpad, backend=backend)
    steps = [37] + [1] * 40
    for n in steps:
        new = lens + n
        update_centroids(cent, kc, lens, new, block_size=bsz, max_new_blocks=-(-n // bsz) + 1,
                         cache_leftpad=leftpad, backend=backend)
        lens = new
        assert max_err(cent, _centroids(kc, lens.tolist(), pads, bsz)) < 1e-6


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: {**a, "cache_seqlens": torch.tensor([0, 96, 96])}, ValueError, ">= Tq=1"),
    (lambda a: {**a, "cache_seqlens": torch.tensor([97, 96, 96])}, ValueError, "<= the cache"),
    (lambda a: {**a, "cache_leftpad": torch.tensor([-1, 0, 0])}, ValueError, "leftpad must be"),
    (lambda a: {**a, "cache_seqlens": torch.tensor([96.0, 1, 1])}, TypeError, "int32/int64"),
    (lambda a: {**a, "cache_seqlens": torch.tensor([96, 96])}, ValueError, r"\[batch\] = \[3\]"),
    (lambda a: {**a, "centroids": torch.zeros(3, 2, 2, 16)}, ValueError, "must cover"),
    (lambda a: {**a, "centroids": torch.zeros(3, 6, 4, 16)}, ValueError, "fp32"),
    (lambda a: {**a, "k_cache": a["k_cache"].half(), "v_cache": a["v_cache"].half()}, TypeError,
     "one dtype"),
    (lambda a: {**a, "q": a["q"].transpose(1, 2)}, ValueError, "transpose"),
    (lambda a: {**a, "softmax_scale": float("nan")}, ValueError, "finite"),
])
def test_bad_input_raises_with_the_fix(mutate, exc, match):
    args = {"q": torch.randn(3, 1, 4, 16), "k_cache": torch.randn(3, 96, 2, 16),
            "v_cache": torch.randn(3, 96, 2, 16), "cache_seqlens": torch.tensor([96, 50, 3])}
    args = mutate(args)
    with pytest.raises(exc, match=match):
        moba_attn_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                               args.pop("cache_seqlens"), block_size=16, topk=3,
                               backend="torch", **args)


def test_validate_false_skips_only_value_checks():
    q, kc, vc = torch.randn(1, 1, 4, 16), torch.randn(1, 96, 2, 16), torch.randn(1, 96, 2, 16)
    out = moba_attn_with_kvcache(q, kc, vc, torch.tensor([96]), block_size=16, topk=3,
                                 validate=False, backend="torch")
    assert out.shape == q.shape
    with pytest.raises(TypeError):
        moba_attn_with_kvcache(q, kc, vc, torch.tensor([96.0]), block_size=16, topk=3,
                               validate=False)


def test_meta_tensors_give_meta_outputs():
    q = torch.empty(2, 3, 4, 16, device="meta")
    kc = torch.empty(2, 64, 2, 16, device="meta")
    out, lse = moba_attn_with_kvcache(q, kc, kc, torch.empty(2, dtype=torch.int32, device="meta"),
                                      block_size=16, topk=3, return_lse=True)
    assert out.device.type == "meta" and out.shape == q.shape and lse.shape == (2, 4, 3)


# ============================================================================ GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("bs,topk", [(512, 8), (4096, 12), (64, 4)], ids=str)
@pytest.mark.parametrize("rows", [1, 16])
def test_gpu_long_cache_bf16(bs, topk, rows):
    tmax, hq, hkv, d = 131072 + 777, 32, 8, 128
    kc, vc = _cache(rows, hkv, d, torch.bfloat16, tmax=tmax)
    lens = torch.randint(tmax // 2, tmax + 1, (rows,), device=DEVICE)
    lens[0] = tmax
    q = torch.randn(rows, 1, hq, d, device=DEVICE, dtype=torch.bfloat16)
    out = moba_attn_with_kvcache(q, kc, vc, lens, block_size=bs, topk=topk)
    cpu = [x.cpu() for x in (q, kc, vc, lens)]
    ref, _ = moba_attn_with_kvcache_naive(*cpu[:3], cpu[3], block_size=bs, topk=topk,
                                          compute_dtype=torch.float64) if rows == 1 else \
        (None, None)
    if ref is not None:
        low, _ = moba_attn_with_kvcache_naive(*cpu[:3], cpu[3], block_size=bs, topk=topk,
                                              compute_dtype=torch.float32)
        assert max_err(out.cpu(), ref) <= 2 * max_err(low.to(torch.bfloat16), ref) + 2e-2
    torch_out = moba_attn_with_kvcache(q, kc, vc, lens, block_size=bs, topk=topk,
                                       backend="torch")
    assert max_err(out, torch_out) < 3e-2


@gpu
@pytest.mark.parametrize("d,hq,hkv", [(64, 8, 8), (256, 16, 2), (128, 32, 1)],
                         ids=lambda v: str(v))
def test_gpu_head_dims_and_groups(d, hq, hkv):
    kc, vc = _cache(4, hkv, d, torch.bfloat16, tmax=5000)
    lens = torch.tensor([5000, 4000, 1, 2222], device=DEVICE)
    q = torch.randn(4, 2, hq, d, device=DEVICE, dtype=torch.bfloat16)
    lens[2] = 2
    out = moba_attn_with_kvcache(q, kc, vc, lens, block_size=128, topk=5)
    ref = moba_attn_with_kvcache(q.float(), kc.float(), vc.float(), lens, block_size=128,
                                 topk=5, backend="torch")
    assert max_err(out, ref) < 3e-2
