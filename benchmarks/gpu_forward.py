"""MoBA forward (Triton) on one GPU vs dense SDPA (FLASH_ATTENTION and CUDNN_ATTENTION).

Checks correctness first (sampled rows against an fp64 gather reference on the same
selection), then times, per setting and length: the whole op (``moba_attn_triton``, gating
included), the gate alone and the attention alone (given the selection), and both dense
baselines with ``enable_gqa`` (no K/V repetition). Settings (the issue's):
  paper   : batch 1, 8 heads, D=128, block 4096, topk 12
  flashmoba: batch 2, 16 heads, D=128, block 128, topk 8
  gqa     : batch 1, 32 q / 8 kv heads, D=128, block 512, topk 3
Random q/k/v (random routing). Useful FLOPs count selected keys only (4*D per row, head, key).
T >= 256K: one warm-up and 3 CUDA-event timings; shorter: ``triton.testing.do_bench`` median.

    PYTHONPATH=src python benchmarks/gpu_forward.py --out bench_out [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from moba_attn import bench
from moba_attn.ops import triton_attention as ta
from moba_attn.ops import triton_gate as tg
from moba_attn.ops.gate import BlockLayout, dense_causal_keys, n_attended_keys

K = 1024
SETTINGS = {
    "paper": {"batch": 1, "hq": 8, "hkv": 8, "d": 128, "block": 4096, "topk": 12,
                  "lengths": [32 * K, 128 * K, 512 * K, 1024 * K]},
    "flashmoba": {"batch": 2, "hq": 16, "hkv": 16, "d": 128, "block": 128, "topk": 8,
                      "lengths": [8 * K, 128 * K, 512 * K]},
    "gqa": {"batch": 1, "hq": 32, "hkv": 8, "d": 128, "block": 512, "topk": 3, "lengths": [8 * K, 32 * K, 128 * K]},
    # the "1M tokens x 32 heads fits" check: MoBA only (dense would take minutes)
    "paper32h": {"batch": 1, "hq": 32, "hkv": 32, "d": 128, "block": 4096, "topk": 12,
                 "lengths": [1024 * K], "dense": False},
}
# Priority order (the issue's targets first), so a time budget cuts the least important runs.
JOBS = [("paper", 1024 * K), ("flashmoba", 512 * K), ("paper", 128 * K), ("flashmoba", 128 * K),
        ("gqa", 128 * K), ("paper", 32 * K), ("flashmoba", 8 * K), ("gqa", 8 * K), ("gqa", 32 * K),
        ("paper", 512 * K)]
QUICK = [("paper", 128 * K), ("flashmoba", 128 * K), ("gqa", 32 * K)]


def machine() -> str:
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}, "
            f"triton {triton.__version__}, python {platform.python_version()}")


CUDA = torch.device("cuda")


def time_ms(fn, long: bool) -> float:
    """``moba_attn.bench.time_ms`` on the GPU: do_bench median, or (``long``) one warm-up and
    the median of 3 CUDA-event timings."""
    return bench.time_ms(fn, CUDA, 3, long)


def peak_gb(fn) -> float:
    """Rise of the allocator's peak over what was allocated before the call (the inputs), GB."""
    return bench.peak_mib(fn, CUDA) * 2**20 / 1e9


