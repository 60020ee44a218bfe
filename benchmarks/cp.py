"""Context-parallel MoBA (``moba_attn.distributed.moba_attn_cp``) on several GPUs of one host:
modes "allgather" and "selective" against dense context parallelism (all-gather K/V, then
SDPA FLASH on each local chunk) on the same GPUs, and the strong-scaling efficiency against
one-GPU references.

Setting (the paper's): block 4096 / top-12, D=128, bf16, one sequence of 1M-4M tokens,
zigzag layout, random q/k/v (random routing), 8/8 and 32/8 query/KV heads, forward and
forward+backward. The script spawns its own processes (NCCL, ``NCCL_NVLS_ENABLE=0``):

1. one-GPU references, one process per head count, side by side on GPUs 0, 1, ...:
   "single" (``moba_attn_func`` on the whole sequence), "dense" (SDPA FLASH, dense CP in a
   world of one) and "dense-cudnn" (SDPA cuDNN);
2. every world size of ``--worlds`` above 1 on GPUs 0..w-1: "allgather", "selective", "dense".

Each configuration first checks every mode's output and gradients against the single-device
op on a short sequence. A call is the slowest rank's wall time between barriers: one
warm-up, then the median of ``--iters`` calls, or of one call when the warm-up took more than
``--long-s`` seconds. Dense modes run at ``--dense-tokens`` and are extrapolated (T^2,
marked ``est``) to the other lengths. ``eff`` = t(1 GPU) / (GPUs x t(GPUs)); ``x dense`` =
dense CP time / MoBA time on the same GPUs; ``x cuDNN/n`` = (1-GPU cuDNN time / GPUs) /
MoBA time. Bytes: what a rank receives in the forward (largest rank).

    python benchmarks/cp.py --out bench_out                      # all visible GPUs: 4 -> ~5 min
    python benchmarks/cp.py --worlds 1 2 4 --tokens 1M 2M 4M --fwd-only-at 2M:32 4M:32 --out bench_out
    python benchmarks/cp.py --dry-run --out /tmp/cp              # CPU, gloo, 1 and 2 processes
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off (before any communicator)

import argparse
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import common
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moba_attn import moba_attn_func
from moba_attn.distributed import comm_bytes, cp_layout, moba_attn_cp, shard, unshard

NAME = "cp"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CP_MODES = ("allgather", "selective")
ONE_DEVICE_MODES = ("single", "dense-cudnn")
DENSE_MODES = ("dense", "dense-cudnn")
REFERENCE_MODES = ("single", "dense", "dense-cudnn")
KINDS = ("fwd", "fwd_bwd")
COLUMNS = [("tokens", "tokens", "tokens"), ("H/Hkv", "heads_label", "s"), ("GPUs", "world", "d"),
           ("mode", "mode", "s"), ("fwd ms", "fwd_ms", ".0f"), ("fwd+bwd ms", "fwd_bwd_ms", ".0f"),
           ("eff fwd", "eff_fwd", ".0%"), ("eff fwd+bwd", "eff_fwd_bwd", ".0%"),
           ("x dense fwd", "x_dense_fwd", "x"), ("x dense fwd+bwd", "x_dense_fwd_bwd", "x"),
           ("x cuDNN/n fwd", "x_cudnn_fwd", "x"), ("x cuDNN/n fwd+bwd", "x_cudnn_fwd_bwd", "x"),
           ("recv fwd GiB/GPU", "recv_fwd_gib", ".2f"), ("peak GiB", "peak_gib", ".1f"),
           ("note", "note", "s")]
PLOT = {"x": "tokens", "xlabel": "tokens (one sequence)", "by": "heads_label", "panels": [
    {"title": "forward ms", "y": "fwd_ms", "series": "series", "logy": True, "ylabel": "ms"},
    {"title": "forward+backward ms", "y": "fwd_bwd_ms", "series": "series", "logy": True,
     "ylabel": "ms"},
]}


def parse_at(s: str) -> tuple[int, int]:
    """``"2M:32"`` -> (tokens, heads)."""
    t, _, h = s.partition(":")
    if not h:
        raise argparse.ArgumentTypeError(f"expected TOKENS:HEADS such as 2M:32, got {s!r}")
    return common.parse_tokens(t), int(h)


def log(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def kv_heads_of(args, heads: int) -> int:
    return min(args.kv_heads, heads) if args.kv_heads else heads


def kinds_at(args, t: int, heads: int) -> tuple[str, ...]:
    if args.fwd_only or (t, heads) in args.fwd_only_at:
        return ("fwd",)
    return KINDS


def schedule(args, modes):
    """``(tokens, modes)`` in run order: the dense modes at ``--dense-tokens`` first, then
    every ``--tokens`` length with the MoBA modes."""
    moba = [m for m in modes if m not in DENSE_MODES]
    dense = [m for m in modes if m in DENSE_MODES]
    return ([(t, dense) for t in args.dense_tokens] if dense else []) + \
        ([(t, moba) for t in args.tokens] if moba else [])


# ----------------------------------------------------------------------------- attention
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


def dense_one_device(q, k, v):
    """Causal SDPA on one device, ``[T, H, D]`` (cuDNN backend on CUDA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
    ctx = sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if q.is_cuda else nullcontext()
    with ctx:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                           enable_gqa=qh.shape[1] != kh.shape[1])
    return o[0].transpose(0, 1)


