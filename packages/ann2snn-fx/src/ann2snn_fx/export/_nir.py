"""``to_nir`` and ``write_nir``: a converted SNN as a NIR graph (the ``ann2snn-fx[nir]`` extra)."""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ann2snn_fx.__about__ import __version__
from ann2snn_fx.export._lower import lower
from ann2snn_fx.export._params import ExportError, Op
from ann2snn_fx.snn.neurons import reset_net
from ann2snn_fx.tracing import trace_model

__all__ = ["METADATA", "ExportError", "import_nir", "to_nir", "write_nir"]

#: Graph metadata keys written by :func:`to_nir` (not normative in NIR; :func:`from_nir` honours them).
METADATA = {"reset": "subtract", "spike_condition": ">=", "dt": 1.0}


def import_nir() -> Any:
    """Import the ``nir`` package, or raise an ImportError that names the extra to install."""
    try:
        import nir
    except ImportError as error:  # pragma: no cover - exercised where nir is absent
        raise ImportError(
            "NIR export/import needs the 'nir' package: pip install 'ann2snn-fx[nir]' (or pip install nir)."
        ) from error
    return nir


def _shapes(snn: fx.GraphModule, sample_input: torch.Tensor) -> dict[str, tuple[int, ...]]:
    model = copy.deepcopy(snn).eval()
    reset_net(model)
    ShapeProp(model).propagate(sample_input)
    shapes = {}
    for node in model.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[node.name] = tuple(int(d) for d in meta.shape[1:])
    return shapes


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy().copy()


def _node(nir: Any, op: Op) -> Any:
    p = op.params
    if op.kind == "input":
        return nir.Input(input_type={"input": np.array(op.shape)})
    if op.kind == "output":
        return nir.Output(output_type={"output": np.array(op.shape)})
    if op.kind == "affine":
        return nir.Affine(weight=_f32(p["weight"]), bias=_f32(p["bias"]))
    if op.kind == "conv":
        cls = nir.Conv1d if len(op.in_shape) == 2 else nir.Conv2d
        spatial = op.in_shape[1] if cls is nir.Conv1d else np.array(op.in_shape[1:])
        return cls(
            input_shape=spatial,
            weight=_f32(p["weight"]),
            stride=np.array(p["stride"]) if cls is nir.Conv2d else p["stride"][0],
            padding=np.array(p["padding"]) if cls is nir.Conv2d else p["padding"][0],
            dilation=np.array(p["dilation"]) if cls is nir.Conv2d else p["dilation"][0],
            groups=int(p["groups"]),
            bias=_f32(p["bias"]),
        )
    if op.kind == "sumpool":
        return nir.SumPool2d(
            kernel_size=np.array(p["kernel_size"]), stride=np.array(p["stride"]), padding=np.array([0, 0])
        )
    if op.kind == "flatten":
        return nir.Flatten(input_type={"input": np.array(op.in_shape)}, start_dim=0, end_dim=-1)
    assert op.kind == "if", op.kind
    threshold = _f32(p["v_threshold"])
    metadata = {
        "reset": p["reset"],
        "spike_condition": ">=",
        "v_init": _f32(p["v_init"]),
        "source": p["source"],
    }
    return nir.IF(
        r=np.ones_like(threshold), v_threshold=threshold, v_reset=_f32(p["v_reset"]), metadata=metadata
    )


