"""The ReLU -> IF conversion path: the Converter and its stages, rules, factories, thresholds, observers, report."""

from ann2snn_fx.relu.converter import Converter
from ann2snn_fx.relu.factories import HookFactory, NeuronFactory
from ann2snn_fx.relu.observers import ActivationStatsHook
from ann2snn_fx.relu.report import ConversionReport, ConvertedActivation, LeftActivation
from ann2snn_fx.relu.rules import ActivationRule, ClippedReLURule, FunctionalReLURule, ReLURule, all_rules
from ann2snn_fx.relu.thresholds import ThresholdOptimizer

__all__ = [
    "ActivationRule",
    "ActivationStatsHook",
    "ClippedReLURule",
    "ConversionReport",
    "ConvertedActivation",
    "Converter",
    "FunctionalReLURule",
    "HookFactory",
    "LeftActivation",
    "NeuronFactory",
    "ReLURule",
    "ThresholdOptimizer",
    "all_rules",
]
