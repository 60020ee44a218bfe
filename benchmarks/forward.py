"""MoBA forward through the public functions against dense causal SDPA (cuDNN and FLASH).

For every job (setting:length) it times, in one run and on random q/k/v (random routing):
``moba_attn_func`` on ``[batch, T, H, D]`` tensors (no host sync per call), the same call
replayed from a CUDA graph (kernel time without launch overhead), ``moba_attn_varlen_func``
with a layout prepared once (``validate=False``), and SDPA with the CUDNN_ATTENTION and
FLASH_ATTENTION backends (``enable_gqa`` for GQA), plus each call's peak-memory rise;
``--gate`` adds the gate alone. Before any timing, every setting's public functions are
checked against the fp64 reference on ``topk + 2`` blocks (abort on failure).

Settings: paper = 1 seq, 8 heads, D=128, block 4096, top-12; flashmoba =
batch 2, 16 heads, block 128, top-8; gqa = 32 q / 8 kv heads, block 512, top-3.

    python benchmarks/forward.py --out bench_out                 # the default jobs, ~4 min
    python benchmarks/forward.py --jobs paper:1M,gqa:32K --out bench_out
    python benchmarks/forward.py --smoke --out /tmp/fwd          # CPU, seconds
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F

from moba_attn import moba_attn_func, moba_attn_varlen_func, prepare_layout
from moba_attn.ops.backends import resolve

NAME = "forward"
DEFAULT_JOBS = ("paper:128K,paper:1M,flashmoba:8K,flashmoba:128K,flashmoba:512K,gqa:8K,"
                "gqa:32K,gqa:128K")
SMOKE_JOBS = "paper:320,flashmoba:200,gqa:300"
COLUMNS = [("setting", "setting", "s"), ("T", "T", "tokens"), ("schedule", "schedule", "s"),
           ("MoBA ms", "moba_ms", ".2f"), ("graph ms", "graph_ms", ".2f"),
           ("varlen ms", "varlen_ms", ".2f"), ("gate ms", "gate_ms", ".2f"),
           ("cuDNN ms", "cudnn_ms", ".2f"), ("FLASH ms", "flash_ms", ".2f"),
           ("SDPA ms", "sdpa_ms", ".2f"), ("x cuDNN", "x_cudnn", "x"), ("x FLASH", "x_flash", "x"),
           ("x SDPA", "x_sdpa", "x"), ("TFLOP/s", "moba_tflops", ".3g"),
           ("peak MiB MoBA / cuDNN", "peaks", "s")]
PLOT = {"x": "T", "xlabel": "tokens per sequence", "by": "setting", "panels": [
    {"title": "forward ms (median)", "ys": ["moba_ms", "graph_ms", "varlen_ms", "cudnn_ms",
                                            "flash_ms", "sdpa_ms"], "logy": True, "ylabel": "ms"},
    {"title": "speed-up (dense ms / MoBA ms)", "ys": ["x_cudnn", "x_flash", "x_sdpa"],
     "ylabel": "x", "hline": 1.0},
]}


def dense_backends(device: torch.device) -> list[tuple[str, object]]:
    """``(label, SDPBackend)``: cuDNN and FLASH on the GPU, torch's own choice on the CPU."""
    if device.type != "cuda":
        return [("sdpa", None)]
    from torch.nn.attention import SDPBackend

    return [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]


def sdpa_call(q, k, v, sdpa_backend):
    """Causal SDPA on the ``[B, T, H, D]`` tensors (transposed views, as transformers passes
    them), returning ``[B, T, Hq, D]``."""
    from contextlib import nullcontext

    from torch.nn.attention import sdpa_kernel

    gqa = q.shape[2] != k.shape[2]
    ctx = nullcontext() if sdpa_backend is None else sdpa_kernel([sdpa_backend])
    with ctx:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True, enable_gqa=gqa)
    return o.transpose(1, 2)


def schedule_of(layout, q_flat, setting, backend: str, config) -> str:
    """Which path the forward takes: the exactly-dense cuDNN shortcut, the Triton schedule
    (``plan_schedule``), or the torch path."""
    if backend != "triton":
        return backend
    if (layout.is_dense(setting.topk) and q_flat.is_cuda
            and q_flat.dtype in (torch.float16, torch.bfloat16) and setting.d <= 128):
        return "dense: cuDNN"
    from moba_attn.ops.triton.forward import plan_schedule

    return plan_schedule(layout, q_flat, setting.hkv, setting.topk, config)


