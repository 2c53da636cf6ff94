"""See what an SNN does: spike and operation accounting, an energy estimate, and the conversion doctor.

* :func:`profile_snn` counts events, synaptic operations, MACs and neuron updates per layer, with energy
  estimates against the ANN and the bit-matched quantised ANN (``docs/guides/accounting.md``).
* :func:`diagnose` splits each converted layer's error into clipping, quantisation and the rest, and ranks
  what to do about it; :func:`diagnose_td` finds the node where a TD conversion stops being equivalent.
* :func:`plot_profile` and :func:`plot_sweep` draw the figures (optional extra ``ann2snn-fx[plot]``).
"""

from ann2snn_fx.analysis.doctor import (
    Diagnosis,
    LayerDiagnosis,
    TDDiagnosis,
    TDNodeDeviation,
    diagnose,
    diagnose_td,
)
from ann2snn_fx.analysis.energy import FP32_45NM, INT8_45NM, EnergyModel, bit_matched_bits
from ann2snn_fx.analysis.plot import plot_profile, plot_sweep
from ann2snn_fx.analysis.profile import profile_snn, profile_sweep
from ann2snn_fx.analysis.records import EnergyEstimate, LayerRecord, SNNProfile

__all__ = [
    "FP32_45NM",
    "INT8_45NM",
    "Diagnosis",
    "EnergyEstimate",
    "EnergyModel",
    "LayerDiagnosis",
    "LayerRecord",
    "SNNProfile",
    "TDDiagnosis",
    "TDNodeDeviation",
    "bit_matched_bits",
    "diagnose",
    "diagnose_td",
    "plot_profile",
    "plot_sweep",
    "profile_snn",
    "profile_sweep",
]
