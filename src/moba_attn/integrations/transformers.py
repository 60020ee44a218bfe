"""MoBA inside HuggingFace transformers models (5.x): one call to switch, one to switch back.

    import moba_attn.integrations.transformers as moba_hf   # registers "moba"
    model = moba_hf.enable_moba(model, block_size=512, topk=3, full_attn_layers=(-3, -2, -1))
    model.generate(...)                      # MoBA prefill, MoBA (or dense) decode
    model = moba_hf.disable_moba(model)      # the attention implementation it had before

How it plugs in (registries, nothing patched):
- Importing this module registers ``"moba"`` in transformers' ``AttentionInterface`` (the
  attention function) and ``AttentionMaskInterface`` (the mask function). ``enable_moba``
  stores the settings on ``config.moba`` and ``config.attn_implementation = "moba"``, so a
  saved model loads back into MoBA with a plain ``from_pretrained`` once this module is
  imported (and fails loudly, naming ``"moba"``, when it is not).
- The mask function builds no ``[B, 1, Tq, Tk]`` mask: it returns a :class:`MobaMask`, one
  per forward pass, shared by every layer. It holds the padding mask and the cache offset,
  and prepares once per forward what the layers need (the block layout of the real tokens,
  the cache lengths); an unpadded forward never syncs with the host, a padded one once.
- Padding (left or right) is removed before attention: real tokens are packed into the
  varlen layout, so MoBA blocks start at each sequence's first real token.
- Sparse decode: each MoBA layer keeps the fp32 centroids of the cache's full key blocks
  next to the KV cache (on the cache layer object), filled on the device as blocks complete
  (``moba_attn.update_centroids``), and attends through ``moba_attn.moba_attn_with_kvcache``:
  O(Tk / B) gate reads plus O(topk * B) keys per step, no host sync, CUDA-graph friendly.
  ``DynamicCache`` and ``StaticCache`` (``cache_implementation="static"``, with
  ``torch.compile``) are supported.
- Layers in ``full_attn_layers`` (and, with ``decode="full"``, every call with cached keys)
  run PyTorch SDPA, the model's dense attention.

Models with sliding-window or linear-attention layers are rejected at ``enable_moba``;
attention dropout must be 0 in MoBA layers.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import asdict, dataclass

import torch

from ..interface import (
    BACKENDS,
    moba_attn_func,
    moba_attn_varlen_func,
    moba_attn_with_kvcache,
    update_centroids,
)
from ..ops.layout import BlockLayout, layout_from_lengths

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "moba_attn.integrations.transformers needs transformers>=5.0: "
        "pip install 'moba-attn[hf]'"
    ) from exc

__all__ = [
    "ATTN_NAME",
    "CONFIG_KEY",
    "CentroidCache",
    "MobaMask",
    "MobaSettings",
    "disable_moba",
    "enable_moba",
    "get_decode_state",
    "moba_attention_forward",
    "moba_mask",
    "register_moba",
]

ATTN_NAME = "moba"  # the name registered in AttentionInterface / AttentionMaskInterface
CONFIG_KEY = "moba"  # config attribute holding the settings dict
DECODE_MODES = ("moba", "full")
_STATE_ATTR = "_moba_centroids"
_CACHE_REF_ATTR = "_moba_cache_ref"
_HOOK_ATTR = "_moba_cache_hook"


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
        return _settings_from_dict(tuple(sorted((k, _freeze(v)) for k, v in raw.items())))


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


_SETTINGS_CACHE: dict = {}


def _settings_from_dict(items: tuple) -> MobaSettings:
    """Settings from the frozen items of ``config.moba`` (memoised: immutable values)."""
    hit = _SETTINGS_CACHE.get(items)
    if hit is None:
        raw = dict(items)
        raw["full_attn_layers"] = tuple(int(i) for i in raw.get("full_attn_layers", ()))
        known = MobaSettings.__dataclass_fields__
        hit = _SETTINGS_CACHE[items] = MobaSettings(**{k: v for k, v in raw.items() if k in known})
    return hit


def _check_settings(block_size, topk, decode, backend) -> None:
    for name, val in (("block_size", block_size), ("topk", topk)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# ----------------------------------------------------------------------------- the per-forward mask
class MobaMask:
    """What the ``"moba"`` mask function hands to every layer of one forward pass.

    ``padding``: ``[B, L]`` bool, True where a key slot holds a real token (None: all real;
    ``L`` may be shorter than the key buffer of a static cache). ``q_offset``: key slots in
    the cache before this call (an int, or a 0-d device tensor for a static cache).
    ``maybe_packed``: transformers saw position ids that restart (packed sequences).
    Per-forward facts (the layout of the real tokens, cache lengths, left padding) are
    computed once, by the first layer that needs them, and shared by the others.
    """

    def __init__(self, padding: torch.Tensor | None, q_offset, q_length: int, kv_length: int,
                 maybe_packed: bool = False):
        self.padding = padding
        self.q_offset = q_offset
        self.q_length = q_length
        self.kv_length = kv_length
        self.maybe_packed = maybe_packed
        self._memo: dict = {}

    # transformers passes an already prepared mask through as a 4D one (generate prepares
    # the mask of compileable caches before the forward): it looks only at these
    @property
    def shape(self):
        b = self.padding.shape[0] if self.padding is not None else 1
        return (b, 1, self.q_length, self.kv_length)

    ndim = 4

    def dim(self) -> int:
        return 4

    def __repr__(self) -> str:
        pad = None if self.padding is None else tuple(self.padding.shape)
        return (f"MobaMask(padding={pad}, q_offset={self.q_offset}, q_length={self.q_length}, "
                f"kv_length={self.kv_length})")

    def _get(self, key, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # ---- the cache
    def static(self) -> bool:
        """The keys include slots not yet written (a static cache): lengths live on the device."""
        return isinstance(self.q_offset, torch.Tensor) or \
            self.kv_length != self.q_offset + self.q_length

    def offset(self) -> int:
        """Cached tokens before this call, on the host (one sync for a static cache)."""
        return self._get("offset", lambda: int(self.q_offset))

    def seqlens(self, batch: int, device) -> torch.Tensor:
        """``[B]`` int64: the end of every row's valid key slots after this call (device)."""
        def build():
            if isinstance(self.q_offset, torch.Tensor):
                end = (self.q_offset.to(device=device, dtype=torch.int64) + self.q_length)
                return end.reshape(1).expand(batch).contiguous()
            return torch.full((batch,), self.q_offset + self.q_length, dtype=torch.int64,
                              device=device)
        return self._get(("seqlens", batch), build)

    def leftpad(self) -> torch.Tensor | None:
        """``[B]`` first real slot of every row (left padding), or None; device-only."""
        if self.padding is None:
            return None
        return self._get("leftpad", lambda: self.padding.to(torch.uint8).argmax(1))

    # ---- the real tokens of this call (prefill, chunked prefill, training)
    def rows(self) -> _Rows:
        return self._get("rows", lambda: _Rows(self.padding))

    def layout(self, block_size: int, past: int) -> BlockLayout:
        """Layout of the packed real tokens: the last ``q_length`` slots' real tokens as
        queries over the row's real tokens up to them (one host sync per forward)."""
        return self._get(("layout", block_size, past),
                         lambda: self.rows().layout(past, self.q_length, block_size))

    def segments(self, position_ids, batch: int, t: int) -> tuple | None:
        """Packed sequences inside rows (position ids restarting), once per forward (one host
        copy)."""
        return self._get("segments", lambda: _segments(position_ids, batch, t))


