"""The GPU gate alone: TF32 tensor cores (the default) against IEEE fp32, time and how often
the two select the same blocks, on random q/k (random routing).

For every job it times the gate (centroids + fused score and top-(k-1)) of the Triton
backend with ``MobaConfig(gate_precision="tf32")`` and ``"ieee"`` on a prepared layout, and
counts the (row, head) pairs whose selected sets are equal.

    python benchmarks/gate.py --out bench_out --jobs flashmoba:128K,flashmoba:512K   # ~1 min
"""

from __future__ import annotations

import common

from moba_attn import MobaConfig, prepare_layout
from moba_attn.ops.backends import resolve

NAME = "gate"
DEFAULT_JOBS = "flashmoba:128K,flashmoba:512K,gqa:128K,paper:1M"
COLUMNS = [("setting", "setting", "s"), ("T", "T", "tokens"), ("TF32 ms", "tf32_ms", ".2f"),
           ("IEEE ms", "ieee_ms", ".2f"), ("IEEE / TF32", "slowdown", "x"),
           ("same selection", "agree", ".4%")]


def main(argv=None) -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--jobs", default=DEFAULT_JOBS)
    args = parser.parse_args(argv)
    if common.handle_plot_only(args):
        return
    device = common.pick_device(args, NAME)
    settings = common.SMOKE_SETTINGS if args.smoke else common.SETTINGS
    jobs = common.parse_jobs("flashmoba:256,gqa:300" if args.smoke else args.jobs, settings)
    result = common.new_result(NAME, "GPU gate: TF32 against IEEE fp32", device,
                               {"jobs": [f"{s.name}:{t}" for s, t in jobs]})
    dtype = common.work_dtype(device)
    for setting, t in jobs:
        q, k, _ = common.random_qkv(setting, t, device, dtype, seed=args.seed + t)
        b = setting.batch
        q, k = q.reshape(b * t, setting.hq, setting.d), k.reshape(b * t, setting.hkv, setting.d)
        lay = prepare_layout(common.seq_offsets(b, t, device), block_size=setting.block)
        be = resolve(common.pick_backend(args, device), device, dtype, setting.d, setting.block,
                     setting.topk)
        row = {"setting": setting.name, "T": t}
        sel = {}
        for prec in ("tf32", "ieee"):
            cfg = MobaConfig(gate_precision=prec)
            sel[prec] = be.gate(q, k, lay, setting.topk, cfg)
            row[f"{prec}_ms"] = common.time_ms(lambda cfg=cfg: be.gate(q, k, lay, setting.topk,
                                                                       cfg), device)
        same = (sel["tf32"].sort(-1).values == sel["ieee"].sort(-1).values).all(-1)
        row["agree"] = same.float().mean().item()
        row["slowdown"] = common.ratio(row["ieee_ms"], row["tf32_ms"])
        result["rows"].append(row)
        q = k = sel = None
        common.free_memory(device)
    result["plot"] = {"x": "T", "xlabel": "tokens per sequence", "by": "setting", "panels": [
        {"title": "gate ms", "ys": ["tf32_ms", "ieee_ms"], "logy": True, "ylabel": "ms"}]}
    common.finish(result, args.out, NAME, COLUMNS)


if __name__ == "__main__":
    main()
