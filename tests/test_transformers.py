"""MoBA inside transformers models: tiny Llama / Qwen2 / Qwen3 built from configs, CPU.

Oracles: the model's own SDPA attention (dense), MoBA's identities (below topk*B tokens MoBA
is dense; full_attn_layers covering everything is dense), the naive backend (ground truth),
and self-consistency between full-sequence, chunked-prefill and token-by-token runs.
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
    register_moba,
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
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.moba == model.config.moba
    enable_moba(loaded)  # no arguments: restore the saved settings
    assert loaded.config._attn_implementation == "moba"
    assert close(logits(loaded, x), want)
    register_moba()  # or load straight into MoBA
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="moba").eval()
    assert close(logits(direct, x), want)
    inc, cache = incremental_logits(direct, x, [30, 31, 32, 33])
    assert close(inc, incremental_logits(model, x, [30, 31, 32, 33])[0], 1e-5)
    if decode == "moba":  # MoBA decode reproduces the full pass; the state sits on the cache
        assert close(inc, want, 1e-4) and get_decode_state(cache, 0) is not None
    else:
        assert not close(inc, want, 1e-4) and get_decode_state(cache, 0) is None
    # settings are per model: another model in the same process is untouched
    other = make_model("qwen3")
    assert other.config._attn_implementation == "sdpa"
    assert getattr(other.config, "moba", None) is None


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
    calls = {"centroids": 0, "varlen": 0}
    real_cent, real_func = hf.moba_attn_func, hf.moba_attn_varlen_func

    def spy_func(*a, **k):
        calls["varlen"] += 1
        return real_func(*a, **k)

    def spy_batch(*a, **k):
        calls["varlen"] += 1
        return real_cent(*a, **k)

    import moba_attn.ops.torch_impl as ti
    from moba_attn.ops import gate

    real_bc = gate.block_centroids

    def spy_bc(*a, **k):
        calls["centroids"] += 1
        return real_bc(*a, **k)

    monkeypatch.setattr(hf, "moba_attn_varlen_func", spy_func)
    monkeypatch.setattr(hf, "moba_attn_func", spy_batch)
    monkeypatch.setattr(gate, "block_centroids", spy_bc)
    monkeypatch.setattr(ti, "block_centroids", spy_bc)
    with torch.no_grad():
        out = model(x[:, :21], use_cache=True)  # prefill: 2 full blocks per row
        cache, pieces = cache_of(out), [out.logits]
        states = [get_decode_state(cache, i) for i in range(2)]
        assert all(s is not None and s.n_full == [2, 2] and s.blocks_computed == 4 for s in states)
        before = dict(calls)
        for t in range(21, 61):
            done = [s.blocks_computed for s in states]
            pieces.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
            n_real = t + 1
            for s, d in zip(states, done):
                assert get_decode_state(cache, states.index(s)) is s  # same object, updated
                assert s.blocks_computed - d == (2 if n_real % BS == 0 else 0)  # 1 block per row
                assert s.n_real == [n_real, n_real] and s.rebuilds == 0
        assert before["varlen"] > 0 and before["centroids"] > 0  # the spies do see prefill
        assert calls == before  # no centroid recomputation, no prefill kernel in decode steps
    assert close(torch.cat(pieces, 1), full, 1e-4)
    keys = cache.layers[1].keys  # [B, Hkv, T, D]
    nb = 61 // BS
    want = keys[:, :, : nb * BS].float().reshape(2, 2, nb, BS, -1).mean(3).transpose(1, 2)
    assert torch.allclose(states[1].centroids[:, :nb], want, atol=1e-6)


def test_decode_state_rebuilds_for_a_foreign_cache():
    model = enable_moba(make_model("llama"), block_size=BS, topk=K)
    x = ids(1, 40)
    with torch.no_grad():
        c = cache_of(model(x[:, :30], use_cache=True))
        c2 = copy.deepcopy(c)  # the state is copied with the cache
        model(x[:, 30:31], past_key_values=c, use_cache=True)
        s = get_decode_state(c, 0)
        s.n_slots = -1  # corrupt: the next step must notice and rebuild from the keys
        a = model(x[:, 31:32], past_key_values=c, use_cache=True).logits
        assert get_decode_state(c, 0).rebuilds == 1
        model(x[:, 30:31], past_key_values=c2, use_cache=True)
        b = model(x[:, 31:32], past_key_values=c2, use_cache=True).logits
        assert get_decode_state(c2, 0).rebuilds == 0
    assert close(a, b, 1e-5)


def test_static_cache_is_rejected_clearly():
    model = enable_moba(make_model("llama"), block_size=BS, topk=K)
    x = ids(1, 12)
    with pytest.raises(ValueError, match="StaticCache"):
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False,
                       cache_implementation="static", pad_token_id=0)


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
    got = logits(model, x, position_ids=pos)
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


# ----------------------------------------------------------------------------- decode pieces
@pytest.mark.parametrize("hq,hkv,topk", [(4, 2, 3), (4, 1, 2), (2, 2, 1), (4, 4, 9)],
                         ids=lambda v: str(v))
def test_decode_step_and_state_match_naive(monkeypatch, hq, hkv, topk):
    """The decode step on a left-padded cache == the naive reference on the packed rows."""
    from moba_attn import moba_attn_varlen_func
    from moba_attn.integrations.transformers import MobaDecodeState, moba_decode_attention

    g = torch.Generator().manual_seed(2)
    n_real, tk, d, bs = [37, 5, 64, 1], 64, 16, 8
    key = torch.randn(4, hkv, tk, d, generator=g)
    value = torch.randn(4, hkv, tk, d, generator=g)
    q = torch.randn(4, hq, d, generator=g)
    valid = torch.zeros(4, tk, dtype=torch.bool)
    for b, n in enumerate(n_real):
        valid[b, tk - n :] = True
    rows = hf._Rows.build(valid, 4, tk)
    assert rows.contiguous and rows.first.tolist() == [tk - n for n in n_real]
    state = MobaDecodeState(4, hkv, d, bs, key.device)
    state.advance(key, rows, [n - 1 for n in n_real], tk - 1)  # the cache before this token
    state.advance(key, rows, n_real, tk)
    assert state.n_full == [n // bs for n in n_real]
    assert state.blocks_computed == sum(n // bs for n in n_real)
    for b, n in enumerate(n_real):
        real = key[b, :, tk - n :]  # [Hkv, n, D]
        for j in range(n // bs):
            want = real[:, j * bs : (j + 1) * bs].mean(1)
            assert torch.allclose(state.centroids[b, j], want, atol=1e-6)
    monkeypatch.setattr(hf, "DECODE_CHUNK_ELEMS", hq * min(topk, 8) * bs * d)  # 1 row/chunk
    out = moba_decode_attention(q, key, value, rows.first, rows.n_real, state.centroids,
                                block_size=bs, topk=topk, scale=d ** -0.5)
    k_packed = key.transpose(1, 2)[valid]
    v_packed = value.transpose(1, 2)[valid]
    cu_k = torch.tensor([0] + list(torch.tensor(n_real).cumsum(0)), dtype=torch.int32)
    cu_q = torch.arange(5, dtype=torch.int32)
    ref = moba_attn_varlen_func(q, k_packed, v_packed, cu_q, cu_k, 1, 64, block_size=bs,
                                topk=topk, backend="naive")
    assert torch.allclose(out, ref, atol=1e-5)
    if topk < 8:  # a sparse selection really differs from dense attention here
        dense = moba_attn_varlen_func(q, k_packed, v_packed, cu_q, cu_k, 1, 64, block_size=bs,
                                      topk=64, backend="naive")
        assert not torch.allclose(out[2], dense[2], atol=1e-4)


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
