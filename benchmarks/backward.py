"""MoBA forward+backward through ``moba_attn_func`` against dense causal SDPA (cuDNN, FLASH).

For every job (setting:length) it times one training call, forward and backward (gating
included, gradients of q, k and v), in one run on random q/k/v (random routing): MoBA on
``[batch, T, H, D]`` tensors and SDPA with the CUDNN_ATTENTION and FLASH_ATTENTION backends
(``enable_gqa`` for GQA), plus each call's peak-memory rise (inputs excluded, gradients
included). Before any timing, every setting's output and gradients are checked against the
fp64 reference on ``topk + 2`` blocks (abort on failure). Settings as in forward.py.

    python benchmarks/backward.py --out bench_out                # the default jobs, ~3 min
    python benchmarks/backward.py --jobs flashmoba:512K,paper:1M --out bench_out   # ~6 min
    python benchmarks/backward.py --smoke --out /tmp/bwd         # CPU, seconds
"""

from __future__ import annotations

import common
import torch
from forward import dense_backends, sdpa_call

from moba_attn import moba_attn_func, prepare_layout

NAME = "backward"
DEFAULT_JOBS = "paper:128K,flashmoba:8K,flashmoba:128K,flashmoba:256K,gqa:8K,gqa:32K,gqa:128K"
SMOKE_JOBS = "paper:320,flashmoba:200,gqa:300"
COLUMNS = [("setting", "setting", "s"), ("T", "T", "tokens"),
           ("MoBA fwd+bwd ms", "moba_ms", ".2f"), ("cuDNN ms", "cudnn_ms", ".2f"),
           ("FLASH ms", "flash_ms", ".2f"), ("SDPA ms", "sdpa_ms", ".2f"),
           ("x cuDNN", "x_cudnn", "x"), ("x FLASH", "x_flash", "x"), ("x SDPA", "x_sdpa", "x"),
           ("TFLOP/s", "moba_tflops", ".3g"), ("peak MiB MoBA / cuDNN", "peaks", "s")]
PLOT = {"x": "T", "xlabel": "tokens per sequence", "by": "setting", "panels": [
    {"title": "forward+backward ms (median)", "ys": ["moba_ms", "cudnn_ms", "flash_ms",
                                                     "sdpa_ms"], "logy": True, "ylabel": "ms"},
    {"title": "speed-up (dense ms / MoBA ms)", "ys": ["x_cudnn", "x_flash", "x_sdpa"],
     "ylabel": "x", "hline": 1.0},
]}


def train_call(fwd, leaves, dout):
    """One forward+backward: fresh gradients (allocated inside the call), then backward."""
    def run():
        for x in leaves:
            x.grad = None
        fwd().backward(dout)
    return run


def run_job(setting, t: int, args, device, dtype, backend: str) -> dict:
    b, hq, d, bsz, topk = setting.batch, setting.hq, setting.d, setting.block, setting.topk
    q, k, v = common.random_qkv(setting, t, device, dtype, seed=args.seed + t, grad=True)
    dout = torch.randn_like(q)
    layout = prepare_layout(common.seq_offsets(b, t, "cpu"), block_size=bsz)  # FLOP counts
    keys, dense_keys = layout.attended_keys(topk), layout.dense_keys()
    row = {"setting": setting.name, "T": t, "batch": b, "hq": hq, "hkv": setting.hkv, "d": d,
           "block": bsz, "topk": topk, "backend": backend, "keys_share": keys / dense_keys}

    def moba():
        return moba_attn_func(q, k, v, block_size=bsz, topk=topk, backend=backend,
                              config=args.moba_config)

    m = common.measure(train_call(moba, (q, k, v), dout), device, args.repeats)
    row["moba_ms"], row["moba_peak_mib"] = m["ms"], m["peak_mib"]
    row["moba_tflops"] = common.tflops(keys, hq, d, m["ms"], common.FWD_BWD)
    common.free_memory(device)
    if not args.no_dense:
        for label, sdpa_backend in dense_backends(device):
            def dense(sdpa_backend=sdpa_backend):
                return sdpa_call(q, k, v, sdpa_backend)
            try:
                m = common.measure(train_call(dense, (q, k, v), dout), device, args.repeats)
            except RuntimeError as err:  # a backend refusing the shape, or out of memory
                row[f"{label}_error"] = common.short_error(err)
                common.free_memory(device)
                continue
            row[f"{label}_ms"], row[f"{label}_peak_mib"] = m["ms"], m["peak_mib"]
            row[f"{label}_tflops"] = common.tflops(dense_keys, hq, d, m["ms"], common.FWD_BWD)
            row[f"x_{label}"] = common.ratio(m["ms"], row["moba_ms"])
            common.free_memory(device)
    base = row.get("cudnn_peak_mib", row.get("sdpa_peak_mib"))
    if row["moba_peak_mib"] is not None:
        row["peaks"] = f"{row['moba_peak_mib']:.0f} / " + ("-" if base is None else f"{base:.0f}")
    for x in (q, k, v):
        x.grad = None
    return row


def main(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--jobs", default=None, help=f"SETTING:TOKENS list (default {DEFAULT_JOBS})")
    p.add_argument("--no-dense", action="store_true", help="skip the SDPA baselines")
    p.add_argument("--config", default=None, metavar="JSON",
                   help='MobaConfig fields, e.g. \'{"dkdv_tile": [64, 64, 4, 3]}\'')
    p.add_argument("--repeats", type=int, default=3, help="timed calls on the CPU")
    args = p.parse_args(argv)
    if common.handle_plot_only(args):
        return
    common.run_setting_jobs(args, name=NAME, title="MoBA forward+backward vs dense causal SDPA",
                            default_jobs=DEFAULT_JOBS, smoke_jobs=SMOKE_JOBS, run_job=run_job,
                            columns=COLUMNS, plot_spec=PLOT, grads=True, varlen=False)


if __name__ == "__main__":
    main()
