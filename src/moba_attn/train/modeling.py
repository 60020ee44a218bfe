"""Model construction and attention switching.

MoBA is applied only through the library's transformers integration
(``moba_attn.integrations.transformers.enable_moba`` / ``disable_moba``); models are built with
SDPA attention, which is what "full" means everywhere in these tools.
"""

from __future__ import annotations

import copy

import torch

from ..ops.layout import prepare_layout
from .config import PRESETS, TrainConfig

BASE_ATTN = "sdpa"


def _hf():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the training tools need transformers: pip install 'moba-attn[train]'"
        ) from e
    from transformers import AutoModelForCausalLM, LlamaConfig

    return AutoModelForCausalLM, LlamaConfig


def model_config(cfg: TrainConfig, vocab_size: int, sep_id: int):
    """The ``LlamaConfig`` of a run (byte vocabulary unless a tokenizer is given)."""
    _, LlamaConfig = _hf()
    p = PRESETS[cfg.preset]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=max(cfg.seq_len, 4096),
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=sep_id,
        pad_token_id=sep_id,
        use_cache=False,
    )


def build_model(hf_config, seed: int) -> torch.nn.Module:
    """A freshly initialised causal LM from ``hf_config`` (deep-copied: transformers mutates it)."""
    AutoModelForCausalLM, _ = _hf()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), attn_implementation=BASE_ATTN)


def config_from_dict(d: dict):
    _, LlamaConfig = _hf()
    return LlamaConfig.from_dict(d)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _integration():
    try:
        from ..integrations.transformers import disable_moba, enable_moba
    except ImportError as e:
        raise ImportError(
            "MoBA training needs moba_attn.integrations.transformers (enable_moba/disable_moba), "
            f"which could not be imported ({e}); --attn full works without it"
        ) from e
    return enable_moba, disable_moba


class AttentionSwitch:
    """Puts a model in ``"full"`` or ``"moba"`` mode, calling the integration only on changes."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.model, self.cfg, self.mode = model, cfg, "full"

    def set(self, mode: str) -> None:
        if mode == self.mode:
            return
        enable_moba, disable_moba = _integration()
        if mode == "moba":
            enable_moba(
                self.model,
                block_size=self.cfg.block_size,
                topk=self.cfg.topk,
                full_attn_layers=tuple(self.cfg.full_attn_layers),
                decode=self.cfg.decode,
                deterministic=self.cfg.deterministic,
            )
        elif mode == "full":
            disable_moba(self.model)
        else:
            raise ValueError(f"attention mode must be 'full' or 'moba', got {mode!r}")
        self.mode = mode


def moba_sparsity(seq_len: int, block_size: int, topk: int) -> dict:
    """Sparsity of one MoBA layer on a ``seq_len`` sequence.

    ``nominal`` = 1 - topk / #blocks (the paper's figure); ``causal`` = 1 - keys MoBA attends /
    keys dense causal attention attends, summed over all queries (the work actually skipped).
    """
    cu = torch.tensor([0, seq_len], dtype=torch.int64)
    n_blocks = -(-seq_len // block_size)
    lay = prepare_layout(cu, cu, block_size=block_size)
    used, dense = lay.attended_keys(topk), lay.dense_keys()
    return {"nominal": max(0.0, 1 - topk / n_blocks), "causal": 1 - used / dense}


def run_sparsity(cfg: TrainConfig, mode: str | None = None) -> float:
    """Causal sparsity over all layers in ``mode`` (default: averaged over the run's steps).

    Full-attention layers count as 0; the stage hybrid averages its MoBA and full steps.
    """
    n = PRESETS[cfg.preset].num_layers
    per_layer = moba_sparsity(cfg.seq_len, cfg.block_size, cfg.topk)["causal"]
    moba_share = per_layer * (n - len(cfg.full_layer_ids())) / n
    if mode == "moba":
        return moba_share
    if mode == "full":
        return 0.0
    return moba_share * cfg.switch_step / max(cfg.steps, 1)
