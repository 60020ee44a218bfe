"""Matplotlib figures (headless Agg backend) for training curves, evaluation and routing."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def annotate_cells(ax, data, fontsize: int) -> None:
    """Write each cell's value (2 decimals) on a [0, 1] heatmap drawn with ``imshow``."""
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=fontsize,
                    color="white" if data[i, j] < 0.6 else "black")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def smooth(values, frac: float = 0.03) -> np.ndarray:
    """Centered moving average over ``frac`` of the points (no lag; shorter windows at the ends)."""
    v = np.asarray(values, dtype=float)
    half = max(1, int(frac * len(v) / 2))
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(len(v))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(v))
    return (c[hi] - c[lo]) / (hi - lo)


def _floats(rows, key):
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v not in (None, ""):
            xs.append(float(r["tokens_seen"]))
            ys.append(float(v))
    return np.asarray(xs), np.asarray(ys)


def plot_loss_curves(
    runs: dict[str, list[dict]],
    path: Path,
    *,
    switch_tokens: dict[str, float] | None = None,
    title: str = "",
    reference: str | None = None,
) -> Path:
    """Train loss (moving average) and held-out loss against tokens seen, one colour per run.

    With ``reference`` (a run trained on the same batches), a third panel shows every run's
    train loss minus the reference's, step by step: the batch-to-batch noise cancels.
    """
    plt = _plt()
    ncols = 3 if reference in runs and len(runs) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
    ax1, ax2 = axes[0], axes[1]
    ref = {r["step"]: float(r["loss"]) for r in runs.get(reference, []) if r.get("loss")}
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i % 10}"
        x, y = _floats(rows, "loss")
        if len(x):
            ax1.plot(x, y, color=color, alpha=0.15, lw=0.8)
            ax1.plot(x, smooth(y), color=color, lw=1.6, label=label)
        x, y = _floats(rows, "val_loss")
        if len(x):
            ax2.plot(x, y, "o-", color=color, ms=3, lw=1.4, label=label)
        if ncols == 3:
            pts = [
                (float(r["tokens_seen"]), float(r["loss"]) - ref[r["step"]])
                for r in rows
                if r.get("loss") and r["step"] in ref
            ]
            if pts:
                dx, dy = map(np.asarray, zip(*pts))
                axes[2].plot(dx, smooth(dy, 0.05), color=color, lw=1.4, label=label)
        if switch_tokens and label in switch_tokens:
            for ax in axes:
                ax.axvline(switch_tokens[label], color=color, ls=":", lw=1)
    ax1.set_title("train loss (moving average; faint: per step)")
    ax2.set_title("held-out loss")
    if ncols == 3:
        axes[2].set_title(f"train loss minus {reference}'s (same batches; moving average)")
        axes[2].axhline(0, color="k", lw=0.6)
    for ax in axes:
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _zoom(ax1, [smooth(_floats(r, "loss")[1]) for r in runs.values()])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _zoom(ax, curves):
    """Keep the y range on the later part of the curves (the start is far above)."""
    tails = [c[len(c) // 10 :] for c in curves if len(c) > 10]
    if tails:
        lo = min(t.min() for t in tails)
        hi = max(t.max() for t in tails)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-6), hi + 0.05 * (hi - lo + 1e-6))


def plot_position_loss(results: dict[str, dict], path: Path) -> Path:
    """Held-out loss per position bucket, one line per checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in results.items():
        b = r["buckets"]
        mids = [(x["start"] + x["end"]) / 2 for x in b]
        ax.plot(mids, [x["loss"] for x in b], "o-", ms=3, label=label)
    ax.set_xlabel("position in the context (token)")
    ax.set_ylabel("held-out loss")
    ax.set_title("held-out loss by position (later = more context)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_retrieval_heatmaps(results: dict[str, dict], path: Path) -> Path:
    """One accuracy heatmap (context length x needle depth) per checkpoint."""
    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 0.8, 3.8), squeeze=False)
    im = None
    for ax, (label, r) in zip(axes[0], results.items()):
        acc = np.asarray(r["retrieval"]["accuracy"], dtype=float)
        lengths, depths = r["retrieval"]["lengths"], r["retrieval"]["depths"]
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(x) for x in lengths])
        annotate_cells(ax, acc, fontsize=8)
        ax.set_xlabel("needle depth (fraction of context)")
        ax.set_ylabel("context length")
        ax.set_title(label, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="exact-match accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