def rows_reference(q, k, v, layout, sel, scale, rows):
    """fp64 output of ``rows`` attending their own block (causal) and selected blocks."""
    hq, hkv = q.shape[1], k.shape[1]
    bsz = layout.block_size
    hk = (torch.arange(hq, device=q.device) // (hq // hkv))[None, :, None]
    j = torch.arange(bsz, device=q.device)
    outs = []
    for r in rows.split(4):
        n = r.numel()
        blocks = torch.cat([layout.row_own[r][:, None, None].expand(n, hq, 1), sel[r].long()], 2)
        b = blocks.clamp(min=0)
        valid = (blocks >= 0)[..., None] & (j < layout.blk_len[b][..., None])
        valid[:, :, 0] &= j[None, None, :] <= (layout.row_pos[r] % bsz)[:, None, None]
        tok = (layout.blk_start[b][..., None] + j).clamp(max=k.shape[0] - 1).reshape(n, hq, -1)
        kk, vv = k[tok, hk].double(), v[tok, hk].double()
        s = torch.einsum("nhd,nhkd->nhk", q[r].double(), kk) * scale
        p = torch.softmax(s.masked_fill(~valid.reshape(n, hq, -1), float("-inf")), -1)
        outs.append(torch.einsum("nhk,nhkd->nhd", p, vv))
    return torch.cat(outs)


def make_inputs(cfg, t):
    """Random bf16 ``(cu, q, k, v, scale)`` of a setting at length ``t`` (``batch`` sequences)."""
    total = cfg["batch"] * t
    cu = torch.arange(0, total + 1, t, device="cuda", dtype=torch.int32)
    q = torch.randn(total, cfg["hq"], cfg["d"], device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, cfg["hkv"], cfg["d"], device="cuda", dtype=torch.bfloat16)
    v = torch.randn(total, cfg["hkv"], cfg["d"], device="cuda", dtype=torch.bfloat16)
    return cu, q, k, v, cfg["d"] ** -0.5


def run_setting(name, cfg, lengths, dense_max, log):
    return [run_one(name, cfg, t, dense_max, log) for t in lengths]


def run_one(name, cfg, t, dense_max, log):
    """One (setting, T): correctness check, then timings; returns the record."""
    b, hq, hkv, d, bsz, topk = (cfg[x] for x in ("batch", "hq", "hkv", "d", "block", "topk"))
    total = b * t
    cu, q, k, v, scale = make_inputs(cfg, t)
    long = t >= 256 * K
    rec = {"setting": name, "T": t, "batch": b, "hq": hq, "hkv": hkv, "d": d, "block": bsz, "topk": topk}
    dense = t <= topk * bsz

    # correctness first (kernels, not the dense dispatch): sampled rows vs fp64
    layout = BlockLayout.build(cu, cu, bsz)
    with torch.no_grad():
        out, lse, sel = ta.moba_forward_triton(q, k, v, layout, topk, scale)
    rows = torch.cat([torch.arange(8), torch.randint(0, total, (24,)),
                      torch.arange(total - 8, total)]).cuda()
    ref = rows_reference(q, k, v, layout, sel, scale, rows)
    rel = ((out[rows].double() - ref).norm() / ref.norm()).item()
    rec["check_rel_err"] = rel
    rec["check_ok"] = bool(rel < 2e-2 and not out.isnan().any())
    del out, lse
    if not rec["check_ok"]:
        log(f"[{name} T={t}] CORRECTNESS FAILED rel={rel:.3e}; skipping timings")
        return rec

    def moba():
        with torch.no_grad():
            return ta.moba_attn_triton(q, k, v, cu, cu, t, t, block_size=bsz, topk=topk,
                                       softmax_scale=scale)

    def gate():
        return tg.gate_triton(q, k, layout, topk)

    def attn():
        return ta._moba_forward(q, k, v, layout, sel, topk, scale)

    rec["moba_ms"] = time_ms(moba, long)
    rec["path"] = ta.LAST_PATH
    rec["gate_ms"] = time_ms(gate, long) if not dense else 0.0
    rec["attn_ms"] = time_ms(attn, long)
    rec["moba_peak_gb"] = peak_gb(moba)
    useful = n_attended_keys(cu.cpu(), cu.cpu(), bsz, topk) * hq * 4 * d
    rec["moba_tflops"] = useful / rec["moba_ms"] / 1e9
    rec["dense_dispatch"] = dense
    sel = None  # free the selection before the dense baselines

    q4 = q.view(b, t, hq, d).transpose(1, 2)
    k4 = k.view(b, t, hkv, d).transpose(1, 2)
    v4 = v.view(b, t, hkv, d).transpose(1, 2)
    dflops = dense_causal_keys(cu.cpu(), cu.cpu()) * hq * 4 * d
    for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                           ("flash", SDPBackend.FLASH_ATTENTION)):
        if t > dense_max or not cfg.get("dense", True):
            continue

        def sdpa(backend=backend):
            with sdpa_kernel(backend), torch.no_grad():
                return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale,
                                                      enable_gqa=hq != hkv)
        try:
            rec[f"{label}_ms"] = time_ms(sdpa, long)
            if label == "cudnn":
                rec[f"{label}_peak_gb"] = peak_gb(sdpa)
            rec[f"{label}_tflops"] = dflops / rec[f"{label}_ms"] / 1e9
            rec[f"speedup_vs_{label}"] = rec[f"{label}_ms"] / rec["moba_ms"]
        except RuntimeError as err:  # a backend refusing the shape
            rec[f"{label}_error"] = str(err).splitlines()[0][:200]
    if dense:  # the floor of the dense dispatch: the bare cuDNN call with its LSE
        try:
            rec["cudnn_lse_ms"] = time_ms(lambda: ta._dense_cudnn(q, k, v, b, scale), long)
        except RuntimeError as err:
            rec["cudnn_lse_error"] = str(err).splitlines()[0][:200]
    rec["gate_share"] = rec["gate_ms"] / rec["moba_ms"]
    log(json.dumps(rec))
    return rec


