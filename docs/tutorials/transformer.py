"""Tutorial 2: a tiny transformer classifier on scikit-learn's digits, converted to TD operators.

The conversion path:

1. train a one-block transformer whose tokens are the image rows (an ordinary PyTorch model);
2. ``replace_by_td_operators`` traces it with torch.fx and swaps Linear, LayerNorm, GELU and
   MultiheadAttention for their temporal-difference (TD) versions from ann2snn-ops;
3. the TD model takes a whole time sequence ``[T, batch, tokens, features]``: the tokens at t = 0 and zeros
   after. Its outputs are differences; their cumulative sum equals the ANN's output at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from digits import Digits, accuracy, markdown_table, train_classifier
from torch import nn

from ann2snn_fx.td import replace_by_td_operators

ROWS = 8  # an 8x8 digit gives 8 tokens, one per row, of 8 pixels each


def rows_as_tokens(images: torch.Tensor) -> torch.Tensor:
    """Turn ``[N, 1, 8, 8]`` images into ``[N, 8, 8]`` token sequences: token i is pixel row i."""
    return images.squeeze(1)


# --8<-- [start:model]
class TinyTransformer(nn.Module):
    """A row embedding with a learnt positional embedding, one pre-norm transformer block, mean pooling over
    tokens and a linear head.

    Shape:
        - Input: ``[N, L, in_features]`` tokens.
        - Output: ``[N, num_classes]`` logits.
    """

    def __init__(
        self,
        in_features: int = ROWS,
        tokens: int = ROWS,
        embed_dim: int = 32,
        num_heads: int = 4,
        mlp_dim: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, embed_dim)
        self.position = nn.Parameter(0.02 * torch.randn(tokens, embed_dim))
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # A constant added to the tokens: the TD conversion adds it at t = 0 only (else it would count T times).
        x = self.embed(tokens) + self.position
        h = self.norm1(x)
        # need_weights=False is required by the TD conversion (a TD attention returns no weights).
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        # Negative dims only: the TD model has an extra leading time axis.
        return self.head(self.norm(x).mean(dim=-2))


# --8<-- [end:model]


def train_transformer(data: Digits, *, epochs: int, seed: int = 0, progress: bool = True) -> TinyTransformer:
    """Train :class:`TinyTransformer` on the training split; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = TinyTransformer()
    train_classifier(
        model,
        rows_as_tokens(data.x_train),
        data.y_train,
        epochs=epochs,
        lr=3e-3,
        weight_decay=1e-2,
        seed=seed,
        progress=progress,
        desc="train transformer",
    )
    return model


# --8<-- [start:compare]
def impulse(tokens: torch.Tensor, steps: int) -> torch.Tensor:
    """The time sequence ``[T, N, ...]`` holding ``tokens`` at t = 0 and zeros after."""
    sequence = torch.zeros((steps, *tokens.shape), dtype=tokens.dtype)
    sequence[0] = tokens
    return sequence


@dataclass(frozen=True)
class TDResult:
    """How closely the TD model reproduces the ANN on the test split."""

    steps: int
    ann_accuracy: float
    td_accuracy: float  # the lowest over the T steps: the prediction is right from t = 0 on
    max_abs_difference: float  # max over steps, samples and classes of |cumulative TD output - ANN output|
    naive_max_abs_difference: float  # the same for the ANN run on each step's input without TD operators
    naive_accuracy: float


@torch.no_grad()
def compare(
    ann: nn.Module, td_model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, steps: int
) -> TDResult:
    """Run the TD model on the impulse sequence and compare its cumulative output with the ANN's output."""
    reference = ann(tokens)  # [N, classes]
    sequence = impulse(tokens, steps)  # [T, N, L, F]
    cumulative = td_model(sequence).cumsum(dim=0)  # [T, N, classes]: the SNN's output so far, at every step
    difference = (cumulative - reference).abs().max().item()

    # For contrast: the unconverted ANN applied step by step. Biases and LayerNorm see zeros after t = 0 and
    # add their response to zero T - 1 times, so the sum drifts away from the ANN.
    naive = torch.stack([ann(x) for x in sequence]).cumsum(dim=0)
    return TDResult(
        steps=steps,
        ann_accuracy=accuracy(reference, labels),
        td_accuracy=min(accuracy(out, labels) for out in cumulative),
        max_abs_difference=difference,
        naive_max_abs_difference=(naive - reference).abs().max().item(),
        naive_accuracy=accuracy(naive[-1], labels),
    )


# --8<-- [end:compare]


# --8<-- [start:convert]
def run_transformer_tutorial(
    data: Digits, *, epochs: int = 20, steps: int = 16, seed: int = 0, progress: bool = True
) -> TDResult:
    """Train the transformer, convert it with TD operators and compare it with the ANN on the test split."""
    ann = train_transformer(data, epochs=epochs, seed=seed, progress=progress)
    # strict=True: fail, listing the nodes, if anything left in the graph breaks the equivalence.
    td_model = replace_by_td_operators(ann, strict=True)  # ann itself is left untouched
    print(td_model.td_report)
    return compare(ann, td_model.eval(), rows_as_tokens(data.x_test), data.y_test, steps)


# --8<-- [end:convert]


def format_table(result: TDResult) -> str:
    """A markdown table of both accuracies and the largest deviation from the ANN."""
    rows = [
        ["ANN", f"{100 * result.ann_accuracy:.1f}", "0 (reference)"],
        [
            f"TD operators, T={result.steps} (worst step)",
            f"{100 * result.td_accuracy:.1f}",
            f"{result.max_abs_difference:.2e}",
        ],
        [
            f"ANN run step by step (no TD), T={result.steps}",
            f"{100 * result.naive_accuracy:.1f}",
            f"{result.naive_max_abs_difference:.2e}",
        ],
    ]
    header = ["model", "test accuracy (%)", "largest abs(cumulative output - ANN output)"]
    return markdown_table(header, rows)
