"""MoBA inside a transformers Llama on the GPU (bf16): no host sync from MoBA code in an
unpadded training step or a decode step, at most one per padded forward; long-context
decode and the compiled static-cache decode agree with eager."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig

from moba_attn.integrations.transformers import enable_moba

pytestmark = pytest.mark.gpu


def _model(layers=2):
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=1 << 17, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.bfloat16).cuda()


def _moba_syncs(fn) -> list[str]:
    """The host syncs ``fn`` does from MoBA's own code (file:line of each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in seen
            if "synchroniz" in str(w.message) and "moba_attn" in w.filename]


def test_training_step_and_decode_step_do_not_sync_in_moba():
    model = enable_moba(_model().train(), block_size=128, topk=3)
    model.gradient_checkpointing_enable()
    emb = torch.randn(1, 4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def train_step():
        out = model(inputs_embeds=emb, use_cache=False).logits
        out.float().square().mean().backward()

    train_step()
    assert _moba_syncs(train_step) == []
    model.eval()
    x = torch.randint(3, 1000, (2, 3000), device="cuda")
    with torch.no_grad():
        cache = model(x[:, :2999], use_cache=True).past_key_values
        model(x[:, 2999:], past_key_values=cache, use_cache=True)  # warm up
        nxt = x[:, -1:]
        assert _moba_syncs(lambda: model(nxt, past_key_values=cache, use_cache=True)) == []
        mask = torch.ones(2, 3000, dtype=torch.long, device="cuda")
        mask[1, :700] = 0  # a padded batch: at most one sync per forward
        syncs = _moba_syncs(lambda: model(x, attention_mask=mask, use_cache=False))
        assert len(syncs) <= 1, syncs


def test_long_context_decode_matches_the_full_pass():
    # the prefill gate scores on TF32 tensor cores, the decode gate in IEEE fp32: near ties
    # may pick other blocks, so the logits agree to bf16 and routing-flip noise
    model = enable_moba(_model().eval(), block_size=512, topk=3)
    x = torch.randint(3, 1000, (1, 33000), device="cuda")
    with torch.no_grad():
        full = model(x, use_cache=False).logits[:, -40:].float()
        cache = model(x[:, :-40], use_cache=True).past_key_values
        steps = [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits.float()
                 for t in range(x.shape[1] - 40, x.shape[1])]
    inc = torch.cat(steps, 1)
    assert ((inc - full).norm() / full.norm()).item() < 6e-2
    assert (inc.argmax(-1) == full.argmax(-1)).float().mean().item() > 0.9


def _first_difference_is_a_near_tie(got, want, scores, prompt_len, tol=2e-2):
    """Tokens equal, or where they first differ the reference's two best logits were within
    ``tol`` (relative): a bf16 near tie that any change of summation order may flip."""
    diff = (got[0, prompt_len:] != want[0, prompt_len:]).nonzero()
    if diff.numel() == 0:
        return True
    step = int(diff[0])
    top = scores[step][0].float().topk(2).values
    return bool((top[0] - top[1]).abs() <= tol * top[0].abs().clamp(min=1.0))


def test_static_cache_generate_compiled_by_transformers_equals_eager():
    # transformers compiles the decode step of a static cache itself on CUDA (reduce-overhead);
    # inductor also compiles the rest of the model (norms, MLPs), so in bf16 the first token
    # that differs must be a near tie of eager's logits
    model = enable_moba(_model().eval(), block_size=512, topk=3)
    model.generation_config.eos_token_id = None
    x = torch.randint(3, 1000, (1, 9000), device="cuda")
    kw = {"attention_mask": torch.ones_like(x), "max_new_tokens": 32, "do_sample": False,
          "pad_token_id": 0, "return_dict_in_generate": True, "output_scores": True}
    eager = model.generate(x, **kw)  # dynamic cache
    model.generation_config.disable_compile = True
    static = model.generate(x, cache_implementation="static", **kw)
    model.generation_config.disable_compile = False
    torch._dynamo.reset()
    compiled = model.generate(x, cache_implementation="static", **kw)
    assert hasattr(model, "_compiled_call")  # transformers did compile the forward
    assert torch.equal(eager.sequences, static.sequences)
    assert _first_difference_is_a_near_tie(compiled.sequences, eager.sequences, eager.scores,
                                           x.shape[1])
