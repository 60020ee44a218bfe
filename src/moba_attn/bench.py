"""Benchmarks and checks behind ``moba bench``, ``moba check`` and ``moba env``.

Everything here is a library function; the CLI only parses flags. Definitions:
- what is timed: the public functions. ``moba-torch`` / ``moba-triton`` are
  ``moba_attn_func`` on the equal-length ``[batch, T, H, D]`` batch with ``backend="torch"``
  / ``backend="triton"`` (the layout comes from the shapes: no host sync per call; a backend
  that cannot run raises instead of running another); ``sdpa*`` are
  ``F.scaled_dot_product_attention`` on transposed views of the same tensors.
- useful FLOPs: forward = 4 * D * (keys attended, summed over queries and heads);
  backward = 2.5 x forward. MoBA is credited only with the keys it attends, dense causal
  attention with its causal triangle.
- peak memory: rise of the CUDA allocator's peak over the inputs (and their gradients for
  forward+backward). CPUs have no allocator statistics: reported as n/a there.
- timing: median over repeats after a warm-up (triton's do_bench on CUDA; at long T one
  warm-up plus 3 CUDA-event timings; ``time.perf_counter`` on CPU).

tqdm (progress bar) and matplotlib (``plot.png``) are optional: without them there is no
bar, and the JSON and CSV are written without the plot.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .interface import moba_attn_func, moba_attn_varlen_func, moba_select
from .ops.backends import TRITON
from .ops.layout import prepare_layout

PLOT_HINT = "install moba-attn[plot] for plot.png"


def triton_available(device: torch.device) -> bool:
    """The Triton kernels run by default on ``device``: CUDA with a working triton (the CPU
    interpreter is used only when ``moba-triton`` is asked for by name)."""
    return device.type == "cuda" and TRITON.supports(device, torch.bfloat16, 128, 128, 2) is None


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BenchConfig:
    """One benchmark run: shapes, MoBA settings, providers and modes (CLI flags map 1:1)."""

    seqlens: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384])
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None  # default: = heads
    head_dim: int = 64
    block_size: int = 512
    topk: int = 3
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    providers: list[str] | None = None  # default: every provider available on the device
    modes: list[str] = field(default_factory=lambda: ["fwd", "fwd+bwd"])
    routing: str = "random"
    repeats: int = 5
    long_seqlen: int = 262144  # from here on: one warm-up + 3 timed calls
    check: bool = True
    out: str = "bench_out"
    seed: int = 0

    def resolved(self) -> BenchConfig:
        c = BenchConfig(**asdict(self))
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if c.dtype == "auto":
            c.dtype = "bf16" if c.device.startswith("cuda") else "fp32"
        if c.kv_heads is None:
            c.kv_heads = c.heads
        if c.providers is None:
            c.providers = default_providers(torch.device(c.device))
        return c


# ----------------------------------------------------------------------------- inputs
def local_walk(n: int, width: int, generator: torch.Generator, device, rho: float = 0.98,
               sigma: float = 0.2, chunk: int = 256) -> torch.Tensor:
    """``x_t = rho * x_{t-1} + sigma * noise`` along ``n`` steps: ``[n, width]`` fp32 (~unit
    variance), computed chunk by chunk with one small matmul per chunk."""
    out = torch.empty(n, width, device=device)
    idx = torch.arange(chunk, device=device, dtype=torch.float32)
    powers = rho ** (idx[:, None] - idx[None, :]).clamp(min=0)
    lower = torch.tril(powers)  # lower[i, j] = rho^(i-j) for j <= i
    carry_w = rho ** (idx + 1)  # contribution of the previous chunk's last value
    prev = torch.randn(width, generator=generator, device=device)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        noise = sigma * torch.randn(m, width, generator=generator, device=device)
        block = lower[:m, :m] @ noise + carry_w[:m, None] * prev[None, :]
        out[s : s + m] = block
        prev = block[-1]
    return out


def make_inputs(cfg: BenchConfig, T: int, requires_grad: bool):
    """q ``[batch, T, H, D]``, k/v ``[batch, T, Hkv, D]`` (sequence-first, what
    ``moba_attn_func`` takes) plus their ``cu_seqlens``, on the benchmark device."""
    dev, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + T)
    n = cfg.batch * T
    if cfg.routing == "random":
        q = torch.randn(n, cfg.heads, cfg.head_dim, generator=gen, device=dev)
        k = torch.randn(n, cfg.kv_heads, cfg.head_dim, generator=gen, device=dev)
    elif cfg.routing == "local":
        qs, ks = [], []
        for _ in range(cfg.batch):
            qs.append(local_walk(T, cfg.heads * cfg.head_dim, gen, dev))
            ks.append(local_walk(T, cfg.kv_heads * cfg.head_dim, gen, dev))
        q = torch.cat(qs).view(n, cfg.heads, cfg.head_dim)
        k = torch.cat(ks).view(n, cfg.kv_heads, cfg.head_dim)
    else:
        raise ValueError(f"routing must be 'random' or 'local', got {cfg.routing!r}")
    v = torch.randn(n, cfg.kv_heads, cfg.head_dim, generator=gen, device=dev)
    q, k, v = (t.to(dtype).view(cfg.batch, T, *t.shape[1:]).requires_grad_(requires_grad)
               for t in (q, k, v))
    cu = torch.arange(0, (cfg.batch + 1) * T, T, dtype=torch.int32, device=dev)
    return q, k, v, cu


# ----------------------------------------------------------------------------- providers
# A factory takes (cfg, q, k, v, cu, T) with q/k/v ``[batch, T, H, D]`` and returns the call
# to time; the call returns the output (any shape with q's number of elements).
def _moba(backend: str):
    def make(cfg, q, k, v, cu, T):
        def run():
            return moba_attn_func(q, k, v, block_size=cfg.block_size, topk=cfg.topk,
                                  backend=backend)
        return run
    return make


def _sdpa(sdpa_backend):
    def make(cfg, q, k, v, cu, T):
        from contextlib import nullcontext

        from torch.nn.attention import sdpa_kernel

        gqa = cfg.heads != cfg.kv_heads

        def run():
            ctx = sdpa_kernel([sdpa_backend]) if sdpa_backend is not None else nullcontext()
            with ctx:
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2), is_causal=True,
                                                      enable_gqa=gqa)
        return run
    return make


def _packed(factory):
    """A factory of the packed ``[batch * T, H, D]`` layout (``moba_attn.baselines``)."""
    def make(cfg, q, k, v, cu, T):
        return factory(cfg, q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, T)
    return make


def _providers() -> dict[str, tuple[Callable, str]]:
    """name -> (factory(cfg, q, k, v, cu, T) -> callable returning out, device type or 'any')."""
    from torch.nn.attention import SDPBackend

    table = {
        "moba-torch": (_moba("torch"), "any"),
        "moba-triton": (_moba("triton"), "cuda"),
        "sdpa": (_sdpa(None), "cpu"),
        "sdpa-flash": (_sdpa(SDPBackend.FLASH_ATTENTION), "cuda"),
        "sdpa-cudnn": (_sdpa(SDPBackend.CUDNN_ATTENTION), "cuda"),
    }
    try:  # extra GPU providers (FlexAttention MoBA, original-release re-implementation)
        from .baselines import extra_providers

        table.update({name: (_packed(f), where) for name, (f, where) in extra_providers().items()})
    except ImportError:
        pass
    return table


DENSE = ("sdpa", "sdpa-flash", "sdpa-cudnn")


def default_providers(device: torch.device) -> list[str]:
    names = []
    for name, (_, where) in _providers().items():
        if where not in ("any", device.type):
            continue
        if name == "moba-triton" and not triton_available(device):
            continue
        if name.startswith(("flex", "orig")):
            continue  # opt-in: slow or long to compile
        names.append(name)
    return names


# ----------------------------------------------------------------------------- timing
def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cuda_event_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of ``reps`` calls timed with CUDA events (no warm-up here)."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def time_ms(fn: Callable[[], object], dev: torch.device, repeats: int, long: bool) -> float:
    """Median milliseconds of ``fn`` after a warm-up."""
    if dev.type == "cuda":
        if long:  # seconds per call: one warm-up, 3 CUDA-event timings
            fn()
            return cuda_event_ms(fn, 3)
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(max(1, 1 if long else repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def machine_line(dev: torch.device) -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton -")
    if dev.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name(dev))
    else:
        parts.insert(0, f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- runs
def _progress(jobs: list, enabled: bool):
    """``(iterable, set_postfix)``: a tqdm bar when tqdm is installed and ``enabled``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        return jobs, lambda text: None
    bar = tqdm(jobs, desc="moba bench", leave=False)
    return bar, bar.set_postfix_str