class _Rows:
    """Where the real tokens of each row sit among the key slots: host counts from one
    device-to-host copy, index tensors built on the device from them."""

    def __init__(self, valid: torch.Tensor):
        self.valid = valid  # [B, L] bool
        n = valid.shape[1]
        self.n_real_d = valid.sum(1)
        self.first_d = valid.to(torch.uint8).argmax(1)
        last = n - 1 - valid.flip(1).to(torch.uint8).argmax(1)
        host = torch.stack([self.n_real_d, self.first_d, last]).tolist()  # the one host copy
        self.n_real, self.first, self.last = host
        self.contiguous = all(m == 0 or e - f + 1 == m for m, f, e in zip(*host))
        self.full = all(m == n for m in self.n_real)  # no padding after all
        self._memo: dict = {}

    def counts(self, lo: int, hi: int) -> list[int]:
        """Real tokens of every row among slots ``[lo, hi)`` (host)."""
        if not self.contiguous:
            key = ("counts", lo, hi)
            if key not in self._memo:
                self._memo[key] = self.valid[:, lo:hi].sum(1).tolist()
            return self._memo[key]
        return [max(min(f + m, hi) - max(f, lo), 0) for m, f in zip(self.n_real, self.first)]

    def index(self, lo: int, hi: int, width: int, shift: int = 0) -> torch.Tensor:
        """``b * width + slot - shift`` of every real slot in ``[lo, hi)``, row-major (device)."""
        key = ("index", lo, hi, width, shift)
        if key in self._memo:
            return self._memo[key]
        if not self.contiguous:  # holes inside rows: one more sync
            rows, cols = self.valid[:, lo:hi].nonzero(as_tuple=True)
            idx = rows * width + cols + lo - shift
        else:
            s = self.first_d.clamp(min=lo)
            cnt = ((self.first_d + self.n_real_d).clamp(max=hi) - s).clamp(min=0)
            total = sum(self.counts(lo, hi))
            dev = self.valid.device
            seg = torch.repeat_interleave(torch.arange(cnt.shape[0], device=dev), cnt,
                                          output_size=total)
            off = torch.arange(total, device=dev) - (torch.cumsum(cnt, 0) - cnt)[seg]
            idx = seg * width + s[seg] + off - shift
        self._memo[key] = idx
        return idx

    def layout(self, past: int, q_length: int, block_size: int) -> BlockLayout:
        """Layout of the real tokens: queries in slots ``[past, past + q_length)``, keys in
        ``[0, past + q_length)`` (host lengths known, ``cu_seqlens`` made on the device)."""
        hi = past + q_length
        lq, lk = self.counts(past, hi), self.counts(0, hi)
        dev = self.valid.device

        def cu(counts):
            c = torch.as_tensor(counts, dtype=torch.int64).pin_memory() \
                if dev.type == "cuda" else torch.as_tensor(counts, dtype=torch.int64)
            c = c.to(dev, non_blocking=True)
            return torch.cat([c.new_zeros(1), torch.cumsum(c, 0)])

        return layout_from_lengths(lq, lk, block_size, cu(lq), cu(lk))