def run_job(setting, t: int, args, device, dtype, backend: str) -> dict:
    config = args.moba_config
    b, hq, d, bsz, topk = setting.batch, setting.hq, setting.d, setting.block, setting.topk
    q, k, v = common.random_qkv(setting, t, device, dtype, seed=args.seed + t)
    cu = common.seq_offsets(b, t, device)
    layout = prepare_layout(cu, cu, block_size=bsz)  # once per batch: one host sync, here
    qf, kf, vf = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    keys, dense_keys = layout.attended_keys(topk), layout.dense_keys()
    row = {"setting": setting.name, "T": t, "batch": b, "hq": hq, "hkv": setting.hkv, "d": d,
           "block": bsz, "topk": topk, "backend": backend,
           "schedule": schedule_of(layout, qf, setting, backend, config),
           "keys_share": keys / dense_keys}
    kw = {"block_size": bsz, "topk": topk, "backend": backend, "config": config}
    reps = args.repeats

    @torch.no_grad()
    def moba():
        return moba_attn_func(q, k, v, **kw)

    @torch.no_grad()
    def moba_varlen():
        return moba_attn_varlen_func(qf, kf, vf, cu, cu, t, t, layout=layout, validate=False,
                                     **kw)

    m = common.measure(moba, device, reps)
    row["moba_ms"], row["moba_peak_mib"] = m["ms"], m["peak_mib"]
    row["moba_tflops"] = common.tflops(keys, hq, d, m["ms"])
    if not args.no_graph and device.type == "cuda":
        row["graph_ms"], row["graph_error"] = common.graph_ms(moba, device)
    if not args.no_varlen:
        row["varlen_ms"] = common.time_ms(moba_varlen, device, reps)
    if args.gate:
        be = resolve(backend, device, dtype, d, bsz, topk)

        @torch.no_grad()
        def gate():
            return be.gate(qf, kf, layout, topk, config)

        row["gate_ms"] = common.time_ms(gate, device, reps) if not layout.is_dense(topk) else 0.0
        row["gate_share"] = common.ratio(row["gate_ms"], row["moba_ms"])
    common.free_memory(device)
    if not args.no_dense:
        for label, sdpa_backend in dense_backends(device):
            @torch.no_grad()
            def dense(sdpa_backend=sdpa_backend):
                return sdpa_call(q, k, v, sdpa_backend)
            try:
                m = common.measure(dense, device, reps)
            except RuntimeError as err:  # a backend refusing the shape, or out of memory
                row[f"{label}_error"] = common.short_error(err)
                common.free_memory(device)
                continue
            row[f"{label}_ms"], row[f"{label}_peak_mib"] = m["ms"], m["peak_mib"]
            row[f"{label}_tflops"] = common.tflops(dense_keys, hq, d, m["ms"])
            row[f"x_{label}"] = common.ratio(m["ms"], row["moba_ms"])
    base = row.get("cudnn_peak_mib", row.get("sdpa_peak_mib"))
    if row["moba_peak_mib"] is not None:
        row["peaks"] = f"{row['moba_peak_mib']:.0f} / " + ("-" if base is None else f"{base:.0f}")
    return row


def main(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--jobs", default=None, help=f"SETTING:TOKENS list (default {DEFAULT_JOBS})")
    p.add_argument("--gate", action="store_true", help="also time the gate alone (gate share)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay column")
    p.add_argument("--no-varlen", action="store_true", help="skip moba_attn_varlen_func")
    p.add_argument("--no-dense", action="store_true", help="skip the SDPA baselines")
    p.add_argument("--config", default=None, metavar="JSON",
                   help='MobaConfig fields for a sweep, e.g. \'{"schedule": "partials"}\'')
    p.add_argument("--repeats", type=int, default=3, help="timed calls on the CPU")
    args = p.parse_args(argv)
    if common.handle_plot_only(args):
        return
    common.run_setting_jobs(args, name=NAME, title="MoBA forward vs dense causal SDPA",
                            default_jobs=DEFAULT_JOBS, smoke_jobs=SMOKE_JOBS, run_job=run_job,
                            columns=COLUMNS, plot_spec=PLOT, grads=False)


if __name__ == "__main__":
    main()
