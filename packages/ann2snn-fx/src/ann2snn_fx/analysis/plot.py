"""Figures of the accounting, behind the optional extra ``ann2snn-fx[plot]`` (matplotlib, imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ann2snn_fx.analysis.energy import EnergyModel
from ann2snn_fx.analysis.records import SNNProfile

__all__ = ["plot_profile", "plot_sweep"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "plotting needs matplotlib: pip install 'ann2snn-fx[plot]' (or matplotlib>=3.7)."
        ) from error
    return plt


def plot_profile(profile: SNNProfile, path: str | None = None) -> Any:
    """Two panels: spike events per neuron layer, and SOPs beside MACs (SNN and ANN) per operator layer.

    Args:
        profile: What :func:`~ann2snn_fx.analysis.profile_snn` returned.
        path: Where to save the figure (PNG, SVG, ... by extension), or None.

    Returns:
        The matplotlib ``Figure``.

    Examples:
        >>> import torch
        >>> from ann2snn_fx import IFNode, trace_model
        >>> from ann2snn_fx.analysis import profile_snn
        >>> snn = trace_model(torch.nn.Sequential(IFNode(v_reset=None), torch.nn.Linear(2, 3)))
        >>> fig = plot_profile(profile_snn(snn, torch.ones(1, 2), 4))
        >>> len(fig.axes)
        2
    """
    if not isinstance(profile, SNNProfile):
        raise TypeError(f"profile must be an SNNProfile, but got {type(profile).__name__}.")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    neurons = [r for r in profile.layers if r.role == "neuron"]
    left.bar([r.name for r in neurons], [r.events_pos for r in neurons], label="positive")
    left.bar([r.name for r in neurons], [r.events_neg for r in neurons], bottom=[r.events_pos for r in neurons],
             label="negative")  # fmt: skip
    left.set(
        title=f"spike events per inference, T={profile.time_steps}", ylabel="events", xlabel="neuron layer"
    )
    left.legend()
    ops = [r for r in profile.layers if r.role != "neuron"]
    xs = range(len(ops))
    width = 0.27
    right.bar([x - width for x in xs], [r.sop for r in ops], width, label="SNN SOP")
    right.bar(list(xs), [r.mac for r in ops], width, label="SNN MAC")
    right.bar([x + width for x in xs], [r.ann_mac for r in ops], width, label="ANN MAC")
    right.set_xticks(list(xs), [r.name for r in ops])
    right.set(title="operations per inference", ylabel="operations", xlabel="layer", yscale="symlog")
    right.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_sweep(profiles: Sequence[SNNProfile], model: EnergyModel, path: str | None = None) -> Any:
    """Energy (SNN compute-only and with memory, ANN, bit-matched QANN) against ``T``, beside accuracy.

    Args:
        profiles: Profiles of one SNN at several ``T`` (:func:`~ann2snn_fx.analysis.profile_sweep`); the
            accuracy panel needs them made with labels.
        model: The energy constants.
        path: Where to save the figure, or None.

    Returns:
        The matplotlib ``Figure``.
    """
    if not profiles or not all(isinstance(p, SNNProfile) for p in profiles):
        raise TypeError("profiles must be a non-empty sequence of SNNProfile.")
    plt = _pyplot()
    ordered = sorted(profiles, key=lambda p: p.time_steps)
    ts = [p.time_steps for p in ordered]
    energies = [p.energy(model) for p in ordered]
    with_accuracy = all(p.accuracy is not None for p in ordered)
    fig, axes = plt.subplots(1, 2 if with_accuracy else 1, figsize=(11 if with_accuracy else 6, 4))
    ax = axes[0] if with_accuracy else axes
    ax.plot(ts, [e.snn_compute_pj for e in energies], "o-", label="SNN, compute-only")
    ax.plot(ts, [e.snn_memory_pj for e in energies], "o--", label="SNN, with memory")
    ax.plot(ts, [e.ann_compute_pj for e in energies], "k-", label="ANN, compute-only")
    ax.plot(ts, [e.qann_compute_pj for e in energies], "s:", label="bit-matched QANN, compute-only")
    ax.set(yscale="log", xlabel="T", ylabel="pJ per inference", title=model.name)
    for axis in axes if with_accuracy else (axes,):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ts, [str(t) for t in ts])
    ax.legend(fontsize=8)
    if with_accuracy:
        axes[1].plot(ts, [p.accuracy for p in ordered], "o-")
        axes[1].set(xlabel="T", ylabel="accuracy", title="SNN accuracy")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
