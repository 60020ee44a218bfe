"""MoBA forward+backward on one GPU vs dense SDPA (FLASH_ATTENTION, CUDNN_ATTENTION).

Checks the Triton backward against the exact torch backward first, optionally sweeps the
backward's tile shapes once, then times fwd and fwd+bwd (gating included) for
  - FlashMoBA's setting: batch 2, 16 heads, D=128, block 128, topk 8, T = 8K .. 512K
  - the paper's setting: batch 1, 8 heads, D=128, block 4096, topk 12, T = 128K .. 1M
The MoBA forward is ``triton_attention`` when it imports (else the torch forward) and the
backward is ``triton_backward``. Dense baselines are timed in the same run up to
``--dense-max``; longer ones are skipped (PERF.md has them). Useful FLOPs only (selected keys):
fwd 4*D per (row, head, key), fwd+bwd 3.5x that. Writes JSON to ``--out`` and prints a table.

    PYTHONPATH=src python benchmarks/gpu_backward.py --out bench_out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from moba_attn.bench import cuda_event_ms
from moba_attn.ops import torch_impl
from moba_attn.ops import triton_backward as tb
from moba_attn.ops.gate import BlockLayout, dense_causal_keys, n_attended_keys

K = 1024


# ----------------------------------------------------------------------------- MoBA callables
def moba_fn():
    """``(name, f(q, k, v, cu, T, B, topk) -> out)``: the Triton forward and backward."""
    from moba_attn.ops import triton_attention as ta

    assert ta._backward_impl() is tb.moba_backward_triton

    def f(q, k, v, cu, t, b, kk):
        return ta.moba_attn_triton(q, k, v, cu, cu, t, t, block_size=b, topk=kk,
                                   softmax_scale=q.shape[-1] ** -0.5)[0]

    return "triton-fwd+triton-bwd", f


# ----------------------------------------------------------------------------- timing
LONG_REPS = 3  # timed calls after the warm-up for calls of 80 ms or more (--long-reps)


def time_ms(fn, long_reps=None):
    """Median ms: do_bench for short calls, 1 warm-up + ``long_reps`` events for long ones."""
    long_reps = LONG_REPS if long_reps is None else long_reps
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    if first < 80:
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    return cuda_event_ms(fn, long_reps)


def inputs(batch, t, hq, hkv, d, grad=True):
    g = {"device": "cuda", "dtype": torch.bfloat16, "requires_grad": grad}
    q = torch.randn(batch * t, hq, d, **g)
    k = torch.randn(batch * t, hkv, d, **g)
    v = torch.randn(batch * t, hkv, d, **g)
    cu = torch.arange(0, (batch + 1) * t, t, device="cuda", dtype=torch.int32)
    return q, k, v, cu


def fwd_bwd(f):
    def run():
        for x in run.leaves:
            x.grad = None
        out = f()
        out.backward(run.dout)
    return run


def bench_moba(name_fn, batch, t, hq, hkv, d, b, kk):
    _, f = name_fn
    q, k, v, cu = inputs(batch, t, hq, hkv, d)
    dout = torch.randn_like(q)
    with torch.no_grad():
        fwd = time_ms(lambda: f(q, k, v, cu, t, b, kk))
    run = fwd_bwd(lambda: f(q, k, v, cu, t, b, kk))
    run.leaves, run.dout = (q, k, v), dout
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fb = time_ms(run)
    peak = torch.cuda.max_memory_allocated() - base
    keys = n_attended_keys(cu.cpu(), cu.cpu(), b, kk) * hq
    return {"fwd_ms": fwd, "fwdbwd_ms": fb, "peak_extra_gb": peak / 1e9,
            "tflops_fwdbwd": 3.5 * 4 * d * keys / (fb * 1e-3) / 1e12}


def bench_dense(backend, batch, t, hq, d):
    q, k, v, _ = inputs(batch, t, hq, hq, d)
    q4, k4, v4 = (x.detach().view(batch, t, hq, d).transpose(1, 2).requires_grad_()
                  for x in (q, k, v))
    del q, k, v
    dout = torch.randn_like(q4)

    def f():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)

    with torch.no_grad():
        fwd = time_ms(f)
    run = fwd_bwd(f)
    run.leaves, run.dout = (q4, k4, v4), dout
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fb = time_ms(run)
    peak = torch.cuda.max_memory_allocated() - base
    return {"fwd_ms": fwd, "fwdbwd_ms": fb, "peak_extra_gb": peak / 1e9}


# ----------------------------------------------------------------------------- checks
def check_backward(batch=2, t=4 * K, hq=16, hkv=4, d=128, b=128, kk=8):
    """Triton backward vs the torch backward (fp32 math) on the same out/lse/sel."""
    q, k, v, _cu = inputs(batch, t, hq, hkv, d, grad=False)
    cu_q = torch.tensor([0, 1, 1 + t // 4, batch * t], device="cuda",
                        dtype=torch.int32)  # ragged: a length-1 and a short sequence
    layout = BlockLayout.build(cu_q, cu_q, b)
    scale = d ** -0.5
    sel = torch_impl._gate_all(q, k, layout, kk)
    out, lse = torch_impl._forward(q, k, v, layout, sel, kk, scale)
    dout = torch.randn_like(q)
    ref = torch_impl._backward(q, k, v, out, lse, dout, layout, sel, kk, scale, False)
    res = {}
    for det in (False, True):
        got = tb.moba_backward_triton(q, k, v, out, lse.float(), dout, layout, sel, kk, scale, det)
        for n, a, r in zip(("dq", "dk", "dv"), got, ref):
            e = ((a.float() - r.float()).norm() / r.float().norm()).item()
            res[f"{n}{'_det' if det else ''}"] = e
            assert e < 2e-2, f"{n} (deterministic={det}) rel error {e:.2e} vs torch backward"
    return res


def _bwd_case(batch, t, hq, hkv, d, b, kk):
    q, k, v, cu = inputs(batch, t, hq, hkv, d, grad=False)
    layout = BlockLayout.build(cu, cu, b)
    scale = d ** -0.5
    sel = torch_impl._gate_all(q, k, layout, kk)
    out, lse = torch_impl._forward(q, k, v, layout, sel, kk, scale)
    return q, k, v, out, lse.float(), torch.randn_like(q), layout, sel, kk, scale


SWEEP = {"small": {"dkdv": [(64, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (32, 128, 4, 3)],
                   "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (128, 32, 4, 3)]},
         "large": {"dkdv": [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3)],
                   "dq": [(128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2)]}}


def sweep(regime, batch, t, hq, hkv, d, b, kk):
    """Time the backward alone for a few tile shapes; keep the fastest per kernel."""
    case = _bwd_case(batch, t, hq, hkv, d, b, kk)

    def bwd():
        tb.moba_backward_triton(*case, False)

    results = {}
    for kernel in ("dkdv", "dq"):
        best = None
        for cfg in SWEEP[regime][kernel]:
            tb.KERNEL_CONFIG[(kernel, regime)][d] = cfg
            try:
                ms = time_ms(bwd, long_reps=2)
            except Exception as err:  # noqa: BLE001  a shape the compiler refuses (resources): skip it
                print(f"# {kernel} {cfg}: {type(err).__name__}: {str(err)[:100]}")
                continue
            results[f"{regime}-{kernel}{cfg}"] = ms
            print(f"# sweep {regime} {kernel} {cfg}: bwd {ms:.2f} ms")
            if best is None or ms < best[1]:
                best = (cfg, ms)
        tb.KERNEL_CONFIG[(kernel, regime)][d] = best[0]
    return results


def breakdown(batch, t, hq, hkv, d, b, kk):
    """ms of the backward's parts: entry sort, dK/dV kernel, dQ kernel (tiles included)."""
    q, k, v, _out, lse, dout, layout, sel, kk, scale = case = _bwd_case(batch, t, hq, hkv, d, b, kk)
    total_q = q.shape[0]
    ents = tb._Entries(layout, sel, 0, total_q, hq, hkv, kk)
    lse2 = (lse.t() * tb.LOG2E).contiguous()
    delta = torch.randn(total_q * hq, device="cuda")
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.zeros(total_q, hq, d, device="cuda")
    res = {
        "total": time_ms(lambda: tb.moba_backward_triton(*case, False)),
        "entries": time_ms(lambda: tb._Entries(layout, sel, 0, total_q, hq, hkv, kk)),
        "dkdv": time_ms(lambda: tb._launch_dkdv(q, k, v, dout, dk, dv, lse2, delta, layout,
                                                ents, scale, d, "tf32")),
        "dq": time_ms(lambda: tb._launch_dq(q, k, v, dout, dq, lse2, delta, layout, ents, scale,
                                            True, 0, d, "tf32")),
    }
    keys = n_attended_keys(torch.tensor([0, t]), torch.tensor([0, t]), b, kk) * batch * hq
    res["dkdv_tflops"] = 4 * 2 * d * keys / (res["dkdv"] * 1e-3) / 1e12
    res["dq_tflops"] = 3 * 2 * d * keys / (res["dq"] * 1e-3) / 1e12
    print(f"# breakdown T={t // K}K B={b} k={kk}: " + ", ".join(
        f"{n} {x:.1f}" for n, x in res.items()))
    return res


