"""Triton kernels of fastmezo (installed as ``fastmezo.kernels``). Importing this module imports
triton; the rest of fastmezo imports it lazily, so fastmezo works where triton is missing."""
from .axpbz import axpbz_

__all__ = ["axpbz_"]