def single_device(q, k, v, args):
    """MoBA of the whole sequence on one device: ``moba_attn_func`` on a batch of one (the
    layout comes from the shapes: no host sync)."""
    return moba_attn_func(q[None], k[None], v[None], block_size=args.block_size,
                          topk=args.topk, backend=args.backend, validate=False)[0]


# ----------------------------------------------------------------------------- runner
class Runner:
    """Measurements of one process group; every decision is taken from all-reduced values,
    so all ranks run the same collectives."""

    def __init__(self, args, device, path: str):
        self.args, self.device, self.path = args, device, path
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.start = time.perf_counter()
        self.peaks: dict = {}  # (mode, kind, heads) -> [(tokens, peak bytes)]
        self.rows: list[dict] = []
        self.checks: dict = {}
        self.mem_cap = (args.mem_frac * torch.cuda.get_device_properties(device).total_memory
                        if device.type == "cuda" else None)

    def all_max(self, *vals) -> list[float]:
        t = torch.tensor(vals, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def all_sum(self, *vals) -> list[float]:
        t = torch.tensor(vals, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def call(self, fn) -> float:
        """Seconds of one call on the slowest rank."""
        common.sync(self.device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        common.sync(self.device)
        return self.all_max(time.perf_counter() - t0)[0]

    def skip_reason(self, mode, kind, t, heads) -> str | None:
        """A peak predicted (linearly, from a shorter length of the same mode) above
        ``--mem-frac`` of the GPU: the run would die in an out-of-memory error."""
        smaller = [(t0, p) for t0, p in self.peaks.get((mode, kind, heads), []) if t0 < t]
        if not smaller or self.mem_cap is None:
            return None
        t0, p = max(smaller)
        if p * t / t0 <= self.mem_cap:
            return None
        return (f"skipped: memory ~{p * t / t0 / 2**30:.0f} GiB predicted ({p / 2**30:.0f} GiB "
                f"at {common.fmt_tokens(t0)}), cap {self.mem_cap / 2**30:.0f} GiB")

    def measure(self, fn, mode, kind, t, heads) -> dict:
        """``{"ms", "calls", "note", "peak"}``; ``ms`` is None when skipped."""
        reason = self.skip_reason(mode, kind, t, heads)
        if reason:
            log(f"  {mode} {kind}: {reason}")
            return {"ms": None, "calls": 0, "note": reason, "peak": None}
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            warm = self.call(fn)
            n = self.args.iters if warm <= self.args.long_s else 1
            samples = [self.call(fn) for _ in range(n)]
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if self.world > 1:
                raise  # the other ranks wait in a collective: end the run
            why = "out of memory" if isinstance(e, torch.OutOfMemoryError) else \
                f"failed: {str(e).splitlines()[0][:120]}"
            log(f"  {mode} {kind}: {why}")
            return {"ms": None, "calls": 0, "note": why, "peak": None}
        sec = statistics.median(samples)
        peak = self.all_max(torch.cuda.max_memory_allocated(self.device))[0] if cuda else None
        if peak:
            self.peaks.setdefault((mode, kind, heads), []).append((t, peak))
        log(f"  {mode} {kind}: {sec * 1e3:.1f} ms ({len(samples)} timed after a warm-up"
            + (f", peak {peak / 2**30:.1f} GiB" if peak else "") + ")")
        return {"ms": sec * 1e3, "calls": len(samples), "note": "", "peak": peak}

    def save(self, complete: bool):
        if self.rank != 0:
            return
        data = {"world": self.world, "complete": complete,
                "elapsed_s": round(time.perf_counter() - self.start, 1),
                "checks": self.checks, "results": self.rows}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, self.path)


def new_row(world, t, heads, hkv, mode) -> dict:
    return {"world": world, "tokens": t, "heads": heads, "kv_heads": hkv, "mode": mode,
            "fwd_ms": None, "fwd_bwd_ms": None, "fwd_calls": 0, "fwd_bwd_calls": 0,
            "est_from": None, "bytes_recv_fwd_max": None, "bytes_sent_bwd_max": None,
            "bytes_recv_fwd_sum": None, "fetched_blocks_max": None, "peak_gib_fwd": None,
            "peak_gib_fwd_bwd": None, "note": ""}


def _put(row, kind, res):
    row[f"{kind}_ms"] = res["ms"]
    row[f"{kind}_calls"] = res["calls"]
    if res["peak"]:
        row[f"peak_gib_{kind}"] = round(res["peak"] / 2**30, 2)
    if res["note"]:
        row["note"] = "; ".join(x for x in (row["note"], f"{kind}: {res['note']}") if x)


# ----------------------------------------------------------------------------- checks
def _rel_err(got, ref) -> float:
    ref = ref.float()
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check(run: Runner, heads, hkv, modes) -> dict:
    """Every mode's output and gradients against the single-device op (dense modes: against
    MoBA with topk = all blocks, which is dense causal attention) on a short sequence. Also
    compiles the kernels before the timed calls."""
    args, dev = run.args, run.device
    dtype = DTYPES[args.dtype]
    bs = args.block_size
    t = args.check_tokens or max(16, 4 * run.world) * bs
    g = torch.Generator(device=dev).manual_seed(0)  # the same tensors on every rank
    q, k, v, do = (torch.randn(t, h, args.head_dim, generator=g, device=dev, dtype=dtype)
                   for h in (heads, hkv, hkv, heads))

    def single(topk):
        x = [y.detach().requires_grad_(True) for y in (q, k, v)]
        o = moba_attn_func(*(y[None] for y in x), block_size=bs, topk=topk,
                           backend=args.backend)[0]
        o.backward(do)
        return [o.detach()] + [y.grad for y in x]

    ref = single(args.topk)
    ref_dense = single((t + bs - 1) // bs) if set(modes) & set(DENSE_MODES) else None
    lay = cp_layout([t], run.world, bs, args.layout)
    errs = {}
    for mode in modes:
        if mode == "single":
            continue
        try:
            errs[mode] = _check_mode(run, mode, q, k, v, do, lay, ref, ref_dense)
        except RuntimeError as e:
            if run.world > 1:
                raise
            errs[mode] = {"out": math.inf, "grad": math.inf,
                          "error": str(e).splitlines()[0][:200]}
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ok = all(max(e["out"], e["grad"]) <= tol for e in errs.values())
    log(f"check H{heads}/{hkv} T={t} (max |error| / max |ref|, tol {tol}): {errs}"
        + ("" if ok else "  CHECK FAILED"))
    return {"tokens": t, "tol": tol, "ok": ok, "max_rel_err": errs}


def _check_mode(run, mode, q, k, v, do, lay, ref, ref_dense) -> dict:
    """Largest relative error of ``mode``'s output and of its gradients."""
    args, rank = run.args, run.rank
    if mode == "dense-cudnn":
        x = [y.detach().requires_grad_(True) for y in (q, k, v)]
        o = dense_one_device(*x)
        o.backward(do)
        got, want = [o.detach()] + [y.grad for y in x], ref_dense
    else:
        x = [shard(y, lay, rank).requires_grad_(True) for y in (q, k, v)]
        if mode == "dense":
            o = dense_cp(*x, lay, rank)
            want = ref_dense
        else:
            o = moba_attn_cp(*x, block_size=args.block_size, topk=args.topk, layout=lay,
                             mode=mode, backend=args.backend)
            want = ref
        o.backward(shard(do, lay, rank))
        got = [unshard(y, lay) for y in [o.detach()] + [y.grad for y in x]]
    e = [_rel_err(a, b) for a, b in zip(got, want)]
    return {"out": float(f"{e[0]:.3g}"), "grad": float(f"{max(e[1:]):.3g}")}


# ----------------------------------------------------------------------------- runs
def run_config(run: Runner, heads, hkv, t, modes):
    """Measure every mode at one length into ``run.rows`` (and the part JSON)."""
    args, dev = run.args, run.device
    rank, world = run.rank, run.world
    dtype = DTYPES[args.dtype]
    item = torch.tensor([], dtype=dtype).element_size()
    lay = cp_layout([t], world, args.block_size, args.layout)
    n = lay.num_local(rank)  # == t in a world of one (the only world of 1-device modes)
    g = torch.Generator(device=dev).manual_seed(1000 + rank + t)

    def rnd(h):
        return torch.randn(n, h, args.head_dim, generator=g, device=dev, dtype=dtype)

    q, k, v = rnd(heads), rnd(hkv), rnd(hkv)
    grad_out = []  # dO, made on first use (a skipped forward+backward never allocates it)

    def do():
        if not grad_out:
            grad_out.append(rnd(heads))
        return grad_out[0]

    def attn(mode, stats):
        def fn(q_, k_, v_):
            if mode == "single":
                return single_device(q_, k_, v_, args)
            if mode == "dense-cudnn":
                return dense_one_device(q_, k_, v_)
            if mode == "dense":
                return dense_cp(q_, k_, v_, lay, rank)
            return moba_attn_cp(q_, k_, v_, block_size=args.block_size, topk=args.topk,
                                layout=lay, mode=mode, backend=args.backend, stats=stats)
        return fn

    def fwd(fn):
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd(fn):
        x = [y.detach().requires_grad_(True) for y in (q, k, v)]
        fn(*x).backward(do())

    rows = {m: new_row(world, t, heads, hkv, m) for m in modes}
    stats = {m: {} for m in modes}
    run.rows += rows.values()  # saved after every measurement: a run that dies keeps them
    for kind in kinds_at(args, t, heads):  # every mode's forward before any backward
        for mode in modes:
            fn = attn(mode, stats[mode])
            res = run.measure(lambda fn=fn, kind=kind: (fwd if kind == "fwd" else fwd_bwd)(fn),
                              mode, kind, t, heads)
            _put(rows[mode], kind, res)
            run.save(False)
    for mode, row in rows.items():
        st = stats[mode]
        if mode in CP_MODES and st:
            mx = run.all_max(st["bytes_recv_fwd"], st["bytes_sent_bwd"],
                             st.get("fetched_blocks", 0))
            (total,) = run.all_sum(st["bytes_recv_fwd"])
            row.update(bytes_recv_fwd_max=int(mx[0]), bytes_sent_bwd_max=int(mx[1]),
                       bytes_recv_fwd_sum=int(total),
                       fetched_blocks_max=int(mx[2]) if mode == "selective" else None)
        elif mode == "dense":
            _dense_bytes(row, lay, hkv, args.head_dim, item)
        elif mode in ONE_DEVICE_MODES:
            row.update(bytes_recv_fwd_max=0, bytes_sent_bwd_max=0, bytes_recv_fwd_sum=0)
    run.save(False)


def _dense_bytes(row, lay, hkv, head_dim, item):
    per = comm_bytes(lay, "allgather", n_kv_heads=hkv, head_dim=head_dim, itemsize=item)
    row.update(bytes_recv_fwd_max=max(p["bytes_recv_fwd"] for p in per),
               bytes_sent_bwd_max=max(p["bytes_sent_bwd"] for p in per),
               bytes_recv_fwd_sum=sum(p["bytes_recv_fwd"] for p in per))


def dense_estimates(run: Runner, heads, hkv, t, modes) -> list[dict]:
    """Dense rows at length ``t`` extrapolated (T^2) from the longest measured length."""
    args = run.args
    item = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    rows = []
    for mode in (m for m in modes if m in DENSE_MODES):
        done = [r for r in run.rows if r["mode"] == mode and r["heads"] == heads
                and r["est_from"] is None and r["fwd_ms"] is not None]
        if not done or any(r["tokens"] == t for r in done):
            continue
        src = max(done, key=lambda r: r["tokens"])
        f = (t / src["tokens"]) ** 2
        row = new_row(run.world, t, heads, hkv, mode)
        row["est_from"] = src["tokens"]
        for kind in KINDS:
            if src[f"{kind}_ms"] is not None:
                row[f"{kind}_ms"] = src[f"{kind}_ms"] * f
        row["note"] = f"est: T^2 from {common.fmt_tokens(src['tokens'])}"
        if mode == "dense":
            _dense_bytes(row, cp_layout([t], run.world, args.block_size, args.layout), hkv,
                         args.head_dim, item)
        else:
            row.update(bytes_recv_fwd_max=0, bytes_sent_bwd_max=0, bytes_recv_fwd_sum=0)
        rows.append(row)
    return rows


def main_worker(args, device, heads_list, modes, path):
    run = Runner(args, device, path)
    for heads in heads_list:
        hkv = kv_heads_of(args, heads)
        run.checks[f"H{heads}"] = check(run, heads, hkv, modes)
        run.save(False)
        if not run.checks[f"H{heads}"]["ok"]:  # the same verdict on every rank
            log(f"[world {run.world}] correctness check failed: nothing timed")
            return
        for t, mset in schedule(args, modes):
            common.free_memory(device)
            log(f"[world {run.world}] T={common.fmt_tokens(t)} H={heads}/{hkv} "
                f"({time.perf_counter() - run.start:.0f} s):")
            run_config(run, heads, hkv, t, mset)
            if not set(mset) & set(DENSE_MODES):
                run.rows += dense_estimates(run, heads, hkv, t, modes)
            run.save(False)
    run.save(True)
    log(f"[world {run.world}] wrote {path} ({time.perf_counter() - run.start:.0f} s)")


def run_and_close(args, device, heads_list, modes, path):
    """``main_worker``, then the process group's teardown; after a normal end every rank
    waits at a barrier first, so none tears the group down while a peer still uses it."""
    finished = False
    try:
        main_worker(args, device, heads_list, modes, path)
        finished = True
    finally:
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def _rank_main(rank, world, init, args, gpus, heads_list, modes, path):
    """One spawned rank: its device, the process group, the run, then a clean exit."""
    if args.dry_run:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        backend = "gloo"
    else:
        device = torch.device("cuda", gpus[rank])
        torch.cuda.set_device(device)
        backend = "nccl"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.pg_timeout_s))
    run_and_close(args, device, heads_list, modes, path)
    # The results are written and the group is destroyed. Leave without interpreter
    # finalization: a gloo rank aborted there once in CI ("terminate called without an active
    # exception", SIGABRT) after a complete run; see pytorch/pytorch#179291 for the race.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(world, gpus, heads_list, modes, args, path, tmp):
    """Start ``world`` ranks (not waiting): a ``ProcessContext``."""
    init = f"file://{tmp}/rendezvous-{Path(path).stem}"
    return mp.spawn(_rank_main, args=(world, init, args, gpus, heads_list, modes, path),
                    nprocs=world, join=False)


def wait_all(contexts) -> None:
    """Join every running group; when one fails, stop the others and re-raise."""
    pending = list(contexts)
    try:
        while pending:
            for ctx in list(pending):
                if ctx.join(timeout=1):
                    pending.remove(ctx)
    except BaseException:
        for ctx in pending:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        raise


# ----------------------------------------------------------------------------- merge
def merge(parts: list[dict]) -> list[dict]:
    """All groups' rows with efficiency against the 1-device run, ratios against dense CP on
    the same GPUs and against the 1-GPU cuDNN time divided by the GPU count."""
    rows = [dict(r) for part in parts for r in part["results"]]
    by: dict = {}
    for r in rows:
        by.setdefault((r["tokens"], r["heads"], r["kv_heads"]), {})[(r["world"], r["mode"])] = r
    for d in by.values():
        for (w, mode), r in d.items():
            moba = mode in CP_MODES + ("single",)
            base = d.get((1, "single")) if moba else d.get((1, "dense"))
            dense, cudnn = d.get((w, "dense")), d.get((1, "dense-cudnn"))
            for kind in KINDS:
                ms = r[f"{kind}_ms"]
                b = base[f"{kind}_ms"] if base else None
                r[f"eff_{kind}"] = b / (w * ms) if (b and ms and w > 1) else None
                if moba:
                    r[f"x_dense_{kind}"] = common.ratio(dense[f"{kind}_ms"] if dense else None, ms)
                    c = cudnn[f"{kind}_ms"] / w if (cudnn and cudnn[f"{kind}_ms"]) else None
                    r[f"x_cudnn_{kind}"] = common.ratio(c, ms)
                    r[f"x_dense_{kind}_est"] = bool(dense and dense["est_from"])
                    r[f"x_cudnn_{kind}_est"] = bool(cudnn and cudnn["est_from"])
            r["heads_label"] = f"{r['heads']}/{r['kv_heads']} heads"
            r["series"] = f"{mode} x{w}"
            recv = r["bytes_recv_fwd_max"]
            r["recv_fwd_gib"] = None if recv is None else recv / 2**30
            r["peak_gib"] = r["peak_gib_fwd_bwd"] or r["peak_gib_fwd"]
            if any(r.get(f"x_{b}_{k}_est") for b in ("dense", "cudnn") for k in KINDS):
                r["note"] = "; ".join(x for x in (r["note"], "x vs est dense") if x)
    order = {m: i for i, m in enumerate(REFERENCE_MODES + CP_MODES)}
    rows.sort(key=lambda r: (r["tokens"], r["heads"], r["world"], order.get(r["mode"], 9)))
    return rows


# ----------------------------------------------------------------------------- entry
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="folder for cp.json, cp.csv, cp.png")
    p.add_argument("--tokens", nargs="+", type=common.parse_tokens, default=[2**20, 2**22],
                   help="sequence lengths, run in the order given, e.g. 1M 2M 4M")
    p.add_argument("--heads", nargs="+", type=int, default=[8, 32])
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (capped at heads; 0 = MHA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--topk", type=int, default=12)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--backend", default="triton", help="MoBA backend (dry run: torch)")
    p.add_argument("--worlds", nargs="+", type=int, default=None,
                   help="world sizes: 1 (the one-GPU references) and the CP runs "
                        "(default: 1 and every visible GPU)")
    p.add_argument("--dense-tokens", nargs="+", type=common.parse_tokens, default=[2**18],
                   help="lengths at which the dense modes are measured (others: T^2 estimates)")
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--fwd-only-at", nargs="+", type=parse_at, default=[(2**22, 32)],
                   metavar="T:H", help="configurations timed forward only (default 4M:32: a "
                   "4M fwd+bwd of 32 heads does not fit one GPU, so it has no efficiency)")
    p.add_argument("--iters", type=int, default=3, help="timed calls after the warm-up")
    p.add_argument("--long-s", type=float, default=3.0,
                   help="a warm-up longer than this (seconds) is followed by one timed call")
    p.add_argument("--mem-frac", type=float, default=0.92,
                   help="skip a measurement whose predicted peak exceeds this part of the GPU")
    p.add_argument("--check-tokens", type=common.parse_tokens, default=0)
    p.add_argument("--pg-timeout-s", type=int, default=300, help="collective timeout")
    p.add_argument("--plot-only", metavar="JSON", default=None,
                   help="redraw the PNG of a results JSON and exit")
    p.add_argument("--dry-run", "--smoke", dest="dry_run", action="store_true",
                   help="tiny shapes on CPU with gloo: a 1-process and a 2-process run")
    args = p.parse_args(argv)
    if args.dry_run:
        args.tokens, args.heads, args.kv_heads, args.head_dim = [1024, 1536], [2, 4], 2, 16
        args.block_size, args.topk, args.dtype, args.backend = 64, 3, "fp32", "torch"
        args.dense_tokens, args.fwd_only_at, args.worlds = [512], [(1536, 4)], [1, 2]
        args.iters, args.check_tokens = 2, 0
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        png = common.plot(args.plot_only)
        if png is not None:
            print(f"wrote {png}")
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("cp.py needs CUDA GPUs; --dry-run runs tiny shapes on the CPU")
    n_gpus = 2 if args.dry_run else torch.cuda.device_count()
    worlds = sorted(set(args.worlds or [1, n_gpus]))
    if max(worlds) > n_gpus:
        raise SystemExit(f"--worlds {worlds} needs {max(worlds)} GPUs, {n_gpus} visible")
    out = Path(args.out)
    parts_dir = out / "cp_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        if 1 in worlds:  # the references, one process per head count, side by side
            for i in range(0, len(args.heads), n_gpus):
                ctxs = []
                for j, heads in enumerate(args.heads[i : i + n_gpus]):
                    path = str(parts_dir / f"world1-h{heads}.json")
                    ctxs.append(launch(1, [j], [heads], list(REFERENCE_MODES), args, path, tmp))
                    paths.append(path)
                wait_all(ctxs)
        for w in (w for w in worlds if w > 1):
            path = str(parts_dir / f"world{w}.json")
            wait_all([launch(w, list(range(w)), args.heads, ["allgather", "selective", "dense"],
                             args, path, tmp)])
            paths.append(path)
    parts = [json.loads(Path(p).read_text()) for p in paths]
    device = torch.device("cpu" if args.dry_run else "cuda")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot_only")}
    settings["worlds"] = worlds
    result = common.new_result(NAME, f"context-parallel MoBA {args.block_size}/top-{args.topk}, "
                               f"D={args.head_dim}, {args.dtype}, {args.layout}", device,
                               settings)
    result["plot"] = PLOT
    result["checks"] = [{"world": part["world"], "heads": h, **c} for part in parts
                        for h, c in part["checks"].items()]
    result["complete"] = all(part["complete"] for part in parts)
    result["rows"] = merge(parts)
    bad = [c for c in result["checks"] if not c["ok"]]
    if bad:
        print(f"CHECK FAILED in {len(bad)} configuration(s): {bad}")
    common.finish(result, args.out, NAME, COLUMNS,
                  show=lambda r: r["mode"] in CP_MODES + ("single",))
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
