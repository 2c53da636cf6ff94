"""Temporal-difference (TD) operators that make transformer blocks spiking-equivalent.

Every operator takes complete time sequences ``[T, ...]`` (time at dimension 0) and returns the temporal
difference of the ANN op applied to the cumulative input: ``Y.cumsum(0)[t] == f(X.cumsum(0)[t])``.
``set_streaming(True)`` switches an operator to one-step-at-a-time input; ``reset()`` clears its state.
"""

from ann2snn_ops.__about__ import __version__
from ann2snn_ops._base import TDModule
from ann2snn_ops._cumsum import running_sum
from ann2snn_ops.attention import TDMultiheadAttention, TDScaledDotProductAttention
from ann2snn_ops.elementwise import TDGELU, TDSiLU, TDSoftmax
from ann2snn_ops.generic import TDFunction
from ann2snn_ops.linear import TDConv2d, TDLinear
from ann2snn_ops.norm import TDLayerNorm, TDRMSNorm
from ann2snn_ops.products import TDMatMul, TDMul

# SpikeZIP-TF building blocks (issue 16)
from ann2snn_ops.stbif import Quantizer, STBIFNeuron, quantizer_bounds
from ann2snn_ops.streaming import reset_streaming, set_streaming

__all__ = [
    "TDGELU",
    "Quantizer",
    "STBIFNeuron",
    "TDConv2d",
    "TDFunction",
    "TDLayerNorm",
    "TDLinear",
    "TDMatMul",
    "TDModule",
    "TDMul",
    "TDMultiheadAttention",
    "TDRMSNorm",
    "TDScaledDotProductAttention",
    "TDSiLU",
    "TDSoftmax",
    "__version__",
    "quantizer_bounds",
    "reset_streaming",
    "running_sum",
    "set_streaming",
]
