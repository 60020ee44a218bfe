"""Training data: an embedded corpus (the Python standard library's sources, read as bytes),
user text files, packing into long sequences, a held-out split and the synthetic retrieval task.

Everything here is deterministic: the same files, seed and step always give the same batch,
so variants trained side by side see identical data and resumed runs continue exactly.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .config import CORPORA, UsageError

HELDOUT_FRAC = 0.03  # share of documents (by a hash of their path) kept for evaluation
TEXT_SUFFIXES = (
    ".py",
    ".txt",
    ".md",
    ".rst",
    ".json",
    ".c",
    ".h",
    ".cpp",
    ".rs",
    ".go",
    ".js",
    ".ts",
    ".java",
    ".tex",
    ".html",
    ".csv",
    ".yaml",
    ".yml",
    ".toml",
)
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


# ----------------------------------------------------------------------------- retrieval task
@dataclass(frozen=True)
class RetrievalTask:
    """Key-value records hidden in the text, queried at the end of the sequence.

    A record is ``"\\n<kv 4821=93017>\\n"`` placed at some depth of the sequence; a query is
    ``"\\n<kv 4821="`` in the last tokens and the answer is the value's digits. Only a model
    that finds the record (possibly many blocks back) can predict them: random guessing
    succeeds with probability 10**-value_digits. In training every record is queried, in
    shuffled order; in evaluation one record (the needle) is queried, the others distract.
    """

    n_pairs: int = 4
    key_digits: int = 4
    value_digits: int = 5
    max_depth: float = 0.9  # training records start within the first 90% of the body

    @staticmethod
    def record(key: str, value: str) -> str:
        return f"\n<kv {key}={value}>\n"

    @staticmethod
    def query(key: str) -> str:
        return f"\n<kv {key}="

    def draw_pairs(self, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
        keys = rng.choice(10**self.key_digits, size=n, replace=False)
        vals = rng.integers(0, 10**self.value_digits, size=n)
        return [
            (f"{k:0{self.key_digits}d}", f"{v:0{self.value_digits}d}") for k, v in zip(keys, vals)
        ]


TASK = RetrievalTask()


# ----------------------------------------------------------------------------- corpus
MAX_PASSES = 2.0  # more passes over the training split than this get a warning


def python_files(corpus: str = "stdlib") -> list[tuple[Path, str]]:
    """``(file, name used for the split)`` of the embedded corpus.

    ``stdlib``: the ``.py`` files of the running Python's standard library (~31 MB on 3.11).
    ``python``: those plus every ``.py`` file in site-packages (torch, transformers, ... :
    several times larger; depends on what is installed).
    """
    if corpus not in CORPORA:
        raise UsageError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    paths = sysconfig.get_paths()
    root = Path(paths["stdlib"])
    out = [
        (p, str(p.relative_to(root)))
        for p in sorted(root.rglob("*.py"))
        if not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    ]
    if corpus == "python":
        seen = set()
        for key in ("purelib", "platlib"):
            site = Path(paths[key])
            if site in seen or not site.is_dir():
                continue
            seen.add(site)
            out += [
                (p, "site/" + str(p.relative_to(site)))
                for p in sorted(site.rglob("*.py"))
                if "__pycache__" not in p.parts
            ]
    return out


def user_files(paths: tuple[str, ...]) -> list[tuple[Path, str]]:
    """``(file, name used for the split)`` for files and directories (text suffixes only)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if (
                    f.is_file()
                    and f.suffix.lower() in TEXT_SUFFIXES
                    and not _SKIP_DIRS.intersection(f.parts)
                ):
                    out.append((f, str(f.relative_to(p))))
        elif p.is_file():
            out.append((p, p.name))
        else:
            raise FileNotFoundError(f"--data {p}: no such file or directory")
    if not out:
        raise UsageError(f"--data {list(paths)}: no text files found (suffixes {TEXT_SUFFIXES})")
    return out


def is_heldout(name: str, frac: float = HELDOUT_FRAC) -> bool:
    return zlib.crc32(name.encode()) % 10_000 < int(frac * 10_000)


