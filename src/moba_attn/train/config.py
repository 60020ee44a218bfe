"""Presets and the run configuration: the one place where training defaults live."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

ATTN_MODES = ("full", "moba", "hybrid")
DECODE_MODES = ("moba", "full")
DTYPES = ("auto", "bf16", "fp32")
CORPORA = ("stdlib", "python")


class UsageError(ValueError):
    """A setting, path or device that cannot work, found before any work starts.

    ``moba`` prints its message as one line and exits with status 2.
    """


def _default(value, default):
    """``None`` means the default; every other value (0 included) is kept and validated."""
    return default if value is None else value


def _at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Preset:
    """A Llama-style model shape plus the training defaults that suit it."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    block_size: int
    topk: int
    layer_hybrid_full: tuple[int, ...]  # full-attention layers of the layer-wise hybrid
    eval_every: int
    note: str


PRESETS: dict[str, Preset] = {
    # ~0.8M params; 200 steps of 8 x 512 bytes take about 2 minutes on a 2-core CPU.
    "tiny": Preset(
        "tiny",
        128,
        4,
        4,
        2,
        384,
        seq_len=512,
        batch_size=8,
        steps=200,
        lr=2e-3,
        block_size=64,
        topk=3,
        layer_hybrid_full=(-1,),
        eval_every=50,
        note="CPU smoke runs",
    ),
    # ~4.8M params, 8K context, block 512 / topk 3: the 8K setting at ~110 tokens per
    # parameter (8000 steps x 8 x 8192 = 524M tokens, 1.35 passes over the `python` corpus).
    # Measured runs and how far their curves had flattened: benchmarks/RESULTS.md.
    "micro": Preset(
        "micro",
        256,
        6,
        4,
        2,
        768,
        seq_len=8192,
        batch_size=8,
        steps=8000,
        lr=2e-3,
        block_size=512,
        topk=3,
        layer_hybrid_full=(-1,),
        eval_every=250,
        note="GPU, ~4.8M params, 8K context, ~110 tokens per parameter",
    ),
    # ~13M params, 8K context, block 512 / topk 3: the `small` setting at about 40 tokens per
    # parameter (the default 6000 steps x 8 x 8192).
    "mini": Preset(
        "mini",
        384,
        8,
        6,
        2,
        1024,
        seq_len=8192,
        batch_size=8,
        steps=6000,
        lr=2e-3,
        block_size=512,
        topk=3,
        layer_hybrid_full=(-2, -1),
        eval_every=250,
        note="GPU, ~13M params, 8K context",
    ),
    # ~52M params, 8K context, block 512 / topk 3 (the paper's 8K setting, 81% nominal sparsity).
    "small": Preset(
        "small",
        640,
        12,
        10,
        2,
        1728,
        seq_len=8192,
        batch_size=8,
        steps=2000,
        lr=1e-3,
        block_size=512,
        topk=3,
        layer_hybrid_full=(-2, -1),
        eval_every=100,
        note="GPU, ~50M params, 8K context",
    ),
    # ~150M params, 32K context, block 2048 / topk 3 (the paper's 32K setting).
    "medium": Preset(
        "medium",
        1024,
        14,
        16,
        4,
        2816,
        seq_len=32768,
        batch_size=2,
        steps=2000,
        lr=6e-4,
        block_size=2048,
        topk=3,
        layer_hybrid_full=(-2, -1),
        eval_every=100,
        note="GPU, ~150M params, 32K context",
    ),
}


