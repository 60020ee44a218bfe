"""moba-attn: exact, trainable MoBA (Mixture of Block Attention) for PyTorch."""

from .interface import moba_attn_func, moba_attn_varlen_func
from .ops.gate import moba_select

__version__ = "0.1.0"
__all__ = ["__version__", "moba_attn_func", "moba_attn_varlen_func", "moba_select"]
