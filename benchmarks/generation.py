"""Generation through transformers: prefill time and decode speed, MoBA against the same
model's SDPA attention, random weights, bf16.

- ``eager``: model S (8 layers, hidden 1024, 8 q / 2 kv heads, head_dim 128, intermediate
  2816, vocab 32000), batch 1, greedy ``model.generate`` at each context: prefill ms (the
  model forward over the prompt) and decode ms/token (``generate`` of 1 + n tokens minus
  ``generate`` of 1 token, over n). MoBA 512/top-3 with ``decode="moba"`` and ``"full"``.
- ``compiled``: model L (8 layers, hidden 4096, 32 q / 8 kv heads, intermediate 11008,
  1.4B parameters) with a ``StaticCache`` filled directly with random keys and values (a
  dense 1M prefill of model L takes minutes) and ``torch.compile(model.forward,
  mode="reduce-overhead")``: decode ms per step and tokens/s at each ``context:batch``.

Before timing, MoBA's greedy tokens with a static cache must equal those with a dynamic
cache (4K prompt, 16 tokens).

    python benchmarks/generation.py --out bench_out                        # ~8 min, one H200
    python benchmarks/generation.py --parts eager --contexts 32K --out bench_out
    python benchmarks/generation.py --smoke --out /tmp/gen                 # CPU, tiny models
"""

from __future__ import annotations

import copy
import statistics

import common
import torch

NAME = "generation"
COLUMNS = [("part", "part", "s"), ("model", "model", "s"), ("context", "T", "tokens"),
           ("batch", "batch", "s"), ("attention", "impl", "s"),
           ("prefill ms", "prefill_ms", ".1f"), ("decode ms/step", "decode_ms", ".2f"),
           ("tokens/s", "tokens_s", ".1f"), ("x SDPA (tokens/s)", "x_sdpa", "x"),
           ("x SDPA (prefill)", "x_sdpa_prefill", "x")]
MODELS = {
    "S": {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8,
          "num_key_value_heads": 2, "head_dim": 128},
    "L": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
          "num_key_value_heads": 8, "head_dim": 128},
    "tiny": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16},
}
IMPLS = {"sdpa": None, "moba": "moba", "moba-decode-full": "full"}


