"""Context-parallel MoBA over several GPUs: "allgather" vs "selective" vs dense context
parallelism (all-gather K/V + SDPA per chunk), with 1-GPU references from a one-process run;
``--merge`` puts runs together (scaling efficiency, ratios against dense, targets).

One run (one ``torchrun`` launch), for every head count: a correctness check (outputs and
gradients of every mode against the single-device op on a short sequence), then forward and
forward+backward of every mode at every ``--tokens`` length; dense modes run at
``--dense-tokens`` and are extrapolated (T^2, marked ``est``) to the other lengths.

Timing: one call is the slowest rank's wall time between barriers. When a call is short
(``2 * t <= --meas-s``) the first call is a warm-up and up to ``--iters`` more are timed
(median); a long call is timed once, again only if it spent > 2% of its time compiling Triton
kernels. ``--budget-s`` skips a measurement whose predicted time (rates measured so far in the
run, H200 figures before that) exceeds the time left; a measurement whose peak memory,
predicted linearly from a shorter length of the same mode, exceeds ``--mem-frac`` of the GPU
is skipped too. Bytes are what a rank receives in the forward and sends in the backward
(maximum and sum over ranks). The JSON is rewritten after every measurement.

Modes: "allgather" and "selective" (``moba_attn_cp``); "dense" (all-gather K/V, then SDPA on
each local chunk: bottom-right causal, so FLASH kernels on CUDA); and the 1-device references
"single" (``moba_attn_varlen_func`` on the whole sequence) and "dense-cudnn" (causal SDPA with
the cuDNN backend), which run in a world of one process.

    torchrun --standalone --nproc-per-node 1 benchmarks/cp_bench.py \\
        --modes single dense dense-cudnn --tokens 1M 2M 4M --heads 8 --out "$OUT/w1"
    torchrun --standalone --nproc-per-node 4 benchmarks/cp_bench.py \\
        --tokens 1M 2M 4M --heads 8 32 --out "$OUT/w4"
    python benchmarks/cp_bench.py --merge "$OUT"/w*/cp_bench_world*.json --out "$OUT"
    python benchmarks/cp_bench.py --plan-world 4 --tokens 4M --heads 8   # time plan only
    python benchmarks/cp_bench.py --dry-run   # CPU, gloo, tiny shapes: 1 and 2 processes, merged

``benchmarks/cp_suite.sh`` runs the whole benchmark of issue #7 on one 4-GPU host.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moba_attn import moba_attn_varlen_func
from moba_attn.distributed import comm_bytes, cp_layout, moba_attn_cp, shard, unshard

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CP_MODES = ("allgather", "selective")
ONE_DEVICE_MODES = ("single", "dense-cudnn")
DENSE_MODES = ("dense", "dense-cudnn")
MODES = CP_MODES + ("dense",) + ONE_DEVICE_MODES
KINDS = ("fwd", "fwd_bwd")

# Seconds of one call per work unit on one H200 (bf16, D=128; shared/PERF.md and
# benchmarks/RESULTS.md), (forward, forward+backward). MoBA at B=4096, k=12: unit = 1M tokens
# x 8 query heads per GPU, linear in T. Dense causal: unit = (1M tokens)^2 x 8 heads per GPU.
# Only the time plan and the first --budget-s predictions use them; measured rates replace them.
H200_S_PER_UNIT = {"moba": (0.55, 7.4), "dense": (7.3, 24.3), "dense-cudnn": (4.7, 15.0)}
PLAN_FIXED_S = 45  # start-up, NCCL set-up, checks, first-time Triton compilation (estimate)


def parse_tokens(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KM" else s) * mult)


def parse_at(s: str) -> tuple[int, int]:
    """``"2M:32"`` -> (tokens, heads)."""
    t, _, h = s.partition(":")
    if not h:
        raise argparse.ArgumentTypeError(f"expected TOKENS:HEADS such as 2M:32, got {s!r}")
    return parse_tokens(t), int(h)


def fmt_tokens(t: int) -> str:
    for unit, n in (("M", 2**20), ("K", 2**10)):
        if t >= n and t % (n // 4) == 0:
            return f"{t / n:g}{unit}"
    return str(t)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = (f"{dist.get_world_size()} x {p.name} ({p.multi_processor_count} SMs, "
               f"{p.total_memory / 2**30:.0f} GiB)")
    else:
        gpu = f"{dist.get_world_size()} CPU processes ({dist.get_backend()})"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"{gpu}, torch {torch.__version__}, triton {tv}, python {platform.python_version()}"


def log(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_cache(device):
    """Give the previous configuration's memory back (large, differently shaped tensors)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kv_heads_of(args, heads: int) -> int:
    return min(args.kv_heads, heads) if args.kv_heads else heads


