"""A transformers Llama training step with MoBA attention against the same model on SDPA.

The model: 8 layers, hidden 1024, 8 q / 2 kv heads, head_dim 128,
intermediate 2816, vocab 32000, built from a ``LlamaConfig`` with random weights (no
download), bf16 weights, gradient checkpointing, batch 1, AdamW. One variant runs
``attn_implementation="sdpa"``, the other the same model after
``moba_attn.integrations.transformers.enable_moba(model, block_size=512, topk=3)``. A step
is forward + loss + backward + optimizer step, timed with a device sync on both sides
(median of ``--steps`` steps after ``--warmup``); tokens/s = tokens per step / step time.

Correctness first: the attention call at the model's shape (8 / 2 heads, D=128, bf16,
block 512, top-3) against the fp64 reference (output and gradients), and a tiny fp32 Llama
whose MoBA covers every block (exactly dense) against the same model on SDPA (logits and
gradients): the integration's plumbing, end to end.

    python benchmarks/train_step.py --out bench_out              # 32K and 128K, ~1.5 min
    python benchmarks/train_step.py --smoke --out /tmp/train     # CPU, seconds
"""

from __future__ import annotations

import copy
import statistics
import time

import common
import torch

NAME = "train_step"
MODEL = {"num_hidden_layers": 8, "hidden_size": 1024, "num_attention_heads": 8,
         "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 2816,
         "vocab_size": 32000}
SMOKE_MODEL = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
               "vocab_size": 256}
COLUMNS = [("T", "T", "tokens"), ("attention", "variant", "s"), ("step ms", "step_ms", ".1f"),
           ("tokens/s", "tokens_per_s", ",.0f"), ("x SDPA", "x_sdpa", "x"),
           ("peak GiB", "peak_gib", ".2f")]
PLOT = {"x": "T", "xlabel": "tokens per step (batch 1)", "panels": [
    {"title": "training step: tokens/s", "y": "tokens_per_s", "series": "variant",
     "ylabel": "tokens/s"},
    {"title": "step ms", "y": "step_ms", "series": "variant", "logy": True, "ylabel": "ms"},
]}


def build_model(dims: dict, max_len: int, device, dtype):
    """A randomly initialised Llama on SDPA attention: weights in ``dtype``, the rotary
    frequencies kept in fp32 (``from_config`` with ``dtype``, not ``.to(dtype)``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**dims, max_position_embeddings=max_len)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)


def moba_variant(model, block: int, topk: int, backend: str):
    from moba_attn.integrations.transformers import enable_moba

    return enable_moba(model, block_size=block, topk=topk, backend=backend)


# ----------------------------------------------------------------------------- checks
def check_model(device, backend: str, seed: int) -> dict:
    """Tiny fp32 Llama, MoBA over every block (exactly dense) vs the same weights on SDPA."""
    dims = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
            "vocab_size": 128}
    t, block = 256, 64
    ref_model = build_model(dims, t, device, torch.float32)
    moba_model = moba_variant(copy.deepcopy(ref_model), block, t // block, backend)
    ids = torch.randint(0, dims["vocab_size"], (2, t), device=device,
                        generator=torch.Generator(device=device).manual_seed(seed))
    res = []
    for model in (ref_model, moba_model):
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        res.append((out.logits.detach(), grads))
    errs = {"logits": common.rel_err(res[1][0], res[0][0]),
            "grads": common.rel_err(res[1][1], res[0][1])}
    tol = common.tolerance(torch.float32)
    return {"case": "tiny Llama, MoBA exactly dense vs SDPA", "T": t, "block": block,
            "topk": t // block, "backend": backend, "dtype": "float32", "tol": tol,
            **{f"rel_err_{k}": v for k, v in errs.items()},
            "ok": all(v <= tol for v in errs.values())}


# ----------------------------------------------------------------------------- timing
def time_steps(model, t: int, args, device) -> dict:
    """Median step ms over ``--steps`` steps after ``--warmup``, and the peak memory."""
    model.train()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, t), device=device,
                        generator=torch.Generator(device=device).manual_seed(args.seed + t))

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    common.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        common.sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_ms": ms, "tokens_per_s": t / (ms * 1e-3), "peak_gib": peak,
            "loss": float(loss.detach()), "steps_ms": times}


def main(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--seqlens", default=None, help="tokens per step (default 32K,128K)")
    p.add_argument("--block-size", type=int, default=None, help="MoBA block size (512)")
    p.add_argument("--topk", type=int, default=None, help="MoBA top-k, own block counted (3)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = p.parse_args(argv)
    if common.handle_plot_only(args):
        return
    device = common.pick_device(args, "train_step.py")
    backend = common.pick_backend(args, device)
    dtype = common.work_dtype(device)
    smoke = args.smoke
    dims = SMOKE_MODEL if smoke else MODEL
    block = args.block_size or (64 if smoke else 512)
    topk = args.topk or (2 if smoke else 3)
    seqlens = [common.parse_tokens(x) for x in
               (args.seqlens or ("256,384" if smoke else "32K,128K")).split(",")]
    if smoke:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    result = common.new_result(NAME, f"Llama training step: MoBA {block}/top-{topk} vs SDPA",
                               device, {"backend": backend, "dtype": str(dtype), "model": dims,
                                        "block": block, "topk": topk, "seqlens": seqlens,
                                        "steps": args.steps, "warmup": args.warmup,
                                        "gradient_checkpointing": True, "batch": 1})
    print(result["machine_line"], flush=True)
    result["plot"] = PLOT
    layer = common.Setting("layer", 1, dims["num_attention_heads"], dims["num_key_value_heads"],
                           dims["head_dim"], block, topk)
    result["checks"].append(common.check_moba(layer, device=device, dtype=dtype,
                                              backend=backend, grads=True, seed=args.seed))
    result["checks"].append(check_model(device, backend, args.seed))
    common.report_checks(result, args.out, NAME)
    for t in seqlens:
        base = None
        for variant in ("sdpa", "moba"):
            model = build_model(dims, t, device, dtype)
            if variant == "moba":
                model = moba_variant(model, block, topk, backend)
            row = {"T": t, "variant": "SDPA" if variant == "sdpa" else f"MoBA {block}/{topk}",
                   "backend": backend if variant == "moba" else "sdpa",
                   **time_steps(model, t, args, device)}
            base = row["tokens_per_s"] if variant == "sdpa" else base
            row["x_sdpa"] = common.ratio(row["tokens_per_s"], base)
            result["rows"].append(row)
            print({k: v for k, v in row.items() if k != "steps_ms"}, flush=True)
            del model
            common.free_memory(device)
    common.finish(result, args.out, NAME, COLUMNS)


if __name__ == "__main__":
    main()
