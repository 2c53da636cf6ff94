"""SpikeZIP-TF for any model the TD path converts: quantise (QANN), then replace quantisers by ST-BIF neurons.

* :func:`prepare_qann` places quantisers by one rule (every operand of a product with a weight or another
  activation), :func:`calibrate_qann` sets their steps from data (or train the QANN: LSQ).
* :func:`qann_to_snn` gives the :class:`SpikeZIPSNN`, whose cumulative output equals the QANN's once every
  neuron is quiet, every weight layer but the first being fed ternary spikes.
"""

from ann2snn_fx.spikezip.qann import QANN, QANNReport, QuantSite, calibrate_qann, prepare_qann
from ann2snn_fx.spikezip.snn import SpikeZIPSNN, qann_to_snn

__all__ = ["QANN", "QANNReport", "QuantSite", "SpikeZIPSNN", "calibrate_qann", "prepare_qann", "qann_to_snn"]
