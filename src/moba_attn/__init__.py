"""moba-attn: exact, trainable MoBA (Mixture of Block Attention) for PyTorch."""

from .interface import (
    moba_attn_func,
    moba_attn_varlen_func,
    moba_attn_with_kvcache,
    moba_select,
    update_centroids,
)
from .ops.config import MobaConfig
from .ops.layout import BlockLayout, prepare_layout

__version__ = "0.1.0"
__all__ = [
    "BlockLayout",
    "MobaConfig",
    "__version__",
    "moba_attn_func",
    "moba_attn_varlen_func",
    "moba_attn_with_kvcache",
    "moba_select",
    "prepare_layout",
    "update_centroids",
]