@dataclass
class TrainConfig:
    """Everything a run depends on; saved next to its checkpoint as ``config.json``.

    ``None`` fields take the preset's value in :meth:`resolved`.
    """

    preset: str = "tiny"
    attn: str = "full"  # full | moba | hybrid (MoBA for switch_at of the steps, then full)
    switch_at: float = 0.9
    full_attn_layers: tuple[int, ...] = ()  # layers kept dense while MoBA is on (negative ok)
    block_size: int | None = None
    topk: int | None = None
    decode: str = "moba"  # passed to enable_moba: how generation decodes (moba | full)
    seq_len: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    min_lr_frac: float = 0.1  # cosine decay ends at lr * min_lr_frac
    warmup: int | None = None  # default: 5% of steps (at least 10)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    data: tuple[str, ...] = ()  # text files / directories; empty = the embedded corpus
    corpus: str = "stdlib"  # embedded corpus: stdlib | python (stdlib + site-packages sources)
    tokenizer: str | None = None  # local tokenizer directory; None = raw bytes (vocab 256)
    retrieval_frac: float = 0.25  # share of training sequences carrying the retrieval task
    eval_every: int | None = None
    eval_batches: int = 4
    ckpt_every: int = 200
    log_every: int = 1
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"
    deterministic: bool = False  # bit-identical reruns: fixed-order reductions (see trainer)
    extra: dict = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every preset-dependent ``None`` filled in, validated.

        ``None`` means the preset's value; any other value is used as given or rejected:
        raises :class:`UsageError` (a ``ValueError``) naming the field and its valid range.
        """
        if self.preset not in PRESETS:
            raise UsageError(f"unknown preset {self.preset!r}: choose one of {sorted(PRESETS)}")
        p = PRESETS[self.preset]
        c = replace(
            self,
            block_size=_default(self.block_size, p.block_size),
            topk=_default(self.topk, p.topk),
            seq_len=_default(self.seq_len, p.seq_len),
            steps=_default(self.steps, p.steps),
            batch_size=_default(self.batch_size, p.batch_size),
            lr=_default(self.lr, p.lr),
            eval_every=_default(self.eval_every, p.eval_every),
            full_attn_layers=tuple(int(i) for i in self.full_attn_layers),
            data=tuple(str(d) for d in self.data),
        )
        c._check()
        if c.warmup is None:
            c = replace(c, warmup=max(10, c.steps // 20) if c.steps > 20 else 0)
        return c

    def _check(self) -> None:
        for name, choices in (
            ("attn", ATTN_MODES),
            ("decode", DECODE_MODES),
            ("corpus", CORPORA),
            ("dtype", DTYPES),
        ):
            if getattr(self, name) not in choices:
                raise UsageError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("block_size", "topk", "steps", "batch_size", "eval_every", "eval_batches",
                     "ckpt_every", "log_every"):
            _at_least(name, getattr(self, name), 1)
        _at_least("seq_len", self.seq_len, 2)  # one token predicts nothing
        _at_least("seed", self.seed, 0)  # numpy's generators take non-negative seeds
        if self.warmup is not None:
            _at_least("warmup", self.warmup, 0)
        for name in ("switch_at", "retrieval_frac", "min_lr_frac"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UsageError(f"{name} must be in [0, 1], got {v}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise UsageError(f"grad_clip must be a positive number, got {self.grad_clip}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"weight_decay must be >= 0, got {self.weight_decay}")
        n = PRESETS[self.preset].num_layers
        bad = [i for i in self.full_attn_layers if not -n <= i < n]
        if bad:
            raise UsageError(
                f"full_attn_layers {bad} out of range for the {n}-layer {self.preset!r} preset "
                f"(valid: {-n} .. {n - 1})"
            )

    @property
    def switch_step(self) -> int:
        """First step that runs with full attention (hybrid); ``steps`` for pure MoBA."""
        if self.attn == "hybrid":
            return round(self.switch_at * self.steps)
        return 0 if self.attn == "full" else self.steps

    def mode_at(self, step: int) -> str:
        """Attention used by training step ``step`` (0-based): ``"full"`` or ``"moba"``."""
        return "moba" if step < self.switch_step else "full"

    def final_mode(self) -> str:
        return (
            "full"
            if self.attn == "full" or (self.attn == "hybrid" and self.switch_step < self.steps)
            else "moba"
        )

    def full_layer_ids(self) -> list[int]:
        n = PRESETS[self.preset].num_layers
        return sorted({i % n for i in self.full_attn_layers})

    def to_json(self) -> dict:
        d = asdict(self)
        d["full_attn_layers"] = list(self.full_attn_layers)
        d["data"] = list(self.data)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["full_attn_layers"] = tuple(d.get("full_attn_layers", ()))
        d["data"] = tuple(d.get("data", ()))
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.from_json(json.loads(Path(path).read_text()))
