"""Regression check against an older checkout, in one run on one GPU: the forward and
forward+backward of each job through this tree's public ``moba_attn_func`` against the same
job through the baseline tree's fastest entry (its private kernel entry with a fixed
``cu_seqlens``, what its benchmarks timed), each tree in its own process.

    git worktree add /tmp/base 60056d5
    python benchmarks/regress.py --baseline /tmp/base/src --out bench_out       # ~3 min

``--baseline`` is the baseline's ``src`` folder. Jobs as in forward.py (setting:length).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import common

NAME = "regress"
DEFAULT_JOBS = ("paper:128K,paper:512K,paper:1M,flashmoba:8K,flashmoba:128K,flashmoba:512K,"
                "gqa:8K,gqa:32K")
COLUMNS = [("setting", "setting", "s"), ("T", "T", "tokens"), ("mode", "mode", "s"),
           ("this tree ms", "new_ms", ".2f"), ("baseline ms", "base_ms", ".2f"),
           ("change", "change", "s")]

_CHILD = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import common
jobs = common.parse_jobs(sys.argv[3], common.SETTINGS)
entry = sys.argv[4]
rows = []
for setting, t in jobs:
    for mode in ("fwd", "fwd+bwd"):
        q, k, v = common.random_qkv(setting, t, "cuda", torch.bfloat16, seed=t, grad=mode != "fwd")
        b, hq, hkv, d = setting.batch, setting.hq, setting.hkv, setting.d
        if entry == "public":
            from moba_attn import moba_attn_func
            def call():
                return moba_attn_func(q, k, v, block_size=setting.block, topk=setting.topk)
        else:  # the baseline's private kernel entry, fixed cu_seqlens
            from moba_attn.ops.triton_attention import moba_attn_triton
            cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device="cuda")
            qf, kf, vf = (x.reshape(b * t, x.shape[2], d) for x in (q, k, v))
            def call():
                return moba_attn_triton(qf, kf, vf, cu, cu, t, t, block_size=setting.block,
                                        topk=setting.topk, softmax_scale=d ** -0.5)[0]
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return call()
        else:
            g = torch.randn(b * t * hq * d, device="cuda", dtype=torch.bfloat16)
            def fn():
                out = call()
                out.backward(g.view(out.shape))
        rows.append({"setting": setting.name, "T": t, "mode": mode,
                     "ms": common.time_ms(fn, torch.device("cuda"))})
        del q, k, v
        torch.cuda.empty_cache()
print("RESULT " + json.dumps(rows))
'''


def run_tree(src: str, jobs: str, entry: str) -> list[dict]:
    here = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=src)
    proc = subprocess.run([sys.executable, "-c", _CHILD, src, here, jobs, entry], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{entry} run failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--baseline", required=True, help="the baseline checkout's src folder")
    parser.add_argument("--jobs", default=DEFAULT_JOBS)
    args = parser.parse_args(argv)
    if common.handle_plot_only(args):
        return
    device = common.pick_device(args, NAME)
    result = common.new_result(NAME, "This tree's public functions against a baseline tree's "
                               "kernel entry", device, {"jobs": args.jobs,
                                                       "baseline": args.baseline})
    src = str(common.ROOT / "src")
    new = run_tree(src, args.jobs, "public")
    base = run_tree(args.baseline, args.jobs, "baseline")
    for n, b in zip(new, base):
        change = n["ms"] / b["ms"] - 1
        result["rows"].append({"setting": n["setting"], "T": n["T"], "mode": n["mode"],
                               "new_ms": n["ms"], "base_ms": b["ms"], "change_frac": change,
                               "change": f"{change:+.1%}"})
    result["plot"] = {"x": "T", "xlabel": "tokens per sequence", "by": "setting", "panels": [
        {"title": "this tree ms / baseline ms - 1", "y": "change_frac", "series": "mode",
         "hline": 0.0}]}
    common.finish(result, args.out, NAME, COLUMNS)


if __name__ == "__main__":
    main()
