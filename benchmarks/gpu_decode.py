"""Sparse MoBA decode (Triton, ``ops.triton_decode``) vs dense GQA decode, one step, one GPU.

Settings (issue #5): 32 query / 8 kv heads, D=128, bf16, random q/k/v (random routing: the
four heads of a kv group rarely agree, the most K/V a step can read); block 512 / topk 8 at
128K and 1M tokens, block 4096 / topk 12 at 1M; batch 1 and 16 (a batch whose K/V cache
exceeds ``--max-gb`` is skipped). Every row holds the whole context and its query is the last
token, which closes a block: the step at which ``MobaDecodeState.advance`` also computes one
new centroid per row.

Per setting, correctness first: the kernel step vs the PyTorch step (``_decode_rows``) on the
first and last row (gate agreement, relative error), the Triton dense decode vs an fp32 dense
reference on the first row. Then medians of ``triton.testing.do_bench`` (L2 flushed between
calls), in ms per decode step:
- ``moba``: gate + attention + combine, eager and replayed from a CUDA graph (the step does no
  host sync, so it captures; the graph removes the host launch overhead), plus the gate and
  the attention alone;
- ``update``: the fp32 mean of one block per row, as ``advance`` computes it when a block
  fills; a step costs ``moba + update / block_size`` amortised (``moba_amort``);
- dense: SDPA (``enable_gqa=True``) with torch's own choice and with FLASH / EFFICIENT / CUDNN
  forced (refusals are recorded), and a split-KV Triton dense decode defined here (the best of
  a few chunk / tile configs; its LSE merge is the decode kernels' combine), eager and graph.
GB/s count the bytes a step reads: K/V of the tokens attended (for MoBA: the union of blocks a
kv group chose, plus the own block) and the centroids the gate scans.

    PYTHONPATH=src python benchmarks/gpu_decode.py --out bench_out   # < 150 s on one H200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moba_attn.integrations import transformers as hf
from moba_attn.ops import triton_decode as td
from moba_attn.ops.gate import sortable_key

K = 1024
HQ, HKV, D = 32, 8, 128
SETTINGS = [  # (context T, [(block_size, topk), ...]): settings sharing T share one cache
    (1024 * K, [(512, 8), (4096, 12)]),
    (128 * K, [(512, 8)]),
]
DENSE_CONFIGS = [  # Triton dense decode: (chunk tokens, BN, num_warps, num_stages)
    (1024, 64, 4, 3), (2048, 64, 4, 3), (4096, 64, 4, 3), (4096, 128, 8, 3),
]
SWEEP_TILES = [(64, 4, 3), (64, 4, 2), (32, 4, 3), (64, 8, 3), (128, 8, 3)]
SDPA_BACKENDS = {  # label -> SDPBackend name (None: torch's own choice)
    "sdpa_default": None, "sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
}


# ----------------------------------------------------------------------------- dense baseline
@triton.jit
def _dense_split_kernel(Q, K, V, N_REAL, PO, PL, hq, hkv, chunk, scale2,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt,
                        GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                        BN: tl.constexpr):
    """One (row, kv head, token chunk): dense attention of the group's query heads over slots
    ``[sp * chunk, min((sp + 1) * chunk, n))``; a partial output and log2 LSE per head."""
    bk = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    n_sp = tl.num_programs(1)
    b = bk // hkv
    hk = bk % hkv
    n = tl.load(N_REAL + b)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n)
    r = tl.arange(0, GP)
    rmask = r < GROUP
    h = hk * GROUP + r
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=rmask[:, None],
                other=0.0)  # [GP, D]
    kbase = K + b * stride_kb + hk * stride_kh
    vbase = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for p0 in range(lo, hi, BN):
        pos = p0 + tl.arange(0, BN)  # [BN] int64 slots
        pm = pos < hi
        kt = tl.load(kbase + pos[:, None] * stride_kt + d[None, :], mask=pm[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kt)) * scale2  # [GP, BN], log2 domain
        s = tl.where(pm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(vbase + pos[:, None] * stride_vt + d[None, :], mask=pm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    ok = l_i > 0
    o = acc / tl.where(ok, l_i, 1.0)[:, None]
    lse = tl.where(ok, m_i + tl.math.log2(l_i), float("-inf"))
    part = (b * hq + h) * n_sp + sp
    tl.store(PL + part, lse, mask=rmask)
    tl.store(PO + part[:, None] * D + d[None, :], o, mask=(rmask & ok)[:, None])


def dense_decode_triton(q, key, value, n_real, scale, config):
    """Dense GQA decode over slots ``0 .. n_real[b] - 1`` of each row: split-KV partials, then
    ``triton_decode.combine_partials``. ``config``: one of ``DENSE_CONFIGS``."""
    chunk, bn, warps, stages = config
    bsz, hq, d = q.shape
    hkv, tk = key.shape[1], key.shape[2]
    group = hq // hkv
    n_sp = triton.cdiv(tk, chunk)
    part_o = torch.empty(bsz * hq * n_sp, d, dtype=torch.float32, device=q.device)
    part_l = torch.empty(bsz * hq * n_sp, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _dense_split_kernel[(bsz * hkv, n_sp)](
        q, key, value, n_real, part_o, part_l, hq, hkv, chunk, scale * td.LOG2E,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=d, BN=bn,
        num_warps=warps, num_stages=stages,
    )
    return td.combine_partials(part_o, part_l, out, n_sp)


# ----------------------------------------------------------------------------- helpers
def machine() -> str:
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}, "
            f"triton {triton.__version__}, python {platform.python_version()}")


def bench_ms(fn, rep: int = 100) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def graph_ms(fn) -> float | None:
    """Median ms of ``fn`` replayed from a CUDA graph (None if it does not capture)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up (compilation, allocator) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench_ms(graph.replay)
    except RuntimeError:
        return None


