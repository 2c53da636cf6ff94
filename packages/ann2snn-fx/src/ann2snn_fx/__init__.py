"""torch.fx converters: ReLU -> IF neurons with calibration, and transformers -> TD operators."""

from ann2snn_fx.__about__ import __version__
from ann2snn_fx.converter import Converter
from ann2snn_fx.factories import HookFactory, NeuronFactory
from ann2snn_fx.neuron import IFNode, SigmoidSurrogate, reset_net
from ann2snn_fx.observers import ActivationStatsHook
from ann2snn_fx.relu.calibrate import CalibratedLayer, calibrate_snn
from ann2snn_fx.relu.ltb import LTBHook
from ann2snn_fx.relu.qcfs import QCFS, QCFSRule, prepare_qcfs
from ann2snn_fx.relu.tuner import LatencyRecord, LatencyResult, pareto_front, tune_latency
from ann2snn_fx.report import ConversionReport, ConvertedActivation, LeftActivation
from ann2snn_fx.rules import ActivationRule, ClippedReLURule, FunctionalReLURule, ReLURule, all_rules
from ann2snn_fx.runner import MultiStepSNN, run_snn
from ann2snn_fx.snn.readout import estimate_readout_delay
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
    "QCFS",
    "ActivationRule",
    "ActivationStatsHook",
    "CalibratedLayer",
    "ClippedReLURule",
    "ConversionReport",
    "ConvertedActivation",
    "Converter",
    "FunctionalReLURule",
    "HookFactory",
    "IFNode",
    "LTBHook",
    "LatencyRecord",
    "LatencyResult",
    "LeftActivation",
    "ModelTraceError",
    "MultiStepSNN",
    "NeuronFactory",
    "QCFSRule",
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
    "calibrate_snn",
    "estimate_readout_delay",
    "pareto_front",
    "prepare_qcfs",
    "replace_by_td_operators",
    "reset_net",
    "run_snn",
    "td_impulse",
    "trace_model",
    "tune_latency",
]
