"""Calibration observers (VoltageHook) and current scalers (VoltageScaler) for ANN-to-SNN conversion.

``VoltageHook`` records a scale statistic of the activations it sees (EMA of batch maxima or exact
percentiles by default, dataset-level statistics with ``momentum=None``, per channel with
``channel_dim``, reduced over ``torch.distributed`` ranks when a process group is initialised);
``VoltageScaler`` multiplies currents by a fixed (per-tensor or per-channel) scale; ``percentile`` is the
exact on-device ``numpy.percentile`` both rely on.
"""

from ann2snn_calib.__about__ import __version__
from ann2snn_calib._finite import NonFiniteError
from ann2snn_calib._select import percentile
from ann2snn_calib.modules import VoltageHook, VoltageScaler

__all__ = ["NonFiniteError", "VoltageHook", "VoltageScaler", "__version__", "percentile"]
