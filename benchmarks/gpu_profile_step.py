"""Where a training step's time goes, MoBA against full attention, on one GPU.

First the attention op alone at a ``moba train`` preset's shapes (batch x T, q/kv heads, head
dim, block size, top-k), forward and forward+backward: MoBA through the public API
(``moba_attn_varlen_func``, as the transformers integration calls it) against SDPA
FLASH_ATTENTION and CUDNN_ATTENTION with ``enable_gqa``, plus MoBA's kernel table. Then, for
each ``--attn`` variant of the preset: a few warm-up steps and ``--profile-steps`` steps under
``torch.profiler``; the kernel table (top 40) goes to ``OUT/profile_<attn>.txt``.

    PYTHONPATH=src python benchmarks/gpu_profile_step.py --preset small --out "$OUT"
    PYTHONPATH=src python benchmarks/gpu_profile_step.py --preset tiny --device cpu  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from moba_attn import moba_attn_varlen_func
from moba_attn.bench import time_ms
from moba_attn.training.config import PRESETS, TrainConfig
from moba_attn.training.data import load_corpus
from moba_attn.training.trainer import Run


def _activities(device: str):
    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    return acts, ("cuda_time_total" if cuda else "self_cpu_time_total")


def step_profile(preset: str, attn: str, warm: int, steps: int, out: str, device: str) -> dict:
    cfg = TrainConfig(
        preset=preset,
        attn=attn,
        device=device,
        steps=warm + steps + 2,
        eval_every=10**9,
        ckpt_every=10**9,
    ).resolved()
    corpus = load_corpus(cfg.data, cfg.tokenizer, cfg.corpus)
    acts, key = _activities(device)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, tmp, corpus=corpus)
        for _ in range(warm):
            run.step()
        times = []
        with profile(activities=acts) as prof:
            for _ in range(steps):
                times.append(run.step()["step_time_s"])
        run.close()
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    with open(os.path.join(out, f"profile_{attn}.txt"), "w") as fh:
        fh.write(f"{preset} attn={attn} step times (profiled) {times}\n{table}\n")
    print(f"# {preset} {attn}: step {min(times):.3f} s (under the profiler)")
    print("\n".join(table.splitlines()[:18]))
    return {"attn": attn, "step_s_profiled": times}


def op_bench(preset: str, device: str) -> dict:
    p = PRESETS[preset]
    cfg = TrainConfig(preset=preset).resolved()
    batch, t, hq, hkv = cfg.batch_size, cfg.seq_len, p.num_heads, p.num_kv_heads
    d = p.hidden_size // p.num_heads
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = {"device": device, "dtype": dtype}
    q = torch.randn(batch * t, hq, d, **g, requires_grad=True)
    k = torch.randn(batch * t, hkv, d, **g, requires_grad=True)
    v = torch.randn(batch * t, hkv, d, **g, requires_grad=True)
    do = torch.randn_like(q)
    cu = torch.arange(0, (batch + 1) * t, t, device=device, dtype=torch.int32)

    def moba():
        return moba_attn_varlen_func(
            q, k, v, cu, cu, t, t, block_size=cfg.block_size, topk=cfg.topk
        )

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
                fwd = time_ms(f, dev, 3, False)
            fb = time_ms(lambda f=f, grad=grad: f().backward(grad), dev, 3, False)
            res[name] = {"fwd_ms": fwd, "fwd_bwd_ms": fb}
        except RuntimeError as err:
            res[name] = {"error": str(err)[:200]}
        print(f"# op {name}: {res[name]}")
    acts, key = _activities(device)
    with profile(activities=acts) as prof:
        for _ in range(3):
            moba().backward(do)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    res["moba_kernels"] = prof.key_averages().table(sort_by=key, row_limit=25)
    print(res["moba_kernels"])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--attn", default="moba,full")
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    machine = f"{gpu} | torch {torch.__version__} | python {platform.python_version()}"
    print("#", machine)
    res = {"machine": machine, "op": op_bench(args.preset, args.device), "steps": []}
    for attn in args.attn.split(","):
        res["steps"].append(
            step_profile(args.preset, attn, args.warm, args.profile_steps, args.out, args.device)
        )
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "gpu_profile_step.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
