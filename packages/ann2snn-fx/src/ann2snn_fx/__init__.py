"""torch.fx converters: ReLU -> IF neurons with calibration, and transformers -> TD operators."""

from typing import TYPE_CHECKING

from ann2snn_fx.__about__ import __version__
from ann2snn_fx.converter import Converter
from ann2snn_fx.factories import HookFactory, NeuronFactory
from ann2snn_fx.neuron import IFNode, SigmoidSurrogate, reset_net
from ann2snn_fx.observers import ActivationStatsHook
from ann2snn_fx.report import ConversionReport, ConvertedActivation, LeftActivation
from ann2snn_fx.rules import ActivationRule, ClippedReLURule, FunctionalReLURule, ReLURule, all_rules
from ann2snn_fx.runner import MultiStepSNN, run_snn
from ann2snn_fx.td import (
    TDConversionReport,
    TDEquivalenceError,
    TDImpulse,
    TDNodeRecord,
    TDTimeFolded,
    replace_by_td_operators,
    td_impulse,
)
from ann2snn_fx.threshold import ThresholdOptimizer
from ann2snn_fx.tracing import ModelTraceError, trace_model

__all__ = [
    "ActivationRule",
    "ActivationStatsHook",
    "ClippedReLURule",
    "ConversionReport",
    "ConvertedActivation",
    "Converter",
    "FunctionalReLURule",
    "HookFactory",
    "IFNode",
    "LeftActivation",
    "ModelTraceError",
    "MultiStepSNN",
    "NeuronFactory",
    "ReLURule",
    "SigmoidSurrogate",
    "TDConversionReport",
    "TDEquivalenceError",
    "TDImpulse",
    "TDNodeRecord",
    "TDTimeFolded",
    "ThresholdOptimizer",
    "__version__",
    "all_rules",
    "replace_by_td_operators",
    "reset_net",
    "run_snn",
    "td_impulse",
    "trace_model",
]

# NIR export/import (the ann2snn-fx[nir] extra), loaded on first use so `import ann2snn_fx` needs no nir.
if TYPE_CHECKING:
    from ann2snn_fx.export import ExportError, from_nir, to_nir, write_nir

_EXPORT_NAMES = ("ExportError", "from_nir", "to_nir", "write_nir")
__all__ += ["ExportError", "from_nir", "to_nir", "write_nir"]


def __getattr__(name: str) -> object:
    if name in _EXPORT_NAMES:
        from ann2snn_fx import export

        return getattr(export, name)
    raise AttributeError(f"module 'ann2snn_fx' has no attribute {name!r}")
