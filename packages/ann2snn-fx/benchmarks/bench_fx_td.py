"""Benchmark: TD-converted encoders (a small one and ViT-tiny) and Hugging Face BERT/Llama (hidden 32 and 64)
on [T, B, ...] against the ANN on [T*B, ...].

Run: ``python packages/ann2snn-fx/benchmarks/bench_fx_td.py [--quick] [--markdown PATH]``.

The floor is the ANN itself applied to the T*B inputs (what any TD model must at least compute). Both
conversion paths are timed side by side in the same run: ``replace_by_td_operators`` (fx graph on
``[T, B, L, E]``) and ``TDTimeFolded`` (the model's own forward on time folded into the batch). The Hugging
Face models (random weights; skipped, with the reason printed, when ``transformers`` is missing) do not
trace, so only ``TDTimeFolded`` runs them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from _timing import median_times

from ann2snn_fx.td import TDTimeFolded, replace_by_td_operators


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Encoder(nn.Module):
    def __init__(self, width: int, heads: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


# (name, width, heads, blocks, tokens, batch): the small size is where per-op Python dispatch of the folded
# path dominates (issue 18 measured 4.3-6x for BERT/Llama at hidden 32-64 and 5-16 tokens).
SIZES = (("small encoder", 48, 3, 2, 16, 2), ("ViT-tiny encoder", 192, 3, 4, 65, 2))


# Hugging Face models: (hidden sizes, layers, heads, tokens, batch), the sizes of issue 18's measurement
HF_SIZES = ((32, 64), 2, 4, 9, 2)


def run(quick: bool) -> str:
    """Both encoder sizes and the Hugging Face models, one markdown section each."""
    sizes = ((SIZES[0][0], 48, 3, 1, 17, 2),) if quick else SIZES
    return "\n".join([*(run_size(quick, *size) for size in sizes), run_hugging_face(quick)])


def _hugging_face(transformers: Any, family: str, hidden: int, layers: int, heads: int) -> nn.Module:
    """A randomly initialised BERT, GPT-2 or Llama (grouped-query attention: half as many key/value heads)."""
    torch.manual_seed(0)
    if family == "BERT":
        config = transformers.BertConfig(
            vocab_size=64,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=32,
        )
        return transformers.BertModel(config).eval()  # type: ignore[no-any-return]
    if family == "GPT-2":
        gpt2 = transformers.GPT2Config(
            vocab_size=64, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=4 * hidden, n_positions=32
        )
        return transformers.GPT2Model(gpt2).eval()  # type: ignore[no-any-return]
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        intermediate_size=4 * hidden,
        max_position_embeddings=32,
    )
    return transformers.LlamaModel(config).eval()  # type: ignore[no-any-return]


_NO_CACHE = "Llama, use_cache=False"


def run_hugging_face(quick: bool) -> str:
    """BERT, Llama and GPT-2 through ``TDTimeFolded`` against the ANN on ``[T*B]``, both hidden sizes."""
    title = "## ann2snn-fx: TD-converted Hugging Face BERT, Llama and GPT-2 (TDTimeFolded)"
    try:
        import transformers
    except ImportError as error:
        reason = f"skipped: transformers is not installed ({error})"
        print(f"bench_fx_td: Hugging Face rows {reason}")
        return f"{title}\n\n{reason.capitalize()}.\n"
    hiddens, layers, heads, tokens, batch = HF_SIZES
    # Llama's default use_cache=True builds a DynamicCache every forward and returns it: the fused call sums and
    # differences its keys and values; both calls are measured
    families, hiddens = (
        (("BERT",), hiddens[:1]) if quick else (("BERT", "Llama", _NO_CACHE, "GPT-2"), hiddens)
    )
    # millisecond calls on a shared machine: each sample times `calls` forwards, more repeats
    steps_list, repeats, calls = ((2,), 1, 1) if quick else ((4, 16, 32), 15, 5)
    rows = []
    for family in families:
        for hidden in hiddens:
            ann = _hugging_face(transformers, family.split(",")[0], hidden, layers, heads)
            folded = TDTimeFolded(ann, time_inputs={"inputs_embeds"}, strict=True)
            extra: dict[str, Any] = {"use_cache": False} if family == _NO_CACHE else {}
            with torch.inference_mode():
                for steps in steps_list:
                    x = torch.randn(steps, batch, tokens, hidden)
                    flat = x.flatten(0, 1)
                    paths: dict[str, Callable[[], object]] = {
                        "ann": lambda flat=flat, ann=ann, kw=extra: [
                            ann(inputs_embeds=flat, **kw) for _ in range(calls)
                        ],
                        "folded": lambda x=x, f=folded, kw=extra: [
                            f(inputs_embeds=x, **kw) for _ in range(calls)
                        ],
                    }
                    times = {k: v / calls for k, v in median_times(paths, repeats).items()}
                    out = folded(inputs_embeds=x, **extra).last_hidden_state
                    reference = ann(inputs_embeds=x.cumsum(0).flatten(0, 1), **extra).last_hidden_state
                    error = float((out.cumsum(0).flatten(0, 1) - reference).abs().max())
                    rows.append(
                        f"| {family} | {hidden} | {steps} | {times['ann'] * 1e3:.1f} "
                        f"| {times['folded'] / times['ann']:.2f}x | {error:.1e} |"
                    )
    shape = f"{layers} layers, {heads} heads, {tokens} tokens, batch {batch}, random weights"
    lines = [
        title,
        "",
        f"Forward time of `TDTimeFolded` on a Hugging Face model ({shape}; Llama with {heads // 2} key/value "
        "heads) fed `inputs_embeds` as a `[T, B, ...]` sequence, as a ratio to the ANN's forward on the same "
        f"data folded to `[T*B, ...]` (the floor; float32, CPU, {torch.get_num_threads()} thread(s), median "
        f"of {repeats} interleaved samples of {calls} calls; transformers {transformers.__version__}). These sizes are where per-op Python dispatch "
        "of the folded path dominates; after a checked first call, modules that converted exactly run as one "
        "TD function each (the whole model where it can). Llama's and GPT-2's default `use_cache=True` returns a key/value "
        "cache, whose TD-form keys and values the fused call makes from the cumulative ones; `use_cache=False` "
        "returns none. Last column: max abs error of the cumulative `last_hidden_state` "
        "against the ANN on the cumulative input.",
        "",
        "| model | hidden | T | ANN on [T*B] (ms) | folded / ANN | max error |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    return "\n".join(lines)


def run_size(quick: bool, name: str, width: int, heads: int, depth: int, tokens: int, batch: int) -> str:
    """One size: the ANN, both TD paths, side by side."""
    torch.manual_seed(0)
    steps_list, repeats = ((2,), 1) if quick else ((4, 16, 32), 5)
    ann = Encoder(width, heads, depth).eval()
    graph = replace_by_td_operators(ann, strict=True)
    folded = TDTimeFolded(ann, strict=True)
    rows = []
    with torch.inference_mode():
        for steps in steps_list:
            x = torch.randn(steps, batch, tokens, width)
            flat = x.flatten(0, 1)
            paths: dict[str, Callable[[], object]] = {
                "ann": lambda flat=flat: ann(flat),
                "fx": lambda x=x: graph(x),
                "folded": lambda x=x: folded(x),
            }
            times = median_times(paths, repeats)
            reference = ann(x.cumsum(0).flatten(0, 1)).unflatten(0, (steps, batch))
            error = max(float((model(x).cumsum(0) - reference).abs().max()) for model in (graph, folded))
            rows.append(
                f"| {steps} | {times['ann'] * 1e3:.1f} | {times['fx'] / times['ann']:.2f}x "
                f"| {times['folded'] / times['ann']:.2f}x | {error:.1e} |"
            )
    title = f"## ann2snn-fx: TD-converted {name}"
    shape = f"width {width}, {heads} heads, {depth} blocks, {tokens} tokens, batch {batch}"
    lines = [
        title,
        "",
        f"Forward time of the TD-converted encoder ({shape}) on a `[T, B, ...]` sequence, as a ratio to the "
        f"ANN's forward on the same data folded to `[T*B, ...]` (the floor; float32, CPU, "
        f"{torch.get_num_threads()} thread(s), median of {repeats}). `fx`: `replace_by_td_operators`; `folded`: "
        "`TDTimeFolded`. Last column: max abs error of the cumulative output against the ANN on the "
        "cumulative input (both paths).",
        "",
        "| T | ANN on [T*B] (ms) | fx / ANN | folded / ANN | max error |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (a smoke test)")
    parser.add_argument("--markdown", help="write the markdown section to this path")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable ratios on a shared machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = run(args.quick)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
