"""CPU smoke tests of the training tools on the tiny preset (short sequences, few steps)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from moba_attn.training import cli as training_cli
from moba_attn.training.config import PRESETS, TrainConfig
from moba_attn.training.data import TASK, Corpus, load_corpus
from moba_attn.training.modeling import moba_sparsity
from moba_attn.training.routing import layer_routing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--seq-len", "128", "--batch-size", "4", "--no-progress"]


def _has_integration() -> bool:
    try:
        import moba_attn.integrations.transformers  # noqa: F401
    except ImportError:
        return False
    return True


needs_moba = pytest.mark.skipif(
    not _has_integration(), reason="moba_attn.integrations.transformers missing"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is faster than two fighting over a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def moba(*argv: str) -> int:
    """Run ``moba <argv>`` through the training subcommands' parsers."""
    parser = argparse.ArgumentParser(prog="moba")
    training_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A full-attention tiny run: 40 steps of 4 x 128 bytes."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert (
        moba(
            "train",
            "--out",
            str(out),
            "--steps",
            "40",
            "--lr",
            "3e-3",
            "--eval-every",
            "20",
            "--ckpt-every",
            "20",
            *SMALL,
        )
        == 0
    )
    return out


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


def test_sparsity_accounting():
    s = moba_sparsity(8192, 512, 3)
    assert s["nominal"] == pytest.approx(1 - 3 / 16)
    assert 0.5 < s["causal"] < s["nominal"]
    assert moba_sparsity(1024, 512, 3)["causal"] == 0.0  # topk >= #blocks is dense


def test_presets_build_the_documented_model_sizes():
    from moba_attn.training.modeling import build_model, count_params, model_config

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
    with pytest.raises(FileExistsError):
        moba("train", "--out", str(part), *args)
    moba("train", "--out", str(part), "--resume", "--no-progress")
    got, ref = rows(part), rows(tmp_path / "straight")
    assert [int(x["step"]) for x in got] == list(range(1, 7))
    np.testing.assert_allclose(
        [float(x["loss"]) for x in got], [float(x["loss"]) for x in ref], rtol=1e-4
    )
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 6


@needs_moba
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


@needs_moba
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
@needs_moba
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


