"""Context-parallel MoBA over several GPUs: "allgather" vs "selective" vs dense context
parallelism (all-gather K/V + SDPA per chunk) vs the single-GPU op.

For every (tokens, heads): a correctness check first (both modes against the single-device
op on a short sequence, on rank 0), then timings of forward and forward+backward (median of
``--iters`` runs; each run is the slowest rank's wall time between barriers). Scaling
efficiency is ``t(1 GPU) / (world * t(world))``. Bytes are what each rank received in the
forward (the backward sends the same K/V-sized gradients back). Dense CP above
``--dense-max-tokens`` is extrapolated quadratically from the longest measured length and
marked ``est``. Results: a table on stdout, JSON under ``$OUT`` (or ``--out``).

    torchrun --standalone --nproc-per-node 4 benchmarks/cp_bench.py \\
        --tokens 1M 2M 4M --heads 8 32 --out "$OUT"
    python benchmarks/cp_bench.py --dry-run          # 2 CPU processes, gloo, tiny shapes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moba_attn import moba_attn_varlen_func
from moba_attn.distributed import comm_bytes, cp_layout, moba_attn_cp, shard, unshard

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_tokens(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KM" else s) * mult)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = f"{dist.get_world_size()} x {p.name} ({p.multi_processor_count} SMs)"
    else:
        gpu = f"{dist.get_world_size()} CPU processes ({dist.get_backend()})"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"{gpu}, torch {torch.__version__}, triton {tv}, python {platform.python_version()}"


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int) -> float:
    """Median over runs of the slowest rank's milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.append(dt.item() * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- dense CP
def _sdpa_chunk(q, k, v, scale):
    """Causal (bottom-right) dense attention of queries ``[n, Hq, D]`` over keys ``[e, Hkv, D]``."""
    from torch.nn.attention.bias import causal_lower_right

    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
    mask = causal_lower_right(q.shape[0], k.shape[0])
    if qh.shape[1] != kh.shape[1]:
        try:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
            return o[0].transpose(0, 1)
        except (RuntimeError, TypeError):
            g = qh.shape[1] // kh.shape[1]
            kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)[0].transpose(0, 1)


def dense_cp(q, k, v, layout, rank):
    """All-gather K/V (differentiable) and run SDPA on every local chunk."""
    hkv = k.shape[1]
    kv = unshard(torch.cat([k, v], dim=1), layout)
    off = layout.seq_offsets()
    outs, r0 = [], 0
    for i, s, e in layout.pieces(rank):
        n = e - s
        o0 = int(off[i])
        outs.append(_sdpa_chunk(q[r0 : r0 + n], kv[o0 : o0 + e, :hkv], kv[o0 : o0 + e, hkv:],
                                q.shape[-1] ** -0.5))
        r0 += n
    return torch.cat(outs)


# ----------------------------------------------------------------------------- checks
def check(args, device, dtype, heads, hkv):
    """Both modes and dense CP against the single-device op on a short sequence."""
    rank, world = dist.get_rank(), dist.get_world_size()
    t = args.check_tokens or max(16, 4 * world) * args.block_size
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(t, h, args.head_dim, generator=g).to(device, dtype)
               for h in (heads, hkv, hkv))
    lay = cp_layout([t], world, args.block_size, args.layout)
    ql, kl, vl = (shard(x, lay, rank) for x in (q, k, v))
    cu = torch.tensor([0, t], dtype=torch.int32, device=device)
    ref = moba_attn_varlen_func(q, k, v, cu, cu, t, t, block_size=args.block_size, topk=args.topk,
                                backend=args.backend).float()
    dense_topk = (t + args.block_size - 1) // args.block_size
    ref_dense = moba_attn_varlen_func(q, k, v, cu, cu, t, t, block_size=args.block_size,
                                      topk=dense_topk, backend=args.backend).float()
    errs = {}
    for mode in ("allgather", "selective"):
        o = moba_attn_cp(ql, kl, vl, block_size=args.block_size, topk=args.topk, layout=lay,
                         mode=mode, backend=args.backend)
        errs[mode] = (unshard(o, lay).float() - ref).abs().max().item()
    errs["dense"] = (unshard(dense_cp(ql, kl, vl, lay, rank), lay).float() - ref_dense) \
        .abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    bad = {m: e for m, e in errs.items() if not e <= tol}
    if bad:
        raise AssertionError(f"correctness check failed (max abs error > {tol}): {bad}")
    return t, errs