def _check_providers(cfg: BenchConfig, table: dict) -> None:
    """Unknown names, and a Triton provider where the kernels cannot run, fail up front."""
    unknown = [p for p in cfg.providers if p not in table]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; available: {sorted(table)}")
    if "moba-triton" in cfg.providers:
        why = TRITON.supports(torch.device(cfg.device), DTYPES[cfg.dtype], cfg.head_dim,
                              cfg.block_size, cfg.topk)
        if why is not None:
            raise ValueError(f"moba-triton cannot run here: {why}")


def run_benchmark(cfg: BenchConfig, progress: bool = True) -> dict:
    """Time every provider x mode x T; returns ``{"config", "machine", "rows", "check"}``."""
    cfg = cfg.resolved()
    dev = torch.device(cfg.device)
    table = _providers()
    _check_providers(cfg, table)
    check = run_check(cfg) if cfg.check else None
    rows = []
    jobs = [(T, mode, p) for T in cfg.seqlens for mode in cfg.modes for p in cfg.providers]
    bar, postfix = _progress(jobs, progress)
    inputs = {}
    for T, mode, name in bar:
        postfix(f"T={T} {mode} {name}")
        key = (T, mode)
        if key not in inputs:
            inputs.clear()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            inputs[key] = make_inputs(cfg, T, requires_grad=(mode != "fwd"))
        q, k, v, cu = inputs[key]
        fwd = table[name][0](cfg, q, k, v, cu, T)
        if mode == "fwd":
            def fn(fwd=fwd):
                with torch.no_grad():
                    return fwd()
        else:
            grad = torch.randn(q.shape, device=dev, dtype=q.dtype)

            def fn(fwd=fwd, grad=grad, leaves=(q, k, v)):
                for x in leaves:
                    x.grad = None
                out = fwd()
                out.backward(grad.view_as(out))
        long = T >= cfg.long_seqlen
        try:
            ms = time_ms(fn, dev, cfg.repeats, long)
            mem = peak_mib(fn, dev)
            err = None
        except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. OOM, unsupported
            ms, mem, err = float("nan"), None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        lay = prepare_layout(cu.cpu(), block_size=cfg.block_size)
        keys = lay.dense_keys() if name in DENSE or name.startswith("sdpa") else \
            lay.attended_keys(cfg.topk)
        flops = 4 * cfg.head_dim * keys * cfg.heads * (1.0 if mode == "fwd" else 3.5)
        rows.append({"T": T, "mode": mode, "provider": name, "ms": ms,
                     "tflops": flops / (ms * 1e-3) / 1e12 if not math.isnan(ms) else float("nan"),
                     "peak_mib": mem, "error": err})
    if hasattr(bar, "close"):
        bar.close()
    _add_speedups(rows)
    return {"config": asdict(cfg), "machine": machine_line(dev), "rows": rows, "check": check,
            "date": time.strftime("%Y-%m-%d")}