def build(name: str, impl: str, device, dtype, block: int, topk: int, max_len: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from moba_attn.integrations.transformers import enable_moba

    cfg = LlamaConfig(vocab_size=32000 if name != "tiny" else 97, num_hidden_layers=8 if
                      name != "tiny" else 2, max_position_embeddings=max_len, pad_token_id=0,
                      eos_token_id=None, **MODELS[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa",
                                             dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    if IMPLS[impl] is not None:
        enable_moba(model, block_size=block, topk=topk, decode=IMPLS[impl])
    return model


def _event_ms(fn, device) -> float:
    if device.type == "cuda":
        return common.cuda_event_ms(fn)
    import time

    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def check(device, dtype, block, topk, smoke) -> dict:
    model = build("tiny" if smoke else "S", "moba", device, dtype, block, topk, 1 << 14)
    t = 200 if smoke else 4096
    x = torch.randint(3, 90, (1, t), device=device)
    kw = {"attention_mask": torch.ones_like(x), "max_new_tokens": 16, "do_sample": False,
          "pad_token_id": 0}
    dyn = model.generate(x, **kw)
    model.generation_config.disable_compile = True  # the same attention, eager
    sta = model.generate(x, cache_implementation="static", **kw)
    ok = bool(torch.equal(dyn, sta))
    if not ok:
        raise SystemExit("check failed: MoBA's greedy tokens differ between static and dynamic "
                         "caches")
    return {"what": "static cache == dynamic cache, greedy tokens", "ok": ok}


def eager_part(args, device, dtype, result) -> None:
    model_name = "tiny" if args.smoke else "S"
    contexts = [common.parse_tokens(c) for c in args.contexts.split(",")]
    n = args.new_tokens
    for t in contexts:
        rows = {}
        for impl in IMPLS:
            model = build(model_name, impl, device, dtype, args.block, args.topk, t + n + 64)
            x = torch.randint(3, 90, (1, t), device=device)
            kw = {"attention_mask": torch.ones_like(x), "do_sample": False, "pad_token_id": 0}

            def prefill(model=model, x=x):
                with torch.no_grad():
                    model(x, use_cache=True)

            prefill()
            pre = statistics.median(_event_ms(prefill, device) for _ in range(2))

            def gen(k, model=model, x=x, kw=kw):
                return lambda: model.generate(x, max_new_tokens=k, **kw)

            gen(2)()  # warm-up
            one = statistics.median(_event_ms(gen(1), device) for _ in range(2))
            many = statistics.median(_event_ms(gen(1 + n), device) for _ in range(2))
            dec = (many - one) / n
            rows[impl] = {"part": "eager", "model": model_name, "T": t, "batch": 1, "impl": impl,
                          "prefill_ms": pre, "decode_ms": dec, "tokens_s": 1e3 / dec}
            model = None
            common.free_memory(device)
        for impl, row in rows.items():
            row["x_sdpa"] = common.ratio(row["tokens_s"], rows["sdpa"]["tokens_s"])
            row["x_sdpa_prefill"] = common.ratio(rows["sdpa"]["prefill_ms"], row["prefill_ms"])
            result["rows"].append(row)


def _filled_static_cache(model, batch, t, max_len, device, dtype):
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    cache.early_initialization(batch, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
    gen = torch.Generator(device=device).manual_seed(t)
    for layer in cache.layers:
        layer.keys.normal_(generator=gen)
        layer.values.normal_(generator=gen)
        layer.cumulative_length.fill_(t)
    return cache


def compiled_part(args, device, dtype, result) -> None:
    model_name = "tiny" if args.smoke else "L"
    jobs = []
    for part in args.compiled_jobs.split(","):
        ctx, _, b = part.partition(":")
        jobs.append((common.parse_tokens(ctx), int(b or 1)))
    n = args.new_tokens
    for t, batch in jobs:
        rows = {}
        for impl in ("sdpa", "moba"):
            model = build(model_name, impl, device, dtype, args.block, args.topk, t + n + 64)
            cache = _filled_static_cache(model, batch, t, t + 2 * n + 16, device, dtype)
            tok = torch.randint(3, 90, (batch, 1), device=device)
            pos = [t]

            def step(fn):
                p = torch.tensor([pos[0]], device=device)
                pos[0] += 1
                with torch.no_grad():
                    return fn(input_ids=tok, past_key_values=cache, use_cache=True,
                              cache_position=p, position_ids=p[None].expand(batch, 1)).logits

            step(model.forward)  # eager: MoBA computes the cache's centroids here
            torch._dynamo.reset()
            fwd = model.forward if args.smoke else torch.compile(model.forward,
                                                                 mode="reduce-overhead")
            for _ in range(3):  # compile and record the CUDA graph
                step(fwd)
            common.sync(device)
            total = _event_ms(lambda fwd=fwd: [step(fwd) for _ in range(n)], device)
            ms = total / n
            rows[impl] = {"part": "compiled", "model": model_name, "T": t, "batch": batch,
                          "impl": impl, "decode_ms": ms, "tokens_s": batch * 1e3 / ms}
            model = cache = fwd = None
            torch._dynamo.reset()
            common.free_memory(device)
        for row in rows.values():
            row["x_sdpa"] = common.ratio(row["tokens_s"], rows["sdpa"]["tokens_s"])
            result["rows"].append(row)


def main(argv=None) -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--parts", default="eager,compiled")
    parser.add_argument("--contexts", default="32K,128K", help="eager part's prompt lengths")
    parser.add_argument("--compiled-jobs", default="128K:1,1M:1,128K:16",
                        help="compiled part's CONTEXT:BATCH list")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--topk", type=int, default=3)
    args = parser.parse_args(argv)
    if common.handle_plot_only(args):
        return
    device = common.pick_device(args, NAME)
    if args.smoke:
        args.contexts, args.compiled_jobs, args.new_tokens = "256", "256:2", 4
        args.block = min(args.block, 32)
    dtype = common.work_dtype(device)
    result = common.new_result(NAME, "Generation: MoBA against SDPA in transformers", device,
                               {"parts": args.parts, "block": args.block, "topk": args.topk,
                                "new_tokens": args.new_tokens})
    result["checks"].append(check(device, dtype, args.block, args.topk, args.smoke))
    parts = args.parts.split(",")
    if "eager" in parts:
        eager_part(args, device, dtype, result)
    if "compiled" in parts:
        compiled_part(args, device, dtype, result)
    result["plot"] = {"x": "T", "xlabel": "context", "by": "part", "panels": [
        {"title": "decode tokens/s", "y": "tokens_s", "series": "impl", "logy": True},
    ]}
    common.finish(result, args.out, NAME, COLUMNS)


if __name__ == "__main__":
    main()