# ----------------------------------------------------------------------------- runs
def run_config(args, device, dtype, t, heads, hkv, dense_ref):
    rank, world = dist.get_rank(), dist.get_world_size()
    lay = cp_layout([t], world, args.block_size, args.layout)
    n = lay.num_local(rank)
    g = torch.Generator(device="cpu").manual_seed(1000 + rank)

    def rnd(h):
        return torch.randn(n, h, args.head_dim, generator=g).to(device, dtype)

    q, k, v, do = rnd(heads), rnd(hkv), rnd(hkv), rnd(heads)
    rows = []
    item = torch.tensor([], dtype=dtype).element_size()

    def record(mode, fwd_ms, fb_ms, bytes_recv, fetched=None, note=""):
        rows.append({"tokens": t, "heads": heads, "kv_heads": hkv, "mode": mode,
                     "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "bytes_recv_fwd_max": bytes_recv,
                     "fetched_blocks_max": fetched, "note": note})

    for mode in args.modes:
        if mode == "dense":
            if t > args.dense_max_tokens:
                key = max((tt for (tt, hh) in dense_ref if hh == heads), default=None)
                if key is None:
                    record("dense", None, None, None, note="skipped")
                    continue
                f = (t / key) ** 2
                fw, fb = dense_ref[(key, heads)]
                record("dense", fw * f if fw else None, fb * f if fb else None,
                       comm_bytes(lay, "allgather", n_kv_heads=hkv, head_dim=args.head_dim,
                                  itemsize=item)[0]["bytes_recv_fwd"],
                       note=f"est (T^2 from {key})")
                continue

            def fwd():
                with torch.no_grad():
                    dense_cp(q, k, v, lay, rank)
        else:
            stats = {}

            def fwd(mode=mode, stats=stats):
                with torch.no_grad():
                    moba_attn_cp(q, k, v, block_size=args.block_size, topk=args.topk, layout=lay,
                                 mode=mode, backend=args.backend, stats=stats)

        def fwd_bwd(mode=mode):
            qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
            if mode == "dense":
                out = dense_cp(qg, kg, vg, lay, rank)
            else:
                out = moba_attn_cp(qg, kg, vg, block_size=args.block_size, topk=args.topk,
                                   layout=lay, mode=mode, backend=args.backend)
            out.backward(do)

        fw = timed(fwd, device, args.iters, args.warmup)
        fb = None if args.fwd_only else timed(fwd_bwd, device, args.iters, args.warmup)
        if mode == "dense":
            dense_ref[(t, heads)] = (fw, fb)
            b = comm_bytes(lay, "allgather", n_kv_heads=hkv, head_dim=args.head_dim,
                           itemsize=item)[0]["bytes_recv_fwd"]
            record("dense", fw, fb, b)
        else:
            vals = torch.tensor([stats["bytes_recv_fwd"], stats.get("fetched_blocks", 0)],
                                dtype=torch.float64, device=device)
            dist.all_reduce(vals, op=dist.ReduceOp.MAX)
            record(mode, fw, fb, int(vals[0]), int(vals[1]) if mode == "selective" else None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_single(args, device, dtype, t, heads, hkv):
    """The 1-GPU baseline row (rank 0 runs it; the others wait)."""
    rank = dist.get_rank()
    res = torch.tensor([float("nan"), float("nan")], dtype=torch.float64, device=device)
    if rank == 0:
        res[:] = torch.tensor(single_gpu(args, device, dtype, t, heads, hkv))
    dist.barrier()
    dist.broadcast(res, 0)
    fw, fb = (None if math.isnan(x) else x for x in res.tolist())
    return {"tokens": t, "heads": heads, "kv_heads": hkv, "mode": "1-device", "fwd_ms": fw,
            "fwd_bwd_ms": fb, "bytes_recv_fwd_max": 0, "fetched_blocks_max": None,
            "note": "" if fw is not None else "OOM/failed"}


def single_gpu(args, device, dtype, t, heads, hkv):
    """The single-device op on the whole sequence (rank 0 only); nan when it does not fit."""
    try:
        g = torch.Generator(device="cpu").manual_seed(7)
        q, k, v, do = (torch.randn(t, h, args.head_dim, generator=g).to(device, dtype)
                       for h in (heads, hkv, hkv, heads))
        cu = torch.tensor([0, t], dtype=torch.int32, device=device)

        def fwd():
            with torch.no_grad():
                moba_attn_varlen_func(q, k, v, cu, cu, t, t, block_size=args.block_size,
                                      topk=args.topk, backend=args.backend)

        def fwd_bwd():
            qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
            moba_attn_varlen_func(qg, kg, vg, cu, cu, t, t, block_size=args.block_size,
                                  topk=args.topk, backend=args.backend).backward(do)

        def med(fn):
            for _ in range(args.warmup):
                fn()
            ts = []
            for _ in range(args.iters):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)

        fw = med(fwd)
        fb = float("nan") if args.fwd_only else med(fwd_bwd)
        return fw, fb
    except torch.OutOfMemoryError:
        return float("nan"), float("nan")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def fmt(x, unit=""):
    if x is None:
        return "-"
    if unit == "B":
        return f"{x / 2**20:.1f}MiB" if x < 2**30 else f"{x / 2**30:.2f}GiB"
    return f"{x:.1f}"


