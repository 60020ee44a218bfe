"""CPU tests of ``moba compare``: variants side by side, the summary, time budgets and the
split over several processes."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("transformers")

from moba_attn.train.config import TrainConfig

from .helpers import SMALL, is_png, moba, rows


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


def _summary_row(**kw) -> dict:
    """One row of the compare summary table, as ``_write_summary`` builds it."""
    row = {
        "variant": "full", "attn": "full", "seed": 0, "tokens_seen": 10, "heldout_loss": 1.0,
        "heldout_vs_full_pct": 0.0, "trailing_loss": None, "trailing_vs_full_pct": None,
        "retrieval_acc": None, "sparsity": 0.0, "tokens_per_s": 1.0,
        "best_periodic_heldout": 1.0, "best_periodic_step": 300, "final_periodic_heldout": 1.0,
    }
    return {**row, **kw}


def test_summary_flags_heldout_rising_from_its_minimum():
    from moba_attn.train.compare import summary_markdown

    row = _summary_row(heldout_loss=1.2, final_periodic_heldout=1.1)
    flat = {**row, "variant": "moba", "final_periodic_heldout": 1.01}  # +1%: under the limit
    md = summary_markdown([row, flat], TrainConfig(preset="tiny").resolved(), True)
    assert "Held-out loss rose before the end" in md
    assert "full +10.0% from 1.0000 at step 300" in md and "moba +" not in md
    assert "Held-out loss rose" not in summary_markdown(
        [flat], TrainConfig(preset="tiny").resolved(), True)


def test_summary_says_whether_the_curves_flattened():
    from moba_attn.train.compare import summary_markdown

    base = _summary_row()
    falling = {**base, "heldout_change_tail_pct": -1.6}
    flat = {**base, "variant": "moba", "heldout_change_tail_pct": -0.4}
    cfg = TrainConfig(preset="tiny").resolved()
    md = summary_markdown([falling, flat], cfg, True)
    assert "full -1.60%, moba -0.40%" in md and "**Still falling** (more than 1%): full;" in md
    assert "Every curve has flattened" in summary_markdown([flat], cfg, True)
    assert "last 20% of the steps" not in summary_markdown([base], cfg, True)  # no evaluations


def test_plan_parallel_balances_devices_and_never_plans_zero_steps():
    from moba_attn.train.compare import plan_parallel, split_variants

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
