"""The ReLU -> IF conversion path: the Converter and its stages, rules, factories, thresholds, observers, report.

The public names are exported by :mod:`ann2snn_fx`; import the modules of this package for the rest
(``ann2snn_fx.relu.stages``, ``ann2snn_fx.relu.rule_base``, ...).
"""
