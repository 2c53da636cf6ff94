"""scikit-learn's bundled digits as torch tensors, and a small training loop both tutorials share.

The digits ship inside scikit-learn (1,797 grey-level 8x8 images of the digits 0-9), so nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm


@dataclass(frozen=True)
class Digits:
    """A seeded, stratified train/test split, pixels scaled to [0, 1].

    Shape:
        - x_train: ``[N_train, 1, 8, 8]`` float32, y_train: ``[N_train]`` int64
        - x_test: ``[N_test, 1, 8, 8]`` float32, y_test: ``[N_test]`` int64
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0, test_size: float = 0.3) -> Digits:
    """Load the digits and split them, stratified by class, with a fixed seed."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # grey levels are 0..16
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_size, random_state=seed, stratify=y.numpy()
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits [N, C]`` against ``labels [N]``, as a fraction."""
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def train_classifier(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` with AdamW and a cosine schedule on cross-entropy; returns it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(inputs, labels), batch_size=batch_size, shuffle=True, generator=generator
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for _ in bar:
        total, seen = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(y)
            seen += len(y)
        bar.set_postfix(loss=f"{total / seen:.3f}")
    return model.eval()


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """An aligned markdown table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    rule = (
        "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