def report(rows, world, args, machine_line, checks):
    by = {}
    for r in rows:
        by.setdefault((r["tokens"], r["heads"]), {})[r["mode"]] = r
    for d in by.values():
        single, dense = d.get("1-device"), d.get("dense")
        for r in d.values():
            for key in ("fwd_ms", "fwd_bwd_ms"):
                tag = key.replace("_ms", "")
                s = single.get(key) if single else None
                r[f"scaling_eff_{tag}"] = s / (world * r[key]) if (s and r[key] and
                                                                  r["mode"] != "1-device") else None
                dn = dense.get(key) if dense else None
                r[f"vs_dense_{tag}"] = dn / r[key] if (dn and r[key]) else None
    hdr = (f"{'tokens':>9} {'H/Hkv':>6} {'mode':>10} {'fwd ms':>10} {'fwd+bwd ms':>11} "
           f"{'eff fwd':>8} {'eff f+b':>8} {'x dense f':>9} {'x dense fb':>10} "
           f"{'recv/rank':>10} {'blocks':>6} note")
    log(f"\nmachine: {machine_line}\nworld {world}, block {args.block_size}, topk {args.topk}, "
        f"D {args.head_dim}, {args.dtype}, layout {args.layout}, backend {args.backend}")
    log(f"checks (max abs err vs single device): {checks}")
    log(hdr)
    for r in rows:
        def pct(x):
            return f"{100 * x:.0f}%" if x is not None else "-"

        def xx(x):
            return f"{x:.1f}x" if x is not None else "-"

        log(f"{r['tokens']:>9} {r['heads']:>3}/{r['kv_heads']:<2} {r['mode']:>10} "
            f"{fmt(r['fwd_ms']):>10} {fmt(r['fwd_bwd_ms']):>11} "
            f"{pct(r.get('scaling_eff_fwd')):>8} {pct(r.get('scaling_eff_fwd_bwd')):>8} "
            f"{xx(r.get('vs_dense_fwd')):>9} {xx(r.get('vs_dense_fwd_bwd')):>10} "
            f"{fmt(r['bytes_recv_fwd_max'], 'B'):>10} {r['fetched_blocks_max'] or '-'!s:>6} "
            f"{r['note']}")


def main_worker(args, device):
    world = dist.get_world_size()
    dtype = DTYPES[args.dtype]
    machine_line = machine(device)
    checks, rows, dense_ref = {}, [], {}
    for heads in args.heads:
        hkv = min(args.kv_heads, heads) if args.kv_heads else heads
        t_chk, errs = check(args, device, dtype, heads, hkv)
        checks[f"H{heads}-T{t_chk}"] = {m: float(f"{e:.3g}") for m, e in errs.items()}
        log(f"check H{heads}/{hkv} T={t_chk}: {errs}")
        for t in args.tokens:
            log(f"running T={t} H={heads}/{hkv} ...")
            rows += run_config(args, device, dtype, t, heads, hkv, dense_ref)
            if args.single and t <= args.single_max_tokens:
                rows.append(run_single(args, device, dtype, t, heads, hkv))
    report(rows, world, args, machine_line, checks)
    if dist.get_rank() == 0:
        out_dir = args.out or os.environ.get("OUT") or "cp_bench_out"
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"cp_bench_world{world}.json")
        with open(path, "w") as fh:
            json.dump({"machine": machine_line, "argv": sys.argv, "world": world,
                       "settings": {k: v for k, v in vars(args).items() if k != "out"},
                       "checks": checks, "results": rows}, fh, indent=1)
        log(f"wrote {path}")


def _spawned(rank, world, init, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        main_worker(args, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", nargs="+", type=parse_tokens, default=[2**20, 2**21, 2**22],
                   help="sequence lengths, e.g. 1M 2M 4M")
    p.add_argument("--heads", nargs="+", type=int, default=[8, 32])
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (capped at heads; 0 = MHA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--topk", type=int, default=12)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--backend", default="auto")
    p.add_argument("--modes", nargs="+", default=["allgather", "selective", "dense"],
                   choices=["allgather", "selective", "dense"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--no-single", dest="single", action="store_false",
                   help="skip the 1-GPU baseline (rank 0 runs the whole sequence)")
    p.add_argument("--single-max-tokens", type=parse_tokens, default=2**22)
    p.add_argument("--dense-max-tokens", type=parse_tokens, default=2**20,
                   help="longer dense CP runs are extrapolated (T^2) from the longest measured")
    p.add_argument("--check-tokens", type=parse_tokens, default=0)
    p.add_argument("--out", default=None, help="JSON folder (default: $OUT, else ./cp_bench_out)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on 2 CPU processes with gloo (a smoke test)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.tokens, args.heads, args.kv_heads, args.head_dim = [1024, 1500], [2], 1, 16
        args.block_size, args.topk, args.dtype, args.backend = 64, 3, "fp32", "torch"
        args.iters, args.warmup, args.dense_max_tokens = 1, 0, 1024
        args.check_tokens = 0
    return args


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        cuda = torch.cuda.is_available() and not args.dry_run
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo")
        try:
            main_worker(args, device)
        finally:
            dist.destroy_process_group()
        return
    if not args.dry_run:
        raise SystemExit("launch with torchrun (see the module docstring), or pass --dry-run")
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawned, args=(2, f"file://{tmp}/rendezvous", args), nprocs=2)


if __name__ == "__main__":
    main()