TILE_CASES = {  # name: (batch, T, Hq, Hkv, D, block, topk)
    "small-preset-8K": (8, 8 * K, 10, 2, 64, 512, 3),
    "flashmoba-128K": (2, 128 * K, 16, 16, 128, 128, 8),
    "paper-128K": (1, 128 * K, 8, 8, 128, 4096, 12),
}
TILE_CONFIGS = {64: [(64, 128, 8, 2), (64, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                     (128, 64, 8, 3), (32, 128, 4, 3)],
                128: [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)]}


def dkdv_tiles(cases=None):
    """The dK/dV kernel alone over tile shapes: ms, and the largest difference of dK/dV from
    the first shape's (the default) relative to its largest value."""
    res = []
    for name in cases or TILE_CASES:
        batch, t, hq, hkv, d, b, kk = TILE_CASES[name]
        q, k, v, out, lse, dout, layout, sel, kk, scale = _bwd_case(batch, t, hq, hkv, d, b, kk)
        lse2 = (lse.t() * tb.LOG2E).contiguous()
        delta = (out.float() * dout.float()).sum(-1).reshape(-1).contiguous()
        ents = tb._Entries(layout, sel, 0, q.shape[0], hq, hkv, kk, keep_ids=False)
        regime = "large" if b >= tb.LARGE_BLOCK else "small"
        default = tb.KERNEL_CONFIG[("dkdv", regime)][d]
        ref = None
        for cfg in [default] + [c for c in TILE_CONFIGS[d] if c != default]:
            tb.KERNEL_CONFIG[("dkdv", regime)][d] = cfg
            dk, dv = torch.empty_like(k), torch.empty_like(v)

            def run(dk=dk, dv=dv):
                tb._launch_dkdv(q, k, v, dout, dk, dv, lse2, delta, layout, ents, scale, d,
                                "tf32")

            try:
                ms = time_ms(run)
            except Exception as err:  # noqa: BLE001  a tile shape the compiler refuses: skip it
                print(f"# {name} {cfg}: {type(err).__name__}: {str(err)[:100]}")
                continue
            if ref is None:
                ref = (dk.float(), dv.float())
            err = max(((a.float() - r).abs().max() / r.abs().max()).item()
                      for a, r in zip((dk, dv), ref))
            res.append({"case": name, "config": cfg, "ms": ms, "rel_diff": err})
            print(f"# dkdv {name:<16} {cfg}: {ms:8.3f} ms  diff {err:.1e}", flush=True)
        tb.KERNEL_CONFIG[("dkdv", regime)][d] = default
    return res


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--flashmoba-t", default="8,32,128,512", help="T in K tokens")
    ap.add_argument("--paper-t", default="128,512,1024", help="T in K tokens")
    ap.add_argument("--dense-max", type=int, default=128, help="largest dense T (K tokens)")
    ap.add_argument("--budget-s", type=float, default=240, help="skip the rest past this")
    ap.add_argument("--sweep", default="small", help="regimes to sweep: small,large or none")
    ap.add_argument("--breakdown", action="store_true", help="time the backward's parts")
    ap.add_argument("--long-reps", type=int, default=3,
                    help="timed calls after the warm-up for calls of 80 ms or more (1 for the "
                         "dense baselines at 1M)")
    ap.add_argument("--dkdv-tiles", default=None, metavar="CASES",
                    help="only the dK/dV kernel over tile shapes, e.g. "
                         f"{','.join(TILE_CASES)} (or 'all')")
    args = ap.parse_args()
    global LONG_REPS
    LONG_REPS = args.long_reps
    os.makedirs(args.out, exist_ok=True)
    if args.dkdv_tiles:
        cases = None if args.dkdv_tiles == "all" else args.dkdv_tiles.split(",")
        with open(os.path.join(args.out, "dkdv_tiles.json"), "w") as fh:
            json.dump({"machine": f"{torch.cuda.get_device_name()} | torch {torch.__version__} "
                       f"| triton {triton.__version__}", "rows": dkdv_tiles(cases)}, fh, indent=1)
        return
    t_start = time.perf_counter()
    machine = (f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
               f"{triton.__version__} | python {platform.python_version()}")
    print("#", machine)
    res = {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M"),
           "check": check_backward(), "rows": []}
    print("# check vs torch backward (rel err):",
          {k: f"{v:.1e}" for k, v in res["check"].items()})
    name_fn = moba_fn()
    res["moba_impl"] = name_fn[0]
    res["sweep"] = {}
    if "small" in args.sweep:
        res["sweep"].update(sweep("small", 2, 128 * K, 16, 16, 128, 128, 8))
    if "large" in args.sweep:
        res["sweep"].update(sweep("large", 1, 128 * K, 8, 8, 128, 4096, 12))
    if args.breakdown:
        res["breakdown"] = {"flashmoba_128k": breakdown(2, 128 * K, 16, 16, 128, 128, 8),
                            "paper_128k": breakdown(1, 128 * K, 8, 8, 128, 4096, 12)}
    res["kernel_config"] = {"-".join(k): {str(d): c for d, c in v.items()}
                            for k, v in tb.KERNEL_CONFIG.items()}

    settings = [("flashmoba", 2, 16, 128, 8, int(x)) for x in args.flashmoba_t.split(",") if x]
    settings += [("paper", 1, 8, 4096, 12, int(x)) for x in args.paper_t.split(",") if x]
    for name, batch, h, b, kk, tk in settings:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"# budget reached: skipping {name} T={tk}K")
            continue
        t = tk * K
        row = {"setting": name, "batch": batch, "heads": h, "T": t, "block": b, "topk": kk}
        try:
            row["moba"] = bench_moba(name_fn, batch, t, h, h, 128, b, kk)
        except torch.cuda.OutOfMemoryError as err:
            row["moba"] = {"error": str(err)[:200]}
        torch.cuda.empty_cache()
        if tk <= args.dense_max:
            for label, be in (("flash", SDPBackend.FLASH_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    row[label] = bench_dense(be, batch, t, h, 128)
                except RuntimeError as err:
                    row[label] = {"error": str(err)[:200]}
                torch.cuda.empty_cache()
        cu = torch.tensor([0, t])
        row["sparsity"] = 1 - n_attended_keys(cu, cu, b, kk) / dense_causal_keys(cu, cu)
        res["rows"].append(row)
        print("#", json.dumps(row))
        with open(os.path.join(args.out, "gpu_backward.json"), "w") as fh:
            json.dump(res, fh, indent=1)

    print(f"\nMoBA = {res['moba_impl']}; bf16, D=128; ms (fwd / fwd+bwd); x = dense fwd+bwd / "
          "MoBA fwd+bwd")
    print(f"{'setting':<10}{'T':>6} {'MoBA':>17} {'TF/s':>6} {'FLASH':>17} {'cuDNN':>17} "
          f"{'xFLASH':>7} {'xcuDNN':>7} {'peak GB moba/cudnn':>19}")
    for r in res["rows"]:
        m = r["moba"]
        fl, cd = r.get("flash", {}), r.get("cudnn", {})

        def cell(x):
            return f"{x['fwd_ms']:.1f} / {x['fwdbwd_ms']:.1f}" if "fwdbwd_ms" in x else "-"

        def ratio(x):
            if "fwdbwd_ms" not in x or "fwdbwd_ms" not in m:
                return "-"
            return f"{x['fwdbwd_ms'] / m['fwdbwd_ms']:.1f}"

        nan = float("nan")
        peak = f"{m.get('peak_extra_gb', nan):.1f}/{cd.get('peak_extra_gb', nan):.1f}"
        print(f"{r['setting']:<10}{r['T'] // K:>5}K {cell(m):>17} "
              f"{m.get('tflops_fwdbwd', 0):>6.0f} {cell(fl):>17} {cell(cd):>17} "
              f"{ratio(fl):>7} {ratio(cd):>7} {peak:>19}")


if __name__ == "__main__":
    main()
