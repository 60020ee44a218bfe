"""Presets and the run configuration: the one place where training defaults live."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

ATTN_MODES = ("full", "moba", "hybrid")


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
    # A 4731-step run (310M tokens) on one H200 was still falling 4-8% over its last 20%
    # (benchmarks/RESULTS.md), like the `mini` preset's 144M-token run.
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
    # parameter (the default 6000 steps x 8 x 8192). A 2192-step run (144M tokens) on two
    # H200s was still falling 3.9-4.6% over its last 20% (benchmarks/RESULTS.md).
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
        """A copy with every preset-dependent ``None`` filled in, validated."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {sorted(PRESETS)}")
        if self.attn not in ATTN_MODES:
            raise ValueError(f"attn must be one of {ATTN_MODES}, got {self.attn!r}")
        p = PRESETS[self.preset]
        c = replace(
            self,
            block_size=self.block_size or p.block_size,
            topk=self.topk or p.topk,
            seq_len=self.seq_len or p.seq_len,
            steps=self.steps or p.steps,
            batch_size=self.batch_size or p.batch_size,
            lr=self.lr or p.lr,
            eval_every=self.eval_every or p.eval_every,
            full_attn_layers=tuple(int(i) for i in self.full_attn_layers),
            data=tuple(str(d) for d in self.data),
        )
        if c.warmup is None:
            c = replace(c, warmup=max(10, c.steps // 20) if c.steps > 20 else 0)
        if c.corpus not in ("stdlib", "python"):
            raise ValueError(f"corpus must be 'stdlib' or 'python', got {c.corpus!r}")
        if not 0.0 <= c.switch_at <= 1.0:
            raise ValueError(f"switch_at must be in [0, 1], got {c.switch_at}")
        if not 0.0 <= c.retrieval_frac <= 1.0:
            raise ValueError(f"retrieval_frac must be in [0, 1], got {c.retrieval_frac}")
        for name in ("block_size", "topk", "seq_len", "steps", "batch_size"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        n = p.num_layers
        bad = [i for i in c.full_attn_layers if not -n <= i < n]
        if bad:
            raise ValueError(f"full_attn_layers {bad} out of range for a {n}-layer model")
        return c

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