def kinds_at(args, t: int, heads: int) -> tuple[str, ...]:
    if args.fwd_only or (t, heads) in args.fwd_only_at:
        return ("fwd",)
    return KINDS


def work_units(mode: str, t: int, heads: int, world: int) -> float:
    """Per-GPU work in the units of ``H200_S_PER_UNIT``."""
    x = t / 2**20
    return heads / 8 / world * (x * x if mode in DENSE_MODES else x)


def h200_rate(mode: str, kind: str) -> float:
    fam = mode if mode in DENSE_MODES else "moba"
    return H200_S_PER_UNIT[fam][KINDS.index(kind)]


def schedule(args):
    """Each head count's configurations in run order, ``(tokens, modes)``: the dense modes at
    ``--dense-tokens`` first, then every ``--tokens`` length (in the order given) with the
    MoBA modes."""
    moba = [m for m in args.modes if m not in DENSE_MODES]
    dense = [m for m in args.modes if m in DENSE_MODES]
    return ([(t, dense) for t in args.dense_tokens] if dense else []) + \
        ([(t, moba) for t in args.tokens] if moba else [])


def planned_calls(t_call: float, args) -> int:
    t_call = max(t_call, 1e-6)
    if 2 * t_call <= args.meas_s:
        return 1 + max(1, min(args.iters, int((args.meas_s - t_call) // t_call)))
    return 1


def print_plan(args, world: int) -> float:
    """The run's measurements with H200 time estimates; returns the total (seconds)."""
    print(f"time plan, {world} GPU(s), H200 rates (a call's time x calls):")
    total = 0.0
    for heads in args.heads:
        hkv = kv_heads_of(args, heads)
        for t, modes in schedule(args):
            for kind in kinds_at(args, t, heads):
                for mode in modes:
                    s = h200_rate(mode, kind) * work_units(mode, t, heads, world)
                    n = planned_calls(s, args)
                    total += s * n
                    print(f"  H {heads:>2}/{hkv:<2} T {fmt_tokens(t):>5} {mode:>11} {kind:>7}: "
                          f"{s:7.2f} s x {n} = {s * n:6.1f} s")
    budget = f", budget {args.budget_s:.0f} s" if args.budget_s else ""
    print(f"  measurements ~{total:.0f} s + start-up/checks/compilation ~{PLAN_FIXED_S} s = "
          f"~{total + PLAN_FIXED_S:.0f} s{budget}", flush=True)
    return total + PLAN_FIXED_S


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


# ----------------------------------------------------------------------------- runner
class CompileClock:
    """Seconds this process spent in ``triton.compiler.compile`` (compiling a kernel, or
    loading it from the disk cache). Kernels look the function up when they are first
    launched on a device, so this must be created before any launch."""

    def __init__(self):
        self.seconds = 0.0
        try:
            import triton.compiler as tc
        except ImportError:
            return
        inner = getattr(tc.compile, "__wrapped__", tc.compile)

        def compile(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        compile.__wrapped__ = inner
        tc.compile = compile


class Runner:
    """Measurements of one run; every decision is taken from all-reduced values, so all ranks
    run the same collectives."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.start = time.perf_counter()
        self.clock = CompileClock()
        self.rates: dict = {}  # (mode, kind) -> measured seconds per work unit
        self.peaks: dict = {}  # (mode, kind, heads) -> [(tokens, peak bytes)]
        self.rows: list[dict] = []
        self.checks: dict = {}
        self.machine = machine(device)
        self.mem_cap = (args.mem_frac * torch.cuda.get_device_properties(device).total_memory
                        if device.type == "cuda" else None)
        out_dir = args.out or os.environ.get("OUT") or "cp_bench_out"
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, f"cp_bench_world{self.world}.json")

    # --- collectives on scalars
    def all_max(self, *vals) -> list[float]:
        t = torch.tensor(vals, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def all_sum(self, *vals) -> list[float]:
        t = torch.tensor(vals, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def left(self) -> float:
        if not self.args.budget_s:
            return math.inf
        return self.args.budget_s - self.all_max(time.perf_counter() - self.start)[0]

    def call(self, fn) -> tuple[float, float]:
        """Seconds of one call (slowest rank) and seconds it spent compiling (most on a rank)."""
        sync(self.device)
        dist.barrier()
        c0, t0 = self.clock.seconds, time.perf_counter()
        fn()
        sync(self.device)
        return tuple(self.all_max(time.perf_counter() - t0, self.clock.seconds - c0))

    # --- one measurement
    def predicted_peak(self, mode, kind, heads, t):
        smaller = [(t0, p) for t0, p in self.peaks.get((mode, kind, heads), []) if t0 < t]
        if not smaller:
            return None
        t0, p = max(smaller)
        return p * t / t0, t0, p

    def skip_reason(self, mode, kind, t, heads) -> str | None:
        mem = self.predicted_peak(mode, kind, heads, t)
        if mem and self.mem_cap and mem[0] > self.mem_cap:
            return (f"skipped: memory ~{mem[0] / 2**30:.0f} GiB predicted ({mem[2] / 2**30:.0f} "
                    f"GiB at {fmt_tokens(mem[1])}), cap {self.mem_cap / 2**30:.0f} GiB")
        units = work_units(mode, t, heads, self.world)
        pred = self.rates.get((mode, kind), h200_rate(mode, kind)) * units
        left = self.left()
        if pred > left:
            return f"skipped: time budget (~{pred:.0f} s predicted, {max(left, 0):.0f} s left)"
        return None

    def measure(self, fn, mode, kind, t, heads) -> dict:
        """``{"ms", "calls", "note", "peak"}``; ``ms`` is None when skipped."""
        a = self.args
        reason = self.skip_reason(mode, kind, t, heads)
        if reason:
            log(f"  {mode} {kind}: {reason}")
            return {"ms": None, "calls": 0, "note": reason, "peak": None}
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            dt, comp = self.call(fn)
            samples = []
            if 2 * dt <= a.meas_s:  # short: the first call was a warm-up
                n = max(1, min(a.iters, int((a.meas_s - dt) // max(dt, 1e-6))))
                while len(samples) < n and self.left() > 1.5 * dt:
                    samples.append(self.call(fn)[0])
            elif comp > 0.02 * dt and self.left() > 1.5 * dt:  # long, and it compiled kernels
                samples.append(self.call(fn)[0])
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if self.world > 1:
                raise  # the other ranks wait in a collective: end the run (JSON so far is kept)
            why = "out of memory" if isinstance(e, torch.OutOfMemoryError) else \
                f"failed: {str(e).splitlines()[0][:120]}"
            log(f"  {mode} {kind}: {why}")
            return {"ms": None, "calls": 0, "note": why, "peak": None}
        note = ""
        if not samples:
            samples = [dt]
            note = f"1 call incl. {comp:.1f} s compile" if comp > 0.02 * dt else "1 call"
        sec = statistics.median(samples)
        self.rates[(mode, kind)] = sec / work_units(mode, t, heads, self.world)
        peak = self.all_max(torch.cuda.max_memory_allocated(self.device))[0] if cuda else None
        if peak:
            self.peaks.setdefault((mode, kind, heads), []).append((t, peak))
        log(f"  {mode} {kind}: {sec * 1e3:.1f} ms ({len(samples)} timed"
            + (f", peak {peak / 2**30:.1f} GiB" if peak else "") + (f"; {note}" if note else "")
            + ")")
        return {"ms": sec * 1e3, "calls": len(samples), "note": note, "peak": peak}

    # --- output
    def save(self, complete: bool):
        if self.rank != 0:
            return
        data = {"machine": self.machine, "argv": sys.argv, "world": self.world,
                "complete": complete, "elapsed_s": round(time.perf_counter() - self.start, 1),
                "settings": {k: v for k, v in vars(self.args).items() if k not in ("out", "merge")},
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


def check(run: Runner, heads, hkv) -> dict:
    """Every mode's output and gradients against the single-device op (dense modes: against
    MoBA with topk = all blocks, which is dense causal attention) on a short sequence. Also
    compiles the kernels before the timed calls."""
    args, dev = run.args, run.device
    dtype = DTYPES[args.dtype]
    world = run.world
    bs = args.block_size
    t = args.check_tokens or max(16, 4 * world) * bs
    g = torch.Generator(device=dev).manual_seed(0)  # the same tensors on every rank
    q, k, v, do = (torch.randn(t, h, args.head_dim, generator=g, device=dev, dtype=dtype)
                   for h in (heads, hkv, hkv, heads))
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)

    def single(topk):
        x = [y.detach().requires_grad_(True) for y in (q, k, v)]
        o = moba_attn_varlen_func(*x, cu, cu, t, t, block_size=bs, topk=topk,
                                  backend=args.backend)
        o.backward(do)
        return [o.detach()] + [y.grad for y in x]

    ref = single(args.topk)
    ref_dense = single((t + bs - 1) // bs) if set(args.modes) & set(DENSE_MODES) else None
    lay = cp_layout([t], world, bs, args.layout)
    errs = {}
    for mode in args.modes:
        if mode == "single":
            continue
        try:
            errs[mode] = _check_mode(run, mode, q, k, v, do, lay, ref, ref_dense)
        except RuntimeError as e:
            if world > 1:
                raise
            errs[mode] = {"out": math.inf, "grad": math.inf,
                          "error": str(e).splitlines()[0][:200]}
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ok = all(max(e["out"], e["grad"]) <= tol for e in errs.values())
    res = {"tokens": t, "tol": tol, "ok": ok, "max_rel_err": errs}
    log(f"check H{heads}/{hkv} T={t} (max |error| / max |ref|, tol {tol}): {errs}"
        + ("" if ok else "  CHECK FAILED"))
    return res


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
    """Measure every mode at one length into ``run.rows`` (and the JSON)."""
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
    grad_out = []  # dO, made on first use (skipped forward+backward never allocates it)

    def do():
        if not grad_out:
            grad_out.append(rnd(heads))
        return grad_out[0]

    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)  # one tensor: layout memo hits

    def attn(mode, stats):
        def fn(q_, k_, v_):
            if mode == "single":
                return moba_attn_varlen_func(q_, k_, v_, cu, cu, t, t, block_size=args.block_size,
                                             topk=args.topk, backend=args.backend, validate=False)
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


def dense_estimates(run: Runner, heads, hkv, t) -> list[dict]:
    """Dense rows at length ``t`` extrapolated (T^2) from the longest measured length."""
    args = run.args
    item = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    rows = []
    for mode in (m for m in args.modes if m in DENSE_MODES):
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
        row["note"] = f"est: T^2 from {fmt_tokens(src['tokens'])}"
        if mode == "dense":
            _dense_bytes(row, cp_layout([t], run.world, args.block_size, args.layout), hkv,
                         args.head_dim, item)
        else:
            row.update(bytes_recv_fwd_max=0, bytes_sent_bwd_max=0, bytes_recv_fwd_sum=0)
        rows.append(row)
    return rows


def print_rows(rows, world, args, machine_line):
    log(f"\nmachine: {machine_line}\nworld {world}, block {args.block_size}, topk {args.topk}, "
        f"D {args.head_dim}, {args.dtype}, layout {args.layout}, backend {args.backend}")
    log(f"{'tokens':>6} {'H/Hkv':>6} {'mode':>11} {'fwd ms':>10} {'fwd+bwd ms':>11} "
        f"{'recv fwd':>9} {'sent bwd':>9} {'blocks':>6} {'peak GiB':>9}  note")
    for r in rows:
        peak = r["peak_gib_fwd_bwd"] or r["peak_gib_fwd"]
        log(f"{fmt_tokens(r['tokens']):>6} {r['heads']:>3}/{r['kv_heads']:<2} {r['mode']:>11} "
            f"{fmt_ms(r['fwd_ms']):>10} {fmt_ms(r['fwd_bwd_ms']):>11} "
            f"{fmt_bytes(r['bytes_recv_fwd_max']):>9} {fmt_bytes(r['bytes_sent_bwd_max']):>9} "
            f"{r['fetched_blocks_max'] if r['fetched_blocks_max'] is not None else '-'!s:>6} "
            f"{peak if peak is not None else '-'!s:>9}  {r['note']}")


def main_worker(args, device):
    world = dist.get_world_size()
    bad = [m for m in args.modes if m in ONE_DEVICE_MODES]
    if world > 1 and bad:
        raise SystemExit(f"modes {bad} are 1-device references: run them with "
                         "--nproc-per-node 1 and combine the runs with --merge")
    run = Runner(args, device)
    if run.rank == 0:
        print_plan(args, world)
    for heads in args.heads:
        hkv = kv_heads_of(args, heads)
        run.checks[f"H{heads}"] = check(run, heads, hkv)
        run.save(False)
        for t, modes in schedule(args):
            free_cache(device)
            log(f"T={fmt_tokens(t)} H={heads}/{hkv} ({time.perf_counter() - run.start:.0f} s):")
            run_config(run, heads, hkv, t, modes)
            if not set(modes) & set(DENSE_MODES):
                run.rows += dense_estimates(run, heads, hkv, t)
            run.save(False)
    run.save(True)
    print_rows(run.rows, world, args, run.machine)
    log(f"wrote {run.path} ({time.perf_counter() - run.start:.0f} s)")


# ----------------------------------------------------------------------------- merge
def fmt_ms(x):
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def fmt_bytes(x):
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x / 2**20:.1f} MiB" if x < 2**30 else f"{x / 2**30:.2f} GiB"


def _ratio(num, den):
    return num / den if (num and den) else None


def _pct(x):
    return f"{100 * x:.0f}%" if x is not None else "-"


def _x(x, est=False):
    return "-" if x is None else f"{x:.1f}x" + (" est" if est else "")


def merge(files, out_dir) -> str:
    """Combine runs' JSON: efficiency against the 1-device run, ratios against dense CP and
    against the 1-GPU cuDNN time divided by the GPU count; writes cp_summary.md and
    cp_merged.json under ``out_dir`` and returns the markdown."""
    runs = []
    for f in files:
        with open(f) as fh:
            runs.append(json.load(fh))
    runs.sort(key=lambda r: r["world"])
    rows = [r for run in runs for r in run["results"]]
    by: dict = {}
    for r in rows:
        by.setdefault((r["tokens"], r["heads"], r["kv_heads"]), {})[(r["world"], r["mode"])] = r
    for d in by.values():
        for (w, mode), r in d.items():
            base = d.get((1, "single")) if mode in CP_MODES + ("single",) else d.get((1, "dense"))
            dense = d.get((w, "dense"))
            cudnn = d.get((1, "dense-cudnn"))
            for kind in KINDS:
                ms = r[f"{kind}_ms"]
                b = base[f"{kind}_ms"] if base else None
                r[f"eff_{kind}"] = b / (w * ms) if (b and ms and w > 1) else None
                if mode in CP_MODES + ("single",):
                    r[f"x_dense_{kind}"] = _ratio(dense[f"{kind}_ms"] if dense else None, ms)
                    r[f"x_dense_{kind}_est"] = bool(dense and dense["est_from"])
                    c = cudnn[f"{kind}_ms"] / w if (cudnn and cudnn[f"{kind}_ms"]) else None
                    r[f"x_cudnn_{kind}"] = _ratio(c, ms)
                    r[f"x_cudnn_{kind}_est"] = bool(cudnn and cudnn["est_from"])
    s0 = runs[0]["settings"] if runs else {}
    diff = sorted({k for run in runs for k in ("block_size", "topk", "head_dim", "dtype", "layout")
                   if run["settings"].get(k) != s0.get(k)})
    md = ["# Context-parallel MoBA benchmark (issue #7)", ""]
    md.append(f"Settings: block_size {s0.get('block_size')}, topk {s0.get('topk')}, head_dim "
              f"{s0.get('head_dim')}, {s0.get('dtype')}, layout {s0.get('layout')}, backend "
              f"{s0.get('backend')}, random q/k/v (random routing), one sequence."
              + (f" **Runs differ in {diff}.**" if diff else ""))
    md.append("")
    for run in runs:
        state = "" if run.get("complete") else " **(incomplete: stopped early)**"
        md.append(f"- world {run['world']}: {run['machine']}; {run.get('elapsed_s', '?')} s"
                  f"{state}; `{' '.join(run['argv'])}`")
    md += ["", ("Times in ms: median of timed calls after a warm-up (`calls`; 1 call = no "
                "warm-up, the call was long). `eff` = t(1 GPU) / (GPUs x t(GPUs)); `x dense` = "
                "dense CP time / MoBA time on the same GPUs; `x cuDNN/n` = (1-GPU cuDNN dense "
                "time / GPUs) / MoBA time, a dense CP with perfect scaling on the fastest dense "
                "kernel. `est` = dense time extrapolated (T^2) from the longest measured length. "
                "Bytes per GPU (largest rank): received in the forward, sent in the backward."),
           ""]
    md += _targets(by)
    md += _moba_table(by)
    md += _mode_table(by)
    md += _dense_table(by)
    md += ["## Checks (max |error| / max |reference| on a short sequence)", "",
           "| world | heads | T | mode | out | grads | ok |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for h, c in run["checks"].items():
            for mode, e in c["max_rel_err"].items():
                ok = "yes" if max(e["out"], e["grad"]) <= c["tol"] else "NO"
                if "error" in e:
                    ok = f"NO: {e['error']}"
                md.append(f"| {run['world']} | {h} | {c['tokens']} | {mode} | {e['out']:.2g} | "
                          f"{e['grad']:.2g} | {ok} |")
    text = "\n".join(md) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "cp_summary.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out_dir, "cp_merged.json"), "w") as fh:
        json.dump({"runs": [{k: v for k, v in r.items() if k != "results"} for r in runs],
                   "results": rows}, fh, indent=1)
    return text


def _targets(by) -> list[str]:
    worlds = sorted({w for d in by.values() for (w, m) in d if m in CP_MODES})
    if not worlds:
        return []
    w = worlds[-1]
    longest = max((c[0] for c, d in by.items() if any(k[0] == w and k[1] in CP_MODES for k in d)))
    md = [(f"## Targets at {fmt_tokens(longest)} tokens on {w} GPUs "
           "(>= 80% scaling efficiency from 1 GPU, >= 8x faster than dense CP)"), "",
          ("| H/Hkv | mode | eff fwd | eff fwd+bwd | x dense fwd | x dense fwd+bwd | "
           f"x cuDNN/{w} fwd | x cuDNN/{w} fwd+bwd |"), "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for (t, h, hkv), d in sorted(by.items()):
        if t != longest:
            continue
        best = {}
        for mode in CP_MODES:
            r = d.get((w, mode))
            if not r:
                continue
            md.append(f"| {h}/{hkv} | {mode} | {_pct(r['eff_fwd'])} | {_pct(r['eff_fwd_bwd'])} "
                      f"| {_x(r['x_dense_fwd'], r['x_dense_fwd_est'])} | "
                      f"{_x(r['x_dense_fwd_bwd'], r['x_dense_fwd_bwd_est'])} | "
                      f"{_x(r['x_cudnn_fwd'], r['x_cudnn_fwd_est'])} | "
                      f"{_x(r['x_cudnn_fwd_bwd'], r['x_cudnn_fwd_bwd_est'])} |")
            for key in ("eff_fwd", "eff_fwd_bwd", "x_dense_fwd", "x_dense_fwd_bwd"):
                if r[key] is not None and r[key] > best.get(key, (-1, ""))[0]:
                    best[key] = (r[key], mode)
        for key, thr, name in (("eff_fwd", 0.8, "efficiency, forward"),
                               ("eff_fwd_bwd", 0.8, "efficiency, forward+backward"),
                               ("x_dense_fwd", 8, "vs dense CP, forward"),
                               ("x_dense_fwd_bwd", 8, "vs dense CP, forward+backward")):
            if key not in best:
                verdicts.append(f"- {h}/{hkv} heads, {name}: not measured")
                continue
            val, mode = best[key]
            shown = _pct(val) if key.startswith("eff") else _x(val, d[(w, mode)][f"{key}_est"])
            verdicts.append(f"- {h}/{hkv} heads, {name}: {shown} ({mode}) -> "
                            f"{'met' if val >= thr else 'NOT met'}")
    return md + [""] + verdicts + [""]


def _moba_table(by) -> list[str]:
    md = ["## MoBA: time, scaling, traffic", "",
          ("| tokens | H/Hkv | GPUs | mode | fwd ms | fwd+bwd ms | eff fwd | eff f+b | x dense "
           "fwd | x dense f+b | x cuDNN/n fwd | x cuDNN/n f+b | recv fwd/GPU | sent bwd/GPU | "
           "blocks | peak GiB | calls | note |"), "|" + "---|" * 18]
    for (t, h, hkv), d in sorted(by.items()):
        for (w, mode), r in sorted(d.items()):
            if mode not in CP_MODES + ("single",):
                continue
            peak = r["peak_gib_fwd_bwd"] or r["peak_gib_fwd"]
            md.append(
                f"| {fmt_tokens(t)} | {h}/{hkv} | {w} | {mode} | {fmt_ms(r['fwd_ms'])} | "
                f"{fmt_ms(r['fwd_bwd_ms'])} | {_pct(r['eff_fwd'])} | {_pct(r['eff_fwd_bwd'])} | "
                f"{_x(r['x_dense_fwd'], r['x_dense_fwd_est'])} | "
                f"{_x(r['x_dense_fwd_bwd'], r['x_dense_fwd_bwd_est'])} | "
                f"{_x(r['x_cudnn_fwd'], r['x_cudnn_fwd_est'])} | "
                f"{_x(r['x_cudnn_fwd_bwd'], r['x_cudnn_fwd_bwd_est'])} | "
                f"{fmt_bytes(r['bytes_recv_fwd_max'])} | {fmt_bytes(r['bytes_sent_bwd_max'])} | "
                f"{r['fetched_blocks_max'] if r['fetched_blocks_max'] is not None else '-'} | "
                f"{peak if peak is not None else '-'} | {r['fwd_calls']}/{r['fwd_bwd_calls']} | "
                f"{r['note']} |")
    return md + [""]


def _mode_table(by) -> list[str]:
    md = ["## allgather vs selective (selective time / allgather time; < 1: selective faster)",
          "", ("| tokens | H/Hkv | GPUs | fwd ms ag / sel | ratio | fwd+bwd ms ag / sel | ratio "
               "| recv fwd/GPU ag / sel | blocks fetched |"), "|" + "---|" * 9]
    wins = {k: [0, 0] for k in KINDS}  # selective faster by > 5%, comparisons
    worlds = sorted({w for d in by.values() for (w, m) in d if m in CP_MODES})
    for (t, h, hkv), d in sorted(by.items()):
        for w in worlds:
            ag, sel = d.get((w, "allgather")), d.get((w, "selective"))
            if not (ag and sel):
                continue
            cells = []
            for kind in KINDS:
                ratio = _ratio(sel[f"{kind}_ms"], ag[f"{kind}_ms"])
                cells += [f"{fmt_ms(ag[f'{kind}_ms'])} / {fmt_ms(sel[f'{kind}_ms'])}",
                          f"{ratio:.2f}" if ratio else "-"]
                if ratio and w == worlds[-1]:
                    wins[kind][1] += 1
                    wins[kind][0] += ratio < 0.95
            blocks = sel["fetched_blocks_max"]
            md.append(f"| {fmt_tokens(t)} | {h}/{hkv} | {w} | {' | '.join(cells)} | "
                      f"{fmt_bytes(ag['bytes_recv_fwd_max'])} / "
                      f"{fmt_bytes(sel['bytes_recv_fwd_max'])} | "
                      f"{blocks if blocks is not None else '-'} |")
    if worlds:
        kind = "fwd_bwd" if wins["fwd_bwd"][1] else "fwd"
        won, n = wins[kind]
        pick = "selective" if n and won > n / 2 else "allgather"
        md += ["", (f"On {worlds[-1]} GPUs selective is > 5% faster in {won} of {n} "
                    f"{kind.replace('_', '+')} comparisons -> measured default for this host: "
                    f"`{pick}` (the library default is `allgather`).")]
    return md + [""]


def _dense_table(by) -> list[str]:
    md = ["## Dense baselines", "", ("| tokens | H/Hkv | GPUs | impl | fwd ms | fwd+bwd ms | "
                                     "eff fwd | eff f+b | recv fwd/GPU | calls | note |"),
          "|" + "---|" * 11]
    for (t, h, hkv), d in sorted(by.items()):
        for (w, mode), r in sorted(d.items()):
            if mode not in DENSE_MODES:
                continue
            impl = "dense CP (SDPA FLASH)" if mode == "dense" else "SDPA cuDNN, 1 device"
            md.append(f"| {fmt_tokens(t)} | {h}/{hkv} | {w} | {impl} | {fmt_ms(r['fwd_ms'])} | "
                      f"{fmt_ms(r['fwd_bwd_ms'])} | {_pct(r['eff_fwd'])} | "
                      f"{_pct(r['eff_fwd_bwd'])} | {fmt_bytes(r['bytes_recv_fwd_max'])} | "
                      f"{r['fwd_calls']}/{r['fwd_bwd_calls']} | {r['note']} |")
    return md + [""]


# ----------------------------------------------------------------------------- entry points
def _spawned(rank, world, init, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    run_and_close(args, torch.device("cpu"))
    # The results are written and the group is destroyed. Leave without interpreter
    # finalization: a gloo rank aborted there once in CI ("terminate called without an active
    # exception", SIGABRT) after a complete run; see pytorch/pytorch#179291 for the race.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_and_close(args, device):
    """``main_worker``, then the process group's teardown; after a normal end every rank
    waits at a barrier first, so none tears the group down while a peer still uses it (a
    gloo rank aborted in teardown once without it, on a 2-core CPU machine; with it, one
    still aborted once at interpreter exit, which ``_spawned`` now skips)."""
    finished = False
    try:
        main_worker(args, device)
        finished = True
    finally:
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", nargs="+", type=parse_tokens, default=[2**20, 2**21, 2**22],
                   help="sequence lengths, run in the order given, e.g. 1M 4M 2M")
    p.add_argument("--heads", nargs="+", type=int, default=[8, 32])
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (capped at heads; 0 = MHA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--topk", type=int, default=12)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--backend", default="auto")
    p.add_argument("--modes", nargs="+", default=["allgather", "selective", "dense"],
                   choices=MODES, help="single and dense-cudnn need --nproc-per-node 1")
    p.add_argument("--dense-tokens", nargs="+", type=parse_tokens, default=[2**18],
                   help="lengths at which the dense modes are measured (others: T^2 estimates)")
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--fwd-only-at", nargs="+", type=parse_at, default=[], metavar="T:H",
                   help="configurations timed forward only, e.g. 2M:32 4M:32")
    p.add_argument("--iters", type=int, default=3, help="timed calls after a warm-up (short calls)")
    p.add_argument("--meas-s", type=float, default=6.0,
                   help="time per measurement: calls shorter than half of it get a warm-up "
                        "and up to --iters timed calls; longer ones are timed once")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="seconds for the run: skip measurements that would not fit (0: none)")
    p.add_argument("--mem-frac", type=float, default=0.92,
                   help="skip a measurement whose predicted peak exceeds this part of the GPU")
    p.add_argument("--check-tokens", type=parse_tokens, default=0)
    p.add_argument("--pg-timeout-s", type=int, default=180, help="collective timeout")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./cp_bench_out)")
    p.add_argument("--plan-world", type=int, default=0,
                   help="print the time plan for this many GPUs and exit")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine runs' JSON files (globs allowed) into OUT/cp_summary.md")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on CPU with gloo: a 1-process and a 2-process run, merged")
    args = p.parse_args(argv)
    if args.dry_run:
        args.tokens, args.heads, args.kv_heads, args.head_dim = [1024, 1536], [2, 4], 2, 16
        args.block_size, args.topk, args.dtype, args.backend = 64, 3, "fp32", "torch"
        args.dense_tokens, args.fwd_only_at = [512], [(1536, 4)]
        args.iters, args.meas_s, args.check_tokens = 2, 0.2, 0
    return args


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.out or os.environ.get("OUT") or "cp_bench_out"
    if args.merge:
        files = sorted({f for pat in args.merge for f in glob.glob(pat)})
        if not files:
            raise SystemExit(f"no JSON files match {args.merge}")
        print(merge(files, out_dir))
        print(f"wrote {os.path.join(out_dir, 'cp_summary.md')}")
        return
    if args.plan_world:
        print_plan(args, args.plan_world)
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        cuda = torch.cuda.is_available() and not args.dry_run
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=args.pg_timeout_s))
        run_and_close(args, device)
        return
    if not args.dry_run:
        raise SystemExit("launch with torchrun (see the module docstring), or pass --dry-run, "
                         "--plan-world or --merge")
    import tempfile

    import torch.multiprocessing as mp

    args.out = out_dir
    one = argparse.Namespace(**{**vars(args), "modes": ["single", "dense", "dense-cudnn"]})
    many = argparse.Namespace(**{**vars(args), "modes": ["allgather", "selective", "dense"]})
    for world, a in ((1, one), (2, many)):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_spawned, args=(world, f"file://{tmp}/rendezvous", a), nprocs=world)
    print(merge([os.path.join(out_dir, f"cp_bench_world{w}.json") for w in (1, 2)], out_dir))


if __name__ == "__main__":
    main()