def to_nir(snn: nn.Module, sample_input: torch.Tensor, strict: bool = True) -> Any:
    """Export a converted SNN (ReLU -> IF path) as a ``nir.NIRGraph``.

    Convolutions and linear layers become ``Affine`` / ``Conv1d`` / ``Conv2d`` (a zero bias where the layer
    has none), each ``IFNode`` an ``IF`` with ``r = 1`` and thresholds shaped like the neuron tensor,
    average pools ``SumPool2d`` with ``1/k²`` folded into the next layer, ``flatten(x, 1)`` a ``Flatten``
    with ``start_dim=0``, and additions (residual joins) two edges into one node. The ``VoltageScaler`` s
    around each neuron are folded away: into the weights next to them where nothing else reads those
    weights' outputs, otherwise into the neuron's threshold (residual joins), so the graph computes the same
    potentials up to float32 rounding of the folded products. What NIR cannot carry is written into
    metadata: the graph's ``{"reset": "subtract", "spike_condition": ">=", "dt": 1.0, "exporter": ...}``
    and, per ``IF`` node, ``reset``, ``spike_condition``, ``v_init`` and the ``source`` module path.
    NIR consumers ignore metadata: they reset to ``v_reset`` and fire on ``v > θ`` (see the guide
    "Running on neuromorphic hardware" for what each consumer reproduces).

    Args:
        snn: The converted SNN (an ``fx.GraphModule`` from :class:`ann2snn_fx.Converter`, or a module that
            :func:`ann2snn_fx.trace_model` can trace); not changed.
        sample_input: One input batch ``[B, *]`` (for the shapes; one step is run on a copy).
        strict: Refuse, with an :class:`ExportError` naming the node and the way out, what NIR cannot
            express (burst or signed neurons, a non-zero initial potential). ``strict=False`` exports those
            anyway, with a ``UserWarning`` each, listed in the graph metadata under ``"approximations"``.
            Nodes with no NIR form at all (TD operators, max-pools on spikes) are always refused.

    Returns:
        A ``nir.NIRGraph``.

    Raises:
        ImportError: when ``nir`` is not installed (``pip install 'ann2snn-fx[nir]'``).
        ExportError: (a ``ValueError``) for what NIR cannot express.
        TypeError: for a non-module ``snn``, a non-tensor ``sample_input`` or a non-bool ``strict``.

    Examples:
        >>> from ann2snn_fx import Converter
        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> snn = Converter([torch.rand(16, 4)], progress=False).convert_to_spiking_neurons(ann)
        >>> graph = to_nir(snn, torch.rand(1, 4))
        >>> sorted(type(n).__name__ for n in graph.nodes.values())
        ['Affine', 'Affine', 'IF', 'Input', 'Output']
        >>> graph.metadata["reset"], graph.metadata["spike_condition"]
        ('subtract', '>=')
    """
    nir = import_nir()
    if not isinstance(snn, nn.Module):
        raise TypeError(f"snn must be an nn.Module (a converted SNN), but got {type(snn).__name__}.")
    if not isinstance(sample_input, torch.Tensor) or sample_input.dim() < 2:
        raise TypeError(
            "sample_input must be a batched tensor [B, *], but got "
            + (
                f"shape {tuple(sample_input.shape)}"
                if isinstance(sample_input, torch.Tensor)
                else type(sample_input).__name__
            )
            + "."
        )
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, but got {strict!r}.")
    gm = snn if isinstance(snn, fx.GraphModule) else trace_model(snn)
    with torch.no_grad():
        lowered = lower(gm, _shapes(gm, sample_input), strict)
    nodes = {name: _node(nir, op) for name, op in lowered.ops.items()}
    edges = [(src, name) for name, op in lowered.ops.items() for src in op.inputs]
    metadata: dict[str, Any] = {**METADATA, "exporter": f"ann2snn-fx {__version__}"}
    inits = [op.params["v_init"] for op in lowered.ops.values() if op.kind == "if"]
    metadata["v_init"] = (
        float(inits[0].flatten()[0])
        if inits and all(bool((i == inits[0].flatten()[0]).all()) for i in inits)
        else "per IF node"
    )
    if lowered.warnings:
        metadata["approximations"] = "\n".join(lowered.warnings)
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)


def write_nir(
    graph_or_snn: Any,
    path: str | os.PathLike[str],
    sample_input: torch.Tensor | None = None,
    *,
    strict: bool = True,
    legacy: bool = False,
) -> Any:
    """Write a NIR graph (or export ``snn`` with :func:`to_nir` first) to an HDF5 file with ``nir.write``.

    Args:
        graph_or_snn: A ``nir.NIRGraph``, or a converted SNN (then ``sample_input`` is required).
        path: The file to write.
        sample_input: The input batch :func:`to_nir` needs when an SNN is given.
        strict: Passed to :func:`to_nir`.
        legacy: Write a file that nir <= 1.0.4 (the version sinabs 3.1.3 pins) can read: IF nodes drop
            their ``v_reset`` field when it is all zeros (reader default), and a non-zero ``v_reset``
            raises ``ValueError``.

    Returns:
        The ``nir.NIRGraph`` written.

    Examples:
        >>> import tempfile, pathlib
        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> from ann2snn_fx import Converter
        >>> snn = Converter([torch.rand(16, 4)], progress=False).convert_to_spiking_neurons(ann)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "snn.nir"
        >>> graph = write_nir(snn, path, torch.rand(1, 4))
        >>> import nir
        >>> sorted(nir.read(path).nodes) == sorted(graph.nodes)
        True
    """
    nir = import_nir()
    if isinstance(graph_or_snn, nir.NIRGraph):
        graph = graph_or_snn
    else:
        if sample_input is None:
            raise TypeError("write_nir needs sample_input when given an SNN instead of a nir.NIRGraph.")
        graph = to_nir(graph_or_snn, sample_input, strict=strict)
    if not isinstance(legacy, bool):
        raise TypeError(f"legacy must be a bool, but got {legacy!r}.")
    nir.write(path, graph)
    if legacy:
        _drop_zero_v_reset(graph, path)
    return graph


def _drop_zero_v_reset(graph: Any, path: str | os.PathLike[str]) -> None:
    import h5py

    nir = import_nir()
    for name, node in graph.nodes.items():
        if isinstance(node, nir.IF) and np.any(node.v_reset != 0):
            raise ValueError(
                f"legacy=True cannot write IF node {name!r}: its v_reset is not zero and nir <= 1.0.4 has "
                "no v_reset field; write with legacy=False."
            )
    with h5py.File(path, "r+") as f:
        for name, node in graph.nodes.items():
            if isinstance(node, nir.IF):
                group = f["node"]["nodes"][name]
                if "v_reset" in group:
                    del group["v_reset"]
