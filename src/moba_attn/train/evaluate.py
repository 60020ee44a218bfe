"""``moba eval``: held-out loss by position (trailing-token analysis) and synthetic needle
retrieval at several context lengths and depths, for one or more checkpoints side by side."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import UsageError
from .data import TASK
from .trainer import LoadedRun, autocast_for, checkpoint_path, load_run, resolve_device

TRAILING_FRAC = 1 / 8  # "trailing tokens" = the last eighth of the context
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def default_lengths(seq_len: int) -> list[int]:
    return sorted({max(128, seq_len // 4), max(128, seq_len // 2), seq_len})


def check_eval_settings(*, n_seqs: int, lengths, depths, samples: int, seq_len: int | None):
    """:class:`UsageError` for evaluation settings that cannot work (``None``: the default)."""
    for name, v in (("n_seqs", n_seqs), ("samples", samples)):
        if not (isinstance(v, int) and v >= 1):
            raise UsageError(f"{name} must be an integer >= 1, got {v!r}")
    if seq_len is not None and not (isinstance(seq_len, int) and seq_len >= 2):
        raise UsageError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if lengths is not None and (
        not len(lengths) or not all(isinstance(n, int) and n >= 2 for n in lengths)
    ):
        raise UsageError(f"lengths must be integers >= 2, got {list(lengths)}")
    if not len(depths) or not all(0.0 <= d <= 1.0 for d in depths):
        raise UsageError(f"depths must be fractions in [0, 1], got {list(depths)}")


@torch.no_grad()
def token_losses(run: LoadedRun, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-token next-token loss ``[n, T-1]`` (fp32) of ``x [n, T]``; entry t predicts token t+1."""
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(run.device)
        with autocast_for(run.device, run.cfg.dtype):
            logits = run.model(input_ids=xb).logits
        logits = logits[:, :-1].float()
        out.append(F.cross_entropy(logits.transpose(1, 2), xb[:, 1:], reduction="none").cpu())
    return torch.cat(out)


