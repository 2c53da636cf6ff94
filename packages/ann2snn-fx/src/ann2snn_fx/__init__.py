"""torch.fx converters: ReLU -> IF neurons with calibration, and transformers -> TD operators."""

from ann2snn_fx.__about__ import __version__
from ann2snn_fx.converter import Converter
from ann2snn_fx.factories import HookFactory, NeuronFactory
from ann2snn_fx.neuron import IFNode, SigmoidSurrogate, reset_net
from ann2snn_fx.observers import ActivationStatsHook
from ann2snn_fx.report import ConversionReport, ConvertedActivation, LeftActivation
from ann2snn_fx.rules import ActivationRule, ClippedReLURule, FunctionalReLURule, ReLURule, all_rules
from ann2snn_fx.runner import MultiStepSNN, run_snn

# SpikeZIP-TF: QANN -> ST-BIF SNN (issue 16)
from ann2snn_fx.spikezip import (
    QANN,
    QANNReport,
    QuantSite,
    SpikeZIPSNN,
    calibrate_qann,
    prepare_qann,
    qann_to_snn,
)
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
    "QANN",
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
    "QANNReport",
    "QuantSite",
    "ReLURule",
    "SigmoidSurrogate",
    "SpikeZIPSNN",
    "TDConversionReport",
    "TDEquivalenceError",
    "TDImpulse",
    "TDNodeRecord",
    "TDTimeFolded",
    "ThresholdOptimizer",
    "__version__",
    "all_rules",
    "calibrate_qann",
    "prepare_qann",
    "qann_to_snn",
    "replace_by_td_operators",
    "reset_net",
    "run_snn",
    "td_impulse",
    "trace_model",
]
