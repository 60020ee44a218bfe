"""Training and quality tools: ``moba train``, ``moba compare``, ``moba eval``, ``moba viz``.

Needs the ``train`` extra (``pip install 'moba-attn[train]'``: transformers, matplotlib, tqdm).
MoBA enters the models only through :mod:`moba_attn.integrations.transformers`
(``enable_moba`` / ``disable_moba``).
"""

from .config import PRESETS, Preset, TrainConfig, UsageError

__all__ = [
    "PRESETS",
    "Preset",
    "TrainConfig",
    "UsageError",
    "load_run",
    "run_compare",
    "run_eval",
    "run_viz",
    "train",
]


def __getattr__(name):  # heavy imports (transformers, matplotlib) only when used
    if name in ("train", "load_run", "Run"):
        from . import trainer

        return getattr(trainer, name)
    if name == "run_compare":
        from .compare import run_compare

        return run_compare
    if name == "run_eval":
        from .evaluate import run_eval

        return run_eval
    if name == "run_viz":
        from .routing import run_viz

        return run_viz
    raise AttributeError(name)