def _segments(position_ids, batch: int, t: int):
    """``(cu_seqlens [n + 1] int32, lengths)`` of the packed sequences inside the rows (one
    host copy of the position ids), or None when position ids never restart."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or \
            position_ids.shape[-1] != t:
        return None
    pid = position_ids.expand(batch, -1).detach().cpu()
    starts = torch.ones_like(pid, dtype=torch.bool)
    starts[:, 1:] = (pid[:, 1:] - pid[:, :-1]) != 1
    flat = starts.reshape(-1).nonzero().squeeze(1)
    if flat.numel() == batch:
        return None
    cu = torch.cat([flat, flat.new_tensor([batch * t])])
    lens = (cu[1:] - cu[:-1]).tolist()
    dev = position_ids.device
    if dev.type == "cuda":
        cu = cu.pin_memory().to(dev, non_blocking=True)
    return cu.to(device=dev, dtype=torch.int32), lens


def moba_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
              attention_mask=None, **kwargs):
    """``AttentionMaskInterface`` entry for ``"moba"``: a :class:`MobaMask` for the forward."""
    if isinstance(attention_mask, MobaMask):  # prepared before the forward (generate)
        return attention_mask
    if isinstance(q_offset, torch.Tensor):
        q_offset = q_offset.clone()  # the cache advances it in place during the forward
    if int(kv_offset) != 0:
        raise ValueError(
            f"MoBA needs a KV cache whose slots start at the first token (offset {kv_offset}): "
            "sliding-window caches are not supported")
    pad = None
    if attention_mask is not None and attention_mask.dim() == 2:
        pad = attention_mask.to(torch.bool)
        if pad.shape[0] != batch_size:
            pad = pad.expand(batch_size, -1)
        if pad.shape[1] > kv_length:
            raise ValueError(f"attention_mask covers {pad.shape[1]} positions but the keys have "
                             f"{kv_length}: pass a 2D mask over the tokens seen so far")
    elif attention_mask is not None:
        return attention_mask  # a prepared 4D mask: the dense layers use it, MoBA layers refuse
    return MobaMask(pad, q_offset, int(q_length), int(kv_length),
                    maybe_packed=mask_function is not None
                    and mask_function is not causal_mask_function)


# ----------------------------------------------------------------------------- decode state
@dataclass
class CentroidCache:
    """fp32 ``[B, NB, Hkv, D]`` mean keys of the full blocks of one layer's KV cache (block
    ``j`` of row ``b`` = real tokens ``j*B .. (j+1)*B - 1``), kept on the cache layer."""

    centroids: torch.Tensor
    block_size: int


def get_decode_state(cache, layer_idx: int) -> CentroidCache | None:
    """The centroid cache MoBA keeps for ``layer_idx`` of ``cache`` (None if there is none)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    return getattr(layers[layer_idx], _STATE_ATTR, None)