def gate_sweep(log, t=512 * K, batch=2, h=16, d=128, bsz=128, topk=8):
    """Gate time per tile shape ``(BM, BN, warps)`` on FlashMoBA's 512K setting."""
    total = batch * t
    cu = torch.arange(0, total + 1, t, device="cuda", dtype=torch.int32)
    q = torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16)
    layout = BlockLayout.build(cu, cu, bsz)
    cent = tg.block_centroids_triton(k, layout)
    log(f"gate sweep T={t} batch={batch} H={h} B={bsz} k={topk}: "
        f"centroids {time_ms(lambda: tg.block_centroids_triton(k, layout), True):.2f} ms")
    base = None
    for tile in [None, (64, 64, 4), (64, 64, 8), (128, 32, 8), (128, 64, 8), (32, 32, 4)]:
        tg.GATE_TILE = tile
        try:
            sel = tg.select_blocks_triton(q, cent, layout, topk)
            sel = torch.sort(sel, -1).values
            same = True if base is None else bool(torch.equal(sel, base))
            base = sel if base is None else base
            ms = time_ms(lambda: tg.select_blocks_triton(q, cent, layout, topk), True)
            log(f"  gate tile {tile or 'default'}: {ms:.2f} ms, same selection: {same}")
        except Exception as err:  # noqa: BLE001  a shape the compiler refuses (resources)
            log(f"  gate tile {tile}: failed {str(err).splitlines()[0][:150]}")
        finally:
            tg.GATE_TILE = None


@contextlib.contextmanager
def patched(module, values: dict):
    """Set module attributes for the duration of a ``with`` block, then put the old back."""
    saved = {attr: getattr(module, attr) for attr in values}
    for attr, value in values.items():
        setattr(module, attr, value)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(module, attr, value)


