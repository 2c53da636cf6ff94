"""Shared pieces of the NIR interop tests: the two models, and spike recorders for each consumer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from ann2snn_fx import IFNode

T = 32


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def digits_cnn() -> nn.Module:
    """The CNN of docs/tutorials/cnn.py (the demo's digits model)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResCNN(nn.Module):
    """A residual CNN: identity joins and a strided 1x1-conv join, global average pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 6) -> nn.Module:
    """Seeded training on one thread, so the weights do not depend on the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(epochs):
            for i in range(0, len(x), 64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _hooked(modules: dict[str, nn.Module], store: dict[str, list[torch.Tensor]]) -> list[Any]:
    handles = []
    for name, module in modules.items():
        store[name] = []

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            store[name].append((out[0] if isinstance(out, tuple) else out).detach().clone())

        handles.append(module.register_forward_hook(hook))
    return handles


def record_steps(
    model: nn.Module, neurons: dict[str, nn.Module], x: torch.Tensor, reset: Callable[[], None]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Call ``model`` once per step for T steps on ``x``; spikes ``[T, B, *]`` per neuron, outputs ``[T, B, *]``."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = _hooked(neurons, store)
    reset()
    with torch.no_grad():
        outs = [model(x) for _ in range(T)]
    for h in handles:
        h.remove()
    return {k: torch.stack(v) for k, v in store.items()}, torch.stack(
        [o[0] if isinstance(o, tuple) else o for o in outs]
    )


def original_spikes(snn: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The converted SNN's own spikes, keyed by the NIR node name to_nir gives each IFNode."""
    neurons = {name.replace(".", "_"): m for name, m in snn.named_modules() if isinstance(m, IFNode)}
    from ann2snn_fx import reset_net

    return record_steps(snn, neurons, x, lambda: reset_net(snn))


def threshold_margins(snn: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per ``IFNode`` of the converted SNN (keyed as :func:`original_spikes` keys it), ``|v - θ| / θ`` of
    the membrane just before each step's firing decision, ``[T, B, *]``: how close each spike entry came to
    flipping under a rounding difference. Keys are in the order the neurons run (the data flow)."""
    from ann2snn_fx import reset_net

    store: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in snn.named_modules():
        if isinstance(m, IFNode):
            key = name.replace(".", "_")

            def pre(mod: nn.Module, inputs: Any, key: str = key) -> None:
                theta = torch.as_tensor(mod.v_threshold)
                store.setdefault(key, []).append(((mod.v + inputs[0] - theta).abs() / theta).detach().clone())

            handles.append(m.register_forward_pre_hook(pre))
    reset_net(snn)
    with torch.no_grad():
        for _ in range(T):
            snn(x)
    for h in handles:
        h.remove()
    reset_net(snn)
    return {k: torch.stack(v) for k, v in store.items()}


def from_nir_spikes(model: Any, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from ann2snn_fx import reset_net

    neurons = {model.nir_names[n]: m for n, m in model.named_children() if isinstance(m, IFNode)}
    return record_steps(model, neurons, x, lambda: reset_net(model))


def sinabs_spikes(graph: Any, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """sinabs as the facts say: from_nir, then SingleSpike and no lower membrane bound; input [B*T, ...]."""
    import sinabs
    import sinabs.layers as sl

    b = x.shape[0]
    model = sinabs.from_nir(graph, batch_size=b)
    model.execution_order = topological(model)
    neurons = {}
    for name, m in model.named_modules():
        if isinstance(m, sl.IAFSqueeze):
            m.spike_fn = sinabs.activation.SingleSpike
            m.min_v_mem = None
            neurons[name] = m
    store: dict[str, list[torch.Tensor]] = {}
    handles = _hooked(neurons, store)
    model.reset_states() if hasattr(model, "reset_states") else None
    with torch.no_grad():
        out = model(x.unsqueeze(1).expand(b, T, *x.shape[1:]).reshape(b * T, *x.shape[1:]))
    out = out[0] if isinstance(out, tuple) else out
    for h in handles:
        h.remove()

    def tb(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, T, *t.shape[1:]).transpose(0, 1)

    names = {re_name(n): n for n in graph.nodes}
    return {names[k]: tb(v[0]) for k, v in store.items()}, tb(out)


def topological(executor: Any) -> list[Any]:
    """nirtorch.load's GraphExecutor (sinabs's loader) orders nodes depth-first, pre-order, which runs a
    join before its longer branch and silently drops that input; this orders them so every node runs after
    all of its sources."""
    order, done = [], set()
    pending = list(executor.execution_order)
    while pending:
        for node in pending:
            if all(s.name in done for s in executor.graph.find_source_nodes_of(node)):
                order.append(node)
                done.add(node.name)
                pending.remove(node)
                break
        else:
            raise ValueError("cycle")
    return order


def re_name(name: str) -> str:
    import re

    return re.sub(r"\W", "_", name)


def snntorch_spikes(graph: Any, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """snnTorch as the facts say: import_from_nir, then beta=1 and init_hidden=True (and Flatten keeps the
    batch dimension: snnTorch passes NIR's start_dim=0 to nn.Flatten)."""
    import snntorch
    from snntorch.import_nir import import_from_nir

    model = import_from_nir(graph)
    neurons = {}
    for name, m in model.named_modules():
        if isinstance(m, snntorch.Leaky):
            m.beta = torch.tensor(1.0)
            m.init_hidden = True
            m.reset_delay = True
            neurons[name] = m
        elif isinstance(m, nn.Flatten) and m.start_dim == 0:
            m.start_dim = 1

    def reset() -> None:
        for m in neurons.values():
            m.mem = torch.zeros(0)

    names = {re_name(n): n for n in graph.nodes}
    spikes, out = record_steps(model, neurons, x, reset)
    return {names[k]: v for k, v in spikes.items()}, out
