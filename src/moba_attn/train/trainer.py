"""The training loop: one :class:`Run` per model, stepped by ``train`` (one run) or by
``compare`` (several runs side by side on one device)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import PRESETS, TrainConfig, UsageError
from .data import Corpus, load_corpus
from .modeling import (
    AttentionSwitch,
    build_model,
    config_from_dict,
    count_params,
    model_config,
    run_sparsity,
)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
FLAT_TAIL = 0.2  # the summary reports the held-out change over this last share of the steps
COLUMNS = (
    "step",
    "loss",
    "val_loss",
    "lr",
    "tokens_per_s",
    "tokens_seen",
    "attn",
    "grad_norm",
    "step_time_s",
    "elapsed_s",
)
# Fields that must match between a checkpoint and the run that resumes it.
RESUME_FIXED = (
    "preset",
    "attn",
    "switch_at",
    "full_attn_layers",
    "block_size",
    "topk",
    "seq_len",
    "batch_size",
    "seed",
    "data",
    "corpus",
    "tokenizer",
    "retrieval_frac",
)


def resolve_device(name: str | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``): CUDA when available, else the CPU; otherwise the device named.

    Raises :class:`UsageError` for a name that is no device or a device this machine lacks.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {name!r}: CUDA is not available on this machine "
                f"(torch {torch.__version__}); use --device cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise UsageError(f"device {name!r} is not available on this machine")
    return dev


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default (``dtype="auto"``); fp32 elsewhere or when asked."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype not in ("auto", "fp32"):
        raise UsageError(f"dtype must be auto, bf16 or fp32, got {dtype!r}")
    return contextlib.nullcontext()


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """PyTorch's deterministic-algorithms switch, on for the block and restored after.

    With ``on=False`` nothing changes. On CUDA, cuBLAS also needs ``CUBLAS_WORKSPACE_CONFIG``
    set before its first matmul in the process (``Run`` sets it when its config asks).
    """
    if not on:
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up for ``cfg.warmup`` steps, then cosine decay to ``lr * min_lr_frac``."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    t = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def heldout_tail_change(vals: list[tuple[int, float]], last_step: int) -> float | None:
    """Change (%) of the periodic held-out loss ``[(step, loss)]`` over the last
    ``FLAT_TAIL`` of ``last_step`` steps: from the last evaluation at or before the window's
    first step (so sparse evaluations never shrink the window) to the last evaluation."""
    before = [i for i, (s, _) in enumerate(vals) if s <= (1 - FLAT_TAIL) * last_step]
    tail = [v for _, v in vals[before[-1] if before else 0:]]  # none before: all are inside
    return 100 * (tail[-1] / tail[0] - 1) if len(tail) > 1 and tail[0] > 0 else None


class Run:
    """A model, its optimizer, data stream and output directory; ``step()`` trains one batch.

    Output directory: ``config.json`` (the run's :class:`TrainConfig`), ``metrics.csv`` (a row
    per logged step), ``checkpoint.pt`` (model + optimizer + step; written atomically),
    ``loss.png`` and ``summary.json`` (written by :meth:`finish`).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out: str | Path,
        *,
        resume: bool = False,
        label: str | None = None,
        corpus: Corpus | None = None,
    ):
        cfg = cfg.resolved()
        self.out = Path(out)
        self.label = self.out.name if label is None else label
        self.device = resolve_device(cfg.device)
        ckpt = self.out / CHECKPOINT
        state = None
        if ckpt.exists():
            if not resume:
                raise FileExistsError(
                    f"{self.out} already holds a run: pass --resume to continue it, "
                    "or choose another --out"
                )
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            saved = TrainConfig.from_json(state["train_config"]).resolved()
            diff = [
                f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}"
                for k in RESUME_FIXED
                if getattr(saved, k) != getattr(cfg, k)
            ]
            if diff:
                raise UsageError(
                    f"cannot resume {ckpt} with different settings ({'; '.join(diff)})"
                )
        self.cfg = cfg
        if cfg.deterministic:  # read by cuBLAS when it first runs in this process
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if corpus is None:
            corpus = load_corpus(cfg.data, cfg.tokenizer, cfg.corpus)
        self.corpus = corpus
        self.hf_config = model_config(cfg, self.corpus.vocab_size, self.corpus.sep_id)
        self.model = build_model(self.hf_config, cfg.seed).to(self.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.95),
            eps=1e-8,
            fused=self.device.type == "cuda",
        )
        self.switch = AttentionSwitch(self.model, cfg)
        self.step_no, self.tokens_seen, self.elapsed = 0, 0, 0.0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optim"])
            self.step_no, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
            self.elapsed = float(state.get("elapsed_s", 0.0))
        self.out.mkdir(parents=True, exist_ok=True)  # only now: a rejected run leaves no folder
        cfg.save(self.out / "config.json")
        self.rows = [r for r in read_metrics(self.out) if int(r["step"]) <= self.step_no]
        with open(self.out / METRICS, "w", newline="") as f:  # drops rows past the checkpoint
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in COLUMNS} for r in self.rows)
        self._csv = open(self.out / METRICS, "a", newline="")  # noqa: SIM115 - kept open while training
        self._writer = csv.DictWriter(self._csv, fieldnames=COLUMNS)
        n_eval = cfg.eval_batches * cfg.batch_size
        self.heldout = self.corpus.heldout_windows(n_eval, cfg.seq_len)
        self.n_params = count_params(self.model)

    # ------------------------------------------------------------------ stepping
    @property
    def done(self) -> bool:
        return self.step_no >= self.cfg.steps

    def step(self) -> dict:
        cfg, model = self.cfg, self.model
        mode = cfg.mode_at(self.step_no)
        self.switch.set(mode)
        lr = lr_at(cfg, self.step_no)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x = self.corpus.train_batch(
            self.step_no, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.retrieval_frac
        ).to(self.device, non_blocking=True)
        model.train()
        _sync(self.device)
        t0 = time.perf_counter()
        with deterministic_algorithms(cfg.deterministic):
            with autocast_for(self.device, cfg.dtype):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        loss_v = float(loss.detach())
        _sync(self.device)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"{self.label}: loss is {loss_v} at step {self.step_no + 1}")
        self.step_no += 1
        self.tokens_seen += x.numel()
        self.elapsed += dt
        row = {
            "step": self.step_no,
            "loss": round(loss_v, 5),
            "val_loss": "",
            "lr": f"{lr:.3e}",
            "tokens_per_s": round(x.numel() / dt, 1),
            "tokens_seen": self.tokens_seen,
            "attn": mode,
            "grad_norm": round(float(gnorm), 4),
            "step_time_s": round(dt, 4),
            "elapsed_s": round(self.elapsed, 2),
        }
        if self.step_no % cfg.eval_every == 0 or self.done:
            row["val_loss"] = round(self.eval_loss(), 5)
        if self.step_no % cfg.log_every == 0 or self.done or row["val_loss"] != "":
            self._writer.writerow(row)
            self._csv.flush()
            self.rows.append({k: str(v) for k, v in row.items()})
        if self.step_no % cfg.ckpt_every == 0:
            self.save()
        return row

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Mean held-out loss in the current attention mode (plain text, no retrieval task)."""
        self.model.eval()
        total = 0.0
        bs = self.cfg.batch_size
        for i in range(0, len(self.heldout), bs):
            x = self.heldout[i : i + bs].to(self.device)
            with autocast_for(self.device, self.cfg.dtype):
                total += float(self.model(input_ids=x, labels=x).loss) * len(x)
        self.model.train()
        return total / len(self.heldout)

    # ------------------------------------------------------------------ saving
    def save(self) -> None:
        _atomic_save(
            {
                "model": self.model.state_dict(),
                "optim": self.opt.state_dict(),
                "step": self.step_no,
                "tokens_seen": self.tokens_seen,
                "elapsed_s": self.elapsed,
                "train_config": self.cfg.to_json(),
                "model_config": self.hf_config.to_dict(),
            },
            self.out / CHECKPOINT,
        )

    def summary(self) -> dict:
        rows = [r for r in self.rows if r.get("loss")]
        tail = rows[-max(1, len(rows) // 20) :]
        vals = [(int(r["step"]), float(r["val_loss"])) for r in self.rows if r.get("val_loss")]
        best = min(vals, key=lambda sv: sv[1]) if vals else (None, None)
        tps = {
            m: [float(r["tokens_per_s"]) for r in rows[min(3, len(rows) - 1) :] if r["attn"] == m]
            for m in ("moba", "full")
        }
        all_tps = tps["moba"] + tps["full"]
        return {
            "label": self.label,
            "attn": self.cfg.attn,
            "full_attn_layers": list(self.cfg.full_attn_layers),
            "seed": self.cfg.seed,
            "step": self.step_no,
            "steps": self.cfg.steps,
            "complete": self.done,
            "tokens_seen": self.tokens_seen,
            "params": self.n_params,
            "final_train_loss": float(np.mean([float(r["loss"]) for r in tail])) if tail else None,
            "final_val_loss": vals[-1][1] if vals else None,
            "best_val_loss": best[1],  # the lowest periodic held-out loss, and its step
            "best_val_step": best[0],
            "val_change_tail_pct": heldout_tail_change(vals, self.step_no),
            "tokens_per_s": float(np.median(all_tps)) if all_tps else None,
            "tokens_per_s_moba": float(np.median(tps["moba"])) if tps["moba"] else None,
            "tokens_per_s_full": float(np.median(tps["full"])) if tps["full"] else None,
            "sparsity": run_sparsity(self.cfg),
            "train_time_s": round(self.elapsed, 1),
            "seq_len": self.cfg.seq_len,
            "block_size": self.cfg.block_size,
            "topk": self.cfg.topk,
        }

    def switch_tokens(self) -> float | None:
        if self.cfg.attn != "hybrid":
            return None
        return float(self.cfg.switch_step * self.cfg.batch_size * self.cfg.seq_len)

    def finish(self) -> dict:
        """Checkpoint, ``loss.png`` and ``summary.json``; returns the summary."""
        from .plots import plot_loss_curves

        self.save()
        sw = self.switch_tokens()
        plot_loss_curves(
            {self.label: self.rows},
            self.out / "loss.png",
            switch_tokens={self.label: sw} if sw else None,
            title=f"{self.label}: {describe(self.cfg)}",
        )
        s = self.summary()
        (self.out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
        return s

    def close(self) -> None:
        self._csv.close()


def describe(cfg: TrainConfig) -> str:
    p = PRESETS[cfg.preset]
    s = f"preset {cfg.preset}, {p.num_layers}L, T={cfg.seq_len}, attn={cfg.attn}"
    if cfg.attn != "full":
        s += f" (B={cfg.block_size}, k={cfg.topk}"
        if cfg.full_attn_layers:
            s += f", full layers {list(cfg.full_attn_layers)}"
        if cfg.attn == "hybrid":
            s += f", full from step {cfg.switch_step}"
        s += ")"
    return s


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    time_limit_s: float | None = None,
    log=print,
) -> dict:
    """Train one model; returns its summary. Stops early (checkpointed) after ``time_limit_s``
    seconds (``None``: no limit; ``0``: after one step)."""
    if time_limit_s is not None and not time_limit_s >= 0:
        raise UsageError(f"time_limit_s must be >= 0 seconds, got {time_limit_s}")
    run = Run(cfg, out, resume=resume)
    cfg = run.cfg
    log(
        f"[moba train] {describe(cfg)}; {run.n_params / 1e6:.2f}M params on {run.device}; "
        f"{run.corpus.describe()}"
    )
    warn = run.corpus.repeat_warning(cfg.steps * cfg.batch_size * cfg.seq_len)
    if warn:
        log(f"[moba train] {warn}")
    if run.step_no:
        log(f"[moba train] resuming {run.out} at step {run.step_no}/{cfg.steps}")
    bar = _bar(total=cfg.steps, initial=run.step_no, desc=run.label, enabled=progress)
    start = time.perf_counter()
    try:
        while not run.done:
            row = run.step()
            bar.update(1)
            bar.set_postfix(
                loss=row["loss"],
                tok_s=f"{row['tokens_per_s']:.0f}",
                attn=row["attn"],
                **({"val": row["val_loss"]} if row["val_loss"] != "" else {}),
            )
            if (
                time_limit_s is not None
                and time.perf_counter() - start > time_limit_s
                and not run.done
            ):
                log(
                    f"[moba train] time limit reached at step {run.step_no}/{cfg.steps}; "
                    "rerun with --resume to continue"
                )
                break
    finally:
        bar.close()
    summary = run.finish()
    run.close()
    val = summary["final_val_loss"]
    log(
        f"[moba train] step {summary['step']}: train loss {summary['final_train_loss']:.4f}, "
        f"held-out {'-' if val is None else f'{val:.4f}'}, {summary['tokens_per_s'] or 0:.0f} tok/s "
        f"-> {run.out}"
    )
    return summary


def _bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True
    )


# ---------------------------------------------------------------------- loading for eval / viz
@dataclass
class LoadedRun:
    label: str
    path: Path
    cfg: TrainConfig
    model: torch.nn.Module
    corpus: Corpus
    step: int
    switch: AttentionSwitch
    device: torch.device

    def set_attn(self, attn: str = "as-trained") -> str:
        """``as-trained`` = the mode of the run's last step; or ``full`` / ``moba``."""
        mode = self.cfg.final_mode() if attn == "as-trained" else attn
        self.switch.set(mode)
        return mode


def checkpoint_path(path: str | Path) -> Path:
    """The ``checkpoint.pt`` of a run directory (or the file itself); ``FileNotFoundError``
    when there is none."""
    path = Path(path)
    ckpt = path / CHECKPOINT if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}: train first with `moba train --out DIR`")
    return ckpt


def load_run(path: str | Path, device: str = "auto", label: str | None = None) -> LoadedRun:
    """Load a run directory (or its ``checkpoint.pt``) for evaluation, in eval mode."""
    ckpt = checkpoint_path(path)
    dev = resolve_device(device)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_json(state["train_config"]).resolved()
    from .modeling import BASE_ATTN, _hf

    AutoModelForCausalLM, _ = _hf()
    model = AutoModelForCausalLM.from_config(
        config_from_dict(state["model_config"]), attn_implementation=BASE_ATTN
    )
    model.load_state_dict(state["model"])
    model.to(dev).eval()
    corpus = load_corpus(cfg.data, cfg.tokenizer, cfg.corpus)
    run_dir = ckpt.parent
    return LoadedRun(
        run_dir.name if label is None else label,
        run_dir,
        cfg,
        model,
        corpus,
        int(state["step"]),
        AttentionSwitch(model, cfg),
        dev,
    )