def eighth_of_output(q) -> int:
    """Partial budget (bf16 elements) of an eighth of the output's bytes, no floor."""
    return min(q.numel() * q.element_size() // 8, ta.PART_MAX_BYTES) // 2


PARTIALS = {"SCHEDULE": "partials"}  # partials merged per pass, not in place
MASKED = {"SCHEDULE": "masked"}  # query tiles over their causal keys, masked per row
PER_PASS = {**PARTIALS, "SHARED_SORT": False}  # partials, each pass sorts its own
MB = 1 << 20
SWEEP_VARIANTS = [  # (label, overrides of triton_attention's module settings; a callable
    # value is called with q)
    ("default", {}),
    ("masked", MASKED),
    ("masked 128x128 w8", {**MASKED, "MASKED_CONFIG": (128, 128, 8, 3)}),
    ("masked 64x64 w4", {**MASKED, "MASKED_CONFIG": (64, 64, 4, 3)}),
    ("masked 128x64 w8", {**MASKED, "MASKED_CONFIG": (128, 64, 8, 3)}),
    ("masked 128x128 w8 s4", {**MASKED, "MASKED_CONFIG": (128, 128, 8, 4)}),
    ("masked 128x128 w4", {**MASKED, "MASKED_CONFIG": (128, 128, 4, 3)}),
    ("in place", {"SCHEDULE": "in-place"}),
    ("default, mul-add softmax", {"FWD_FMA": False}),
    ("partials, 256 MB floor", PARTIALS),
    ("partials, 256 MB floor, sort per pass", PER_PASS),
    ("partials, 64 MB floor", {**PARTIALS, "PART_MIN_BYTES": 64 * MB}),
    ("partials, 64 MB floor, sort per pass", {**PER_PASS, "PART_MIN_BYTES": 64 * MB}),
    ("partials, 32 MB floor", {**PARTIALS, "PART_MIN_BYTES": 32 * MB}),
    ("partials, 16 MB floor", {**PARTIALS, "PART_MIN_BYTES": 16 * MB}),
    ("partials, 16 MB floor, sort per pass", {**PER_PASS, "PART_MIN_BYTES": 16 * MB}),
    ("partials, 1/4 output, no floor", {**PARTIALS, "PART_MIN_BYTES": 0}),
    ("partials, 1/8 output, no floor", {**PARTIALS, "PART_CHUNK_ELEMS": eighth_of_output}),
    ("sel 128x64 w8, diag 128x64 w8", {"FWD_CONFIG": (128, 64, 8, 128, 64, 8, 3)}),
    ("sel 64x64 w4, diag 128x64 w8", {"FWD_CONFIG": (64, 64, 4, 128, 64, 8, 3)}),
    ("sel 128x64 w8, diag 64x64 w4", {"FWD_CONFIG": (128, 64, 8, 64, 64, 4, 3)}),
    # wider key tiles and taller entry tiles for large blocks (the 1M stretch target)
    ("sel 128x128 w8 s2, diag 128x64 w8", {"FWD_CONFIG": (128, 128, 8, 128, 64, 8, 2)}),
    ("sel 128x128 w8 s3, diag 128x64 w8", {"FWD_CONFIG": (128, 128, 8, 128, 64, 8, 3)}),
    ("sel 64x128 w4, diag 128x64 w8", {"FWD_CONFIG": (64, 128, 4, 128, 64, 8, 3)}),
    ("sel 256x64 w8 s2, diag 128x64 w8", {"FWD_CONFIG": (256, 64, 8, 128, 64, 8, 2)}),
]


def fwd_sweep(log, jobs, pick=".*"):
    """Forward variants (schedule, pass budget, tile shapes): attention ms given the
    selection, whole-op ms, peak GB, max |difference| from fp32 partials merged in fp32
    (``ref``, the most exact the kernels compute); then the kernel time breakdown of the
    default at the first job. ``pick``: a regular expression that the labels of the variants
    to run match from their start."""
    variants = [v for v in SWEEP_VARIANTS if re.match(pick, v[0])]
    out = []
    for job in jobs:
        name, t = job[0], job[1]
        cfg = {**SETTINGS[name], **({"block": job[2]} if len(job) > 2 else {})}
        bsz, topk = cfg["block"], cfg["topk"]
        cu, q, k, v, scale = make_inputs(cfg, t)
        layout = BlockLayout.build(cu, cu, bsz)
        sel = tg.gate_triton(q, k, layout, topk)
        with patched(ta, {"PART_DTYPE": torch.float32, **PARTIALS}):  # one fp32 merge
            ref = ta._moba_forward(q, k, v, layout, sel, topk, scale)[0].float()
        for label, overrides in variants:
            values = {a: val(q) if callable(val) else val for a, val in overrides.items()}
            try:
                with patched(ta, values):
                    o = ta._moba_forward(q, k, v, layout, sel, topk, scale)[0]
                    diff = (o.float() - ref).abs().max().item()
                    del o
                    attn = time_ms(lambda: ta._moba_forward(q, k, v, layout, sel, topk, scale),
                                   False)

                    def whole():
                        with torch.no_grad():
                            return ta.moba_attn_triton(q, k, v, cu, cu, t, t, block_size=bsz,
                                                       topk=topk, softmax_scale=scale)
                    ms = time_ms(whole, False)
                    rec = {"setting": name, "T": t, "block": bsz, "variant": label,
                           "schedule": ta.LAST_SCHEDULE, "attn_ms": attn,
                           "moba_ms": ms, "peak_gb": peak_gb(whole), "max_diff": diff}
            except Exception as err:  # noqa: BLE001  a tile shape the compiler refuses
                rec = {"setting": name, "T": t, "block": bsz, "variant": label,
                       "error": str(err).splitlines()[0][:150]}
            log("sweep " + json.dumps(rec))
            out.append(rec)
        if job == jobs[0]:
            out.append({"setting": name, "T": t, "breakdown": kernel_breakdown(
                lambda: ta.moba_attn_triton(q, k, v, cu, cu, t, t, block_size=bsz, topk=topk,
                                            softmax_scale=scale), log)})
        q = k = v = sel = ref = None  # free before the next setting
        torch.cuda.empty_cache()
    return out


def kernel_breakdown(fn, log, iters=20):
    """CUDA time per kernel name (ms per call) over ``iters`` calls, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 1e3 / iters) for e in prof.key_averages()),
                  key=lambda x: -x[1])
    total = sum(ms for _, ms in rows)
    log(f"kernel breakdown: {total:.3f} ms of GPU time per call")
    for key, ms in rows[:10]:
        log(f"  {ms:8.3f} ms  {100 * ms / total:5.1f}%  {key[:90]}")
    return [{"kernel": key, "ms": ms} for key, ms in rows]


def table(rows) -> str:
    head = (f"{'setting':9} {'T':>6} {'moba':>9} {'gate':>7} {'attn':>8} {'cudnn':>9} "
            f"{'flash':>9} {'x cuDNN':>7} {'x FA':>6} {'TF/s':>6} {'peakGB':>6} {'cuDNNGB':>7}")
    lines = [head]
    for r in rows:
        f = lambda k, fmt, r=r: (format(r[k], fmt) if k in r else "-")
        lines.append(
            f"{r['setting']:9} {r['T'] // K:>5}K {f('moba_ms', '9.2f')} {f('gate_ms', '7.2f')} "
            f"{f('attn_ms', '8.2f')} {f('cudnn_ms', '9.2f')} {f('flash_ms', '9.2f')} "
            f"{f('speedup_vs_cudnn', '7.2f')} {f('speedup_vs_flash', '6.2f')} "
            f"{f('moba_tflops', '6.0f')} {f('moba_peak_gb', '6.1f')} {f('cudnn_peak_gb', '7.1f')}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--settings", default="paper,flashmoba,gqa,paper32h")
    ap.add_argument("--quick", action="store_true", help="one length per setting")
    ap.add_argument("--dense-max", type=int, default=1024 * K, help="longest T timed densely")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new lengths after")
    ap.add_argument("--jobs", default="", help="e.g. paper:32768,gqa:8192 (default: all)")
    ap.add_argument("--gate-sweep", action="store_true",
                    help="time gate tile shapes at flashmoba 512K (checks equal selections)")
    ap.add_argument("--fwd-sweep", action="store_true",
                    help="forward variants (partial dtype, pass budget, tiles) + kernel breakdown")
    ap.add_argument("--sweep-variants", default=".*",
                    help="regular expression: the --fwd-sweep variants whose labels it matches "
                         "from their start, e.g. '(default|sel)'")
    ap.add_argument("--sweep-jobs", default="flashmoba:8192,gqa:8192,gqa:32768,paper:131072,flashmoba:131072",
                    help="settings of --fwd-sweep, e.g. paper:1048576 or flashmoba:8192:b256 "
                         "(another block size)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    logf = open(os.path.join(args.out, "gpu_forward.log"), "a")  # noqa: SIM115  closed at exit

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"machine: {machine()}; gate precision {tg.get_gate_precision()}")
    results = []
    wanted = args.settings.split(",")
    if args.gate_sweep:
        gate_sweep(log)
    if args.fwd_sweep:
        sweep_jobs = [(j.split(":")[0], int(j.split(":")[1]), *[int(b[1:]) for b in j.split(":")[2:]])
                      for j in args.sweep_jobs.split(",")]
        sweep = fwd_sweep(log, tuple(sweep_jobs), args.sweep_variants)
        with open(os.path.join(args.out, "gpu_forward_sweep.json"), "w") as fh:
            json.dump({"machine": machine(), "sweep": sweep}, fh, indent=1)
    jobs = QUICK if args.quick else JOBS
    if args.jobs:
        jobs = [(j.split(":")[0], int(j.split(":")[1])) for j in args.jobs.split(",")]
    for name, t in jobs:
        if name not in wanted:
            continue
        if time.time() - t0 > args.budget_s:
            log(f"[{name} T={t}] skipped: time budget spent")
            continue
        results += run_setting(name, SETTINGS[name], [t], args.dense_max, log)
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "gpu_forward.json"), "w") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=1)
    results.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), r["T"]))
    keys = sorted({k for r in results for k in r})
    with open(os.path.join(args.out, "gpu_forward.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(results)
    log(f"total {time.time() - t0:.0f} s; ms; x = dense ms / moba ms (same run)")
    log(table(results))
    logf.close()
    return results


if __name__ == "__main__":
    main()
