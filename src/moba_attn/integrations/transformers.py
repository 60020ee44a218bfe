"""MoBA inside HuggingFace transformers models (5.x): one call to switch, one to switch back.

    from moba_attn.integrations.transformers import enable_moba, disable_moba
    model = enable_moba(model, block_size=512, topk=3, full_attn_layers=(-3, -2, -1))
    model.generate(...)                      # MoBA prefill, MoBA (or dense) decode
    model = disable_moba(model)              # the attention implementation it had before

How it plugs in (nothing is patched at import time):
- ``"moba"`` is registered in transformers' ``AttentionInterface`` (the attention function) and
  ``AttentionMaskInterface`` (the mask function) when ``enable_moba`` (or ``register_moba``)
  runs. The mask function does not build a ``[B, 1, Tq, Tk]`` mask: it returns a
  :class:`MobaMask`, the ``[B, Tk]`` key-slot padding mask, so long contexts never allocate a
  quadratic mask and the attention function knows which slots hold real tokens.
- Settings live on the model config as ``config.moba`` (a dict: saved by ``save_pretrained``,
  read back by ``from_pretrained``, per model). The attention function reads them from
  ``module.config`` and ``module.layer_idx``.
- Padding (left or right) is removed before attention: the real tokens of every row are
  packed into flash-attn's varlen layout, so MoBA blocks start at each sequence's first real
  token. Query positions come from the cache length (``Tk - Tq``) and the mask (bottom-right
  alignment, as in the spec), never from the raw key count alone.
- Sparse decode: every MoBA layer keeps the fp32 centroids of the *full* key blocks next to
  the KV cache (a :class:`MobaDecodeState` attached to the cache's layer object, found through
  a forward pre-hook that sees the ``cache`` / ``past_key_values`` argument), updated one
  block at a time as blocks fill. A decode step costs O(Tk / block_size) for gating plus
  O(topk * block_size) for attention (:func:`moba_decode_attention`: Triton kernels on CUDA,
  the pure-PyTorch step elsewhere).
- Layers in ``full_attn_layers`` (and, with ``decode="full"``, every call that has cached keys)
  use PyTorch SDPA with the padding/causal mask, i.e. the model's dense attention.

Limits: caches whose key length is not the number of tokens seen (``StaticCache``, sliding
window caches) are rejected with a clear error; models with sliding-window or linear-attention
layers are rejected at ``enable_moba``; attention dropout must be 0 in MoBA layers.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..interface import moba_attn_func, moba_attn_varlen_func
from ..ops.gate import sortable_key

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "moba_attn.integrations.transformers needs transformers>=5.0: "
        "pip install 'moba-attn[hf]'"
    ) from exc

__all__ = [
    "ATTN_NAME",
    "CONFIG_KEY",
    "MobaDecodeState",
    "MobaMask",
    "MobaSettings",
    "disable_moba",
    "enable_moba",
    "get_decode_state",
    "moba_attention_forward",
    "moba_decode_attention",
    "moba_mask",
    "register_moba",
]

ATTN_NAME = "moba"  # the name registered in AttentionInterface / AttentionMaskInterface
CONFIG_KEY = "moba"  # config attribute holding the settings dict
DECODE_MODES = ("moba", "full")
_STATE_ATTR = "_moba_decode_state"
_CACHE_REF_ATTR = "_moba_cache_ref"
_HOOK_ATTR = "_moba_cache_hook"
DECODE_CHUNK_ELEMS = 1 << 26  # gathered key elements per decode chunk of rows


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class MobaSettings:
    """What ``enable_moba`` stores on ``config.moba`` (one source of truth for the layers).

    ``full_attn_layers`` holds non-negative layer indices (negatives are resolved at enable
    time); ``previous_attn_implementation`` is what ``disable_moba`` restores.
    """

    block_size: int
    topk: int
    full_attn_layers: tuple[int, ...] = ()
    decode: str = "moba"
    backend: str = "auto"
    previous_attn_implementation: str = "sdpa"
    deterministic: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["full_attn_layers"] = list(self.full_attn_layers)
        return d

    @staticmethod
    def from_config(config) -> MobaSettings:
        raw = getattr(config, CONFIG_KEY, None)
        if raw is None:
            raise ValueError(
                "this model has no MoBA settings (config.moba is missing): call "
                "moba_attn.integrations.transformers.enable_moba(model, block_size=..., topk=...)"
            )
        if isinstance(raw, MobaSettings):
            return raw
        raw = dict(raw)
        raw["full_attn_layers"] = tuple(int(i) for i in raw.get("full_attn_layers", ()))
        known = MobaSettings.__dataclass_fields__
        return MobaSettings(**{k: v for k, v in raw.items() if k in known})


def _check_settings(block_size, topk, decode, backend) -> None:
    for name, val in (("block_size", block_size), ("topk", topk)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    from ..interface import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# ----------------------------------------------------------------------------- mask function
class MobaMask:
    """What the ``"moba"`` mask function hands to every layer of one forward pass.

    ``padding``: ``[B, Tk]`` bool, True where a key slot holds a real token (None: all real).
    ``q_offset``: key slots already in the cache before this call (``Tk - Tq``).
    Derived per-row facts (real-token counts, first real slot, slot table) are computed once
    per forward and shared by all layers.
    """

    def __init__(self, padding: torch.Tensor | None, q_offset: int, q_length: int, kv_length: int):
        self.padding = padding
        self.q_offset = q_offset
        self.q_length = q_length
        self.kv_length = kv_length
        self._rows: _Rows | None = None

    @property
    def shape(self):  # for code that only looks at a mask's shape
        return (self.padding.shape[0] if self.padding is not None else 1, 1, self.q_length,
                self.kv_length)

    def rows(self) -> _Rows:
        if self._rows is None:
            self._rows = _Rows.build(self.padding, self.padding.shape[0], self.kv_length)
        return self._rows

    def __repr__(self) -> str:
        pad = None if self.padding is None else tuple(self.padding.shape)
        return f"MobaMask(padding={pad}, q_offset={self.q_offset}, q_length={self.q_length})"


class _Rows:
    """Where the real tokens of each row sit among the key slots."""

    def __init__(self, valid, n_real, first, contiguous):
        self.valid = valid  # [B, Tk] bool or None (all real)
        self.n_real = n_real  # [B] int64: real tokens per row
        self.first = first  # [B] int64: first real slot per row
        self.contiguous = contiguous  # real slots of row b are first[b] .. first[b]+n_real[b]-1
        self.n_real_list = n_real.tolist()
        self._table = None

    @staticmethod
    def build(valid: torch.Tensor | None, batch: int, tk: int, device=None) -> _Rows:
        if valid is None:
            n = torch.full((batch,), tk, dtype=torch.int64, device=device)
            return _Rows(None, n, torch.zeros_like(n), True)
        n = valid.sum(1)
        first = valid.to(torch.uint8).argmax(1)
        j = torch.arange(tk, device=valid.device)
        span = (j[None, :] >= first[:, None]) & (j[None, :] < (first + n)[:, None])
        return _Rows(valid, n, first, bool(torch.equal(span, valid)))

    def slots(self, b: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Key slot of real position ``pos`` of row ``b`` (broadcasting)."""
        if self.contiguous:
            return self.first[b] + pos
        if self._table is None:  # real slots first, in order
            self._table = torch.argsort((~self.valid).to(torch.uint8), dim=1, stable=True)
        return self._table[b, pos]


