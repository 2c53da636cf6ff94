"""torch.fx converters: ReLU -> IF neurons with calibration, and transformers -> TD operators."""

from typing import TYPE_CHECKING

from ann2snn_fx.__about__ import __version__
from ann2snn_fx.relu.converter import Converter
from ann2snn_fx.relu.factories import HookFactory, NeuronFactory
from ann2snn_fx.relu.observers import ActivationStatsHook
from ann2snn_fx.relu.report import ConversionReport, ConvertedActivation, LeftActivation
from ann2snn_fx.relu.rules import ActivationRule, ClippedReLURule, FunctionalReLURule, ReLURule, all_rules
from ann2snn_fx.relu.thresholds import ThresholdOptimizer
from ann2snn_fx.snn.neurons import IFNode, SigmoidSurrogate, reset_net
from ann2snn_fx.snn.runner import MultiStepSNN, run_snn
from ann2snn_fx.td import (
    TDConversionReport,
    TDEquivalenceError,
    TDImpulse,
    TDNodeRecord,
    TDTimeFolded,
    replace_by_td_operators,
    td_impulse,
)
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

# Accounting and the conversion doctor (issue 14) and SpikeZIP-TF: QANN -> ST-BIF SNN (issue 16): each
# subsystem's __all__ is the list of what the top level re-exports.
from ann2snn_fx import analysis as _analysis
from ann2snn_fx import spikezip as _spikezip
from ann2snn_fx.analysis import *  # noqa: F403
from ann2snn_fx.spikezip import *  # noqa: F403

__all__ += [*_analysis.__all__, *_spikezip.__all__]

# Real models (issue 18): spiking max pooling, tracing on an example input.
from ann2snn_fx.snn.pooling import SpikingMaxPool  # noqa: E402
from ann2snn_fx.tracing_example import ExampleInputTracer  # noqa: E402

__all__ += ["ExampleInputTracer", "SpikingMaxPool"]

# Low-latency ReLU -> IF conversion (issue 15).
from ann2snn_fx.relu.calibrate import CalibratedLayer, calibrate_snn  # noqa: E402
from ann2snn_fx.relu.ltb import LTBHook  # noqa: E402
from ann2snn_fx.relu.qcfs import QCFS, QCFSRule, prepare_qcfs  # noqa: E402
from ann2snn_fx.relu.tuner import LatencyRecord, LatencyResult, pareto_front, tune_latency  # noqa: E402
from ann2snn_fx.snn.readout import estimate_readout_delay  # noqa: E402

__all__ += [
    "QCFS",
    "CalibratedLayer",
    "LTBHook",
    "LatencyRecord",
    "LatencyResult",
    "QCFSRule",
    "calibrate_snn",
    "estimate_readout_delay",
    "pareto_front",
    "prepare_qcfs",
    "tune_latency",
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