def _cache_layer(module):
    ref = getattr(module, _CACHE_REF_ATTR, None)
    cache = ref() if ref is not None else None
    layers = getattr(cache, "layers", None)
    if layers is not None and module.layer_idx < len(layers):
        return layers[module.layer_idx]
    return None


def _move_rows(layer, how: str, arg) -> None:
    state = getattr(layer, _STATE_ATTR, None)
    if state is not None:
        c = state.centroids
        state.centroids = c.index_select(0, arg.to(c.device)) if how == "index" else \
            c.repeat_interleave(arg, 0)


def _reorder_cache(self, beam_idx):
    type(self).reorder_cache(self, beam_idx)
    _move_rows(self, "index", beam_idx)


def _batch_select_indices(self, indices):
    type(self).batch_select_indices(self, indices)
    _move_rows(self, "index", indices)


def _batch_repeat_interleave(self, repeats):
    type(self).batch_repeat_interleave(self, repeats)
    _move_rows(self, "repeat", repeats)


_ROW_MOVES = {"reorder_cache": _reorder_cache, "batch_select_indices": _batch_select_indices,
              "batch_repeat_interleave": _batch_repeat_interleave}


def _follow_row_moves(layer) -> None:
    """Make the cache layer's row reorders (beam search, contrastive search, repeats) move
    the centroids with the keys: the layer instance gets bound methods that call its class's
    own and then move the centroids (``copy.deepcopy`` rebinds them to the copy)."""
    for name, fn in _ROW_MOVES.items():
        if hasattr(type(layer), name) and name not in layer.__dict__:
            setattr(layer, name, types.MethodType(fn, layer))


def _centroids_for(layer, key_cache: torch.Tensor, block_size: int,
                   static: bool) -> tuple[torch.Tensor, bool]:
    """This layer's centroid buffer, sized for ``key_cache [B, T, Hkv, D]`` (grown for a
    growing cache, allocated once at full size for a static one), and whether it is new
    (then every full block must be computed)."""
    bsz, t, hkv, d = key_cache.shape
    need = t // block_size
    state = getattr(layer, _STATE_ATTR, None) if layer is not None else None
    ok = (state is not None and state.block_size == block_size
          and state.centroids.shape[0] == bsz and state.centroids.shape[2:] == (hkv, d)
          and state.centroids.device == key_cache.device)
    if ok and state.centroids.shape[1] >= need:
        return state.centroids, False
    cap = need if static else max(need, 2 * (state.centroids.shape[1] if ok else 0), 16)
    cent = torch.zeros(bsz, cap, hkv, d, dtype=torch.float32, device=key_cache.device)
    if ok:
        cent[:, : state.centroids.shape[1]] = state.centroids
    if static and not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(cent)  # updated in place under CUDA graphs
    if layer is not None:
        setattr(layer, _STATE_ATTR, CentroidCache(cent, block_size))
        _follow_row_moves(layer)
    return cent, not ok


