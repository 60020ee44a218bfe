"""CPU tests of ``moba train`` and its parts on the tiny preset: data, presets, configuration,
training, resuming, hybrids and determinism (short sequences, few steps)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from moba_attn.train.config import PRESETS, TrainConfig
from moba_attn.train.data import TASK, Corpus, load_corpus
from moba_attn.train.modeling import moba_sparsity

from .helpers import SMALL, is_png, moba, rows


# ----------------------------------------------------------------------------- data
def test_corpus_split_and_batches_are_deterministic():
    c = load_corpus()
    assert c.vocab_size == 256 and len(c.train) > 1_000_000 and len(c.heldout) > 50_000
    a = c.train_batch(7, 3, 256, seed=0, retrieval_frac=0.5)
    b = c.train_batch(7, 3, 256, seed=0, retrieval_frac=0.5)
    assert a.shape == (3, 256) and a.dtype == torch.int64 and torch.equal(a, b)
    assert not torch.equal(a, c.train_batch(8, 3, 256, seed=0, retrieval_frac=0.5))
    assert not torch.equal(a, c.train_batch(7, 3, 256, seed=1, retrieval_frac=0.5))
    # the held-out stream is not a slice of the training stream
    probe = bytes(c.heldout[1000:1200])
    assert probe not in bytes(c.train)


def test_repeat_warning_names_the_passes(tmp_path):
    (tmp_path / "a.txt").write_text("hello world. " * 2000)
    c = Corpus(data=(str(tmp_path),))
    n = len(c.train)
    assert c.repeat_warning(2 * n) is None
    warn = c.repeat_warning(5 * n)
    assert warn is not None and "5.0 passes" in warn and "--corpus python" in warn


def test_retrieval_task_answers_are_the_needle_values():
    c = load_corpus()
    x = c.heldout_windows(1, 400)[0].numpy()
    rng = np.random.default_rng(3)
    out, answers, starts = c.insert_retrieval(x, rng, depths=[0.0, 0.5, 0.2, 1.0], needle=1)
    assert len(starts) == TASK.n_pairs
    assert len(out) == 400 and len(answers) == 1
    a0, a1 = answers[0]
    value = c.decode(out[a0:a1])
    assert len(value) == TASK.value_digits and value.isdigit()
    record = c.decode(out[starts[1] : starts[1] + 20])
    key = record.split("<kv ")[1].split("=")[0]
    assert record.startswith(f"\n<kv {key}={value}>")
    assert c.decode(out[a0 - len(TASK.query(key)) : a0]) == TASK.query(key)
    assert starts[0] < starts[2] < starts[1] < starts[3]  # depth order
    _, answers, _ = c.insert_retrieval(x, np.random.default_rng(4))  # training form: all queried
    assert len(answers) == TASK.n_pairs


def test_user_files_split_by_stream(tmp_path):
    (tmp_path / "a.txt").write_text("hello world. " * 2000)
    c = Corpus(data=(str(tmp_path),))
    assert len(c.train) > 0 and len(c.heldout) > 0 and c.source.startswith("files:")
    with pytest.raises(FileNotFoundError):
        Corpus(data=(str(tmp_path / "missing"),))


def test_user_data_with_local_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    text = Path(argparse.__file__).read_text()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(
        tmp_path / "tok"
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.py").write_text(text)
    out = tmp_path / "run"
    moba(
        "train",
        "--out",
        str(out),
        "--data",
        str(tmp_path / "data"),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--steps",
        "2",
        "--retrieval-frac",
        "1",
        *SMALL,
    )
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["model_config"]["vocab_size"] == 400 and ckpt["step"] == 2
    c = Corpus(data=(str(tmp_path / "data"),), tokenizer=str(tmp_path / "tok"))
    x, answers, _ = c.insert_retrieval(
        c.heldout_windows(1, 300)[0].numpy(), np.random.default_rng(0), needle=0
    )
    assert c.decode(x[answers[0][0] : answers[0][1]]).strip().isdigit()


def test_sparsity_accounting():
    s = moba_sparsity(8192, 512, 3)
    assert s["nominal"] == pytest.approx(1 - 3 / 16)
    assert 0.5 < s["causal"] < s["nominal"]
    assert moba_sparsity(1024, 512, 3)["causal"] == 0.0  # topk >= #blocks is dense


def test_presets_build_the_documented_model_sizes():
    from moba_attn.train.modeling import build_model, count_params, model_config

    sizes = {"tiny": 0.8e6, "micro": 4.8e6, "mini": 12.8e6}  # the larger presets are too slow to build here
    for name, n in sizes.items():
        cfg = TrainConfig(preset=name).resolved()
        model = build_model(model_config(cfg, 256, 0), seed=0)
        assert abs(count_params(model) - n) / n < 0.05, name


def test_config_validation():
    with pytest.raises(ValueError, match="full_attn_layers"):
        TrainConfig(full_attn_layers=(7,)).resolved()
    with pytest.raises(ValueError, match="attn"):
        TrainConfig(attn="sparse").resolved()
    c = TrainConfig(attn="hybrid", steps=100, switch_at=0.9).resolved()
    assert c.mode_at(89) == "moba" and c.mode_at(90) == "full" and c.final_mode() == "full"


# ----------------------------------------------------------------------------- train / resume
def test_train_loss_decreases_and_writes_outputs(trained):
    r = rows(trained)
    assert [int(x["step"]) for x in r] == list(range(1, 41))
    assert {"step", "loss", "val_loss", "tokens_per_s", "lr", "attn"} <= set(r[0])
    assert all(x["attn"] == "full" and float(x["tokens_per_s"]) > 0 for x in r)
    loss = np.array([float(x["loss"]) for x in r])
    assert loss[-5:].mean() < loss[:3].mean() - 1.0, loss
    vals = [float(x["val_loss"]) for x in r if x["val_loss"]]
    assert len(vals) == 2 and vals[-1] < np.log(256) - 1.0
    assert is_png(trained / "loss.png")
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["step"] == 40 and summary["complete"] and summary["tokens_seen"] == 40 * 4 * 128
    assert torch.load(trained / "checkpoint.pt", weights_only=False)["step"] == 40


def test_resume_continues_exactly(tmp_path):
    args = [
        "--steps",
        "6",
        "--seq-len",
        "128",
        "--batch-size",
        "2",
        "--no-progress",
        "--ckpt-every",
        "100",
    ]
    moba("train", "--out", str(tmp_path / "straight"), *args)
    part = tmp_path / "resumed"
    moba("train", "--out", str(part), *args, "--time-limit", "0")  # stops after one step
    assert [int(x["step"]) for x in rows(part)] == [1]
    with pytest.raises(SystemExit, match="2"):  # an existing run is never overwritten
        moba("train", "--out", str(part), *args)
    moba("train", "--out", str(part), "--resume", "--no-progress")
    got, ref = rows(part), rows(tmp_path / "straight")
    assert [int(x["step"]) for x in got] == list(range(1, 7))
    np.testing.assert_allclose(
        [float(x["loss"]) for x in got], [float(x["loss"]) for x in ref], rtol=1e-4
    )
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 6


def test_heldout_tail_change_reads_the_last_fifth_of_the_steps():
    from moba_attn.train.trainer import heldout_tail_change

    vals = [(60, 2.0), (80, 1.0), (90, 0.95), (100, 0.9)]
    assert heldout_tail_change(vals, 100) == pytest.approx(-10.0)  # 1.0 at step 80 -> 0.9
    assert heldout_tail_change([(100, 0.9)], 100) is None  # one evaluation: no change to read
    # evaluations every 250 of 2192 steps: the window starts at step 1750, the last one at or
    # before step 1753.6, not at 2000 (which would read only the last 9% of the steps)
    sparse = [(1500, 0.70), (1750, 0.64), (2000, 0.62), (2192, 0.608)]
    assert heldout_tail_change(sparse, 2192) == pytest.approx(100 * (0.608 / 0.64 - 1))
    assert heldout_tail_change(sparse[:1], 2192) is None  # nothing after the window's start


def test_hybrid_switches_and_moba_changes_the_model(tmp_path):
    common = [
        "--seq-len",
        "128",
        "--batch-size",
        "2",
        "--block-size",
        "16",
        "--topk",
        "2",
        "--no-progress",
    ]
    moba(
        "train",
        "--out",
        str(tmp_path / "h"),
        "--attn",
        "hybrid",
        "--switch-at",
        "0.5",
        "--steps",
        "4",
        "--full-attn-layers",
        "-1",
        *common,
    )
    r = rows(tmp_path / "h")
    assert [x["attn"] for x in r] == ["moba", "moba", "full", "full"]
    moba("train", "--out", str(tmp_path / "m"), "--attn", "moba", "--steps", "1", *common)
    moba("train", "--out", str(tmp_path / "f"), "--attn", "full", "--steps", "1", *common)
    lm, lf = float(rows(tmp_path / "m")[0]["loss"]), float(rows(tmp_path / "f")[0]["loss"])
    assert lm != lf  # same init and batch: only the attention differs
    assert abs(lm - lf) < 0.05


def test_deterministic_flag_reaches_moba_and_pytorch(tmp_path, monkeypatch):
    """``--deterministic``: the op gets ``deterministic=True`` and PyTorch's switch is on for
    the training step only; without the flag neither."""
    import moba_attn.integrations.transformers as tf

    seen = []
    real = tf.moba_attn_func

    def spy(*args, **kwargs):
        seen.append((kwargs["deterministic"], torch.are_deterministic_algorithms_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(tf, "moba_attn_func", spy)
    common = ["--attn", "moba", "--steps", "2", "--eval-every", "100", "--block-size", "16",
              "--topk", "2", "--seq-len", "128", "--batch-size", "2", "--no-progress"]
    n_layers = PRESETS["tiny"].num_layers
    assert not torch.are_deterministic_algorithms_enabled()
    moba("train", "--out", str(tmp_path / "d"), "--deterministic", *common)
    steps, final_eval = seen[: 2 * n_layers], seen[2 * n_layers :]
    assert steps == [(True, True)] * (2 * n_layers)
    assert final_eval and all(s == (True, False) for s in final_eval)  # held-out: no switch
    assert not torch.are_deterministic_algorithms_enabled()  # restored after every step
    assert json.loads((tmp_path / "d" / "config.json").read_text())["deterministic"] is True
    seen.clear()
    moba("train", "--out", str(tmp_path / "n"), *common)
    assert seen and all(s == (False, False) for s in seen)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["moba", "full"])
def test_deterministic_reruns_are_bit_identical_on_cuda(tmp_path, attn):
    """Two ``--deterministic`` runs of the same config on CUDA: the same losses, gradient
    norms and weights, bit for bit (MoBA's backward reduces with atomics otherwise)."""
    args = ["--attn", attn, "--steps", "6", "--eval-every", "3", "--seq-len", "2048",
            "--batch-size", "4", "--block-size", "128", "--topk", "3", "--device", "cuda",
            "--deterministic", "--no-progress"]
    for name in ("a", "b"):
        moba("train", "--out", str(tmp_path / name), *args)
    keys = ("loss", "val_loss", "grad_norm")
    ra, rb = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert len(ra) == 6 and [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]
    wa, wb = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=False)["model"]
              for n in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
