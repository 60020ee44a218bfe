"""Shared code of the benchmark scripts: settings, timing, FLOPs, the machine line, the fp64
reference checks and the output files (JSON, CSV, PNG).

Definitions used by every script (and by ``RESULTS.md``):

- timing: median milliseconds after one warm-up call. On CUDA, a call that takes at least
  ``LONG_MS`` after the warm-up is timed twice more with CUDA events (one warm-up + 3 event
  timings); shorter calls go to ``triton.testing.do_bench`` (median, L2 flushed between
  calls). On the CPU: ``time.perf_counter`` medians.
- useful FLOPs: forward ``4 * D * keys * heads``, where ``keys`` counts only the keys a query
  attends (MoBA: its own block causally plus the whole selected blocks; dense: the causal
  triangle); the backward is 2.5x the forward, so forward+backward is 3.5x.
- peak memory: the rise of the CUDA allocator's peak over what was allocated before the call
  (the inputs), measured on the warm-up call. None on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
K = 1024
LONG_MS = 50.0  # from here on: one warm-up + 3 CUDA-event timings instead of do_bench
PLOT_HINT = "matplotlib is not installed: no PNG (pip install matplotlib, or moba-attn[plot])"


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One attention shape of the benchmarks: batch, query / key-value heads, head dim,
    MoBA block size and top-k (counting the own block)."""

    name: str
    batch: int
    hq: int
    hkv: int
    d: int
    block: int
    topk: int

    def check_len(self) -> int:
        """Tokens per sequence of the correctness check: ``topk + 2`` blocks, so the last
        queries choose ``topk - 1`` of ``topk + 1`` earlier blocks (sparse)."""
        return (self.topk + 2) * self.block


SETTINGS = {
    "paper": Setting("paper", 1, 8, 8, 128, 4096, 12),  # the MoBA paper's 1M setting
    "flashmoba": Setting("flashmoba", 2, 16, 16, 128, 128, 8),  # FlashMoBA's own benchmark
    "gqa": Setting("gqa", 1, 32, 8, 128, 512, 3),  # GQA 32 q / 8 kv heads
}
# the same kinds of call at CPU size (--smoke): GQA kept, awkward lengths in the jobs
SMOKE_SETTINGS = {
    "paper": Setting("paper", 1, 2, 2, 32, 64, 3),
    "flashmoba": Setting("flashmoba", 2, 2, 2, 32, 32, 3),
    "gqa": Setting("gqa", 1, 4, 2, 32, 64, 2),
}


def parse_tokens(text: str) -> int:
    """``"128K"`` -> 131072, ``"1M"`` -> 1048576, ``"300"`` -> 300."""
    s = str(text).strip().upper()
    mult = {"K": K, "M": K * K}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def fmt_tokens(n) -> str:
    if n is None:
        return "-"
    n = int(n)
    for unit, size in (("M", K * K), ("K", K)):
        if n >= size and n % (size // 4) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def parse_jobs(text: str, settings: dict[str, Setting]) -> list[tuple[Setting, int]]:
    """``"paper:128K,gqa:8192"`` -> ``[(SETTINGS["paper"], 131072), ...]``."""
    jobs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, length = part.partition(":")
        if name not in settings or not length:
            raise SystemExit(f"bad job {part!r}: expected SETTING:TOKENS with SETTING in "
                             f"{sorted(settings)}, e.g. paper:128K")
        jobs.append((settings[name], parse_tokens(length)))
    return jobs


# ----------------------------------------------------------------------------- arguments
def base_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every script shares: --out, --smoke, --backend, --plot-only, --seed."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="folder for NAME.json, NAME.csv, NAME.png")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU in seconds (torch backend unless --backend)")
    p.add_argument("--backend", default=None,
                   help="MoBA backend: triton (default on the GPU), torch (default with "
                        "--smoke); triton on the CPU needs TRITON_INTERPRET=1")
    p.add_argument("--plot-only", metavar="JSON", default=None,
                   help="redraw the PNG of a results JSON and exit")
    p.add_argument("--seed", type=int, default=0)
    return p


def handle_plot_only(args) -> bool:
    if args.plot_only is None:
        return False
    png = plot(args.plot_only)
    if png is not None:
        print(f"wrote {png}")
    return True