# ----------------------------------------------------------------------------- attention paths
def _install_hook(module) -> None:
    setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(_capture_cache, with_kwargs=True))


def _capture_cache(module, args, kwargs):
    """Forward pre-hook on attention modules: remember (weakly) which cache this call uses."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    try:
        ref = weakref.ref(cache) if cache is not None else None
    except TypeError:
        ref = None
    module.__dict__[_CACHE_REF_ATTR] = ref


def _common_dtype(query, key, value):
    """Under autocast, cast q/k/v to the autocast dtype as SDPA does (RoPE often leaves q/k in
    fp32 while v is bf16); otherwise k/v follow q."""
    dev = query.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype
    return query.to(dtype), key.to(dtype), value.to(dtype)


def _packed(query, key, value, mask: MobaMask, past: int, s: MobaSettings, scaling, seg):
    """MoBA over this call's real tokens (prefill, chunked prefill, training): queries are
    the last ``Tq`` slots, keys the slots up to them."""
    bsz, hq, tq, d = query.shape
    hi = past + tq
    q = query.transpose(1, 2)
    k, v = key[:, :, :hi].transpose(1, 2), value[:, :, :hi].transpose(1, 2)  # [B, T, H, D]
    common = {"block_size": s.block_size, "topk": s.topk, "softmax_scale": scaling,
              "backend": s.backend, "deterministic": s.deterministic}
    if seg is None and (mask.padding is None or mask.rows().full):
        return moba_attn_func(q, k, v, **common)
    if seg is not None:  # packed sequences, no padding, no cache: one varlen sequence each
        cu, lens = seg
        lay = mask._get(("seg_layout", s.block_size),
                        lambda: layout_from_lengths(lens, lens, s.block_size, cu, cu))
        out = moba_attn_varlen_func(q.reshape(bsz * tq, hq, d), k.reshape(bsz * tq, -1, d),
                                    v.reshape(bsz * tq, -1, d), cu, cu, lay.max_len_q,
                                    lay.max_len_k, validate=False, layout=lay, **common)
        return out.view(bsz, tq, hq, d)
    rows = mask.rows()
    lay = mask.layout(s.block_size, past)
    q_rows = rows.index(past, hi, tq, shift=past)  # real query slots in [B * Tq]
    k_rows = rows.index(0, hi, hi)  # real key slots in [B * hi]
    out = moba_attn_varlen_func(q.reshape(bsz * tq, hq, d).index_select(0, q_rows),
                                k.reshape(bsz * hi, -1, d).index_select(0, k_rows),
                                v.reshape(bsz * hi, -1, d).index_select(0, k_rows),
                                lay.cu_seqlens_q, lay.cu_seqlens_k, lay.max_len_q,
                                lay.max_len_k, validate=False, layout=lay, **common)
    full = out.new_zeros(bsz * tq, hq, d)
    return full.index_copy_(0, q_rows, out).view(bsz, tq, hq, d)


def _dense(module, query, key, value, mask: MobaMask | None, seg, dropout, scaling, kwargs,
           user_mask=None):
    """Dense causal attention (PyTorch SDPA, as transformers' "sdpa") over the valid slots."""
    kwargs.pop("is_causal", None)
    if user_mask is not None:
        return sdpa_attention_forward(module, query, key, value, user_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    bsz, _, tq, _ = query.shape
    tk = key.shape[2]
    plain = mask is None or (mask.padding is None and seg is None and not mask.static())
    if plain and (tq == 1 or tq == tk):
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout,
                                      scaling=scaling, **kwargs)
    dev = query.device

    def build():
        offset = (tk - tq) if mask is None else mask.q_offset
        if isinstance(offset, torch.Tensor):
            offset = offset.to(dev)
        i = torch.arange(tq, device=dev)[:, None] + offset
        j = torch.arange(tk, device=dev)[None, :]
        allowed = (j <= i)[None, None].expand(bsz, 1, tq, tk)
        if mask is not None and mask.padding is not None:
            pad = mask.padding
            if pad.shape[1] < tk:
                pad = torch.cat([pad, pad.new_ones(bsz, tk - pad.shape[1])], 1)
            allowed = allowed & pad[:, None, None, :]
        if seg is not None:
            cu = seg[0].long()
            sid = torch.bucketize(torch.arange(bsz * tq, device=dev), cu[1:-1], right=True)
            sid = sid.view(bsz, tq)
            allowed = allowed & (sid[:, None, :, None] == sid[:, None, None, :])
        return allowed | (j == i)  # a padded query keeps its own slot: no empty row, no NaN

    # one mask per forward, shared by the dense layers
    allowed = build() if mask is None else mask._get(("dense", bsz, tq, tk), build)
    return sdpa_attention_forward(module, query, key, value, allowed, dropout=dropout,
                                  scaling=scaling, **kwargs)


def moba_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """``AttentionInterface`` entry for ``"moba"``.

    query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, Tk, D]`` (the whole cache, the Tq new
    tokens' keys already in it); ``attention_mask`` is what :func:`moba_mask` returned.
    Returns ``(out [B, Tq, Hq, D], None)``; outputs at padded query positions are zeros.
    """
    s = MobaSettings.from_config(module.config)
    query, key, value = _common_dtype(query, key, value)
    bsz, _, tq, d = query.shape
    tk = key.shape[2]
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError("MoBA needs the attention module's layer index (module.layer_idx)")
    if tq > tk:
        raise ValueError(f"got {tq} queries but only {tk} keys: MoBA needs Tq <= Tk")
    if scaling is None:
        scaling = d ** -0.5

    user_mask = None
    if isinstance(attention_mask, MobaMask):
        mask = attention_mask
        if mask.kv_length != tk:
            raise ValueError(f"the MoBA mask covers {mask.kv_length} key slots but the layer got "
                             f"{tk}: the KV cache must hold the tokens seen so far")
    elif attention_mask is None or (isinstance(attention_mask, torch.Tensor)
                                    and attention_mask.dim() == 2):
        mask = moba_mask(bsz, tq, tk, tk - tq, 0, attention_mask=attention_mask)
    else:
        mask, user_mask = None, attention_mask  # a 4D mask prepared by the caller

    compiling = torch.compiler.is_compiling()
    # whether this call has cached tokens before it: a static cache keeps its length on the
    # device, read once (eager multi-token calls) or assumed (one-token and compiled calls;
    # a one-token prefill is the same attention either way)
    cached = mask is not None and (
        mask.q_offset != 0 if not mask.static() else (tq == 1 or compiling or mask.offset() > 0))
    seg = None
    if mask is not None and not cached and mask.padding is None and mask.maybe_packed:
        seg = mask.segments(kwargs.get("position_ids"), bsz, tq)
    if layer in s.full_attn_layers or (cached and s.decode == "full") or user_mask is not None:
        if user_mask is not None and layer not in s.full_attn_layers and \
                not (cached and s.decode == "full"):
            raise ValueError(
                "MoBA layers take a 2D padding mask ([batch, tokens]); a prepared 4D attention "
                "mask cannot be routed by blocks. Pass the 2D attention_mask instead.")
        return _dense(module, query, key, value, mask, seg, dropout, scaling, kwargs, user_mask)
    if dropout and module.training:
        raise ValueError(f"MoBA layers do not implement attention dropout (got p={dropout}): "
                         "set config.attention_dropout = 0.0")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("MoBA does not combine with sliding-window attention layers")

    cache_layer = _cache_layer(module) if s.decode == "moba" and seg is None else None
    if not cached:  # training, or a prefill that fills an empty (maybe static) cache
        out = _packed(query, key, value, mask, 0, s, scaling, seg)
        if cache_layer is not None:
            _fill_centroids(cache_layer, key, mask, s, tq)
        return out, None
    if tq == 1 or compiling:  # decode (and compiled multi-token steps): over the cache
        k_cache = key.transpose(1, 2)
        leftpad = mask.leftpad()
        seqlens = mask.seqlens(bsz, query.device)
        cent = _fill_centroids(cache_layer, key, mask, s, tq)
        out = moba_attn_with_kvcache(query.transpose(1, 2), k_cache, value.transpose(1, 2),
                                     seqlens, block_size=s.block_size, topk=s.topk,
                                     softmax_scale=scaling, centroids=cent,
                                     cache_leftpad=leftpad, validate=False, backend=s.backend)
        return out, None
    past = mask.offset()  # eager multi-token call: one host read of the cache length
    out = _packed(query, key, value, mask, past, s, scaling, None)
    if cache_layer is not None:
        _fill_centroids(cache_layer, key, mask, s, tq)
    return out, None


def _fill_centroids(cache_layer, key, mask: MobaMask, s: MobaSettings, tq: int):
    """Add the centroids of the blocks this call's ``tq`` tokens completed to the layer's
    centroid cache, or of every full block when the cache has none yet (a cache filled
    elsewhere), and return the buffer. Device-side only."""
    bsz = key.shape[0]
    k_cache = key.transpose(1, 2)
    cent, fresh = _centroids_for(cache_layer, k_cache, s.block_size, mask.static())
    seqlens = mask.seqlens(bsz, key.device)
    leftpad = mask.leftpad()
    if fresh:
        old = leftpad if leftpad is not None else torch.zeros_like(seqlens)
        max_new = k_cache.shape[1] // s.block_size + 1
    else:
        if not mask.static() and leftpad is None and \
                (mask.q_offset + tq) // s.block_size == mask.q_offset // s.block_size:
            return cent  # the lengths are on the host and no block completes in this call
        old = seqlens - tq
        max_new = tq // s.block_size + 1
    update_centroids(cent, k_cache, old, seqlens, block_size=s.block_size,
                     max_new_blocks=max_new, cache_leftpad=leftpad, backend=s.backend)
    return cent


# ----------------------------------------------------------------------------- public API
def register_moba() -> None:
    """Register ``"moba"`` with transformers (idempotent; importing this module does it)."""
    AttentionInterface.register(ATTN_NAME, moba_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, moba_mask)


register_moba()


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


def _configs(model, mods):
    configs = {id(model.config): model.config}
    configs.update({id(m.config): m.config for m in mods})
    return configs.values()


def enable_moba(model, *, block_size: int | None = None, topk: int | None = None,
                full_attn_layers=(), decode: str = "moba", backend: str = "auto",
                deterministic: bool = False):
    """Switch a transformers model to MoBA attention (in place; returns the model).

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through
            ``AttentionInterface`` (Llama, Qwen2, Qwen3, Mistral, ...).
        block_size: tokens per key block. topk: blocks each query attends, counting its own.
            Both omitted: restore the settings saved in ``model.config.moba``.
        full_attn_layers: layer indices that keep dense causal attention (negative indices
            count from the end: ``(-3, -2, -1)`` is the paper's hybrid, last 3 layers full).
        decode: ``"moba"`` routes decode and chunked-prefill queries with MoBA over the cache
            (sparse decode with cached block centroids); ``"full"`` makes every call that has
            cached keys dense, as the paper decodes.
        backend: passed to the MoBA ops (``"auto"``: Triton on CUDA, else torch).
        deterministic: fixed-order gradient reductions, so training runs repeat bit for bit.

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
    for cfg in _configs(model, mods):
        setattr(cfg, CONFIG_KEY, settings.to_dict())
        # saved into config.json, so that from_pretrained loads the model back into "moba"
        cfg.attn_implementation = ATTN_NAME
    model.set_attn_implementation(ATTN_NAME)
    for m in mods:
        if getattr(m, _HOOK_ATTR, None) is None:
            _install_hook(m)
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
    for cfg in _configs(model, mods):
        for attr in (CONFIG_KEY, "attn_implementation"):
            if attr in cfg.__dict__:
                delattr(cfg, attr)
    for m in mods:
        hook = m.__dict__.pop(_HOOK_ATTR, None)
        if hook is not None:
            hook.remove()
        m.__dict__.pop(_CACHE_REF_ATTR, None)
    return model