def position_loss(
    run: LoadedRun,
    *,
    seq_len: int | None = None,
    n_seqs: int = 32,
    n_buckets: int = 8,
    batch_size: int | None = None,
) -> dict:
    """Mean held-out loss overall, of the trailing tokens, and per position bucket."""
    T = run.cfg.seq_len if seq_len is None else seq_len
    bs = max(1, run.cfg.batch_size * run.cfg.seq_len // T) if batch_size is None else batch_size
    x = run.corpus.heldout_windows(n_seqs, T)
    per_pos = token_losses(run, x, bs).mean(0).numpy()  # [T-1], entry t = loss at position t+1
    pos = np.arange(1, T)
    edges = np.linspace(0, T, n_buckets + 1).astype(int)
    buckets = []
    for a, b in itertools.pairwise(edges):
        m = (pos >= a) & (pos < b)
        if m.any():
            buckets.append({"start": a.item(), "end": b.item(), "loss": float(per_pos[m].mean())})
    trail = pos >= round(T * (1 - TRAILING_FRAC))
    return {
        "seq_len": T,
        "n_seqs": n_seqs,
        "loss": float(per_pos.mean()),
        "trailing_loss": float(per_pos[trail].mean()),
        "trailing_from": int(pos[trail][0]),
        "buckets": buckets,
    }


@torch.no_grad()
def retrieval_accuracy(
    run: LoadedRun,
    *,
    lengths=None,
    depths=DEFAULT_DEPTHS,
    samples: int = 16,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict:
    """Exact-match accuracy of the needle's value, per (context length, needle depth).

    Each sample: held-out text with ``TASK.n_pairs`` records (the needle at ``depth``, the
    distractors at random depths) and a query for the needle at the end. Correct = every value
    token is the argmax given the preceding tokens (= greedy decoding reproduces it exactly).
    """
    lengths = default_lengths(run.cfg.seq_len) if lengths is None else list(lengths)
    depths = list(depths)
    acc = np.zeros((len(lengths), len(depths)))
    held = run.corpus.heldout
    for i, L in enumerate(lengths):
        bs = max(1, run.cfg.batch_size * run.cfg.seq_len // L) if batch_size is None else batch_size
        for j, d in enumerate(depths):
            rng = np.random.default_rng([seed, L, j])
            xs, answers = [], []
            for _ in range(samples):
                s = int(rng.integers(0, max(len(held) - L, 1)))
                filler = run.corpus._window(held, s, L)
                dep = [d] + list(rng.uniform(0, 1, TASK.n_pairs - 1))
                x, ans, _ = run.corpus.insert_retrieval(filler, rng, depths=dep, needle=0)
                xs.append(x)
                answers.append(ans[0])
            x = torch.from_numpy(np.stack(xs))
            hits = 0
            for k in range(0, samples, bs):
                xb = x[k : k + bs].to(run.device)
                with autocast_for(run.device, run.cfg.dtype):
                    pred = run.model(input_ids=xb).logits.argmax(-1).cpu()
                for r, (a0, a1) in enumerate(answers[k : k + bs]):
                    hits += bool((pred[r, a0 - 1 : a1 - 1] == x[k + r, a0:a1]).all())
            acc[i, j] = hits / samples
    return {
        "lengths": lengths,
        "depths": depths,
        "samples": samples,
        "accuracy": acc.tolist(),
        "mean": float(acc.mean()),
    }


def evaluate(
    run: LoadedRun,
    *,
    attn: str = "as-trained",
    n_seqs: int = 32,
    lengths=None,
    depths=DEFAULT_DEPTHS,
    samples: int = 16,
    seq_len: int | None = None,
) -> dict:
    mode = run.set_attn(attn)
    res = {
        "label": run.label,
        "path": str(run.path),
        "step": run.step,
        "attn_used": mode,
        "trained_attn": run.cfg.attn,
        "block_size": run.cfg.block_size,
        "topk": run.cfg.topk,
        "full_attn_layers": list(run.cfg.full_attn_layers),
    }
    res.update(position_loss(run, seq_len=seq_len, n_seqs=n_seqs))
    res["retrieval"] = retrieval_accuracy(run, lengths=lengths, depths=depths, samples=samples)
    return res


def _labels(paths) -> list[str]:
    names = [
        Path(p).resolve().name if Path(p).is_dir() else Path(p).resolve().parent.name for p in paths
    ]
    if len(set(names)) < len(names):
        names = [f"{Path(p).resolve().parent.name}/{n}" for p, n in zip(paths, names)]
    return names


def write_results(results: dict[str, dict], out: Path) -> dict[str, Path]:
    """``eval.json``, ``position_loss.csv``, ``retrieval.csv`` and the two PNGs under ``out``."""
    from .plots import plot_position_loss, plot_retrieval_heatmaps

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "eval.json",
        "positions_csv": out / "position_loss.csv",
        "retrieval_csv": out / "retrieval.csv",
        "positions_png": out / "position_loss.png",
        "heatmap_png": out / "retrieval_heatmap.png",
    }
    files["json"].write_text(json.dumps(results, indent=2) + "\n")
    with open(files["positions_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "start", "end", "loss"])
        for label, r in results.items():
            for b in r["buckets"]:
                w.writerow([label, b["start"], b["end"], f"{b['loss']:.5f}"])
    with open(files["retrieval_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "context_length", "depth", "accuracy", "samples"])
        for label, r in results.items():
            ret = r["retrieval"]
            for i, L in enumerate(ret["lengths"]):
                for j, d in enumerate(ret["depths"]):
                    w.writerow([label, L, d, f"{ret['accuracy'][i][j]:.4f}", ret["samples"]])
    plot_position_loss(results, files["positions_png"])
    plot_retrieval_heatmaps(results, files["heatmap_png"])
    return files


def print_tables(results: dict[str, dict]) -> None:
    from .tables import print_table

    first = next(iter(results.values()))
    ret = first["retrieval"]
    print_table(
        f"held-out loss (T={first['seq_len']}, {first['n_seqs']} sequences) and retrieval",
        ["checkpoint", "attn", "step", "loss", "trailing", "retrieval"],
        [
            [
                label,
                r["attn_used"],
                str(r["step"]),
                f"{r['loss']:.4f}",
                f"{r['trailing_loss']:.4f}",
                f"{r['retrieval']['mean']:.2f}",
            ]
            for label, r in results.items()
        ],
        left=2,
    )
    print(
        f"trailing = positions >= {first['trailing_from']} (last {TRAILING_FRAC:.3g} of the context); "
        f"retrieval = exact match, mean over lengths {ret['lengths']} x depths {ret['depths']}, "
        f"{ret['samples']} samples per cell"
    )
    print_table(
        "held-out loss by position bucket",
        ["positions", *results],
        [
            [
                f"{b['start']}-{b['end']}",
                *[f"{r['buckets'][i]['loss']:.4f}" for r in results.values()],
            ]
            for i, b in enumerate(first["buckets"])
        ],
    )
    print_table(
        "needle retrieval accuracy by context length (mean over depths)",
        ["checkpoint", *[f"T={L}" for L in ret["lengths"]]],
        [
            [label, *[f"{a:.2f}" for a in np.asarray(r["retrieval"]["accuracy"]).mean(1)]]
            for label, r in results.items()
        ],
    )


def run_eval(
    paths,
    *,
    out: str | Path | None = None,
    attn: str = "as-trained",
    device: str = "auto",
    n_seqs: int = 32,
    lengths=None,
    depths=DEFAULT_DEPTHS,
    samples: int = 16,
    seq_len: int | None = None,
    show: bool = True,
) -> tuple[dict, dict]:
    """Evaluate checkpoints side by side; returns ``(results, files)``.

    ``None`` means the default: ``out`` = ``FIRST_RUN/eval``, ``seq_len`` = the first run's
    training length, ``lengths`` = T/4, T/2, T of it. Raises :class:`UsageError` for settings
    that cannot work and ``FileNotFoundError`` for a path without a checkpoint, before any
    checkpoint is loaded.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("no run directories given")
    for p in paths:
        checkpoint_path(p)
    resolve_device(device)
    check_eval_settings(n_seqs=n_seqs, lengths=lengths, depths=depths, samples=samples,
                        seq_len=seq_len)
    if out is None:
        out = (paths[0] if paths[0].is_dir() else paths[0].parent) / "eval"
    out = Path(out)
    results = {}
    for label, p in zip(_labels(paths), paths):
        run = load_run(p, device=device, label=label)
        # One context length for all checkpoints (the first one's unless given), so the
        # tables line up.
        if seq_len is None:
            seq_len = run.cfg.seq_len
        if lengths is None:
            lengths = default_lengths(seq_len)
        results[label] = evaluate(
            run,
            attn=attn,
            n_seqs=n_seqs,
            lengths=lengths,
            depths=depths,
            samples=samples,
            seq_len=seq_len,
        )
        del run
    files = write_results(results, out)
    if show:
        print_tables(results)
        print(f"[moba eval] wrote {', '.join(str(f) for f in files.values())}")
    return results, files