def _add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_<dense>`` = dense ms / provider ms, same T and mode, same run."""
    by = {(r["T"], r["mode"], r["provider"]): r["ms"] for r in rows}
    dense = sorted({r["provider"] for r in rows if r["provider"] in DENSE})
    for r in rows:
        for d in dense:
            base = by.get((r["T"], r["mode"], d))
            r[f"speedup_vs_{d}"] = base / r["ms"] if base and r["ms"] == r["ms"] else None


# ----------------------------------------------------------------------------- check
def run_check(cfg: BenchConfig | None = None, verbose: bool = False) -> dict:
    """Fast MoBA paths vs the fp64 reference on small awkward shapes on this device.

    Returns ``{"ok": bool, "rows": [...]}``; each row has the max output/grad errors and
    PyTorch's own error in the same dtype (the tolerance rule: <= 2x / 3x of it).
    """
    cfg = (cfg or BenchConfig()).resolved()
    dev = torch.device(cfg.device)
    backends = ["torch"] + (["triton"] if triton_available(dev) else [])
    shapes = [  # lens, Hq, Hkv, D, block, topk
        ([300, 1, 77], 4, 2, 64, 32, 3),
        ([520], 2, 1, 128, 64, 2),
        ([64, 200], 4, 4, 64, 16, 20),
    ]
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    rows = [row for shape in shapes for row in _check_shape(cfg, dev, gen, backends, *shape)]
    return {"ok": all(r["passed"] for r in rows), "rows": rows, "device": machine_line(dev)}


def _check_shape(cfg, dev, gen, backends, lens, hq, hkv, d, blk, topk) -> list[dict]:
    """``run_check``'s rows of one shape: every backend's output and gradient errors."""
    from .ops.naive import moba_attn_naive

    dtype = DTYPES[cfg.dtype]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32,
                      device=dev)
    n = sum(lens)
    q = torch.randn(n, hq, d, device=dev, generator=gen).to(dtype)
    k = torch.randn(n, hkv, d, device=dev, generator=gen).to(dtype)
    v = torch.randn(n, hkv, d, device=dev, generator=gen).to(dtype)
    g = torch.randn(n, hq, d, device=dev, generator=gen).to(dtype)
    sel = moba_select(q, k, cu, cu, block_size=blk, topk=topk)

    def grads_of(fn, inputs):
        xs = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*xs)
        return [out.detach()] + list(torch.autograd.grad(out, xs, g.to(out.dtype)))

    def naive(dt):
        return lambda a, b, c: moba_attn_naive(a, b, c, cu, cu, block_size=blk, topk=topk,
                                               compute_dtype=dt, selection=sel)[0]

    def fast(backend):
        return lambda a, b, c: moba_attn_varlen_func(a, b, c, cu, cu, max(lens), max(lens),
                                                     block_size=blk, topk=topk, backend=backend)

    ref = grads_of(naive(torch.float64), [t.double() for t in (q, k, v)])
    base = grads_of(naive(dtype), (q, k, v))  # PyTorch's own error in this dtype
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    rows = []
    for backend in backends:
        got = grads_of(fast(backend), (q, k, v))
        errs = [(x.double() - r).abs().max().item() for x, r in zip(got, ref)]
        bases = [(x.double() - r).abs().max().item() for x, r in zip(base, ref)]
        passed = all(e <= (2 if i == 0 else 3) * b + floor for i, (e, b) in enumerate(zip(errs, bases)))
        rows.append({"backend": backend, "shape": f"lens{lens}-H{hq}-Hkv{hkv}-D{d}-B{blk}-k{topk}",
                     "dtype": cfg.dtype, "err_out": errs[0], "err_dq": errs[1],
                     "err_dk": errs[2], "err_dv": errs[3], "torch_err_out": bases[0],
                     "passed": passed})
    return rows


# ----------------------------------------------------------------------------- output
def format_table(result: dict) -> str:
    """A short fixed-width table: one line per (T, mode, provider)."""
    rows = result["rows"]
    dense = [k for k in (rows[0] if rows else {}) if k.startswith("speedup_vs_")]
    head = f"{'T':>8} {'mode':>8} {'provider':>14} {'ms':>10} {'TFLOP/s':>8} {'peak MiB':>9}"
    head += "".join(f" {('x ' + d[len('speedup_vs_'):]):>12}" for d in dense)
    lines = [result["machine"], head]
    for r in rows:
        mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        line = f"{r['T']:>8} {r['mode']:>8} {r['provider']:>14} {r['ms']:>10.2f} {r['tflops']:>8.3f} {mem:>9}"
        for d in dense:
            s = r.get(d)
            line += f" {('-' if s is None else f'{s:.2f}x'):>12}"
        if r.get("error"):
            line += f"  ({r['error']})"
        lines.append(line)
    return "\n".join(lines)


def write_results(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json, results.csv and (with matplotlib) plot.png under ``out_dir``; the
    returned dict has a ``png`` entry only when the plot was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    rows = result["rows"]
    if rows:
        fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        with paths["csv"].open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    try:
        plot_results(result, out / "plot.png")
    except ImportError:
        print(PLOT_HINT)
    else:
        paths["png"] = out / "plot.png"
    return paths


def plot_results(result: dict, path: Path) -> None:
    """The time and useful-TFLOP/s panels; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    modes = sorted({r["mode"] for r in rows}, key=["fwd", "fwd+bwd"].index) or ["fwd"]
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for j, mode in enumerate(modes):
        for name in dict.fromkeys(r["provider"] for r in rows):
            pts = [(r["T"], r["ms"]) for r in rows if r["mode"] == mode and r["provider"] == name
                   and r["ms"] == r["ms"]]
            if pts:
                axes[0][j].plot(*zip(*pts), marker="o", label=name)
            sp = [(r["T"], r["tflops"]) for r in rows if r["mode"] == mode and r["provider"] == name
                  and r["ms"] == r["ms"]]
            if sp:
                axes[1][j].plot(*zip(*sp), marker="o", label=name)
        axes[0][j].set(xscale="log", yscale="log", title=f"{mode}: time", xlabel="tokens per sequence",
                       ylabel="ms (median)")
        axes[1][j].set(xscale="log", title=f"{mode}: useful TFLOP/s (attended keys only)",
                       xlabel="tokens per sequence", ylabel="TFLOP/s")
        for ax in axes[:, j]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    c = result["config"]
    fig.suptitle(f"MoBA block {c['block_size']} top-{c['topk']}, batch {c['batch']}, {c['heads']}/"
                 f"{c['kv_heads']} heads, D={c['head_dim']}, {c['dtype']}, {c['routing']} routing\n"
                 f"{result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def env_report() -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {"machine": machine_line(dev), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "triton_kernels": triton_available(dev), "providers": default_providers(dev)}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


# ----------------------------------------------------------------------------- CLI glue
def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1
        if part.endswith("k"):
            part, mult = part[:-1], 1024
        elif part.endswith("m"):
            part, mult = part[:-1], 1024 * 1024
        out.append(int(float(part) * mult))
    return out


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="time MoBA against dense causal attention on this device")
    d = BenchConfig()
    p.add_argument("--seqlens", type=_ints, default=d.seqlens, help="comma list, e.g. 2k,8k,32k")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--heads", type=int, default=d.heads, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default = heads")
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--topk", type=int, default=d.topk, help="blocks per query, own block included")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default=d.dtype)
    p.add_argument("--device", default=d.device)
    p.add_argument("--providers", type=lambda s: s.split(","), default=None,
                   help="comma list of: " + ", ".join(sorted(_providers())))
    p.add_argument("--modes", type=lambda s: s.split(","), default=d.modes, help="fwd,fwd+bwd")
    p.add_argument("--routing", choices=["random", "local"], default=d.routing)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--out", default=d.out, help="folder for results.json/csv and plot.png")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=_cmd_bench)

    c = sub.add_parser("check", help="fast paths vs the reference on this device")
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    c.set_defaults(func=_cmd_check)

    e = sub.add_parser("env", help="versions, device and available backends")
    e.set_defaults(func=_cmd_env)


