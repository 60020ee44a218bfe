"""Public MoBA functions: input validation, backend choice, batch <-> varlen plumbing."""

from __future__ import annotations

import itertools

import torch

from .ops.naive import moba_attn_naive

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "naive", "torch", "triton")


# ----------------------------------------------------------------------------- validation
def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_qkv(q, k, v, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}: cast them, "
            "e.g. k = k.to(q.dtype)"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads ({hq}) must be a multiple of the number of key/value "
            f"heads ({hkv}) for GQA/MQA"
        )


def _check_cu_seqlens(name: str, cu, total: int, device, validate: bool) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32/int64, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}: use {name}.to(torch.int32)")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with n_seqs + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the tensors are on {device}: move it there")
    if not validate:
        return
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    if any(b < a for a, b in itertools.pairwise(vals)):
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got {vals[:8]}...")
    if vals[-1] != total:
        raise ValueError(
            f"{name} must end at the token count {total} (the first dim of the tensor), got {vals[-1]}"
        )


def validate_varlen(q, k, v, cu_q, cu_k, max_q, max_k, block_size, topk, validate: bool) -> None:
    """Every check of ``moba_attn_varlen_func``; raises ``TypeError``/``ValueError``."""
    _check_qkv(q, k, v, 3, "[total_tokens, heads, head_dim]")
    if k.shape[0] != v.shape[0]:
        raise ValueError("k and v must have the same number of tokens")
    _check_int("block_size", block_size)
    _check_int("topk", topk)
    _check_cu_seqlens("cu_seqlens_q", cu_q, q.shape[0], q.device, validate)
    _check_cu_seqlens("cu_seqlens_k", cu_k, k.shape[0], q.device, validate)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
            f"got {cu_q.numel() - 1} and {cu_k.numel() - 1}"
        )
    _check_int("max_seqlen_q", max_q, 0)
    _check_int("max_seqlen_k", max_k, 0)
    if not validate:
        return
    lq = (cu_q[1:] - cu_q[:-1]).tolist()
    lk = (cu_k[1:] - cu_k[:-1]).tolist()
    bad = [i for i, (a, b) in enumerate(zip(lq, lk)) if a > b]
    if bad:
        i = bad[0]
        raise ValueError(
            f"sequence {i} has {lq[i]} queries but only {lk[i]} keys: MoBA needs Tq <= Tk "
            "(queries are the last Tq positions of their sequence)"
        )
    if lq and max(lq) > max_q:
        raise ValueError(f"max_seqlen_q={max_q} is smaller than the longest query sequence {max(lq)}")
    if lk and max(lk) > max_k:
        raise ValueError(f"max_seqlen_k={max_k} is smaller than the longest key sequence {max(lk)}")


