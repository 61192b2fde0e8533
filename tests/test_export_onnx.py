"""ONNX export: onnx.checker, optimum's ORTModelForCausalLM, and the int8 graph really being quantized."""

from __future__ import annotations

from pathlib import Path

import pytest

from nestling.core.prompting import student_prompt

VARIANTS = ["fp32", "int8"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_checker_passes_and_graph_has_kv_cache(tiny_export_dir: Path, variant: str):
    import onnx

    path = tiny_export_dir / "onnx" / variant / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= inputs
    assert {"logits", "present.0.key", "present.1.value"} <= outputs
    ops = {n.op_type for n in model.graph.node}
    assert bool({"MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits"} & ops) == (variant == "int8")


@pytest.mark.parametrize("variant", VARIANTS)
def test_side_files_copied(tiny_export_dir: Path, variant: str):
    names = {p.name for p in (tiny_export_dir / "onnx" / variant).iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= names


def test_int8_is_smaller(tiny_export_dir: Path):
    fp32 = (tiny_export_dir / "onnx/fp32/model.onnx").stat().st_size
    int8 = (tiny_export_dir / "onnx/int8/model.onnx").stat().st_size
    assert int8 < fp32 / 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_optimum_ort_model_loads_and_generates(tiny_export_dir: Path, tiny_student_dir: Path, variant: str):
    import torch
    from nestling.distill.students import load_student
    from optimum.onnxruntime import ORTModelForCausalLM

    model, tok = load_student(tiny_student_dir)
    ort = ORTModelForCausalLM.from_pretrained(tiny_export_dir / "onnx" / variant)
    assert ort.use_cache
    ids = tok(student_prompt("What is 6 + 1?"), return_tensors="pt")
    got = ort.generate(**ids, max_new_tokens=20, do_sample=False)
    with torch.inference_mode():
        want = model.generate(**ids, max_new_tokens=20, do_sample=False)
        ref_logits = model(**ids).logits
    ort_logits = ort(**ids).logits
    if variant == "fp32":  # exact: same greedy tokens, logits within 1e-3
        assert torch.equal(got, want)
        assert (ort_logits - ref_logits).abs().max().item() < 1e-3
    else:  # int8 weights: close, not exact
        assert (ort_logits - ref_logits).abs().max().item() < 2.0
        assert got.shape[1] > ids["input_ids"].shape[1]


def test_int8_recipes_keep_named_matmuls_fp32_and_static_calibration_writes_qdq(tiny_export_dir, tmp_path):
    import onnx
    from nestling.export.onnx import quantize_onnx_int8
    from nestling.serve.engines import load_engine

    fp32 = tiny_export_dir / "onnx" / "fp32"
    kept = quantize_onnx_int8(fp32, tmp_path / "dyn", keep_fp32=("lm_head",))
    nodes = onnx.load(str(kept / "model.onnx")).graph.node
    assert [n.op_type for n in nodes if "lm_head" in n.name] == ["MatMul"]  # untouched
    assert any(n.op_type == "MatMulInteger" for n in nodes)  # the rest is int8

    e = load_engine(fp32, kind="onnx")
    calibration = [e.tokenize(student_prompt(f"What is {a} + 2?")) for a in range(4)]
    e.close()
    static = quantize_onnx_int8(fp32, tmp_path / "static", calibration=calibration)
    ops = {n.op_type for n in onnx.load(str(static / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    e = load_engine(static, kind="onnx")
    try:
        assert len(list(e.stream(calibration[0], 8, stop_at_eos=False))) == 8  # it runs
    finally:
        e.close()


def test_weight_only_int8_keeps_fp32_activations_close(tiny_export_dir, tmp_path):
    import numpy as np
    import onnx
    from nestling.export.onnx import quantize_onnx_int8
    from nestling.serve.engines import load_engine

    fp32 = tiny_export_dir / "onnx" / "fp32"
    wo = quantize_onnx_int8(fp32, tmp_path / "wo", weight_only=0)
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(wo / "model.onnx")).graph.node}
    assert (wo / "model.onnx").stat().st_size < (fp32 / "model.onnx").stat().st_size / 2
    a, b = load_engine(fp32, kind="onnx"), load_engine(wo, kind="onnx")
    ids = a.tokenize(student_prompt("What is 6 + 1?"))
    assert np.abs(a.logits(ids) - b.logits(ids)).max() < 0.5
