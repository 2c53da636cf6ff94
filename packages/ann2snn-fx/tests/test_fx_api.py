"""The package's public names."""

import ann2snn_fx


def test_public_api() -> None:
    expected = {
        "Converter",
        "ActivationRule",
        "ReLURule",
        "FunctionalReLURule",
        "ClippedReLURule",
        "all_rules",
        "NeuronFactory",
        "HookFactory",
        "ThresholdOptimizer",
        "IFNode",
        "reset_net",
        "run_snn",
        "MultiStepSNN",
        "replace_by_td_operators",
        "td_impulse",
        "TDImpulse",
    }
    assert expected <= set(ann2snn_fx.__all__)
    for name in ann2snn_fx.__all__:
        assert getattr(ann2snn_fx, name) is not None
    assert "download_url" not in ann2snn_fx.__all__
    assert ann2snn_fx.TDImpulse is ann2snn_fx.td.TDImpulse


def test_converter_delegates_td_replacement() -> None:
    import torch
    from torch import nn

    ann = nn.Sequential(nn.Linear(3, 3), nn.GELU()).eval()
    gm = ann2snn_fx.Converter([]).replace_by_td_operators(ann)
    x_seq = torch.randn(4, 2, 3)
    torch.testing.assert_close(gm(x_seq).cumsum(0), ann(x_seq.cumsum(0)), atol=1e-5, rtol=1e-5)


def test_subsystems_are_reexported_from_their_all() -> None:
    """The top level re-exports each subsystem's ``__all__`` (one list per subsystem, not two)."""
    for module in (ann2snn_fx.analysis, ann2snn_fx.spikezip):
        for name in module.__all__:
            assert name in ann2snn_fx.__all__, (module.__name__, name)
            assert getattr(ann2snn_fx, name) is getattr(module, name)
    assert len(ann2snn_fx.__all__) == len(set(ann2snn_fx.__all__))
