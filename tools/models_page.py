"""docs/models.md, "Which models convert", generated from test results (``nox -s models`` runs both steps).

1. As a pytest plugin (``pytest -p models_page`` with this folder on PYTHONPATH and ``ANN2SNN_MODELS_JSON``
   set), it writes one record per test that measured an equivalence (the tests record it with
   ``record_property`` / ``user_properties``): node id, outcome, measured values.
2. As a script, ``python tools/models_page.py RESULTS.json [MORE.json ...] docs/models.md`` renders those
   records (several result files: runs in different venvs, such as ``nox -s timm``'s, on one page).

Nothing on the page is typed by hand except the label of each test function below.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import sys
from typing import Any

# test function -> (model family, conversion path); a test missing here is listed under its own name.
LABELS = {
    "test_real_model_shapes_convert_and_approximate": ("{param}", "ReLU → IF: `Converter`"),
    "test_vit_with_multihead_attention": ("ViT with `nn.MultiheadAttention`", "TD: `TDTimeFolded`"),
    "test_hand_rolled_attention_block": ("hand-rolled `matmul` + softmax attention", "TD: `TDTimeFolded`"),
    "test_hand_rolled_attention_fx_path": (
        "hand-rolled `matmul` + softmax attention",
        "TD: `replace_by_td_operators`",
    ),
    "test_hugging_face_bert": ("Hugging Face BERT, {param}", "TD: `TDTimeFolded`"),
    "test_hugging_face_gpt2_causal": ("Hugging Face GPT-2 (causal), {param}", "TD: `TDTimeFolded`"),
    "test_hugging_face_zoo": ("Hugging Face {param}", "TD: `TDTimeFolded`"),
    "test_multi_head_attention_with_negative_dims_fx_path": (
        "`nn.MultiheadAttention` block",
        "TD: `replace_by_td_operators`",
    ),
    # issue 18: real models (test_fx_real_cnns.py, test_fx_real_hf_cnns.py, test_fx_td_torch_layers.py,
    # test_fx_td_real_ops.py)
    "test_resnet18_style_maxpool_stem_agrees_with_the_ann": (
        "ResNet-18 layout (max-pool stem, 8 basic blocks)",
        "ReLU → IF: `Converter`",
    ),
    "test_vgg11_bn_style_agrees_with_the_ann": ("VGG-11-BN layout (5 max pools)", "ReLU → IF: `Converter`"),
    "test_1d_cnn_with_max_pool1d_agrees_with_the_ann": (
        "1-D CNN with `MaxPool1d`, `F.max_pool1d`, adaptive max pool",
        "ReLU → IF: `Converter`",
    ),
    "test_max_pool_on_spikes_is_exact_cumulatively": (
        "max pool on spike trains ({param}-D, `SpikingMaxPool`)",
        "ReLU → IF: `Converter`",
    ),
    "test_hugging_face_cnn_converts_and_agrees_at_large_t": (
        "Hugging Face {param}",
        "ReLU → IF: `Converter(tracer=ExampleInputTracer)`",
    ),
    # tests/timm (nox -s timm: its own torch/torchvision pair), timm's own model code
    "test_timm_resnet18_converts_and_its_snn_agrees_with_the_ann": (
        "timm ResNet-18",
        "ReLU → IF: `Converter`",
    ),
    "test_timm_vgg11_bn_traces_with_example_inputs_and_agrees_with_the_ann": (
        "timm VGG-11-BN (narrow head)",
        "ReLU → IF: `Converter(tracer=ExampleInputTracer)`",
    ),
    "test_timm_vit_is_exact_through_the_folded_path": (
        "timm ViT-tiny (2 blocks, 32 px)",
        "TD: `TDTimeFolded`",
    ),
    "test_encoder_with_default_dropout_converts_exactly_through_fx": (
        "`nn.TransformerEncoder` (dropout 0.1, eval), norm_first={param}, both batch_first",
        "TD: `replace_by_td_operators`",
    ),
    "test_encoder_with_causal_mask_through_fx_and_folded": (
        "`nn.TransformerEncoder` with a causal mask",
        "TD: both paths",
    ),
    "test_encoder_with_default_dropout_converts_exactly_through_folded": (
        "`nn.TransformerEncoder` (dropout 0.1, eval)",
        "TD: `TDTimeFolded`",
    ),
    "test_decoder_with_memory_and_causal_mask_through_fx": (
        "`nn.TransformerDecoder`, batch_first={param}",
        "TD: `replace_by_td_operators`",
    ),
    "test_decoder_through_folded": ("`nn.TransformerDecoder`", "TD: `TDTimeFolded`"),
    "test_add_products_are_exact": (
        "`addmm`/`baddbmm`/`addbmm` (Bloom, GPT-2 Conv1D), {param} path",
        "TD: both paths",
    ),
    "test_roll_and_adaptive_pooling_are_time_transparent_in_the_folded_path": (
        "Swin-like `torch.roll` + adaptive average pooling",
        "TD: `TDTimeFolded`",
    ),
    "test_roll_over_a_token_dim_is_time_transparent_in_the_fx_path": (
        "`torch.roll` over a token dim",
        "TD: `replace_by_td_operators`",
    ),
    "test_average_pooling_and_upsampling_modules_in_the_fx_path": (
        "average pooling and upsampling modules",
        "TD: `replace_by_td_operators`",
    ),
    "test_inplace_relu_whose_mutation_is_read_later": (
        "in-place ReLU read later ({param})",
        "TD: both paths",
    ),
    "test_a_bool_flag_of_the_forward_is_a_constant_not_a_refusal": (
        "timm-ViT-like SDPA with an `is_causal` flag",
        "TD: `replace_by_td_operators`",
    ),
    # issue 18: key-padding masks (test_fx_td_padding_masks.py)
    "test_encoder_src_key_padding_mask_through_fx": (
        "`nn.TransformerEncoder` with `src_key_padding_mask`, batch_first={param}",
        "TD: `replace_by_td_operators`",
    ),
    "test_encoder_padding_with_causal_mask_and_is_causal_through_fx": (
        "`nn.TransformerEncoder` with padding + causal mask + `is_causal`, batch_first={param}",
        "TD: `replace_by_td_operators`",
    ),
    "test_encoder_src_key_padding_mask_through_folded": (
        "`nn.TransformerEncoder` with `src_key_padding_mask` (and a causal mask)",
        "TD: `TDTimeFolded`",
    ),
    "test_encoder_nested_tensor_fast_path_agrees_on_unpadded_positions": (
        "`nn.TransformerEncoder(enable_nested_tensor=True)` with padding, unpadded positions",
        "TD: both paths",
    ),
    "test_decoder_padding_masks_through_fx": (
        "`nn.TransformerDecoder` with `tgt_`/`memory_key_padding_mask`, batch_first={param}",
        "TD: `replace_by_td_operators`",
    ),
    "test_decoder_padding_masks_through_folded": (
        "`nn.TransformerDecoder` with `tgt_`/`memory_key_padding_mask`",
        "TD: `TDTimeFolded`",
    ),
}
# the first parameter of a test id -> how the page names it
PARAMS = {
    "TinyResNet": "ResNet-style CNN (residual adds, one ReLU module called twice)",
    "TinyVGG": "VGG-style CNN",
    "FunctionalNet": "CNN with functional ReLUs (`F.relu`, `torch.relu`, `Tensor.relu`)",
    "vit": "ViT",
    "distilbert": "DistilBERT",
    "llama": "Llama (grouped-query attention, rotary embeddings)",
    "t5": "T5 encoder (RMS norm: float64 states times a float32 rsqrt)",
    "eager": "eager attention",
    "sdpa": "SDPA attention",
}
MEASURES = {
    "relative_error_T128": "relative L2 error of the SNN's mean output after T = 128 steps vs the ANN",
    "relative_error_T192": "relative L2 error of the SNN's mean output after T = 192 steps vs the ANN",
    "relative_error_T256": "relative L2 error of the SNN's mean output after T = 256 steps vs the ANN",
    "centred_error_T192": "the same after T = 192 steps, both outputs centred over the batch (random-weight "
    "networks give all inputs nearly one output; the differences between inputs are what must agree)",
    "centred_error_T256": "the same as centred_error_T192, after T = 256 steps",
    "max_abs_error": "largest abs(cumulative SNN output - ANN output) over all steps",
}

_records: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: Any) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        props = [(k, v) for k, v in report.user_properties if k in MEASURES]
        if props or report.outcome != "passed":
            _records.append({"nodeid": report.nodeid, "outcome": report.outcome, "measures": props})


def pytest_sessionfinish(session: Any) -> None:
    out = os.environ.get("ANN2SNN_MODELS_JSON")
    if out:
        meta = {"python": platform.python_version(), "platform": sys.platform}
        pathlib.Path(out).write_text(json.dumps({"meta": meta, "records": _records}, indent=1))


def _label(nodeid: str) -> tuple[str, str]:
    name = nodeid.split("::")[-1]
    match = re.match(r"(?P<func>[^\[]+)(?:\[(?P<param>.*)\])?$", name)
    assert match is not None
    func, param = match.group("func"), match.group("param") or ""
    param = param.split("-")[0]
    param = PARAMS.get(param, param)
    family, path = LABELS.get(func, (func, "?"))
    return family.replace("{param}", param), path


def _largest(values: list[str]) -> str:
    return max(values, key=lambda v: float(v.split()[0]), default="-")


def render(data: dict[str, Any]) -> str:
    # several tests of one family (parametrised over T, layouts, dtypes) become one row: the largest error
    # measured by any of them, and how many of them passed
    groups: dict[tuple[str, str, str, str], list[tuple[list[str], str]]] = {}
    for record in data["records"]:
        family, path = _label(record["nodeid"])
        # several outputs of one model (BERT: hidden states and pooler): the largest error
        values = [v for _, v in record["measures"]]
        kinds = ", ".join(sorted({k for k, _ in record["measures"]})) or "-"
        dtypes = " ".join(sorted({v.split(" ", 1)[1] for v in values if " " in v}))  # "(float32)"
        groups.setdefault((path, family, kinds, dtypes), []).append((values, record["outcome"]))
    rows = []
    for (path, family, kinds, _), tests in groups.items():
        measured = _largest([v for values, _ in tests for v in values])
        passed = sum(outcome == "passed" for _, outcome in tests)
        outcome = "passed" if passed == len(tests) else f"{passed} of {len(tests)} passed"
        rows.append((path, family, measured, kinds, str(len(tests)), outcome))
    rows.sort()
    lines = [
        "# Which models convert",
        "",
        "Generated by `nox -s models` from the results of ann2snn-fx's model tests "
        "(`test_fx_models.py`, `test_fx_td_models.py`, `test_fx_real_*.py`, `test_fx_td_real_ops.py`, "
        "`test_fx_td_torch_layers.py`, `test_fx_td_padding_masks.py`, and `tests/timm/test_fx_timm.py` in "
        f"`nox -s timm`'s venv) on {datetime.date.today().isoformat()}, Python "
        f"{data['meta']['python']}, {data['meta']['platform']}; do not edit by hand. Every row is a model family "
        "and a conversion path: the tests that converted a randomly initialised model of that family (over time "
        "steps, layouts and dtypes), how many there were, and the largest error any of them measured for the "
        "equivalence it asserts.",
        "",
        *(f"- `{k}`: {v}" for k, v in MEASURES.items()),
        "",
        "| path | model family | largest error | measure | tests | outcome |",
        "|---|---|---|---|---|---|",
        *(f"| {p} | {f} | {m} | `{k}` | {n} | {o} |" for p, f, m, k, n, o in rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: models_page.py RESULTS.json [MORE.json ...] OUT.md", file=sys.stderr)
        return 2
    parts = [json.loads(pathlib.Path(name).read_text()) for name in argv[:-1]]
    data = {"meta": parts[0]["meta"], "records": [r for part in parts for r in part["records"]]}
    if not data["records"]:
        print("no test recorded a measurement", file=sys.stderr)
        return 1
    pathlib.Path(argv[-1]).write_text(render(data))
    print(f"wrote {argv[-1]} ({len(data['records'])} tests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
