"""What a converted network runs on: the IF neuron, ``reset_net``, and the runners ``run_snn`` / ``MultiStepSNN``.

The public names are exported by :mod:`ann2snn_fx`; the modules: ``neurons``, ``dynamics``, ``runner``,
``multistep``.
"""