def short(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


def all_centroids(key: torch.Tensor, bs: int) -> torch.Tensor:
    """fp32 mean key of every block of every row, ``[B, T / bs, Hkv, D]`` (chunked: the fp32
    copy of one chunk is 256 MB at most)."""
    bsz, hkv, t, d = key.shape
    nb = t // bs
    cent = torch.empty(bsz, nb, hkv, d, dtype=torch.float32, device=key.device)
    step = max(1, (64 * K) // bs)
    for b in range(bsz):
        for j0 in range(0, nb, step):
            j1 = min(nb, j0 + step)
            kb = key[b, :, j0 * bs : j1 * bs].view(hkv, j1 - j0, bs, d).float()
            cent[b, j0:j1] = kb.mean(2).transpose(0, 1)
    return cent


def torch_selection(q, n_real, cent, bs, topk):
    """The PyTorch step's gate (``_decode_rows``): ``[B, Hq, k-1]`` block ids, -1 unused."""
    bsz, hq, d = q.shape
    n_cent, hkv = cent.shape[1], cent.shape[2]
    own = (n_real - 1).clamp(min=0) // bs
    s = torch.einsum("bkgd,bnkd->bkgn", q.float().view(bsz, hkv, hq // hkv, d), cent)
    cand = torch.arange(n_cent, device=q.device)[None, :] < own[:, None]
    s = s.masked_fill(~cand[:, None, None, :], float("-inf")).reshape(bsz, hq, n_cent)
    idx = sortable_key(s).topk(min(topk - 1, n_cent), dim=-1).indices
    return torch.where(idx < own[:, None, None], idx, -1)


def dense_reference_row(q, key, value, b, n, scale):
    """fp32 dense attention of row ``b`` over its first ``n`` slots: ``[Hq, D]``."""
    g = q.shape[1] // key.shape[1]
    outs = []
    for hk in range(key.shape[1]):
        qk = q[b, hk * g : (hk + 1) * g].float()
        s = qk @ key[b, hk, :n].float().t() * scale
        outs.append(torch.softmax(s, -1) @ value[b, hk, :n].float())
    return torch.cat(outs)


def moba_bytes(sel, n_real, bs, n_cent, elem) -> int:
    """Bytes one step reads: K/V of the union of blocks each (row, kv head) chose, the own
    block up to the query, and the centroids the gate scans (fp32)."""
    bsz = sel.shape[0]
    s = torch.sort(sel.view(bsz, HKV, -1).long(), -1).values
    distinct = (s[..., :1] >= 0).sum(-1) + ((s[..., 1:] != s[..., :-1]) & (s[..., 1:] >= 0)).sum(-1)
    t = n_real - 1
    own = t // bs
    tokens = distinct * bs + (t - own * bs + 1)[:, None]  # [B, Hkv]
    cent = own.clamp(max=n_cent) * HKV * D * 4
    return int(tokens.sum().item()) * D * 2 * elem + int(cent.sum().item())


# ----------------------------------------------------------------------------- one cache
def run_dense(q, key, value, n_real, scale, log) -> dict:
    """Dense decode baselines over one cache (shared by every MoBA setting of that cache)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rec = {}
    ref = dense_reference_row(q, key, value, 0, int(n_real[0]), scale)
    q4 = q[:, :, None].contiguous()

    def sdpa():
        return F.scaled_dot_product_attention(q4, key, value, scale=scale, enable_gqa=True)

    def backend(name):  # None: torch's own choice
        return contextlib.nullcontext() if name is None else sdpa_kernel(getattr(SDPBackend, name))

    for label, name in SDPA_BACKENDS.items():
        try:
            with warnings.catch_warnings(), backend(name):
                warnings.simplefilter("ignore")
                rec[f"{label}_rel_err"] = rel_err(sdpa()[0, :, 0], ref)
                rec[f"{label}_ms"] = bench_ms(sdpa)
        except RuntimeError as err:  # a backend refusing the shape, or out of memory
            rec[f"{label}_error"] = short(err)
            torch.cuda.empty_cache()
    timed = [label for label in SDPA_BACKENDS if f"{label}_ms" in rec]
    if timed:
        best = min(timed, key=lambda label: rec[f"{label}_ms"])
        rec["sdpa_best"], rec["sdpa_best_ms"] = best, rec[f"{best}_ms"]
        with backend(SDPA_BACKENDS[best]):
            rec["sdpa_best_graph_ms"] = graph_ms(sdpa)

    best_cfg, best_ms = None, float("inf")
    for cfg in DENSE_CONFIGS:
        def run(cfg=cfg):
            return dense_decode_triton(q, key, value, n_real, scale, cfg)
        out = run()
        e = rel_err(out[0], ref)
        if e > 2e-2:
            log(f"  triton dense {cfg}: WRONG (rel err {e:.2e}), not timed")
            continue
        ms = bench_ms(run, rep=50)
        rec[f"triton_dense_{'_'.join(map(str, cfg))}_ms"] = ms
        if ms < best_ms:
            best_cfg, best_ms, rec["triton_dense_rel_err"] = cfg, ms, e
    if best_cfg is not None:
        rec["triton_dense_config"] = list(best_cfg)
        rec["triton_dense_ms"] = best_ms
        rec["triton_dense_graph_ms"] = graph_ms(
            lambda: dense_decode_triton(q, key, value, n_real, scale, best_cfg))
    return rec


def rel_err(x, ref) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def check_moba(q, key, value, first, n_real, cent, bs, topk, scale, sel) -> dict:
    """Kernel step vs the PyTorch step on the first and last row. Heads whose selection
    differs from the torch gate's must be fp32 near-ties (summation order differs); the
    output is compared on the others."""
    same, errs, ties_ok = [], [], True
    for r in sorted({0, q.shape[0] - 1}):
        sl = slice(r, r + 1)
        want = torch_selection(q[sl], n_real[sl], cent[sl], bs, topk)
        got_sel = sel[sl].long()
        agree = (torch.sort(got_sel, -1).values == torch.sort(want, -1).values).all(-1)
        same.append(agree.float().mean().item())
        if not agree.all():
            s = torch.einsum("kgd,nkd->kgn", q[r].float().view(HKV, -1, D), cent[r])
            s = s.reshape(1, q.shape[1], -1)
            gap = (torch.gather(s, 2, want.clamp(min=0)).min(-1).values
                   - torch.gather(s, 2, got_sel.clamp(min=0)).min(-1).values).abs()
            ties_ok &= bool((gap[~agree] <= 1e-5 * s.abs().amax()).all())
        ref = hf.moba_decode_attention(q[sl], key[sl], value[sl], first[sl], n_real[sl],
                                       cent[sl], block_size=bs, topk=topk, scale=scale,
                                       backend="torch")
        got = td.moba_decode_triton(q[sl], key[sl], value[sl], first[sl], n_real[sl], cent[sl],
                                    block_size=bs, topk=topk, scale=scale)
        errs.append(rel_err(got[agree], ref[agree]) if agree.any() else 0.0)
    agree_frac, err = min(same), max(errs)
    return {"check_gate_agree": agree_frac, "check_rel_err": err,
            "check_ok": bool(ties_ok and agree_frac >= 0.9 and err < 2e-2)}


def run_moba(q, key, value, first, n_real, bs, topk, scale, log, sweep) -> dict:
    rec = {}
    cent = all_centroids(key, bs)
    sel = td.decode_select_triton(q, cent, n_real, block_size=bs, topk=topk)
    rec.update(check_moba(q, key, value, first, n_real, cent, bs, topk, scale, sel))
    if not rec["check_ok"]:
        log(f"  CORRECTNESS FAILED {rec}; timing anyway")

    def step():
        return td.moba_decode_triton(q, key, value, first, n_real, cent, block_size=bs,
                                     topk=topk, scale=scale)

    rec["moba_ms"] = bench_ms(step)
    rec["moba_graph_ms"] = graph_ms(step)
    rec["gate_ms"] = bench_ms(
        lambda: td.decode_select_triton(q, cent, n_real, block_size=bs, topk=topk))
    rec["attn_ms"] = bench_ms(lambda: td.decode_attend_triton(
        q, key, value, first, n_real, sel, block_size=bs, scale=scale))

    rows = torch.arange(q.shape[0], device=q.device)
    j = key.shape[2] // bs - 1  # the block the query closes
    slot = j * bs + torch.arange(bs, device=q.device)

    def update():  # MobaDecodeState.advance for one filled block per row
        kb = key[rows[:, None], :, slot[None, :], :]  # [B, bs, Hkv, D]
        cent[rows, j] = kb.float().sum(1) / bs

    rec["update_ms"] = bench_ms(update)
    rec["update_per_step_ms"] = rec["update_ms"] / bs
    rec["moba_amort_ms"] = rec["moba_ms"] + rec["update_per_step_ms"]
    if rec["moba_graph_ms"] is not None:
        rec["moba_graph_amort_ms"] = rec["moba_graph_ms"] + rec["update_per_step_ms"]
    rec["moba_bytes"] = moba_bytes(sel, n_real, bs, cent.shape[1], key.element_size())
    if sweep:
        rec["sweep"] = attn_sweep(q, key, value, first, n_real, sel, bs, scale)
        log(f"  sweep: {json.dumps(rec['sweep'])}")
    return rec


def attn_sweep(q, key, value, first, n_real, sel, bs, scale) -> dict:
    """Attention-kernel ms per (BN, warps, stages) tile and tokens chunks per block."""
    out = {}
    for tile in SWEEP_TILES:
        for n_sub in (1, 2, 4, 8):
            if bs % (16 * n_sub) or (bs // n_sub) % tile[0]:
                continue
            td.ATTN_TILE, td.ATTN_SPLITS = tile, n_sub
            try:
                out[f"{tile}-x{n_sub}"] = bench_ms(lambda: td.decode_attend_triton(
                    q, key, value, first, n_real, sel, block_size=bs, scale=scale), rep=30)
            except Exception as err:  # noqa: BLE001  a tile the compiler refuses (resources)
                out[f"{tile}-x{n_sub}"] = short(err)
            finally:
                td.ATTN_TILE, td.ATTN_SPLITS = None, None
    return out


def derive(rec: dict) -> None:
    """Speedups (dense ms / MoBA amortised ms, same run) and GB/s."""
    moba, graph = rec.get("moba_amort_ms"), rec.get("moba_graph_amort_ms")
    for base in ("sdpa_best", "triton_dense"):
        if rec.get(f"{base}_ms") and moba:
            rec[f"x_{base}"] = rec[f"{base}_ms"] / moba
        if rec.get(f"{base}_graph_ms") and graph:
            rec[f"x_{base}_graph"] = rec[f"{base}_graph_ms"] / graph
    t_moba = rec.get("moba_graph_ms") or rec.get("moba_ms")
    if t_moba:
        rec["moba_gbps"] = rec["moba_bytes"] / t_moba / 1e6
    for base in ("sdpa_best", "triton_dense"):
        t = rec.get(f"{base}_graph_ms") or rec.get(f"{base}_ms")
        if t:
            rec[f"{base}_gbps"] = rec["dense_bytes"] / t / 1e6


def table(rows) -> str:
    cols = [("setting", "setting", "s"), ("B", "batch", "d"), ("T", "T_k", "s"),
            ("MoBA ms", "moba_ms", ".3f"), ("graph ms", "moba_graph_ms", ".3f"),
            ("upd/B ms", "update_per_step_ms", ".4f"), ("gate ms", "gate_ms", ".3f"),
            ("attn ms", "attn_ms", ".3f"), ("SDPA ms", "sdpa_best_ms", ".3f"),
            ("SDPA", "sdpa_best", "s"), ("dense ms", "triton_dense_ms", ".3f"),
            ("x SDPA", "x_sdpa_best", ".1f"), ("x dense", "x_triton_dense", ".1f"),
            ("x dense graph", "x_triton_dense_graph", ".1f"), ("MoBA GB/s", "moba_gbps", ".0f"),
            ("dense GB/s", "triton_dense_gbps", ".0f"), ("check", "check_ok", "s")]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else format(v, fmt) if fmt != "s" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"),
                    help="folder for gpu_decode.json and gpu_decode.log (default: $OUT)")
    ap.add_argument("--batches", default="1,16", help="batch sizes, comma separated")
    ap.add_argument("--max-gb", type=float, default=100.0,
                    help="skip a (batch, T) whose K/V cache is larger (GB)")
    ap.add_argument("--budget-s", type=float, default=110.0,
                    help="start no new cache after this many seconds")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the attention kernel per tile and chunks per block")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    logf = open(os.path.join(args.out, "gpu_decode.log"), "a")  # noqa: SIM115  closed at exit

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"machine: {machine()}")
    torch.manual_seed(0)
    scale = D ** -0.5
    rows = []
    for t, blocks in SETTINGS:
        for bsz in (int(b) for b in args.batches.split(",")):
            gb = 2 * bsz * HKV * t * D * 2 / 1e9
            tag = f"B={bsz} T={t // K}K"
            if gb > args.max_gb:
                log(f"[{tag}] skipped: K/V cache {gb:.0f} GB > --max-gb {args.max_gb:.0f}")
                continue
            if time.time() - t0 > args.budget_s:
                log(f"[{tag}] skipped: time budget spent")
                continue
            key = torch.randn(bsz, HKV, t, D, device="cuda", dtype=torch.bfloat16)
            value = torch.randn(bsz, HKV, t, D, device="cuda", dtype=torch.bfloat16)
            q = torch.randn(bsz, HQ, D, device="cuda", dtype=torch.bfloat16)
            first = torch.zeros(bsz, dtype=torch.int64, device="cuda")
            n_real = torch.full((bsz,), t, dtype=torch.int64, device="cuda")
            dense = run_dense(q, key, value, n_real, scale, log)
            dense["dense_bytes"] = bsz * HKV * t * D * 2 * key.element_size()
            log(f"[{tag}] dense: {json.dumps(dense)}")
            for bs, topk in blocks:
                rec = {"setting": f"B{bs}-k{topk}", "batch": bsz, "T": t, "T_k": f"{t // K}K",
                       "block": bs, "topk": topk, "hq": HQ, "hkv": HKV, "d": D, "cache_gb": gb}
                rec.update(run_moba(q, key, value, first, n_real, bs, topk, scale, log,
                                    args.sweep))
                rec.update(dense)
                derive(rec)
                rows.append(rec)
                log(f"[{tag} {rec['setting']}] {json.dumps(rec)}")
                torch.cuda.empty_cache()
            del key, value
            torch.cuda.empty_cache()
            with open(os.path.join(args.out, "gpu_decode.json"), "w") as fh:
                json.dump({"machine": machine(), "rows": rows}, fh, indent=1)
    log(f"total {time.time() - t0:.0f} s; ms per decode step (do_bench medians); x = dense ms / "
        "MoBA amortised ms (step + update / block_size), same run")
    log(table(rows))
    logf.close()
    return rows


if __name__ == "__main__":
    main()
