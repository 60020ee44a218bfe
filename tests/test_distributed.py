"""Context-parallel MoBA (``moba_attn.distributed``) against the single-process op.

Two process groups are started (gloo, CPU): 2 and 4 ranks. Each runs every case in both modes
and saves its local outputs and gradients; the tests compare them, reassembled, with
``moba_attn_varlen_func(backend="torch")`` on the whole batch in fp64 (one case: the Triton
kernels, interpreted on CPU, in fp32, against the single-process Triton op). Workers have a deadline
and collectives a timeout, so a hang fails the test instead of blocking.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from moba_attn import moba_attn_varlen_func
from moba_attn.distributed import comm_bytes, cp_layout, shard

from .utils import cu_seqlens

DEADLINE_S = 150  # per process group, import time included
MODES = ("allgather", "selective")

# id -> (seqlens, Hq, Hkv, D, block_size, topk, layout kind, input form)
CASES = {
    "T1000-H4-Hkv2-D16-B64-k3": ([1000], 4, 2, 16, 64, 3, "zigzag", "packed"),
    "T1000-H4-Hkv2-D16-B64-k1": ([1000], 4, 2, 16, 64, 1, "zigzag", "packed"),
    "T1000-H4-Hkv2-D16-B64-k20-dense": ([1000], 4, 2, 16, 64, 20, "zigzag", "packed"),
    "T1200-H2-Hkv2-D8-B16-k5-75blocks": ([1200], 2, 2, 8, 16, 5, "zigzag", "packed"),
    "packed-300.1.0.517.64-H4-Hkv1-D16-B32-k4": ([300, 1, 0, 517, 64], 4, 1, 16, 32, 4,
                                                 "zigzag", "packed"),
    "T777-H2-Hkv1-D16-B32-k3-contiguous": ([777], 2, 1, 16, 32, 3, "contiguous", "packed"),
    "batch2-T512-H4-Hkv2-D16-B32-k3-4d": ([512, 512], 4, 2, 16, 32, 3, "zigzag", "batch"),
    "T640-H4-Hkv2-D16-B32-k3-routed": ([640], 4, 2, 16, 32, 3, "zigzag", "routed"),
    "T40-H2-Hkv1-D8-B16-k2-idle-ranks": ([40], 2, 1, 8, 16, 2, "zigzag", "packed"),  # ranks w/o rows
    # the Triton kernels (interpreted on CPU), fp32, against the single-process Triton op
    "T600-H2-Hkv1-D16-B32-k3-triton": ([600], 2, 1, 16, 32, 3, "zigzag", "triton"),
}


def make_inputs(name: str):
    """Full fp64 q/k/v/dout of a case (the same on every process)."""
    seqlens, hq, hkv, d, bs, _, _, form = CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    total = sum(seqlens)
    q = torch.randn(total, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(total, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(total, hkv, d, generator=g, dtype=torch.float64)
    do = torch.randn(total, hq, d, generator=g, dtype=torch.float64)
    if form == "routed":  # every query prefers blocks 0 and 1: few blocks need to move
        q = q.abs() + 1.0
        k[: 2 * bs] += 4.0
    if form == "triton":
        q, k, v, do = (x.float() for x in (q, k, v, do))
    return q, k, v, do


def backend_of(name: str) -> str:
    return "triton" if CASES[name][7] == "triton" else "torch"


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    from moba_attn.distributed import cp_layout, moba_attn_cp, shard, unshard

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        results = {}
        for name, (seqlens, hq, hkv, d, bs, topk, kind, form) in CASES.items():
            q, k, v, do = make_inputs(name)
            for mode in MODES:
                if form == "batch":  # [B, T, H, D] sharded along T; layout inferred
                    b, t = len(seqlens), seqlens[0]
                    one = cp_layout([t], world, bs)
                    ql, kl, vl, dol = (shard(x.view(b, t, *x.shape[1:]), one, rank, dim=1)
                                       for x in (q, k, v, do))
                    lay = None
                else:
                    lay = cp_layout(seqlens, world, bs, kind)
                    ql, kl, vl, dol = (shard(x, lay, rank) for x in (q, k, v, do))
                ql, kl, vl = (x.clone().requires_grad_(True) for x in (ql, kl, vl))
                stats = {}
                out, lse = moba_attn_cp(ql, kl, vl, block_size=bs, topk=topk, layout=lay,
                                        mode=mode, backend=backend_of(name), return_lse=True,
                                        stats=stats)
                (out * dol).sum().backward()
                res = {"out": out.detach(), "lse": lse, "dq": ql.grad, "dk": kl.grad,
                       "dv": vl.grad, "stats": stats}
                if form != "batch":
                    res["unshard"] = unshard(out.detach(), lay)
                results[(name, mode)] = res
        if world == 2:
            results["hf"] = _hf_worker(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # reported to the parent through a file
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    # results saved, group destroyed: skip interpreter finalization, where a gloo rank can
    # abort after a complete run (see benchmarks/cp.py, _rank_main)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# a tiny Llama: one MoBA layer, one dense layer (full_attn_layers), fp64
HF = {"batch": 2, "T": 200, "block_size": 16, "topk": 3, "full_attn_layers": (1,)}


def _hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attention_dropout=0.0)
    model = LlamaForCausalLM(cfg).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (HF["batch"], HF["T"]), generator=g)
    w = torch.randn(HF["batch"], HF["T"], 64, generator=g, dtype=torch.float64)
    return model, ids, w


def _hf_worker(rank: int, world: int) -> dict:
    """The module docstring's transformers recipe on a tiny Llama: local logits and the
    all-reduced parameter gradients of a per-token loss."""
    import torch.distributed as dist
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from moba_attn.distributed import cp_layout, make_cp_attention_forward, shard

    b, t, bs = HF["batch"], HF["T"], HF["block_size"]
    lay = cp_layout([t] * b, world, bs)
    one = cp_layout([t], world, bs)
    AttentionInterface.register("moba_cp", make_cp_attention_forward(
        lay, block_size=bs, topk=HF["topk"], mode="selective", backend="torch",
        full_attn_layers=HF["full_attn_layers"]))
    AttentionMaskInterface.register("moba_cp", lambda *args, **kwargs: None)
    model, ids, w = _hf_model()
    model.set_attn_implementation("moba_cp")
    pos = torch.arange(t).expand(b, t)
    ids_l, pos_l, w_l = (shard(x, one, rank, dim=1) for x in (ids, pos, w))
    logits = model(input_ids=ids_l, position_ids=pos_l, use_cache=False).logits
    (logits * w_l).sum().backward()
    grads = {}
    for name, prm in model.named_parameters():
        dist.all_reduce(prm.grad)
        grads[name] = prm.grad
    return {"logits": logits.detach(), "grads": grads}


def _run_group(world: int, tmp: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    init = f"file://{tmp / 'rendezvous'}"
    procs = [ctx.Process(target=_worker, args=(r, world, init, str(tmp)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=DEADLINE_S)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = [f.read_text() for f in sorted(tmp.glob("error*.txt"))]
    if errors:
        pytest.fail(f"{world} ranks: worker error:\n{errors[0]}")
    if hung:
        pytest.fail(f"{world} ranks: {len(hung)} process(es) still running after {DEADLINE_S}s")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    assert not bad, f"worker exit codes {bad}"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def group_results(request, tmp_path_factory):
    world = request.param
    return world, _run_group(world, tmp_path_factory.mktemp(f"cp{world}"))


_REF = {}


def reference(name: str):
    """Single-process fp64 output, lse and gradients of the whole batch (torch backend)."""
    if name not in _REF:
        seqlens, _, _, _, bs, topk, _, _ = CASES[name]
        q, k, v, do = make_inputs(name)
        q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
        cu = cu_seqlens(seqlens)
        out, lse = moba_attn_varlen_func(q, k, v, cu, cu, max(seqlens), max(seqlens),
                                         block_size=bs, topk=topk, backend=backend_of(name),
                                         return_lse=True)
        (out * do).sum().backward()
        _REF[name] = {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return _REF[name]


def _assemble(name: str, world: int, per_rank: list, key: str) -> torch.Tensor:
    """Local results of every rank put back at their global rows (packed order)."""
    seqlens, _, _, _, bs, _, kind, form = CASES[name]
    lay = cp_layout(seqlens, world, bs, kind)
    first = per_rank[0][key]
    if form == "batch":
        t = seqlens[0]
        one = cp_layout([t], world, bs)
        full = None
        for r, res in enumerate(per_rank):
            x = res[key]
            if key == "lse":  # [B, Hq, T_local] -> [Hq, B*T]
                if full is None:
                    full = torch.full((x.shape[1], len(seqlens), t), float("nan"), dtype=x.dtype)
                full[:, :, torch.as_tensor(one.local_rows(r))] = x.transpose(0, 1)
            else:  # [B, T_local, H, D]
                if full is None:
                    full = torch.full((x.shape[0], t) + tuple(x.shape[2:]), float("nan"),
                                      dtype=x.dtype)
                full[:, torch.as_tensor(one.local_rows(r))] = x
        return full.reshape(full.shape[0], -1) if key == "lse" else full.flatten(0, 1)
    if key == "lse":
        full = torch.full((first.shape[0], lay.total), float("nan"), dtype=first.dtype)
        for r, res in enumerate(per_rank):
            full[:, torch.as_tensor(lay.local_rows(r))] = res[key]
        return full
    full = torch.full((lay.total,) + tuple(first.shape[1:]), float("nan"), dtype=first.dtype)
    for r, res in enumerate(per_rank):
        full[torch.as_tensor(lay.local_rows(r))] = res[key]
    return full


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(group_results, name, mode):
    world, results = group_results
    per_rank = [res[(name, mode)] for res in results]
    ref = reference(name)
    tol = 1e-5 if ref["out"].dtype == torch.float32 else 1e-9  # same kernels, same routing
    for key in ("out", "dq", "dk", "dv"):
        got = _assemble(name, world, per_rank, key)
        assert not torch.isnan(got).any(), f"{key}: rows missing"
        torch.testing.assert_close(got, ref[key], rtol=tol, atol=tol, msg=f"{key} differs")
    lse = _assemble(name, world, per_rank, "lse")
    torch.testing.assert_close(lse.double(), ref["lse"].double(), rtol=1e-5, atol=1e-5)
    if "unshard" in per_rank[0]:
        for res in per_rank:  # every rank gets the whole output
            torch.testing.assert_close(res["unshard"], ref["out"], rtol=tol, atol=tol)


def test_topk_matters(group_results):
    """Sanity of the oracle: a small topk differs from dense attention on long sequences."""
    a, b = reference("T1000-H4-Hkv2-D16-B64-k3"), reference("T1000-H4-Hkv2-D16-B64-k20-dense")
    assert (a["out"] - b["out"]).abs().max() > 1e-3


def test_bytes_moved(group_results):
    world, results = group_results
    name = "T640-H4-Hkv2-D16-B32-k3-routed"  # all queries pick blocks 0 and 1
    _, _, hkv, d, bs, topk, kind, _ = CASES[name]
    lay = cp_layout([640], world, bs, kind)
    sel = [res[(name, "selective")]["stats"] for res in results]
    ag = [res[(name, "allgather")]["stats"] for res in results]
    pred_ag = comm_bytes(lay, "allgather", n_kv_heads=hkv, head_dim=d, itemsize=8)
    fetched = [s["fetched_blocks"] for s in sel]
    pred_sel = comm_bytes(lay, "selective", n_kv_heads=hkv, head_dim=d, itemsize=8,
                          fetched_blocks=fetched)
    bound = comm_bytes(lay, "selective", n_kv_heads=hkv, head_dim=d, itemsize=8, topk=topk,
                       n_q_heads=4)
    for r in range(world):
        assert ag[r]["bytes_recv_fwd"] == pred_ag[r]["bytes_recv_fwd"] > 0
        assert sel[r]["kv_bytes_recv_fwd"] == pred_sel[r]["kv_bytes_recv_fwd"]
        assert fetched[r] <= 2  # blocks 0 and 1 at most, and only when held elsewhere
        assert sel[r]["bytes_recv_fwd"] < ag[r]["bytes_recv_fwd"]
        assert pred_sel[r]["kv_bytes_recv_fwd"] <= bound[r]["kv_bytes_recv_fwd"]
    # rank 0 holds blocks 0-1 in the zigzag layout; every other rank fetches both
    assert fetched[0] == 0 and all(f == 2 for f in fetched[1:])
    assert sum(s["sent_blocks"] for s in sel) == sum(fetched)


# ----------------------------------------------------------------------------- no processes
def test_layout_zigzag_balanced_and_block_aligned():
    lay = cp_layout([1000, 3, 0, 4096], 4, 64)
    rows = np.concatenate([lay.local_rows(r) for r in range(4)])
    assert np.array_equal(np.sort(rows), np.arange(lay.total))  # a partition of the rows
    for r in range(4):
        for _, s, e in lay.pieces(r):
            assert s % 64 == 0
    # 4096 tokens = 64 blocks over 8 chunks of 8: every rank holds 16 blocks of it
    counts = [sum(e - s for i, s, e in lay.pieces(r) if i == 3) for r in range(4)]
    assert counts == [1024] * 4
    assert lay.chunk_ranks == (0, 1, 2, 3, 3, 2, 1, 0)
    owner = lay.block_owner()
    assert (owner >= 0).all() and owner.shape[0] == lay.n_blocks


def test_shard_batch_equals_packed_order():
    x = torch.arange(2 * 300).view(2, 300)
    one = cp_layout([300], 2, 16)
    two = cp_layout([300, 300], 2, 16)
    for r in range(2):
        assert torch.equal(shard(x, one, r, dim=1).reshape(-1), shard(x.reshape(-1), two, r))


def test_validation_errors():
    with pytest.raises(ValueError, match="layout kind"):
        cp_layout([10], 2, 4, kind="ring")
    with pytest.raises(ValueError, match="tokens along dim"):
        shard(torch.zeros(5, 1, 1), cp_layout([10], 2, 4), 0)
    from moba_attn.distributed import moba_attn_cp

    with pytest.raises(RuntimeError, match="init_process_group"):
        moba_attn_cp(torch.zeros(4, 1, 8), torch.zeros(4, 1, 8), torch.zeros(4, 1, 8),
                     block_size=4, topk=2)


def test_transformers_recipe(group_results):
    """Sharded tokens + the registered CP attention == the unsharded model with enable_moba."""
    world, results = group_results
    if world != 2:
        pytest.skip("run on the 2-rank group only (import time)")
    from moba_attn.integrations.transformers import enable_moba

    model, ids, w = _hf_model()
    model = enable_moba(model, block_size=HF["block_size"], topk=HF["topk"],
                        full_attn_layers=HF["full_attn_layers"], backend="torch")
    logits = model(input_ids=ids, use_cache=False).logits
    (logits * w).sum().backward()
    one = cp_layout([HF["T"]], world, HF["block_size"])
    got = torch.full_like(logits, float("nan"))
    for r, res in enumerate(results):
        got[:, torch.as_tensor(one.local_rows(r))] = res["hf"]["logits"]
    torch.testing.assert_close(got, logits.detach(), rtol=1e-9, atol=1e-9)
    for name, prm in model.named_parameters():
        for res in results:
            torch.testing.assert_close(res["hf"]["grads"][name], prm.grad, rtol=1e-8, atol=1e-9,
                                       msg=f"grad of {name}")