# ----------------------------------------------------------------------------- eval / viz
def test_eval_writes_tables_and_pngs(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    moba(
        "eval",
        str(trained),
        str(trained / "checkpoint.pt"),
        "--out",
        str(out),
        "--n-seqs",
        "4",
        "--samples",
        "2",
        "--depths",
        "0,1",
    )
    res = json.loads((out / "eval.json").read_text())
    assert len(res) == 2
    r = next(iter(res.values()))
    assert len(r["buckets"]) == 8 and r["trailing_from"] == 112
    assert r["loss"] < np.log(256) and abs(r["trailing_loss"] - r["buckets"][-1]["loss"]) < 1e-6
    acc = np.asarray(r["retrieval"]["accuracy"])
    assert acc.shape == (1, 2) and ((0 <= acc) & (acc <= 1)).all()
    with open(out / "retrieval.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 2 * 2
    assert is_png(out / "position_loss.png") and is_png(out / "retrieval_heatmap.png")
    text = capsys.readouterr().out
    assert "held-out loss" in text and "trailing" in text and "retrieval" in text


def test_viz_writes_pictures_and_telemetry(trained, tmp_path):
    out = tmp_path / "viz"
    moba(
        "viz",
        str(trained),
        "--out",
        str(out),
        "--block-size",
        "16",
        "--topk",
        "3",
        "--heads",
        "0,1",
    )
    assert is_png(out / "selection.png") and is_png(out / "routing_mass.png")
    tele = json.loads((out / "telemetry.json").read_text())
    assert len(tele["layers"]) == 4 and tele["block_size"] == 16
    for layer in tele["layers"]:
        m, o = np.array(layer["mass"]), np.array(layer["oracle"])
        assert m.shape == (4,) and (m > 0).all() and (m <= o + 1e-5).all() and (o <= 1 + 1e-5).all()
        assert layer["routed_queries"] == 128 - 3 * 16
        assert len(layer["needle_selected"]) == 4


def test_layer_routing_oracles():
    torch.manual_seed(0)
    q, k = torch.randn(100, 4, 16), torch.randn(100, 2, 16)
    dense = layer_routing(q, k, 0.25, block_size=10, topk=10)  # topk >= #blocks: dense attention
    assert dense.routed == 0 and np.allclose(dense.mass, 1.0)
    r = layer_routing(q, k, 0.25, block_size=10, topk=3)
    assert r.routed == 70 and r.sel.shape == (100, 4, 2)
    assert (r.mass <= r.oracle + 1e-6).all() and (r.mass < 1).all()
    # the row of query 95 (block 9): 2 distinct earlier blocks per head
    assert all(len(set(r.sel[95, h])) == 2 and (r.sel[95, h] < 9).all() for h in range(4))


# ----------------------------------------------------------------------------- compare
@needs_moba
def test_compare_writes_summary(tmp_path):
    out = tmp_path / "cmp"
    code = moba(
        "compare",
        "--variants",
        "full,moba,layer-hybrid",
        "--out",
        str(out),
        "--steps",
        "3",
        "--block-size",
        "32",
        "--topk",
        "2",
        "--eval-seqs",
        "2",
        "--eval-samples",
        "1",
        *SMALL,
    )
    assert code == 0
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["full", "moba", "layer-hybrid"]
    assert all(int(r["steps"]) == 3 and int(r["tokens_seen"]) == 3 * 4 * 128 for r in table)
    sp = {r["variant"]: float(r["sparsity"]) for r in table}
    assert sp["full"] == 0 and sp["moba"] > sp["layer-hybrid"] > 0
    assert float(table[0]["heldout_vs_full_pct"]) == 0.0
    assert "| moba |" in (out / "summary.md").read_text()
    assert is_png(out / "compare.png") and is_png(out / "eval" / "retrieval_heatmap.png")
    # same seed, same data: the variants saw the same first batch and started from the same model
    first = [rows(out / v)[0] for v in ("full", "moba")]
    assert abs(float(first[0]["loss"]) - float(first[1]["loss"])) < 0.05


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


def _summary_row(**kw) -> dict:
    """One row of the compare summary table, as ``_write_summary`` builds it."""
    row = {
        "variant": "full", "attn": "full", "seed": 0, "tokens_seen": 10, "heldout_loss": 1.0,
        "heldout_vs_full_pct": 0.0, "trailing_loss": None, "trailing_vs_full_pct": None,
        "retrieval_acc": None, "sparsity": 0.0, "tokens_per_s": 1.0,
        "best_periodic_heldout": 1.0, "best_periodic_step": 300, "final_periodic_heldout": 1.0,
    }
    return {**row, **kw}


@needs_moba
def test_summary_flags_heldout_rising_from_its_minimum():
    from moba_attn.training.compare import summary_markdown

    row = _summary_row(heldout_loss=1.2, final_periodic_heldout=1.1)
    flat = {**row, "variant": "moba", "final_periodic_heldout": 1.01}  # +1%: under the limit
    md = summary_markdown([row, flat], TrainConfig(preset="tiny").resolved(), True)
    assert "Held-out loss rose before the end" in md
    assert "full +10.0% from 1.0000 at step 300" in md and "moba +" not in md
    assert "Held-out loss rose" not in summary_markdown(
        [flat], TrainConfig(preset="tiny").resolved(), True)


@needs_moba
def test_summary_says_whether_the_curves_flattened():
    from moba_attn.training.compare import summary_markdown

    base = _summary_row()
    falling = {**base, "heldout_change_tail_pct": -1.6}
    flat = {**base, "variant": "moba", "heldout_change_tail_pct": -0.4}
    cfg = TrainConfig(preset="tiny").resolved()
    md = summary_markdown([falling, flat], cfg, True)
    assert "full -1.60%, moba -0.40%" in md and "**Still falling** (more than 1%): full;" in md
    assert "Every curve has flattened" in summary_markdown([flat], cfg, True)
    assert "last 20% of the steps" not in summary_markdown([base], cfg, True)  # no evaluations


def test_heldout_tail_change_reads_the_last_fifth_of_the_steps():
    from moba_attn.training.trainer import heldout_tail_change

    vals = [(60, 2.0), (80, 1.0), (90, 0.95), (100, 0.9)]
    assert heldout_tail_change(vals, 100) == pytest.approx(-10.0)  # 1.0 at step 80 -> 0.9
    assert heldout_tail_change([(100, 0.9)], 100) is None  # one evaluation: no change to read
    # evaluations every 250 of 2192 steps: the window starts at step 1750, the last one at or
    # before step 1753.6, not at 2000 (which would read only the last 9% of the steps)
    sparse = [(1500, 0.70), (1750, 0.64), (2000, 0.62), (2192, 0.608)]
    assert heldout_tail_change(sparse, 2192) == pytest.approx(100 * (0.608 / 0.64 - 1))
    assert heldout_tail_change(sparse[:1], 2192) is None  # nothing after the window's start


def test_compare_sizes_steps_to_a_time_budget(tmp_path, capsys):
    out = tmp_path / "budget"
    args = [
        "compare",
        "--variants",
        "full,moba",
        "--out",
        str(out),
        "--train-minutes",
        "0.01",
        "--block-size",
        "32",
        "--eval-seqs",
        "1",
        "--eval-samples",
        "1",
        *SMALL,
    ]
    assert moba(*args) == 0
    log = capsys.readouterr().out
    assert "steps fit 0.01 minutes" in log and not list(out.glob(".probe*"))
    steps = [len(rows(out / v)) for v in ("full", "moba")]
    assert steps[0] == steps[1] >= 1
    assert json.loads((out / "full" / "config.json").read_text())["steps"] == steps[0]
    assert moba(*args) == 0  # a rerun keeps the steps it started with and trains nothing more
    assert "keeping" in capsys.readouterr().out and len(rows(out / "full")) == steps[0]


def test_plan_parallel_balances_devices_and_never_plans_zero_steps():
    from moba_attn.training.compare import plan_parallel, split_variants

    t = {"full": 1.0, "full@1": 1.0, "moba": 2.0, "hybrid": 2.0, "layer-hybrid": 1.8}
    groups = split_variants(t, 3)
    assert sorted(map(len, groups)) == [1, 2, 2]
    assert sorted(k for g in groups for k in g) == sorted(t)
    assert all(g == sorted(g, key=list(t).index) for g in groups)  # the given order inside
    # slowest group: a MoBA variant and a full one (both full on one device would be 4.0)
    assert max(sum(t[k] for k in g) for g in groups) == 3.0
    plan = plan_parallel(t, 3, seconds=420, overhead_s=30)
    assert plan["steps"] == 117 and plan["round_s"] == [sum(t[k] for k in g) for g in groups]
    assert max(plan["expected_s"]) <= 420 and plan["loop_budget_s"] == 390
    assert plan_parallel(t, 3, seconds=10, overhead_s=30)["steps"] == 5  # min_steps, never 0
    assert plan_parallel(t, 1, seconds=420)["groups"] == [list(t)]
    assert split_variants({"full": 1.0, "moba": 2.0}, 3) == [["moba"], ["full"], []]
    # 5 variants on 2 GPUs (the mini preset's H200 step times): slowest first would put both
    # full seeds with MoBA (0.290 s a round); the best split of 3 + 2 takes 0.280 s
    h200 = {"full": 0.083, "full@1": 0.083, "moba": 0.124, "hybrid": 0.121, "layer-hybrid": 0.114}
    pair = split_variants(h200, 2)
    assert sorted(map(len, pair)) == [2, 3] and sorted(k for g in pair for k in g) == sorted(h200)
    assert max(sum(h200[k] for k in g) for g in pair) == pytest.approx(0.280)
    with pytest.raises(ValueError, match="positive step time"):
        plan_parallel({"full": 0.0}, 2, 60)


@needs_moba
def test_compare_split_over_processes_then_one_report(tmp_path, capsys):
    """Disjoint --train-only runs share --out; the final run trains nothing and reports all."""
    out = tmp_path / "cmp"
    common = ["--steps", "3", "--block-size", "32", "--topk", "2", "--out", str(out), *SMALL]
    times_file = tmp_path / "probe.json"
    assert moba("compare", "--variants", "full,moba", "--probe", str(times_file), *common) == 0
    times = json.loads(times_file.read_text())
    assert list(times) == ["full", "moba"] and all(v > 0 for v in times.values())
    assert not list(out.glob(".probe*")) and not (out / "full").exists()

    for subset in ("full,moba", "layer-hybrid"):
        assert moba("compare", "--variants", subset, "--train-only", *common) == 0
    assert not [p for p in ("summary.md", "compare.png", "eval") if (out / p).exists()]
    variants = ("full", "moba", "layer-hybrid")
    before = {v: ((out / v / "checkpoint.pt").stat().st_mtime_ns, rows(out / v)) for v in variants}
    assert all(len(r) == 3 for _, r in before.values())
    capsys.readouterr()

    final = ["--eval-seqs", "2", "--eval-samples", "1"]
    assert moba("compare", "--variants", ",".join(variants), *final, *common) == 0
    assert "nothing to train" in capsys.readouterr().out
    after = {v: ((out / v / "checkpoint.pt").stat().st_mtime_ns, rows(out / v)) for v in variants}
    assert after == before  # no step taken, no checkpoint rewritten
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == list(variants)
    assert all(int(r["steps"]) == 3 and r["trailing_loss"] for r in table)
    assert is_png(out / "compare.png") and is_png(out / "eval" / "retrieval_heatmap.png")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_compare_gpus_script_spans_calls(tmp_path):
    """benchmarks/compare_gpus.sh: a first call plans and stops at its loop limit; a second
    call with the same RUNS keeps the saved plan (no probe, same steps) and reports, saying
    that the two processes shared one device."""
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "GPUS": "cpu cpu", "PRESET": "tiny", "CORPUS": "stdlib", "VARIANTS": "full,moba",
        "EXTRA": "--seq-len 256 --batch-size 2 --eval-seqs 2 --eval-samples 1",
        "RUNS": str(tmp_path / "runs"), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
    }

    def call(**extra):
        r = subprocess.run(["bash", "benchmarks/compare_gpus.sh"], cwd=root, env={**env, **extra},
                           capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    first = call(STEPS="6", LOOP_MINUTES="0.0001", NO_REPORT="1")
    assert "full: step 1/6" in first and "moba: step 1/6" in first  # stopped after one round
    assert not (tmp_path / "out" / "summary.md").exists()
    second = call()  # no STEPS: the plan in RUNS decides
    assert "resuming the plan" in second and "probe:" not in second
    with open(tmp_path / "runs" / "cmp" / "summary.csv", newline="") as f:
        assert [(r["variant"], r["steps"]) for r in csv.DictReader(f)] == [("full", "6"), ("moba", "6")]
    assert (tmp_path / "out" / "compare.tgz").exists()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert 'Devices shared: GPUS="cpu cpu"' in summary and "on device(s) cpu at once" in summary
