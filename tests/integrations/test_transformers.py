"""MoBA inside transformers models: tiny Llama / Qwen2 / Qwen3 built from configs, CPU.

Oracles: the model's own SDPA attention (dense), MoBA's identities (below topk*B tokens MoBA
is dense; full_attn_layers covering everything is dense), the naive backend (ground truth),
and self-consistency between full-sequence, chunked-prefill, token-by-token, static-cache
and compiled runs.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

import moba_attn.integrations.transformers as hf
from moba_attn.integrations.transformers import (
    disable_moba,
    enable_moba,
    get_decode_state,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

VOCAB = 97
BS, K = 8, 2  # block_size, topk used throughout: MoBA is dense below K * BS = 16 tokens
ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def make_config(arch="llama", hkv=2, layers=2):
    kw = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": hkv,
          "max_position_embeddings": 256, "attention_dropout": 0.0, "pad_token_id": 0,
          "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
          "initializer_range": 0.1}
    if arch == "qwen3":
        kw["head_dim"] = 16
    return ARCHS[arch](**kw)


def make_model(arch="llama", hkv=2, layers=2, seed=0, attn="sdpa"):
    torch.manual_seed(seed)
    cfg = make_config(arch, hkv, layers)
    return AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn).eval()


def clone(model):
    return copy.deepcopy(model)


def ids(batch, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, t), generator=g)


def cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


@torch.no_grad()
def logits(model, x, **kw):
    return model(x, **kw).logits


@torch.no_grad()
def incremental_logits(model, x, cuts):
    """Logits of ``x`` computed in pieces ``x[:, cuts[i]:cuts[i+1]]`` through the KV cache."""
    out = model(x[:, : cuts[0]], use_cache=True)
    cache, pieces = cache_of(out), [out.logits]
    for a, b in zip(cuts, cuts[1:] + [x.shape[1]]):
        if a == b:
            continue
        out = model(x[:, a:b], past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
    return torch.cat(pieces, 1), cache


def close(a, b, tol=2e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize("arch", list(ARCHS))
def test_below_topk_blocks_equals_dense_above_differs(arch):
    model = make_model(arch)
    x = ids(2, 64)
    dense = logits(model, x)
    enable_moba(model, block_size=BS, topk=K)
    assert model.config._attn_implementation == "moba"
    moba = logits(model, x)
    assert close(moba[:, : K * BS], dense[:, : K * BS])
    assert (moba[:, K * BS :] - dense[:, K * BS :]).abs().max() > 1e-3
    short = ids(2, K * BS - 3, seed=5)  # a whole sequence below topk * B tokens
    assert close(logits(model, short), logits(disable_moba(clone(model)), short))


@pytest.mark.parametrize("arch,hkv", [("llama", 4), ("llama", 2), ("llama", 1), ("qwen2", 2),
                                      ("qwen2", 1), ("qwen3", 2), ("qwen3", 1)],
                         ids=lambda v: str(v))
def test_matches_naive_reference(arch, hkv):
    """MHA, GQA and MQA: the torch backend inside the model == the naive ground truth."""
    model = enable_moba(make_model(arch, hkv), block_size=BS, topk=K, backend="torch")
    ref = enable_moba(clone(model), block_size=BS, topk=K, backend="naive")
    x = ids(2, 53)
    assert close(logits(model, x), logits(ref, x))


def test_full_attn_layers_all_equals_dense_and_hybrid_is_partial():
    base = make_model("llama", layers=3)
    x = ids(2, 64)
    mask = torch.ones_like(x)
    mask[1, :11] = 0  # left padding in row 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dense = logits(base, x, attention_mask=mask, position_ids=pos)
    allfull = enable_moba(clone(base), block_size=BS, topk=K, full_attn_layers=(0, 1, -1))
    assert allfull.config.moba["full_attn_layers"] == [0, 1, 2]
    got = logits(allfull, x, attention_mask=mask, position_ids=pos)
    assert close(got[0], dense[0]) and close(got[1, 11:], dense[1, 11:])
    # decode through the cache with every layer dense == the dense model's decode
    a, _ = incremental_logits(allfull, x, [40, 41, 42])
    b, _ = incremental_logits(base, x, [40, 41, 42])
    assert close(a, b)
    # paper's hybrid: last layer full, others MoBA -> between the two
    hybrid = enable_moba(clone(base), block_size=BS, topk=K, full_attn_layers=(-1,))
    moba = enable_moba(clone(base), block_size=BS, topk=K)
    h, m, d = logits(hybrid, x), logits(moba, x), logits(base, x)
    assert hybrid.config.moba["full_attn_layers"] == [2]
    assert (h - m).abs().max() > 1e-4 and (h - d).abs().max() > 1e-4


def test_disable_restores_original_logits_and_implementation():
    for attn in ("sdpa", "eager"):
        model = make_model("qwen2", attn=attn)
        x = ids(2, 48)
        before = logits(model, x)
        enable_moba(model, block_size=BS, topk=K, full_attn_layers=(-1,))
        assert not close(logits(model, x), before)
        disable_moba(model)
        assert model.config._attn_implementation == attn
        assert getattr(model.config, "moba", None) is None
        assert torch.equal(logits(model, x), before)
        for layer in model.model.layers:
            assert not layer.self_attn._forward_pre_hooks


def test_enable_twice_keeps_previous_implementation_and_validates():
    model = make_model("llama", attn="eager")
    enable_moba(model, block_size=BS, topk=K)
    enable_moba(model, block_size=4, topk=3, full_attn_layers=(-2,))
    assert model.config.moba["block_size"] == 4 and model.config.moba["full_attn_layers"] == [0]
    assert len(model.model.layers[0].self_attn._forward_pre_hooks) == 1
    assert disable_moba(model).config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="out of range"):
        enable_moba(make_model(), block_size=BS, topk=K, full_attn_layers=(5,))
    with pytest.raises(ValueError, match="decode"):
        enable_moba(make_model(), block_size=BS, topk=K, decode="sparse")
    with pytest.raises(ValueError, match="topk"):
        enable_moba(make_model(), block_size=BS, topk=0)
    with pytest.raises(ValueError, match="config.moba"):
        enable_moba(make_model())
    with pytest.raises(TypeError, match="deterministic"):
        enable_moba(make_model(), block_size=BS, topk=K, deterministic="yes")


def test_deterministic_setting_reaches_the_op_and_is_kept(monkeypatch):
    seen = []
    real = hf.moba_attn_func

    def spy(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "moba_attn_func", spy)
    model = enable_moba(make_model(), block_size=BS, topk=K)
    x = ids(1, 40)
    want = logits(model, x)
    assert model.config.moba["deterministic"] is False and seen == [False, False]
    enable_moba(model, block_size=BS, topk=K, deterministic=True)
    assert model.config.moba["deterministic"] is True
    enable_moba(model)  # no arguments: the stored settings, deterministic included
    assert model.config.moba["deterministic"] is True
    seen.clear()
    assert torch.equal(logits(model, x), want)  # the forward is the same either way
    assert seen == [True, True]  # one call per layer


@pytest.mark.parametrize("decode", ["moba", "full"])
def test_save_and_load_keep_settings(tmp_path, decode):
    model = enable_moba(make_model("qwen3"), block_size=BS, topk=K, full_attn_layers=(-1,),
                        decode=decode)
    x = ids(1, 50)
    want = logits(model, x)
    model.save_pretrained(tmp_path)
    # a plain from_pretrained loads it back into MoBA (this module registered "moba")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "moba"
    assert loaded.config.moba == model.config.moba
    assert close(logits(loaded, x), want)
    enable_moba(loaded)  # no arguments: restore the saved settings
    assert close(logits(loaded, x), want)
    inc, cache = incremental_logits(loaded, x, [30, 31, 32, 33])
    assert close(inc, incremental_logits(model, x, [30, 31, 32, 33])[0], 1e-5)
    if decode == "moba":  # MoBA decode reproduces the full pass; the state sits on the cache
        assert close(inc, want, 1e-4) and get_decode_state(cache, 0) is not None
    else:
        assert not close(inc, want, 1e-4) and get_decode_state(cache, 0) is None
    # settings are per model: another model in the same process is untouched
    other = make_model("qwen3")
    assert other.config._attn_implementation == "sdpa"
    assert getattr(other.config, "moba", None) is None
    # disabled and saved again: a plain dense model
    disable_moba(loaded).save_pretrained(tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert dense.config._attn_implementation != "moba" and getattr(dense.config, "moba", None) is None


def test_loading_without_the_integration_is_an_error_not_dense(tmp_path):
    import subprocess
    import sys

    enable_moba(make_model("llama"), block_size=BS, topk=K).save_pretrained(tmp_path)
    code = ("from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode != 0 and "moba" in res.stderr


# ----------------------------------------------------------------------------- caches
@pytest.mark.parametrize("arch,hkv", [("llama", 2), ("qwen2", 1), ("qwen3", 4)],
                         ids=lambda v: str(v))
def test_chunked_prefill_and_decode_reproduce_full_sequence(arch, hkv):
    model = enable_moba(make_model(arch, hkv), block_size=BS, topk=K)
    x = ids(2, 70)
    full = logits(model, x)
    chunked, _ = incremental_logits(model, x, [21, 38, 45])  # chunks cross block edges
    assert close(chunked, full, 1e-4)
    stepwise, _ = incremental_logits(model, x, list(range(9, 70)))  # token by token
    assert close(stepwise, full, 1e-4)


def test_decode_full_mode_is_dense_over_the_cache():
    base = make_model("llama")
    model = enable_moba(clone(base), block_size=BS, topk=K, decode="full")
    x = ids(2, 60)
    with torch.no_grad():
        out = model(x[:, :40], use_cache=True)
        assert close(out.logits, logits(enable_moba(clone(base), block_size=BS, topk=K), x[:, :40]))
        c1 = cache_of(out)
        c2 = copy.deepcopy(c1)
        a = model(x[:, 40:47], past_key_values=c1, use_cache=True).logits  # chunk: dense
        b = base(x[:, 40:47], past_key_values=c2, use_cache=True).logits
        assert close(a, b)
        a = model(x[:, 47:48], past_key_values=c1, use_cache=True).logits  # decode: dense
        b = base(x[:, 47:48], past_key_values=c2, use_cache=True).logits
        assert close(a, b)
    g = model.generate(x[:, :30], attention_mask=torch.ones_like(x[:, :30]), max_new_tokens=6,
                       do_sample=False, pad_token_id=0)
    assert g.shape == (2, 36)


def test_sparse_decode_uses_cached_centroids_one_block_at_a_time(monkeypatch):
    model = enable_moba(make_model("llama", hkv=2, layers=2), block_size=BS, topk=K)
    x = ids(2, 61)
    full = logits(model, x)
    calls = {"prefill": 0, "kvcache": 0, "new_blocks": []}
    real_func, real_kv, real_upd = hf.moba_attn_func, hf.moba_attn_with_kvcache, \
        hf.update_centroids

    def spy_func(*a, **k):
        calls["prefill"] += 1
        return real_func(*a, **k)

    def spy_kv(*a, **k):
        calls["kvcache"] += 1
        assert k["centroids"] is not None and k["validate"] is False
        return real_kv(*a, **k)

    def spy_upd(*a, **k):
        calls["new_blocks"].append(k["max_new_blocks"])
        return real_upd(*a, **k)

    monkeypatch.setattr(hf, "moba_attn_func", spy_func)
    monkeypatch.setattr(hf, "moba_attn_with_kvcache", spy_kv)
    monkeypatch.setattr(hf, "update_centroids", spy_upd)
    with torch.no_grad():
        out = model(x[:, :21], use_cache=True)  # prefill: 2 full blocks per row
        cache, pieces = cache_of(out), [out.logits]
        states = [get_decode_state(cache, i) for i in range(2)]
        assert all(s is not None for s in states) and calls["prefill"] == 2
        buffers = [s.centroids for s in states]
        for t in range(21, 61):
            pieces.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert calls["prefill"] == 2 and calls["kvcache"] == 2 * 40  # no prefill kernel in decode
    # a decode step completes at most one block, and only steps that complete one update
    completing = sum((t + 1) % BS == 0 for t in range(21, 61))
    assert calls["new_blocks"][2:] == [1] * (2 * completing)
    assert [get_decode_state(cache, i).centroids for i in range(2)] == buffers  # in place
    assert close(torch.cat(pieces, 1), full, 1e-4)
    keys = cache.layers[1].keys  # [B, Hkv, T, D]
    nb = 61 // BS
    want = keys[:, :, : nb * BS].float().reshape(2, 2, nb, BS, -1).mean(3).transpose(1, 2)
    assert torch.allclose(states[1].centroids[:, :nb], want, atol=1e-6)


def test_decode_over_a_cache_filled_elsewhere_computes_its_centroids():
    # a cache without MoBA's centroids (filled by other code): the layer computes every full
    # block once, then keeps them; the result equals decoding a MoBA-filled cache
    model = enable_moba(make_model("llama"), block_size=BS, topk=K)
    x = ids(1, 40)
    with torch.no_grad():
        c = cache_of(model(x[:, :30], use_cache=True))
        foreign = copy.deepcopy(c)  # the centroids are copied with the cache
        assert get_decode_state(foreign, 0).centroids is not get_decode_state(c, 0).centroids
        for layer in foreign.layers:
            del layer.__dict__[hf._STATE_ATTR]
        a = model(x[:, 30:31], past_key_values=c, use_cache=True).logits
        b = model(x[:, 30:31], past_key_values=foreign, use_cache=True).logits
        assert get_decode_state(foreign, 0) is not None
        for t in range(31, 40):  # both keep going in step
            a = model(x[:, t : t + 1], past_key_values=c, use_cache=True).logits
            b = model(x[:, t : t + 1], past_key_values=foreign, use_cache=True).logits
            assert torch.equal(a, b)
        dense_filled = cache_of(disable_moba(clone(model))(x[:, :30], use_cache=True))
        assert model(x[:, 30:31], past_key_values=dense_filled, use_cache=True).logits.isfinite().all()


def test_beam_search_reorders_the_centroids_with_the_cache():
    model = enable_moba(make_model("llama"), block_size=BS, topk=K)
    model.generation_config.eos_token_id = None
    x = ids(2, 30)
    g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, num_beams=3,
                       do_sample=False, pad_token_id=0)
    for i in range(2):  # the best beam's tokens score like a fresh full pass over them
        seq = g[i : i + 1]
        with torch.no_grad():
            full = logits(model, seq)
            inc, _ = incremental_logits(model, seq, list(range(30, seq.shape[1])))
        assert close(inc, full, 1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_static_cache_generate_equals_dynamic(arch):
    model = enable_moba(make_model(arch), block_size=BS, topk=K)
    model.generation_config.eos_token_id = None
    x = ids(2, 40)  # MoBA differs from dense here
    kw = {"attention_mask": torch.ones_like(x), "max_new_tokens": 20, "do_sample": False,
          "pad_token_id": 0}
    dynamic = model.generate(x, **kw)
    static = model.generate(x, cache_implementation="static", **kw)
    assert torch.equal(dynamic, static)
    again = model.generate(x, cache_implementation="static", **kw)  # a reused static cache
    assert torch.equal(again, static)
    dense = disable_moba(clone(model)).generate(x, **kw)
    assert not torch.equal(dense, dynamic)


def test_static_cache_left_padding_and_decode_full():
    base = make_model("llama")
    prompts = [ids(1, 29, seed=8)[0], ids(1, 17, seed=9)[0]]
    x = torch.zeros(2, 29, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(prompts):
        x[i, 29 - len(p):], mask[i, 29 - len(p):] = p, 1
    for decode in ("moba", "full"):
        model = enable_moba(clone(base), block_size=BS, topk=K, decode=decode)
        model.generation_config.eos_token_id = None
        kw = {"attention_mask": mask, "max_new_tokens": 15, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(x, **kw),
                           model.generate(x, cache_implementation="static", **kw))


def test_compiled_static_decode_step_has_no_graph_break():
    from transformers import StaticCache

    model = enable_moba(make_model("llama"), block_size=16, topk=2)
    x = ids(2, 90)
    torch._dynamo.reset()
    with torch.no_grad():
        full = logits(model, x)
        cache = StaticCache(config=model.config, max_cache_len=128)
        out = model(x[:, :40], past_key_values=cache, use_cache=True)
        step = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        pieces = [out.logits]
        for t in range(40, 60):
            pos = torch.tensor([t])
            pieces.append(step(input_ids=x[:, t : t + 1], past_key_values=cache, use_cache=True,
                               cache_position=pos, position_ids=pos[None].expand(2, 1)).logits)
    assert close(torch.cat(pieces, 1), full[:, :60], 1e-4)


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_tokens(arch, side):
    model = enable_moba(make_model(arch), block_size=BS, topk=K, full_attn_layers=(-1,))
    seqs = [ids(1, 45, seed=3)[0], ids(1, 29, seed=4)[0]]
    alone = [logits(model, s[None])[0] for s in seqs]
    x = torch.zeros(2, 45, dtype=torch.long)
    mask = torch.zeros(2, 45, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(45 - len(s), 45) if side == "left" else slice(0, len(s))
        x[i, sl], mask[i, sl] = s, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got = logits(model, x, attention_mask=mask, position_ids=pos)
    for i, s in enumerate(seqs):
        sl = slice(45 - len(s), 45) if side == "left" else slice(0, len(s))
        assert close(got[i, sl], alone[i], 1e-4)
    assert torch.isfinite(got).all()


def test_packed_sequences_via_position_ids():
    model = enable_moba(make_model("qwen2"), block_size=BS, topk=K, full_attn_layers=(-1,))
    a, b = ids(1, 37, seed=6), ids(1, 26, seed=7)
    x = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(37), torch.arange(26)])[None]
    # position ids that restart mark packed sequences (transformers' own rule: without a cache)
    got = logits(model, x, position_ids=pos, use_cache=False)
    assert close(got[:, :37], logits(model, a), 1e-4)
    assert close(got[:, 37:], logits(model, b), 1e-4)


# ----------------------------------------------------------------------------- generate
def greedy_reference(model, prompt, n):
    seq = prompt[None]
    for _ in range(n):
        nxt = logits(model, seq, use_cache=False)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq[0, len(prompt) :]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_greedy_batch_left_padding(arch):
    model = enable_moba(make_model(arch), block_size=BS, topk=K)
    model.generation_config.eos_token_id = None
    prompts = [ids(1, 23, seed=8)[0], ids(1, 14, seed=9)[0]]
    x = torch.zeros(2, 23, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(prompts):
        x[i, 23 - len(p) :], mask[i, 23 - len(p) :] = p, 1
    n = 20  # crosses several block boundaries for both rows
    g = model.generate(x, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        assert torch.equal(g[i, 23:], greedy_reference(model, p, n))


def test_generate_sampling_batch():
    model = enable_moba(make_model("qwen3"), block_size=BS, topk=K, full_attn_layers=(-1,))
    x = ids(3, 12)
    torch.manual_seed(0)
    g1 = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=25, do_sample=True,
                        top_k=20, temperature=1.5, pad_token_id=0)
    torch.manual_seed(0)
    g2 = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=25, do_sample=True,
                        top_k=20, temperature=1.5, pad_token_id=0)
    assert g1.shape[0] == 3 and g1.shape[1] > 12 and torch.equal(g1, g2)
    assert ((g1 >= 0) & (g1 < VOCAB)).all()


# ----------------------------------------------------------------------------- training
def _grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=x, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}


def test_training_backward_matches_naive_and_gradient_checkpointing():
    base = make_model("llama", hkv=2).train()
    x = ids(2, 44)
    model = enable_moba(clone(base), block_size=BS, topk=K, full_attn_layers=(-1,), backend="torch")
    ref = enable_moba(clone(base), block_size=BS, topk=K, full_attn_layers=(-1,), backend="naive")
    loss, g = _grads(model, x)
    loss_ref, g_ref = _grads(ref, x)
    assert torch.isfinite(loss) and close(loss, loss_ref, 1e-5)
    assert g.keys() == g_ref.keys() and len(g) > 0
    for name in g:
        assert torch.allclose(g[name], g_ref[name], atol=1e-5, rtol=1e-4), name
    ckpt = enable_moba(clone(base), block_size=BS, topk=K, full_attn_layers=(-1,), backend="torch")
    ckpt.gradient_checkpointing_enable()
    loss_c, g_c = _grads(ckpt, x)
    assert close(loss_c, loss, 1e-6)
    for name in g:
        assert torch.allclose(g_c[name], g[name], atol=1e-6, rtol=1e-5), name
    dense_loss, _ = _grads(base, x)
    assert not close(loss, dense_loss, 1e-7)  # MoBA trains on a different attention


def test_mistral_with_and_without_sliding_window():
    from transformers import MistralConfig

    kw = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 256, "pad_token_id": 0, "initializer_range": 0.1}
    torch.manual_seed(0)
    windowed = AutoModelForCausalLM.from_config(MistralConfig(sliding_window=32, **kw)).eval()
    with pytest.raises(ValueError, match="sliding_window = None"):
        enable_moba(windowed, block_size=BS, topk=K)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(sliding_window=None, **kw)).eval()
    x = ids(2, 50)
    dense = logits(model, x)
    enable_moba(model, block_size=BS, topk=K)
    full = logits(model, x)
    assert close(full[:, : K * BS], dense[:, : K * BS]) and not close(full, dense)
    inc, _ = incremental_logits(model, x, list(range(30, 50)))
    assert close(inc, full, 1e-4)


def test_bf16_autocast_training_step_runs():
    """Under autocast RoPE leaves q/k in fp32 while v is bf16: MoBA layers must cope."""
    import copy

    from transformers import AutoModelForCausalLM, LlamaConfig

    from moba_attn.integrations.transformers import enable_moba

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
    enable_moba(model, block_size=16, topk=2)
    ids = torch.randint(0, 64, (2, 100))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