def moba_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
              attention_mask=None, **kwargs):
    """``AttentionMaskInterface`` entry for ``"moba"``: returns a :class:`MobaMask` or None.

    None means every key slot is a real token. Raises ``ValueError`` for caches whose key
    length is not the number of tokens seen (``StaticCache``, sliding-window caches).
    """
    q_offset = int(q_offset)
    kv_offset, kv_length, q_length = int(kv_offset), int(kv_length), int(q_length)
    if kv_offset != 0 or q_offset + q_length != kv_length:
        raise ValueError(
            "MoBA needs a KV cache whose key length equals the tokens seen so far (DynamicCache, "
            f"the default); got {q_offset} cached + {q_length} new tokens but {kv_length} key "
            f"slots (offset {kv_offset}). StaticCache / sliding-window caches are not supported: "
            "use generate() without cache_implementation='static'."
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask
    pad = attention_mask.to(torch.bool)
    if pad.shape[1] != kv_length:
        raise ValueError(
            f"attention_mask covers {pad.shape[1]} positions but the keys have {kv_length}: pass "
            "a 2D mask over all tokens seen so far (cached + new)"
        )
    if pad.shape[0] != batch_size:
        pad = pad.expand(batch_size, -1)
    if bool(pad.all()):
        return None
    return MobaMask(pad, q_offset, q_length, kv_length)


# ----------------------------------------------------------------------------- decode state
class MobaDecodeState:
    """fp32 centroids of the full key blocks of one layer's KV cache, per batch row.

    ``centroids[b, j]`` is the mean key of block ``j`` of row ``b`` (block ``j`` = real tokens
    ``j*B .. j*B+B-1``), valid for ``j < n_full[b]``. ``advance`` computes only the blocks that
    filled since the last call. ``blocks_computed`` counts centroid computations (one per
    block), ``rebuilds`` counts the times the state had to start over on a non-empty cache.
    """

    def __init__(self, batch: int, hkv: int, d: int, block_size: int, device):
        self.block_size = block_size
        self.centroids = torch.zeros(batch, 0, hkv, d, dtype=torch.float32, device=device)
        self.n_full = [0] * batch
        self.n_real = [0] * batch
        self.n_slots = 0
        self.last_key: torch.Tensor | None = None
        self.blocks_computed = 0
        self.rebuilds = 0

    @property
    def batch(self) -> int:
        return len(self.n_full)

    def matches(self, key: torch.Tensor, past: int, prev_real: list[int], bs: int) -> bool:
        """True when this state describes the first ``past`` slots of ``key`` with blocks of
        ``bs`` tokens (same slot count, batch, real-token counts and last cached key)."""
        if past == 0 or self.n_slots != past or self.batch != key.shape[0] or bs != self.block_size:
            return False
        if self.centroids.shape[2:] != key.shape[1:2] + key.shape[3:]:
            return False
        if self.centroids.device != key.device or self.n_real != prev_real:
            return False
        return self.last_key is not None and torch.equal(self.last_key, key[:, :, past - 1])

    @torch.no_grad()
    def advance(self, key: torch.Tensor, rows: _Rows, n_real: list[int], n_slots: int) -> None:
        """Cover real tokens ``0 .. n_real[b]-1`` of every row: centroids of blocks that filled."""
        bs = self.block_size
        pairs = [(b, j) for b in range(self.batch) for j in range(self.n_full[b], n_real[b] // bs)]
        if pairs:
            need = max(j for _, j in pairs) + 1
            cap = self.centroids.shape[1]
            if need > cap:
                grow = self.centroids.new_zeros(
                    (self.batch, max(need, 2 * cap) - cap) + self.centroids.shape[2:])
                self.centroids = torch.cat([self.centroids, grow], 1)
            dev = key.device
            pb = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=dev)
            pj = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=dev)
            step = max(1, (1 << 22) // max(bs * key.shape[1] * key.shape[3], 1))
            off = torch.arange(bs, device=dev)
            for s in range(0, len(pairs), step):
                b, j = pb[s : s + step], pj[s : s + step]
                slot = rows.slots(b[:, None], j[:, None] * bs + off[None, :])  # [P, B]
                kb = key[b[:, None], :, slot, :]  # [P, B, Hkv, D]
                self.centroids[b, j] = kb.float().sum(1) / bs
            self.blocks_computed += len(pairs)
            for b in range(self.batch):
                self.n_full[b] = max(self.n_full[b], n_real[b] // bs)
        self.n_real = list(n_real)
        self.n_slots = n_slots
        self.last_key = key[:, :, n_slots - 1].detach().clone() if n_slots else None


def get_decode_state(cache, layer_idx: int) -> MobaDecodeState | None:
    """The decode state MoBA keeps for ``layer_idx`` of ``cache`` (None if there is none)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    return getattr(layers[layer_idx], _STATE_ATTR, None)


def _state_holder(module):
    """The object the decode state lives on: the cache's layer, else the attention module."""
    ref = getattr(module, _CACHE_REF_ATTR, None)
    cache = ref() if ref is not None else None
    layers = getattr(cache, "layers", None)
    if layers is not None and module.layer_idx < len(layers):
        holder = layers[module.layer_idx]
        if hasattr(holder, "__dict__"):
            return holder
    return module


def _install_hook(module) -> None:
    setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(_capture_cache, with_kwargs=True))


def _capture_cache(module, args, kwargs):
    """Forward pre-hook on attention modules: remember (weakly) which cache this call uses."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    try:
        ref = weakref.ref(cache) if cache is not None else None
    except TypeError:
        ref = None
    setattr(module, _CACHE_REF_ATTR, ref)


# ----------------------------------------------------------------------------- attention paths
DECODE_BACKENDS = ("auto", "torch", "triton")
DECODE_BACKEND = "auto"  # default of moba_decode_attention: Triton on CUDA, else PyTorch


def _decode_backend(q, key, block_size: int, topk: int, backend: str | None) -> str:
    """``"triton"`` or ``"torch"``: which implementation runs this decode step."""
    backend = DECODE_BACKEND if backend is None else backend
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"decode backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and q.device.type != "cuda"):
        return "torch"
    try:
        from ..ops.triton_decode import unsupported_reason
    except ImportError as exc:
        if backend == "triton":
            raise ImportError("the Triton decode kernels need triton: "
                              "pip install 'moba-attn[triton]'") from exc
        return "torch"
    reason = unsupported_reason(q, key, block_size, topk)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run this decode step: {reason}")
    return "torch"


def moba_decode_attention(q, key, value, first, n_real, centroids, *, block_size, topk, scale,
                          backend: str | None = None):
    """One MoBA decode step per row, gating against cached centroids.

    Args:
        q: ``[B, Hq, D]``, the query at real position ``n_real[b] - 1`` of row ``b``.
        key, value: ``[B, Hkv, Tk, D]`` cache; the real tokens of row ``b`` are slots
            ``first[b] .. first[b] + n_real[b] - 1`` (left padding or none).
        first, n_real: ``[B]`` int64 on q's device.
        centroids: ``[B, NB, Hkv, D]`` fp32 mean keys of the row's full blocks; every block
            before the query's own block must be there (more columns are ignored).
        block_size, topk, scale: as in ``moba_attn_varlen_func``.
        backend: ``"triton"`` (``ops.triton_decode``: a few kernel launches, no host sync),
            ``"torch"`` (``_decode_rows``, the reference), ``"auto"`` (Triton for CUDA tensors
            the kernels cover, else torch); None: the module's ``DECODE_BACKEND``.

    Returns ``[B, Hq, D]`` in q's dtype; rows with ``n_real == 0`` get zeros. Gating reads
    O(NB) centroids, attention O(topk * block_size) keys per head. Raises ``ValueError`` for
    an unknown backend, or ``backend="triton"`` on a call the kernels do not cover.
    """
    if _decode_backend(q, key, block_size, topk, backend) == "triton":
        from ..ops.triton_decode import moba_decode_triton

        return moba_decode_triton(q, key, value, first, n_real, centroids, block_size=block_size,
                                  topk=topk, scale=scale)
    bsz, hq, d = q.shape
    n_sel = min(topk, centroids.shape[1] + 1)
    step = max(1, DECODE_CHUNK_ELEMS // max(hq * n_sel * block_size * d, 1))
    if bsz <= step:
        return _decode_rows(q, key, value, first, n_real, centroids, block_size, topk, scale)
    return torch.cat([
        _decode_rows(q[r : r + step], key[r : r + step], value[r : r + step], first[r : r + step],
                     n_real[r : r + step], centroids[r : r + step], block_size, topk, scale)
        for r in range(0, bsz, step)
    ])


def _decode_rows(q, key, value, first, n_real, centroids, block_size, topk, scale):
    bsz, hq, d = q.shape
    hkv, tk = key.shape[1], key.shape[2]
    g = hq // hkv
    dev = q.device
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    t = n_real - 1  # [B] position of the query
    own = t.clamp(min=0) // block_size  # [B]
    nb = centroids.shape[1]
    m = min(topk - 1, nb)
    blocks = own[:, None, None, None].expand(bsz, hkv, g, 1)
    ok = torch.ones_like(blocks, dtype=torch.bool)
    if m > 0:
        qg = q.float().view(bsz, hkv, g, d)
        scores = torch.einsum("bkgd,bnkd->bkgn", qg, centroids)  # [B, Hkv, g, NB] fp32
        cand = torch.arange(nb, device=dev)[None, :] < own[:, None]  # strictly earlier blocks
        scores = scores.masked_fill(~cand[:, None, None, :], float("-inf"))
        idx = sortable_key(scores).topk(m, dim=-1).indices  # ties -> lower block index
        blocks = torch.cat([blocks, idx], -1)
        ok = torch.cat([ok, idx < own[:, None, None, None]], -1)
    n_sel = blocks.shape[-1]
    pos = blocks[..., None] * block_size + torch.arange(block_size, device=dev)  # [B,Hkv,g,S,Bs]
    tok_ok = ok[..., None] & (pos <= t[:, None, None, None, None])
    slot = (first[:, None, None, None, None] + pos).clamp_(0, max(tk - 1, 0))
    slot = slot.reshape(bsz, hkv, g * n_sel * block_size, 1).expand(-1, -1, -1, d)
    ks = key.gather(2, slot).view(bsz, hkv, g, n_sel * block_size, d)  # [B, Hkv, g, N, D]
    vs = value.gather(2, slot).view(bsz, hkv, g, n_sel * block_size, d)
    qc = q.to(cdt).view(bsz, hkv, g, 1, d)
    s = torch.matmul(qc, ks.to(cdt).transpose(-1, -2)).squeeze(-2) * scale  # [B, Hkv, g, N]
    s = s.masked_fill(~tok_ok.reshape(bsz, hkv, g, -1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p.unsqueeze(-2), vs.to(cdt)).reshape(bsz, hq, d)
    out = torch.where((n_real > 0)[:, None, None], out, torch.zeros_like(out))
    return out.to(q.dtype)


def _segments(position_ids, batch: int, t: int):
    """Packed sequences inside rows (position ids restarting), as ``[B, T]`` ids, or None."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        return None
    if position_ids.shape[-1] != t:
        return None
    pid = position_ids.expand(batch, -1)
    starts = torch.ones_like(pid, dtype=torch.bool)
    starts[:, 1:] = (pid[:, 1:] - pid[:, :-1]) != 1
    if not bool(starts[:, 1:].any()):
        return None
    return starts.cumsum(1)


def _moba_prefill(query, key, value, rows: _Rows, seg, past: int, s: MobaSettings, scaling):
    """MoBA for a prefill or chunked-prefill call: real tokens packed into the varlen layout."""
    bsz, hq, tq, d = query.shape
    tk = key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, T, H, D]
    common = {"block_size": s.block_size, "topk": s.topk, "softmax_scale": scaling,
              "backend": s.backend, "deterministic": s.deterministic}
    if rows.valid is None and seg is None:
        return moba_attn_func(q, k, v, validate=False, **common)
    dev = query.device
    if seg is not None:  # packed sequences, no padding, no cache: one varlen sequence each
        lens = torch.stack([torch.bincount(r, minlength=int(seg.max()) + 1)[1:] for r in seg])
        lens = lens.reshape(-1)
        cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        mx = int(lens.max())
        out = moba_attn_varlen_func(q.reshape(bsz * tq, hq, d), k.reshape(bsz * tk, -1, d),
                                    v.reshape(bsz * tk, -1, d), cu, cu, mx, mx, validate=False,
                                    **common)
        return out.view(bsz, tq, hq, d)
    valid = rows.valid
    qv = valid[:, past:]
    nq, nk = qv.sum(1), rows.n_real
    cu_q = F.pad(nq.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(nk.cumsum(0), (1, 0)).to(torch.int32)
    out = moba_attn_varlen_func(q[qv], k[valid], v[valid], cu_q, cu_k, int(nq.max()),
                                int(nk.max()), validate=False, **common)
    full = out.new_zeros(bsz, tq, hq, d)
    return full.index_put((qv,), out).to(dev)


def _dense_attention(module, query, key, value, rows: _Rows, seg, dropout, scaling, kwargs):
    """Dense causal attention (PyTorch SDPA, as transformers' "sdpa") with padding/segments."""
    bsz, _, tq, _ = query.shape
    tk = key.shape[2]
    past = tk - tq
    mask = None
    if rows.valid is not None or seg is not None or (tq > 1 and tq != tk):
        i = torch.arange(tq, device=query.device)[:, None] + past
        j = torch.arange(tk, device=query.device)[None, :]
        mask = (j <= i)[None, None].expand(bsz, 1, tq, tk)
        if rows.valid is not None:
            mask = mask & rows.valid[:, None, None, :]
        if seg is not None:
            mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
        mask = mask | (j == i)  # a padded query keeps its own slot: no empty row, no NaN
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _common_dtype(query, key, value):
    """Under autocast, cast q/k/v to the autocast dtype as SDPA does (RoPE often leaves q/k in
    fp32 while v is bf16); otherwise k/v follow q."""
    dev = query.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = query.dtype
    return query.to(dtype), key.to(dtype), value.to(dtype)


def moba_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """``AttentionInterface`` entry for ``"moba"``.

    query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, Tk, D]`` (the whole cache, Tq new tokens at
    the end); ``attention_mask`` is what :func:`moba_mask` returned. Returns
    ``(out [B, Tq, Hq, D], None)``; outputs at padded query positions are zeros.
    """
    s = MobaSettings.from_config(module.config)
    query, key, value = _common_dtype(query, key, value)
    bsz, _, tq, d = query.shape
    tk = key.shape[2]
    past = tk - tq
    if past < 0:
        raise ValueError(f"got {tq} queries but only {tk} keys: MoBA needs Tq <= Tk")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError("MoBA needs the attention module's layer index (module.layer_idx)")
    if scaling is None:
        scaling = d ** -0.5

    user_mask = None
    if isinstance(attention_mask, MobaMask):
        if attention_mask.kv_length != tk or attention_mask.q_offset != past:
            raise ValueError(
                f"MoBA mask covers {attention_mask.kv_length} key slots with "
                f"{attention_mask.q_offset} "
                f"cached, but the layer got {tk} keys with {past} cached: the KV cache must hold "
                "exactly the tokens seen so far (DynamicCache)"
            )
        rows = attention_mask.rows()
    elif attention_mask is None:
        rows = _Rows.build(None, bsz, tk, query.device)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        m = moba_mask(bsz, tq, tk, past, 0, attention_mask=attention_mask)
        rows = m.rows() if m is not None else _Rows.build(None, bsz, tk, query.device)
    else:
        user_mask = attention_mask  # a 4D mask prepared by the caller
        rows = _Rows.build(None, bsz, tk, query.device)

    seg = None
    if past == 0 and rows.valid is None:  # padding-free packing: position ids restart
        seg = _segments(kwargs.get("position_ids"), bsz, tq)
    dense = layer in s.full_attn_layers or (past > 0 and s.decode == "full")
    if dense:
        if user_mask is not None:
            kwargs.pop("is_causal", None)
            return sdpa_attention_forward(module, query, key, value, user_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return _dense_attention(module, query, key, value, rows, seg, dropout, scaling, kwargs)
    if user_mask is not None:
        raise ValueError(
            "MoBA layers take a 2D padding mask ([batch, tokens]); a prepared 4D attention mask "
            "cannot be routed by blocks. Pass the 2D attention_mask instead."
        )
    if dropout and module.training:
        raise ValueError(
            f"MoBA layers do not implement attention dropout (got p={dropout}): set "
            "config.attention_dropout = 0.0"
        )
    if kwargs.get("sliding_window") is not None:
        raise ValueError("MoBA does not combine with sliding-window attention layers")

    keep_state = s.decode == "moba" and seg is None and (
        past > 0 or (bool(kwargs.get("use_cache")) and not module.training))
    if not keep_state:
        return _moba_prefill(query, key, value, rows, seg, past, s, scaling), None

    if getattr(module, _HOOK_ATTR, None) is None:  # loaded straight into "moba": hook up now
        _install_hook(module)
    holder = _state_holder(module)
    state = getattr(holder, _STATE_ATTR, None)
    n_real = rows.n_real_list
    if rows.valid is None:
        prev_real = [past] * bsz
    else:
        prev_real = (rows.n_real - rows.valid[:, past:].sum(1)).tolist()
    if state is None or not state.matches(key, past, prev_real, s.block_size):
        state = MobaDecodeState(bsz, key.shape[1], d, s.block_size, key.device)
        if past > 0:
            state.rebuilds += 1
            state.advance(key, rows, prev_real, past)
        setattr(holder, _STATE_ATTR, state)
    state.advance(key, rows, n_real, tk)

    if past > 0 and tq == 1 and rows.contiguous:
        out = moba_decode_attention(query[:, :, 0], key, value, rows.first, rows.n_real,
                                    state.centroids, block_size=s.block_size, topk=s.topk,
                                    scale=scaling,
                                    backend=s.backend if s.backend in DECODE_BACKENDS else "torch")
        if rows.valid is not None:  # a padded query slot gets zeros
            out = out * rows.valid[:, -1, None, None].to(out.dtype)
        return out[:, None], None
    return _moba_prefill(query, key, value, rows, seg, past, s, scaling), None


# ----------------------------------------------------------------------------- public API
def register_moba() -> None:
    """Register ``"moba"`` with transformers (idempotent). ``enable_moba`` calls it; call it
    yourself before ``from_pretrained(..., attn_implementation="moba")``."""
    AttentionInterface.register(ATTN_NAME, moba_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, moba_mask)


def _attention_modules(model):
    mods = [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "config") and hasattr(m, "is_causal")
            and any(hasattr(m, p) for p in ("q_proj", "qkv_proj", "query_key_value", "c_attn"))]
    if not mods:
        raise ValueError(
            f"found no attention layers with a layer_idx in {type(model).__name__}: MoBA supports "
            "transformers models that use the AttentionInterface (Llama, Qwen2/3, Mistral, ...)"
        )
    return mods


def enable_moba(model, *, block_size: int | None = None, topk: int | None = None,
                full_attn_layers=(), decode: str = "moba", backend: str = "auto",
                deterministic: bool = False):
    """Switch a transformers model to MoBA attention (in place; returns the model).

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through
            ``AttentionInterface`` (Llama, Qwen2, Qwen3, Mistral, ...).
        block_size: tokens per key block. topk: blocks each query attends, counting its own.
            Both omitted: restore the settings saved in ``model.config.moba`` (after
            ``from_pretrained`` of a model saved with MoBA enabled).
        full_attn_layers: layer indices that keep dense causal attention (negative indices
            count from the end: ``(-3, -2, -1)`` is the paper's hybrid, last 3 layers full).
        decode: ``"moba"`` routes decode and chunked-prefill queries with MoBA over the cache
            (sparse decode with cached block centroids); ``"full"`` makes every call that has
            cached keys dense, as the paper decodes.
        backend: passed to ``moba_attn_varlen_func`` (``"auto"``: Triton on CUDA, else torch).
        deterministic: passed to ``moba_attn_varlen_func``: fixed-order gradient reductions,
            so that training runs repeat bit for bit.

    Raises:
        ValueError for bad settings, out-of-range layer indices, models without
        AttentionInterface attention, or models with sliding-window/linear attention layers.
    """
    mods = _attention_modules(model)
    if block_size is None and topk is None:
        saved = MobaSettings.from_config(model.config)
        block_size, topk = saved.block_size, saved.topk
        decode, backend, deterministic = saved.decode, saved.backend, saved.deterministic
        full_attn_layers = saved.full_attn_layers if full_attn_layers == () else full_attn_layers
    elif block_size is None or topk is None:
        raise ValueError("pass both block_size and topk (or neither, to restore config.moba)")
    _check_settings(block_size, topk, decode, backend)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    n_layers = max(m.layer_idx for m in mods) + 1
    n_layers = max(n_layers, int(getattr(mods[0].config, "num_hidden_layers", 0) or 0))
    full = []
    for i in full_attn_layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"full_attn_layers must hold ints, got {i!r}")
        if not -n_layers <= i < n_layers:
            raise ValueError(f"full_attn_layers index {i} is out of range for {n_layers} layers")
        full.append(i % n_layers)
    for m in mods:
        types = getattr(m.config, "layer_types", None)
        if types is None and getattr(m.config, "sliding_window", None):
            raise ValueError(
                f"this model uses sliding-window attention (config.sliding_window="
                f"{m.config.sliding_window}); MoBA replaces full attention. To route every layer "
                "with MoBA instead of the window, set model.config.sliding_window = None first"
            )
        kind = types[m.layer_idx] if types is not None and m.layer_idx < len(types) else None
        if kind not in (None, "full_attention"):
            raise ValueError(
                f"layer {m.layer_idx} is a '{kind}' layer: MoBA replaces full "
                "attention only; models with sliding-window or linear layers are not supported"
            )
    register_moba()
    prev = model.config._attn_implementation
    if prev == ATTN_NAME:
        prev = MobaSettings.from_config(model.config).previous_attn_implementation
    settings = MobaSettings(block_size, topk, tuple(sorted(set(full))), decode, backend,
                            prev or "sdpa", deterministic)
    configs = {id(model.config): model.config}
    configs.update({id(m.config): m.config for m in mods})
    for cfg in configs.values():
        setattr(cfg, CONFIG_KEY, settings.to_dict())
    model.set_attn_implementation(ATTN_NAME)
    for m in mods:
        if getattr(m, _HOOK_ATTR, None) is None:
            _install_hook(m)
        m.__dict__.pop(_STATE_ATTR, None)
    return model


def disable_moba(model):
    """Back to the attention implementation the model had before ``enable_moba`` (in place).

    Removes ``config.moba`` (a model saved afterwards has no MoBA settings) and the hooks.
    """
    mods = _attention_modules(model)
    prev = "sdpa"
    if getattr(model.config, CONFIG_KEY, None) is not None:
        prev = MobaSettings.from_config(model.config).previous_attn_implementation
    if model.config._attn_implementation == ATTN_NAME:
        model.set_attn_implementation(prev)
    configs = {id(model.config): model.config}
    configs.update({id(m.config): m.config for m in mods})
    for cfg in configs.values():
        if hasattr(cfg, CONFIG_KEY):
            delattr(cfg, CONFIG_KEY)
    for m in mods:
        hook = m.__dict__.pop(_HOOK_ATTR, None)
        if hook is not None:
            hook.remove()
        m.__dict__.pop(_CACHE_REF_ATTR, None)
        m.__dict__.pop(_STATE_ATTR, None)
    return model

