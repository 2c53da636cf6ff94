"""What a converted network runs on: the IF neuron, ``reset_net``, and the runners ``run_snn`` / ``MultiStepSNN``."""

from ann2snn_fx.snn.neurons import IFNode, SigmoidSurrogate, reset_net
from ann2snn_fx.snn.runner import MultiStepSNN, run_snn

__all__ = ["IFNode", "MultiStepSNN", "SigmoidSurrogate", "reset_net", "run_snn"]