def _cmd_bench(args) -> int:
    cfg = BenchConfig(seqlens=args.seqlens, batch=args.batch, heads=args.heads,
                      kv_heads=args.kv_heads, head_dim=args.head_dim, block_size=args.block_size,
                      topk=args.topk, dtype=args.dtype, device=args.device,
                      providers=args.providers, modes=args.modes, routing=args.routing,
                      repeats=args.repeats, check=args.check, out=args.out, seed=args.seed)
    result = run_benchmark(cfg)
    paths = write_results(result, cfg.out)
    if result["check"] is not None:
        print(_format_check(result["check"]))
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if result["check"] is None or result["check"]["ok"] else 1


def _format_check(check: dict) -> str:
    lines = [f"correctness vs fp64 reference ({check['device']}):"]
    for r in check["rows"]:
        lines.append(f"  {'PASS' if r['passed'] else 'FAIL'} {r['backend']:>6} {r['shape']:<38} "
                     f"out {r['err_out']:.1e} (torch {r['torch_err_out']:.1e}) "
                     f"dq {r['err_dq']:.1e} dk {r['err_dk']:.1e} dv {r['err_dv']:.1e}")
    return "\n".join(lines)


def _cmd_check(args) -> int:
    check = run_check(BenchConfig(device=args.device, dtype=args.dtype))
    print(_format_check(check))
    print("all checks passed" if check["ok"] else "SOME CHECKS FAILED")
    return 0 if check["ok"] else 1


def _cmd_env(args) -> int:
    for k, v in env_report().items():
        print(f"{k:>15}: {v}")
    return 0


__all__ = [
    "BenchConfig",
    "cuda_event_ms",
    "env_report",
    "format_table",
    "local_walk",
    "make_inputs",
    "plot_results",
    "run_benchmark",
    "run_check",
    "write_results",
]
