"""Generate with a transformers model running MoBA: the paper's layer-wise hybrid.

Builds a tiny Llama from a config (random weights, no download), switches every layer but
the last ones to MoBA, and generates for a left-padded batch of two prompts, with MoBA
decoding over the KV cache (cached block centroids) or dense decoding (``--decode full``).
With a real checkpoint, replace ``build_model`` by ``AutoModelForCausalLM.from_pretrained``.

    python examples/hf_generate.py --new-tokens 48 --block-size 16 --topk 3
"""

from __future__ import annotations

import argparse
import time

import torch


def build_model(layers: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny model")
    p.add_argument("--full-layers", type=int, default=1,
                   help="last layers kept dense (the paper: 3 of 32)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--topk", type=int, default=3, help="blocks per query, counting its own")
    p.add_argument("--prompt-len", type=int, default=80)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode", choices=("moba", "full"), default="moba")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    return p.parse_args(argv)


def main(argv=None) -> torch.Tensor:
    """Run the example; returns the generated token ids ``[2, prompt_len + new_tokens]``."""
    from moba_attn.integrations.transformers import disable_moba, enable_moba

    args = parse_args(argv)
    model = build_model(args.layers)
    model.generation_config.eos_token_id = None  # random weights: always generate new_tokens
    full = tuple(range(-args.full_layers, 0))
    enable_moba(model, block_size=args.block_size, topk=args.topk, full_attn_layers=full,
                decode=args.decode)
    print(f"MoBA settings: {model.config.moba}")

    g = torch.Generator().manual_seed(1)
    lens = [args.prompt_len, max(1, args.prompt_len * 2 // 3)]
    ids = torch.zeros(2, args.prompt_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lens):  # left padding, as generate() expects
        ids[row, -n:] = torch.randint(3, 256, (n,), generator=g)
        mask[row, -n:] = 1

    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                         do_sample=args.sample, top_k=50 if args.sample else None,
                         pad_token_id=0)
    took = time.perf_counter() - start
    for row, n in enumerate(lens):
        print(f"row {row}: prompt {n} tokens -> {out[row, args.prompt_len:].tolist()}")
    print(f"generated {args.new_tokens} tokens x 2 rows in {took:.2f} s")

    disable_moba(model)
    print(f"back to {model.config._attn_implementation!r} attention")
    return out


if __name__ == "__main__":
    main()