class Corpus:
    """Token streams (``train``, ``heldout``) of packed documents, separated by ``sep_id``.

    Byte mode (no tokenizer): a document's UTF-8 bytes are its tokens (vocabulary 256, byte 0
    separates documents; source text never contains it). With a tokenizer directory, documents
    are encoded with ``AutoTokenizer.from_pretrained(dir)`` (local files only) and separated
    by its EOS token.
    """

    def __init__(
        self,
        data: tuple[str, ...] = (),
        tokenizer: str | None = None,
        corpus: str = "stdlib",
        heldout_frac: float = HELDOUT_FRAC,
    ):
        self.tokenizer = None
        if tokenizer is not None:
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise ImportError(
                    "--tokenizer needs transformers: pip install 'moba-attn[train]'"
                ) from e
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
            self.vocab_size = len(self.tokenizer)
            sep = self.tokenizer.eos_token_id
            self.sep_id = int(sep if sep is not None else 0)
        else:
            self.vocab_size, self.sep_id = 256, 0
        if data:
            docs = user_files(data)
            self.source = "files: " + ", ".join(data)
        else:
            docs = python_files(corpus)
            where = sysconfig.get_paths()["stdlib"]
            self.source = (
                f"python stdlib sources ({where})"
                if corpus == "stdlib"
                else f"python stdlib + site-packages sources ({where})"
            )
        train, held = [], []
        for f, name in docs:
            ids = self._encode_doc(f.read_bytes())
            if len(ids):
                (held if is_heldout(name, heldout_frac) else train).append(ids)
        self.n_docs = (len(train), len(held))
        dtype = np.uint8 if self.tokenizer is None else np.int32
        sep = np.array([self.sep_id], dtype=dtype)

        def pack(parts):
            return (
                np.concatenate([x for d in parts for x in (d.astype(dtype), sep)])
                if parts
                else np.zeros(0, dtype)
            )

        self.train, self.heldout = pack(train), pack(held)
        # Too few documents for a split by file: hold out the tail of the stream instead.
        if len(self.heldout) < 0.5 * heldout_frac * (
            len(self.train) + len(self.heldout)
        ) or not len(self.train):
            whole = np.concatenate([self.train, self.heldout])
            cut = int(len(whole) * (1 - max(heldout_frac, 0.05)))
            self.train, self.heldout = whole[:cut], whole[cut:]

    # ---- text <-> tokens
    def _encode_doc(self, raw: bytes) -> np.ndarray:
        if self.tokenizer is None:
            return np.frombuffer(raw, dtype=np.uint8)
        text = raw.decode("utf-8", errors="replace")
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)

    def encode(self, text: str) -> np.ndarray:
        if self.tokenizer is None:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids)

    def describe(self) -> str:
        unit = "bytes" if self.tokenizer is None else "tokens"
        return (
            f"{self.source}: {len(self.train):,} train / {len(self.heldout):,} held-out {unit} "
            f"({self.n_docs[0]} / {self.n_docs[1]} documents), vocab {self.vocab_size}"
        )

    def repeat_warning(self, tokens: int, max_passes: float = MAX_PASSES) -> str | None:
        """A warning when ``tokens`` training tokens are more than ``max_passes`` passes over
        the training split (held-out loss then rises as the model memorises it), else None."""
        passes = tokens / max(len(self.train), 1)
        if passes <= max_passes:
            return None
        return (
            f"WARNING: {tokens:,} training tokens are {passes:.1f} passes over the "
            f"{len(self.train):,}-token training split; held-out loss will rise from memorisation "
            "before the end. Use more data (--corpus python, --data DIR) or fewer --steps."
        )

    # ---- windows and batches
    def _window(self, stream: np.ndarray, start: int, length: int) -> np.ndarray:
        if len(stream) <= length:
            reps = length // max(len(stream), 1) + 2
            stream = np.tile(stream, reps)
        return stream[start : start + length].astype(np.int64)

    def train_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int, retrieval_frac: float
    ) -> torch.Tensor:
        """``[batch_size, seq_len]`` int64 training tokens for ``step``; a function of
        (seed, step) only. Each row carries the retrieval task with probability ``retrieval_frac``."""
        rng = np.random.default_rng([seed, step, 0x6D6F6261])
        hi = max(len(self.train) - seq_len, 1)
        rows = []
        for _ in range(batch_size):
            x = self._window(self.train, int(rng.integers(0, hi)), seq_len)
            if (
                rng.random() < retrieval_frac
                and self._retrieval_len(TASK, 1, False) <= seq_len // 2
            ):
                x = self.insert_retrieval(x, rng, query_at=float(rng.uniform(0.5, 1.0)))[0]
            rows.append(x)
        return torch.from_numpy(np.stack(rows))

    def heldout_windows(self, n: int, seq_len: int, seed: int = 1234) -> torch.Tensor:
        """``[n, seq_len]`` held-out windows at fixed, evenly spread offsets (plain text only)."""
        hi = max(len(self.heldout) - seq_len, 1)
        starts = np.linspace(0, hi - 1, n).astype(np.int64) if n > 1 else np.array([0])
        return torch.from_numpy(
            np.stack([self._window(self.heldout, int(s), seq_len) for s in starts])
        )

    # ---- retrieval
    def _retrieval_len(self, task: RetrievalTask, n: int, one_query: bool) -> int:
        """Tokens the task adds with ``n`` records (upper bound over keys/values)."""
        key, val = "9" * task.key_digits, "9" * task.value_digits
        rec = len(self.encode(task.record(key, val)))
        qa = len(self.encode(task.query(key) + val + ">"))
        return n * rec + (1 if one_query else n) * qa + 1

    def insert_retrieval(
        self,
        x: np.ndarray,
        rng: np.random.Generator,
        *,
        depths=None,
        needle: int | None = None,
        query_at: float | None = None,
        task: RetrievalTask = TASK,
    ):
        """Hide ``task.n_pairs`` records in ``x`` and query them later; same length as ``x``.

        The queries end the sequence (``query_at=None``, evaluation) or start at fraction
        ``query_at`` of the room left for them, with text continuing after them (training, so
        that the last positions of a sequence are ordinary text as often as any others).

        Sequences too short for all records get fewer (the task never takes more than half of
        ``x``); :class:`UsageError` (a ``ValueError``) when not even one fits.

        ``depths`` (fractions of the body, one per record) default to uniform in
        ``[0, task.max_depth]``. With ``needle=i`` only record ``i`` is queried (evaluation);
        otherwise all are, in shuffled order. Returns ``(tokens, answers, starts)`` where ``answers``
        lists ``(start, end)`` token ranges of the queried values, plus ``starts``, the first
        token of every record.
        """
        seq_len = len(x)
        n = task.n_pairs
        while n > 0 and self._retrieval_len(task, n, needle is not None) > seq_len // 2:
            n -= 1  # short sequences carry fewer records: at least half stays filler text
        if n == 0:
            raise UsageError(f"seq_len {seq_len} is too short for the retrieval task")
        pairs = task.draw_pairs(rng, n)
        if depths is None:
            depths = rng.uniform(0.0, task.max_depth, size=n)
        depths = list(depths)[:n]
        order = [needle] if needle is not None else list(rng.permutation(n))
        tail, answers = [], []
        for i in order:
            key, val = pairs[i]
            q, a = self.encode(task.query(key)), self.encode(val)
            tail.append(q)
            answers.append((sum(map(len, tail)), sum(map(len, tail)) + len(a)))
            tail.append(a)
            tail.append(self.encode(">"))
        tail.append(self.encode("\n"))
        tail = np.concatenate(tail)
        recs = [self.encode(task.record(k, v)) for k, v in pairs]
        room = seq_len - len(tail)
        body_len = room if query_at is None else max(seq_len // 2, int(query_at * room))
        filler_len = body_len - sum(map(len, recs))
        # Record i goes after filler token depth * filler_len, keeping the depth's proportion.
        at = sorted((int(d * filler_len), i) for i, d in enumerate(depths))
        parts, pos, starts = [], 0, [0] * len(recs)
        for cut, i in at:
            cut = min(max(cut, pos), filler_len)
            parts.append(x[pos:cut])
            starts[i] = sum(map(len, parts))
            parts.append(recs[i])
            pos = cut
        parts.append(x[pos:filler_len])
        body = np.concatenate(parts)
        after = x[filler_len : filler_len + room - body_len]
        out = np.concatenate([body, tail, after]).astype(np.int64)
        assert len(out) == seq_len
        return out, [(body_len + s, body_len + e) for s, e in answers], starts


@lru_cache(maxsize=4)
def load_corpus(
    data: tuple[str, ...] = (), tokenizer: str | None = None, corpus: str = "stdlib"
) -> Corpus:
    """Cached :class:`Corpus` (building it reads every file once)."""
    return Corpus(tuple(data), tokenizer, corpus)