# ----------------------------------------------------------------------------- backends
def triton_available(device: torch.device | None = None) -> bool:
    """True when the Triton kernels can run on ``device`` (CUDA + triton importable)."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    try:
        from .ops import triton_attention  # noqa: F401
    except Exception:  # noqa: BLE001  ImportError, or a triton build that cannot load
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend == "triton" and not triton_available(device if device.type == "cuda" else None):
        raise ValueError(
            "backend='triton' needs the triton package (pip install 'moba-attn[triton]'); "
            "use backend='torch' or 'auto'"
        )
    return backend


def _run_backend(name, q, k, v, cu_q, cu_k, max_q, max_k, block_size, topk, scale, deterministic):
    if name == "naive":
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = moba_attn_naive(
            q, k, v, cu_q, cu_k, block_size=block_size, topk=topk, softmax_scale=scale,
            compute_dtype=dtype,
        )
        return out.to(q.dtype), lse
    if name == "torch":
        from .ops.torch_impl import moba_attn_torch

        return moba_attn_torch(
            q, k, v, cu_q, cu_k, max_q, max_k, block_size=block_size, topk=topk,
            softmax_scale=scale, deterministic=deterministic,
        )
    from .ops.triton_attention import moba_attn_triton

    return moba_attn_triton(
        q, k, v, cu_q, cu_k, max_q, max_k, block_size=block_size, topk=topk,
        softmax_scale=scale, deterministic=deterministic,
    )


# ----------------------------------------------------------------------------- public API
def moba_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    block_size: int,
    topk: int,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    validate: bool = True,
    backend: str = "auto",
):
    """Causal MoBA over a packed batch of sequences (flash-attn's varlen layout).

    Args:
        q: ``[total_q, Hq, D]``; the queries of sequence ``i`` are rows
            ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and are the *last* ``Tq_i`` positions of
            that sequence (bottom-right alignment: chunked prefill and decode use this too).
        k, v: ``[total_k, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA; K/V are not repeated).
        cu_seqlens_q, cu_seqlens_k: ``[n_seqs + 1]`` int32/int64 cumulative lengths starting at
            0; zero-length sequences are allowed; ``Tq_i <= Tk_i``.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence.
        block_size: tokens per key block (>= 1); blocks never cross sequences.
        topk: blocks each query attends, *counting its own block* (>= 1). ``topk=1`` is
            block-local causal attention; ``topk >= ceil(Tk / block_size)`` is dense causal.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return ``lse [Hq, total_q]`` (fp32, natural log, over attended keys).
        deterministic: bit-identical results run to run (matters for GPU backward passes).
            Under ``torch.compile`` the call goes through the ``moba_attn::varlen_fwd/bwd``
            custom ops (``fullgraph=True`` works; ``cu_seqlens`` values are not re-checked).
        validate: check the values of ``cu_seqlens_*`` (a device-to-host copy on GPUs); set to
            False only when you built them yourself. Shape, dtype and device checks always run.
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"``,
            ``"triton"`` or ``"naive"`` (the slow reference).

    Returns:
        ``out [total_q, Hq, D]`` in q's dtype, or ``(out, lse)`` when ``return_lse``.

    Raises:
        TypeError / ValueError with the fix in the message for bad shapes, dtypes, devices,
        ``cu_seqlens``, ``block_size``, ``topk`` or ``Tq > Tk``.
    """
    compiling = torch.compiler.is_compiling()
    # value checks copy cu_seqlens to the host, which would break a compiled graph
    validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    block_size, topk, validate and not compiling)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    name = resolve_backend(backend, q.device)
    if compiling and name != "naive":  # opaque custom ops: torch.compile(fullgraph=True)
        from .ops.custom_op import moba_attn_varlen_op

        out, lse = moba_attn_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                       topk=topk, softmax_scale=scale,
                                       deterministic=deterministic, backend=name)
    else:
        out, lse = _run_backend(name, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, block_size, topk, scale, deterministic)
    return (out, lse) if return_lse else out


def moba_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    validate: bool = True,
    backend: str = "auto",
):
    """Causal MoBA over a batch of equal-length sequences (flash-attn's batch layout).

    Args:
        q: ``[batch, Tq, Hq, D]``; k, v: ``[batch, Tk, Hkv, D]`` with ``Tq <= Tk`` (the queries
            are the last ``Tq`` positions) and ``Hq % Hkv == 0``.
        Other arguments as in :func:`moba_attn_varlen_func`.

    Returns:
        ``out [batch, Tq, Hq, D]``, or ``(out, lse)`` with ``lse [batch, Hq, Tq]`` fp32.
    """
    _check_qkv(q, k, v, 4, "[batch, seqlen, heads, head_dim]")
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    if k.shape[0] != b:
        raise ValueError(f"q has batch {b} but k/v have batch {k.shape[0]}")
    if tq > tk:
        raise ValueError(
            f"q has {tq} positions but k/v only {tk}: MoBA needs Tq <= Tk (queries are the last "
            "Tq positions of the sequence)"
        )
    dev = q.device
    cu_q = torch.arange(0, (b + 1) * tq, tq, device=dev, dtype=torch.int32) if tq else \
        torch.zeros(b + 1, device=dev, dtype=torch.int32)
    cu_k = torch.arange(0, (b + 1) * tk, tk, device=dev, dtype=torch.int32) if tk else \
        torch.zeros(b + 1, device=dev, dtype=torch.int32)
    out, lse = moba_attn_varlen_func(
        q.reshape(b * tq, hq, d), k.reshape(b * tk, k.shape[2], d), v.reshape(b * tk, v.shape[2], d),
        cu_q, cu_k, tq, tk, block_size=block_size, topk=topk, softmax_scale=softmax_scale,
        return_lse=True, deterministic=deterministic, validate=False, backend=backend,
    )
    out = out.reshape(b, tq, hq, d)
    if return_lse:
        return out, lse.reshape(hq, b, tq).transpose(0, 1)
    return out
