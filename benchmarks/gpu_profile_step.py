"""Where a training step's time goes, MoBA against full attention, on one GPU.

For each ``--attn`` variant of a ``moba train`` preset: a few warm-up steps, then
``--profile-steps`` steps under ``torch.profiler``; writes the kernel table (CUDA time, top 40)
to ``OUT/profile_<attn>.txt`` and prints the step time. Then the attention op alone at the
preset's shapes (batch x T, q/kv heads, head dim, block size, top-k), forward and
forward+backward: MoBA through the public API (``moba_attn_varlen_func``, as the transformers
integration calls it) against SDPA FLASH_ATTENTION and CUDNN_ATTENTION with ``enable_gqa``.

    PYTHONPATH=src python benchmarks/gpu_profile_step.py --preset small --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from moba_attn import moba_attn_varlen_func
from moba_attn.training.config import PRESETS, TrainConfig
from moba_attn.training.data import load_corpus
from moba_attn.training.trainer import Run


def step_profile(preset: str, attn: str, warm: int, steps: int, out: str) -> dict:
    cfg = TrainConfig(
        preset=preset,
        attn=attn,
        device="cuda",
        steps=warm + steps + 2,
        eval_every=10**9,
        ckpt_every=10**9,
    ).resolved()
    corpus = load_corpus(cfg.data, cfg.tokenizer, cfg.corpus)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, tmp, corpus=corpus)
        for _ in range(warm):
            run.step()
        times = []
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                times.append(run.step()["step_time_s"])
        run.close()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    with open(os.path.join(out, f"profile_{attn}.txt"), "w") as fh:
        fh.write(f"{preset} attn={attn} step times (profiled) {times}\n{table}\n")
    print(f"# {preset} {attn}: step {min(times):.3f} s (under the profiler)")
    print("\n".join(table.splitlines()[:18]))
    return {"attn": attn, "step_s_profiled": times}


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median")


def op_bench(preset: str) -> dict:
    p = PRESETS[preset]
    cfg = TrainConfig(preset=preset).resolved()
    batch, t, hq, hkv = cfg.batch_size, cfg.seq_len, p.num_heads, p.num_kv_heads
    d = p.hidden_size // p.num_heads
    g = {"device": "cuda", "dtype": torch.bfloat16}
    q = torch.randn(batch * t, hq, d, **g, requires_grad=True)
    k = torch.randn(batch * t, hkv, d, **g, requires_grad=True)
    v = torch.randn(batch * t, hkv, d, **g, requires_grad=True)
    do = torch.randn_like(q)
    cu = torch.arange(0, (batch + 1) * t, t, device="cuda", dtype=torch.int32)

    def moba():
        return moba_attn_varlen_func(q, k, v, cu, t, block_size=cfg.block_size, topk=cfg.topk)

    q4, k4, v4 = (
        x.detach().view(batch, t, -1, d).transpose(1, 2).requires_grad_() for x in (q, k, v)
    )
    do4 = do.view(batch, t, hq, d).transpose(1, 2)

    def dense(backend):
        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)

        return f

    res = {
        "shape": {
            "batch": batch,
            "T": t,
            "hq": hq,
            "hkv": hkv,
            "d": d,
            "block": cfg.block_size,
            "topk": cfg.topk,
        }
    }
    for name, f, grad in (
        ("moba", moba, do),
        ("flash", dense(SDPBackend.FLASH_ATTENTION), do4),
        ("cudnn", dense(SDPBackend.CUDNN_ATTENTION), do4),
    ):
        try:
            with torch.no_grad():
                fwd = time_ms(f)
            fb = time_ms(lambda f=f, grad=grad: f().backward(grad))
            res[name] = {"fwd_ms": fwd, "fwd_bwd_ms": fb}
        except RuntimeError as err:
            res[name] = {"error": str(err)[:200]}
        print(f"# op {name}: {res[name]}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            moba().backward(do)
        torch.cuda.synchronize()
    res["moba_kernels"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(res["moba_kernels"])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--attn", default="moba,full")
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    machine = (
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
        f"{triton.__version__} | python {platform.python_version()}"
    )
    print("#", machine)
    res = {"machine": machine, "op": op_bench(args.preset), "steps": []}
    for attn in args.attn.split(","):
        res["steps"].append(
            step_profile(args.preset, attn, args.warm, args.profile_steps, args.out)
        )
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "gpu_profile_step.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