def pick_device(args, script: str) -> torch.device:
    if args.smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU; --smoke runs tiny shapes on the CPU")
    return torch.device("cuda")


def pick_backend(args, device: torch.device) -> str:
    return args.backend or ("triton" if device.type == "cuda" else "torch")


def work_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the GPU; fp32 on the CPU (the Triton interpreter's bf16 dot is wrong)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_event_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call, CUDA events around it (no warm-up)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def _timed_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median after a warm-up that already ran (see the module docstring)."""
    if device.type == "cuda":
        first = cuda_event_ms(fn)
        if first >= LONG_MS:
            return statistics.median([first, cuda_event_ms(fn), cuda_event_ms(fn)])
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median milliseconds of ``fn`` after one warm-up call (``repeats``: CPU only)."""
    fn()
    sync(device)
    return _timed_ms(fn, device, repeats)


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> dict:
    """``{"ms", "peak_mib"}``: the median time (``time_ms``) and the peak-memory rise of the
    warm-up call over what was allocated before it (None on the CPU)."""
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {"ms": _timed_ms(fn, device, repeats), "peak_mib": peak}


def host_ms(fn: Callable[[], object], device: torch.device, calls: int = 1000) -> float:
    """Median host (CPU) milliseconds per call over ``calls`` calls issued without
    synchronising. Once the device is slower than the host the launch queue fills and this
    shows the device's pace instead."""
    fn()
    sync(device)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    sync(device)
    return statistics.median(times) * 1e3


def graph_ms(fn: Callable[[], object], device: torch.device) -> tuple[float | None, str | None]:
    """``(ms, None)``: the median time of ``fn`` captured once in a ``torch.cuda.CUDAGraph``
    (fixed inputs) and replayed; ``(None, reason)`` when the call does not capture."""
    if device.type != "cuda":
        return None, "CUDA graphs need a GPU"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compilation and allocator warm-up outside the capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # noqa: BLE001  e.g. a host sync inside the call
        torch.cuda.synchronize()
        return None, short_error(err)
    try:
        return time_ms(graph.replay, device), None
    finally:
        del graph
        torch.cuda.empty_cache()


def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- FLOPs
FWD_BWD = 3.5  # forward + backward = (1 + 2.5) x the forward


def tflops(keys: int, heads: int, head_dim: int, ms: float | None, factor: float = 1.0):
    """Useful TFLOP/s of ``keys`` attended keys (summed over query rows, per head)."""
    if ms is None or not ms > 0:
        return None
    return 4 * head_dim * keys * heads * factor / (ms * 1e-3) / 1e12


def ratio(num, den):
    """``num / den`` when both are measured, else None (a speed-up: dense ms / MoBA ms)."""
    return num / den if (num and den) else None


# ----------------------------------------------------------------------------- machine
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def commit() -> str:
    """``$COMMIT`` when set (a copy of the tree whose git metadata may be another's), else
    ``git rev-parse --short HEAD`` (plus ``+changes`` when src/ or benchmarks/ differ from
    it), else ``unknown``."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    head = _run(["git", "rev-parse", "--short", "HEAD"])
    if head is None:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src",
                  "benchmarks"])
    return head + ("+changes" if dirty else "")


def machine_info(device: torch.device) -> dict:
    """GPU (name, count, driver), versions, commit and date of this run."""
    info = {"date": time.strftime("%Y-%m-%d"), "time_utc": time.strftime("%H:%M:%SZ", time.gmtime()),
            "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
        drv = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = drv.splitlines()[0].strip() if drv else None
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = f"{platform.machine()} x{torch.get_num_threads()} threads"
    info.update(torch=torch.__version__, triton=_version("triton"),
                transformers=_version("transformers"), python=platform.python_version(),
                commit=commit())
    return info


def machine_line(info: dict) -> str:
    if info["device"] == "cuda":
        where = f"{info['gpu_count']} x {info['gpu']}" if info["gpu_count"] > 1 else info["gpu"]
        where += f" (driver {info['driver']})" if info.get("driver") else ""
    else:
        where = f"CPU {info['cpu']}"
    parts = [where, f"torch {info['torch']}", f"triton {info['triton'] or '-'}",
             f"transformers {info['transformers'] or '-'}", f"python {info['python']}",
             f"commit {info['commit']}", info["date"]]
    return ", ".join(parts)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def new_result(name: str, title: str, device: torch.device, settings: dict) -> dict:
    """The JSON skeleton every script fills: machine, command, settings, checks, rows."""
    info = machine_info(device)
    return {"benchmark": name, "title": title, "date": info["date"], "command": command_line(),
            "machine": info, "machine_line": machine_line(info), "settings": settings,
            "checks": [], "rows": []}


# ----------------------------------------------------------------------------- checks
def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in fp64."""
    ref = ref.detach().double()
    return float((got.detach().double() - ref).norm() / ref.norm().clamp_min(1e-300))


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error a check accepts: bf16/fp16 rounding, or fp32's."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def moba_reference(q, k, v, sel, *, block_size: int, scale: float | None = None,
                   dout=None, chunk: int = 512):
    """fp64 MoBA of an equal-length batch with a given selection, and its exact gradients.

    q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]``; ``sel [B * T, Hq, k-1]`` block indices inside
    each sequence (-1 = unused), as ``moba_attn.moba_select`` returns them. Query ``t``
    attends its own block's keys ``<= t`` and the whole selected blocks before its own.
    Returns ``out [B, T, Hq, D]`` fp64, or ``(out, (dq, dk, dv))`` when ``dout`` is given
    (closed-form attention backward). Memory grows with ``chunk * T`` (rows at a time).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    dev = q.device
    nb = -(-t // block_size)
    f64 = torch.float64
    out = torch.empty(b, t, hq, d, dtype=f64, device=dev)
    if dout is not None:
        dq = torch.empty_like(out)
        dk = torch.zeros(b, t, hkv, d, dtype=f64, device=dev)
        dv = torch.zeros_like(dk)
    key_pos = torch.arange(t, device=dev)
    key_blk = key_pos // block_size
    sel = sel.reshape(b, t, hq, -1).long()
    for bi in range(b):
        for h in range(hq):
            hk = h // group
            kk, vv = k[bi, :, hk].to(f64), v[bi, :, hk].to(f64)  # [T, D]
            for r0 in range(0, t, chunk):
                r1 = min(t, r0 + chunk)
                pos = key_pos[r0:r1]
                own = pos // block_size
                s = sel[bi, r0:r1, h]  # [c, k-1]
                picked = (s >= 0) & (s < own[:, None])
                hit = torch.zeros(r1 - r0, nb + 1, dtype=torch.bool, device=dev)
                hit.scatter_(1, torch.where(picked, s, nb), True)  # column nb: unused slots
                hit = hit[:, :nb]
                hit[torch.arange(r1 - r0, device=dev), own] = True
                mask = hit[:, key_blk] & (key_pos[None, :] <= pos[:, None])  # [c, T]
                qc = q[bi, r0:r1, h].to(f64)
                p = torch.softmax((qc @ kk.T * scale).masked_fill(~mask, float("-inf")), -1)
                o = p @ vv
                out[bi, r0:r1, h] = o
                if dout is not None:
                    do = dout[bi, r0:r1, h].to(f64)
                    dv[bi, :, hk] += p.T @ do
                    ds = p * (do @ vv.T - (do * o).sum(-1, keepdim=True))
                    dq[bi, r0:r1, h] = ds @ kk * scale
                    dk[bi, :, hk] += ds.T @ qc * scale
    return out if dout is None else (out, (dq, dk, dv))


def random_qkv(setting: Setting, t: int, device, dtype, *, seed: int, grad: bool = False):
    """Random ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` (random routing)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = [(setting.batch, t, h, setting.d) for h in (setting.hq, setting.hkv, setting.hkv)]
    return tuple(torch.randn(s, generator=gen, device=device, dtype=dtype).requires_grad_(grad)
                 for s in shapes)


def seq_offsets(batch: int, t: int, device) -> torch.Tensor:
    """``cu_seqlens`` of ``batch`` sequences of ``t`` tokens (int32)."""
    return torch.arange(0, (batch + 1) * t, t, dtype=torch.int32, device=device)


def check_moba(setting: Setting, *, device, dtype, backend: str, grads: bool,
               varlen: bool = True, config=None, seed: int = 0) -> dict:
    """The public functions against :func:`moba_reference` on ``setting.check_len()``
    tokens: ``moba_attn_func`` (output, and gradients when ``grads``) and
    ``moba_attn_varlen_func`` with a prepared layout (output). The reference uses the
    selection of the same backend's gate (``moba_select``), so it checks the attention
    exactly, with no gate near-ties in the way."""
    from moba_attn import moba_attn_func, moba_attn_varlen_func, moba_select, prepare_layout

    t, bsz = setting.check_len(), setting.block
    q, k, v = random_qkv(setting, t, device, dtype, seed=seed + 1)
    b = setting.batch
    cu = seq_offsets(b, t, device)
    sel = moba_select(q.flatten(0, 1), k.flatten(0, 1), cu, cu, block_size=bsz,
                      topk=setting.topk, backend=backend, config=config)
    dout = torch.randn(q.shape, generator=torch.Generator(device=device).manual_seed(seed + 2),
                       device=device, dtype=dtype) if grads else None
    ref = moba_reference(q, k, v, sel, block_size=bsz, dout=dout)
    ref_out, ref_grads = ref if grads else (ref, None)
    kw = {"block_size": bsz, "topk": setting.topk, "backend": backend, "config": config}
    x = [t_.detach().clone().requires_grad_(grads) for t_ in (q, k, v)]
    with torch.set_grad_enabled(grads):
        out = moba_attn_func(*x, **kw)
    errs = {"out": rel_err(out, ref_out)}
    if grads:
        got = torch.autograd.grad(out, x, dout)
        errs.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", got, ref_grads)})
    if varlen:
        layout = prepare_layout(cu, cu, block_size=bsz)
        with torch.no_grad():
            o2 = moba_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu,
                                       t, t, layout=layout, validate=False, **kw)
        errs["out_varlen"] = rel_err(o2.view_as(ref_out), ref_out)
    tol = tolerance(dtype)
    return {"setting": setting.name, "T": t, "batch": b, "hq": setting.hq, "hkv": setting.hkv,
            "d": setting.d, "block": bsz, "topk": setting.topk, "backend": backend,
            "dtype": str(dtype).removeprefix("torch."), "tol": tol,
            **{f"rel_err_{n}": e for n, e in errs.items()},
            "ok": all(e <= tol for e in errs.values())}


def report_checks(result: dict, out_dir, name: str) -> None:
    """Print every check; when one failed, write the JSON (checks only) and exit 1."""
    for c in result["checks"]:
        errs = ", ".join(f"{k.removeprefix('rel_err_')} {v:.1e}" for k, v in c.items()
                         if k.startswith("rel_err_"))
        what = " ".join(f"{k}={c[k]}" for k in ("setting", "case", "T", "block", "topk")
                        if k in c)
        print(f"check {'PASS' if c['ok'] else 'FAIL'} {what}: {errs} (tol {c['tol']:.0e})",
              flush=True)
    if not all(c["ok"] for c in result["checks"]):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
        raise SystemExit(f"correctness check failed: nothing timed (checks in {out / name}.json)")


# ----------------------------------------------------------------------------- output
def write_outputs(result: dict, out_dir, name: str) -> list[Path]:
    """``NAME.json``, ``NAME.csv`` (the rows) and ``NAME.png`` (drawn from the JSON)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, cs = out / f"{name}.json", out / f"{name}.csv"
    js.write_text(json.dumps(result, indent=1, default=str))
    rows = result["rows"]
    fields = list(dict.fromkeys(key for r in rows for key in r))
    with cs.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    written = [js, cs]
    png = plot(js)
    if png is not None:
        written.append(png)
    return written


def _points(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    pts = sorted((r[x], r[y]) for r in rows
                 if r.get(x) is not None and isinstance(r.get(y), (int, float))
                 and math.isfinite(r[y]))
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(json_path) -> Path | None:
    """Draw ``NAME.png`` next to a results JSON from its ``plot`` spec: one row of panels per
    spec panel, one column per value of ``plot["by"]``; a panel draws ``ys`` (one line per
    key) or ``y`` split into lines by ``series``, against ``x``. Returns None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print(PLOT_HINT)
        return None
    path = Path(json_path)
    data = json.loads(path.read_text())
    spec, rows = data["plot"], data["rows"]
    by = spec.get("by")
    groups = list(dict.fromkeys(r.get(by) for r in rows)) if by else [None]
    panels = spec["panels"]
    fig, axes = plt.subplots(len(panels), max(1, len(groups)), squeeze=False,
                             figsize=(4.8 * max(1, len(groups)), 3.4 * len(panels)))
    for i, panel in enumerate(panels):
        for j, group in enumerate(groups):
            ax = axes[i][j]
            sub = [r for r in rows if by is None or r.get(by) == group]
            x = panel.get("x", spec["x"])
            if "series" in panel:
                lines = [(str(s), [r for r in sub if r.get(panel["series"]) == s], panel["y"])
                         for s in dict.fromkeys(r.get(panel["series"]) for r in sub)]
            else:
                lines = [(panel.get("labels", {}).get(key, key), sub, key) for key in panel["ys"]]
            for label, part, key in lines:
                xs, ys = _points(part, x, key)
                if xs:
                    ax.plot(xs, ys, marker="o", label=label)
            if panel.get("logx", True):
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_tokens(v)))
            if panel.get("logy"):
                ax.set_yscale("log")
            if panel.get("hline") is not None:
                ax.axhline(panel["hline"], color="grey", lw=0.8, ls="--")
            title = panel.get("title", "")
            ax.set_title(f"{group}: {title}" if by else title, fontsize=9)
            ax.set_xlabel(panel.get("xlabel", spec.get("xlabel", x)), fontsize=8)
            ax.set_ylabel(panel.get("ylabel", ""), fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"{data['title']}\n{data['machine_line']}", fontsize=9)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt == "tokens":
        return fmt_tokens(value)
    if fmt == "x":
        return f"{value:.2f}x"
    if fmt in ("", "s"):
        return str(value)
    return format(value, fmt)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: ``columns`` are ``(header, key, format)``; format is a format spec,
    ``"tokens"`` (8K, 1M), ``"x"`` (a speed-up) or ``"s"`` (as is)."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(key), fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def finish(result: dict, out_dir, name: str, columns: list[tuple[str, str, str]],
           show: Callable[[dict], bool] | None = None) -> None:
    """Write the files, then print their paths and the table (last): the rows ``show``
    keeps (all by default), without the columns that none of them has."""
    paths = write_outputs(result, out_dir, name)
    print("wrote " + ", ".join(str(p) for p in paths))
    print(f"\n{result['title']}\n{result['machine_line']}\n`{result['command']}`\n")
    rows = [r for r in result["rows"] if show is None or show(r)]
    shown = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
    print(format_table(rows, shown))


def run_setting_jobs(args, *, name: str, title: str, default_jobs: str, smoke_jobs: str,
                     run_job: Callable, columns, plot_spec: dict, grads: bool,
                     varlen: bool = True) -> None:
    """The body of a script over ``setting:length`` jobs (forward.py, backward.py): the
    device and backend, the fp64 check of every setting (abort on failure), then
    ``run_job(setting, t, args, device, dtype, backend) -> row`` for each job, and the files."""
    args.moba_config = parse_config(args.config)
    device = pick_device(args, f"{name}.py")
    backend = pick_backend(args, device)
    dtype = work_dtype(device)
    settings = SMOKE_SETTINGS if args.smoke else SETTINGS
    jobs = parse_jobs(args.jobs or (smoke_jobs if args.smoke else default_jobs), settings)
    result = new_result(name, title, device,
                        {"backend": backend, "dtype": str(dtype), "smoke": args.smoke,
                         "config": args.config, "jobs": [(s.name, t) for s, t in jobs]})
    print(result["machine_line"], flush=True)
    result["plot"] = plot_spec
    for setting in dict.fromkeys(s for s, _ in jobs):
        result["checks"].append(check_moba(setting, device=device, dtype=dtype, backend=backend,
                                           grads=grads, varlen=varlen,
                                           config=args.moba_config, seed=args.seed))
        free_memory(device)
    report_checks(result, args.out, name)
    for setting, t in jobs:
        row = run_job(setting, t, args, device, dtype, backend)
        result["rows"].append(row)
        print(" ".join(f"{key}={row[key]:.3g}" if isinstance(row[key], float) else
                       f"{key}={row[key]}" for key in row), flush=True)
        free_memory(device)
    finish(result, args.out, name, columns)


def parse_config(text: str | None):
    """``--config '{"schedule": "partials"}'`` -> ``moba_attn.MobaConfig`` (None: defaults)."""
    from moba_attn import MobaConfig

    return MobaConfig(**json.loads(text)) if text else MobaConfig()

