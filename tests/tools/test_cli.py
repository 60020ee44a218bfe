"""The train/compare/eval/viz command line: bad values are rejected in one line (never replaced
by defaults), errors leave no folders behind, and without the train extra the subcommands say
how to install it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from moba_attn.cli import main
from moba_attn.train.config import PRESETS, TrainConfig, UsageError

from .helpers import moba

INSTALL = "pip install 'moba-attn[train]'"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _flag_id(value) -> str:
    """Test ids from the flags alone (``--block-size 0``)."""
    return " ".join(value) if isinstance(value, list) else "error"


def one_line_error(capsys, argv: list[str], prog: str) -> str:
    """Run ``moba argv``: exit status 2, one line on stderr (no traceback); returns it."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moba {prog}: error: "), err
    return err


# ----------------------------------------------------------------------------- train settings
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--block-size", "0"], "--block-size"),
        (["--topk", "0"], "--topk"),
        (["--steps", "0"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-1e-3"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--seq-len", "1"], "--seq-len"),
        (["--eval-every", "0"], "--eval-every"),
        (["--eval-batches", "0"], "--eval-batches"),
        (["--ckpt-every", "0"], "--ckpt-every"),
        (["--warmup", "-1"], "--warmup"),
        (["--seed", "-1"], "--seed"),
        (["--switch-at", "1.5"], "--switch-at"),
        (["--retrieval-frac", "-0.1"], "--retrieval-frac"),
        (["--time-limit", "-1"], "--time-limit"),
        (["--steps", "ten"], "--steps"),
        (["--full-attn-layers", "9"], "full_attn_layers [9]"),
        (["--full-attn-layers="], "--full-attn-layers"),
        (["--device", "gpu"], "'gpu' is not a device"),
        (["--data", "nowhere"], "nowhere"),
    ],
    ids=_flag_id,
)
def test_train_rejects_bad_values_in_one_line_and_creates_nothing(tmp_path, capsys, flags, named):
    """``--block-size 0`` once trained with the preset's 64 (``value or default``): every bad
    value is now an error that names it, and the run folder is never created."""
    out = tmp_path / "run"
    err = one_line_error(capsys, ["train", "--out", str(out), "--no-progress", *flags], "train")
    assert named in err
    assert not out.exists()


@NO_CUDA
@pytest.mark.parametrize("command", ["train", "compare"])
def test_cuda_without_cuda_is_one_line(tmp_path, capsys, command):
    out = tmp_path / "run"
    err = one_line_error(capsys, [command, "--out", str(out), "--device", "cuda"], command)
    assert "CUDA is not available" in err and "--device cpu" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "field", ["block_size", "topk", "seq_len", "steps", "batch_size", "lr", "eval_every"]
)
def test_none_means_the_preset_value_and_zero_is_rejected(field):
    assert getattr(TrainConfig(preset="micro").resolved(), field) == getattr(PRESETS["micro"], field)
    with pytest.raises(UsageError, match=field):
        TrainConfig(**{field: 0}).resolved()


@pytest.mark.parametrize(
    "bad",
    [
        {"eval_batches": 0},
        {"ckpt_every": 0},
        {"log_every": 0},
        {"warmup": -1},
        {"lr": float("inf")},
        {"grad_clip": 0.0},
        {"min_lr_frac": 2.0},
        {"dtype": "fp16"},
        {"decode": "sparse"},
        {"corpus": "web"},
        {"steps": 2.5},
    ],
    ids=lambda d: next(iter(d)),
)
def test_train_config_rejects_what_cannot_work(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad).resolved()


def test_zero_warmup_is_a_value_not_the_default():
    assert TrainConfig(steps=100, warmup=0).resolved().warmup == 0
    assert TrainConfig(steps=100).resolved().warmup == 10


def test_existing_run_and_changed_resume_flags_are_one_line(trained, capsys):
    """Without ``--resume`` an existing run is never overwritten; with it, a flag whose value
    differs from the saved run's is an error, not silently ignored."""
    ckpt = trained / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns
    err = one_line_error(capsys, ["train", "--out", str(trained)], "train")
    assert "already holds a run" in err and "--resume" in err
    err = one_line_error(
        capsys, ["train", "--out", str(trained), "--resume", "--block-size", "32"], "train"
    )
    assert "--block-size 64 -> 32" in err
    one_line_error(capsys, ["train", "--out", str(trained), "--resume", "--steps", "0"], "train")
    assert ckpt.stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- eval / viz / compare
@pytest.mark.parametrize("command", ["eval", "viz"])
def test_missing_run_is_one_line_and_creates_nothing(tmp_path, capsys, command):
    err = one_line_error(capsys, [command, str(tmp_path / "nope")], command)
    assert "no checkpoint at" in err and "moba train --out" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_checks_every_path_before_loading_any(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", str(trained), str(tmp_path / "nope"), "--out", str(out)]
    assert "nope" in one_line_error(capsys, argv, "eval")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--n-seqs", "0"], "--n-seqs"),
        (["--samples", "0"], "--samples"),
        (["--depths", "0,1.5"], "--depths"),
        (["--lengths", "128,0"], "--lengths"),
        (["--seq-len", "0"], "--seq-len"),
    ],
    ids=_flag_id,
)
def test_eval_rejects_bad_values(tmp_path, capsys, flags, named):
    assert named in one_line_error(capsys, ["eval", str(tmp_path / "run"), *flags], "eval")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--block-size", "0"], "--block-size"),
        (["--topk", "0"], "--topk"),
        (["--depth", "2"], "--depth"),
        (["--heads", "9"], "heads [9] out of range"),
        (["--layers", "first"], "layers must be 'all' or comma-separated integers"),
        (["--input", "missing.txt"], "missing.txt"),
    ],
    ids=_flag_id,
)
def test_viz_rejects_bad_values(trained, tmp_path, capsys, flags, named):
    out = tmp_path / "viz"
    argv = ["viz", str(trained), "--out", str(out), *flags]
    assert named in one_line_error(capsys, argv, "viz")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--variants", "full,nope"], "unknown variant 'nope'"),
        (["--variants", "full@x"], "full@x"),
        (["--variants", "full,full"], "duplicate variants"),
        (["--variants", ","], "no variants"),
        (["--steps", "3", "--train-minutes", "1"], "--train-minutes"),
        (["--train-minutes", "0"], "--train-minutes"),
        (["--eval-seqs", "0"], "--eval-seqs"),
        (["--eval-samples", "0"], "--eval-samples"),
        (["--block-size", "0"], "--block-size"),
    ],
    ids=_flag_id,
)
def test_compare_rejects_bad_values_and_creates_nothing(tmp_path, capsys, flags, named):
    out = tmp_path / "cmp"
    assert named in one_line_error(capsys, ["compare", "--out", str(out), *flags], "compare")
    assert not out.exists()


# ----------------------------------------------------------------------------- the train extra
@pytest.mark.parametrize("argv", [["train"], ["train", "--help"], ["eval", "x", "--n-seqs", "0"]])
def test_without_the_extra_the_commands_print_the_install_line(monkeypatch, capsys, argv):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    assert moba(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and INSTALL in err and "tqdm" in err, err
    assert f"moba {argv[0]} needs the train extra" in err


def test_core_and_cli_import_with_only_torch_and_numpy():
    """``import moba_attn`` and the ``moba`` command need neither the extras nor triton."""
    code = textwrap.dedent(
        """
        import sys
        for name in ("transformers", "safetensors", "matplotlib", "tqdm", "triton"):
            sys.modules[name] = None  # importing it raises ImportError
        import moba_attn
        from moba_attn.cli import main
        sys.exit(main(["train", "--out", "x"]))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"moba train needs the train extra (transformers, matplotlib, tqdm missing): {INSTALL}"
    ]
