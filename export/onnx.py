"""ONNX export: optimum's decoder-with-past exporter (fp32), then onnxruntime dynamic int8 quantization.

    export_onnx_fp32("students/tiny/model", "exports/tiny/onnx/fp32")
    quantize_onnx_int8("exports/tiny/onnx/fp32", "exports/tiny/onnx/int8")

Each directory holds ``model.onnx`` plus config.json, generation_config.json and the tokenizer files, so
optimum's ``ORTModelForCausalLM`` and ``serve.engines.ONNXEngine`` both load it as it is.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from nestling.core.errors import NestlingError

log = logging.getLogger(__name__)

# Files copied beside model.onnx; optimum writes most of them, ORTQuantizer/quantize_dynamic write none.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file() and not (dst / name).is_file():
            shutil.copy2(src / name, dst / name)


def export_onnx_fp32(model_dir: str | Path, out_dir: str | Path) -> Path:
    """optimum main_export with task text-generation-with-past: one model.onnx with past key/values."""
    import warnings

    from optimum.exporters.onnx import main_export

    src, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow, harmless here
        try:
            main_export(
                str(src),
                output=str(out),
                task="text-generation-with-past",
                device="cpu",
                do_validation=False,  # export.parity checks it through serve.engines instead
                local_files_only=True,
            )
        except NestlingError:
            raise
        except Exception as e:
            raise NestlingError(
                f"{src}: optimum could not export it to ONNX ({type(e).__name__}: {e})"
            ) from None
    if not (out / "model.onnx").is_file():
        raise NestlingError(
            f"{out}: optimum wrote no model.onnx; files: {sorted(p.name for p in out.iterdir())}"
        )
    _copy_side_files(src, out)
    return out


# Named int8 recipes for `nestling export --onnx-int8` (arguments of quantize_onnx_int8);
# benchmarks/bench_int8.py
# compares them, static QDQ included, on SmolLM2-135M.
INT8_RECIPES: dict[str, dict] = {
    "dynamic": {},
    "dynamic-fp32-down": {"keep_fp32": ("down_proj",)},
    "weight-only": {"weight_only": 0},
    "weight-only-int8": {"weight_only": 4},
}


def matmul_nodes(model_path: Path, keep_fp32: tuple[str, ...]) -> list[str]:
    """Names of the MatMul nodes whose name contains any of `keep_fp32` (e.g. "lm_head", "down_proj")."""
    import onnx

    if not keep_fp32:
        return []
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(k in n.name for k in keep_fp32)]


class _Calibration:
    """onnxruntime CalibrationDataReader over token sequences: one prefill per sequence, empty past."""

    def __init__(self, model_path: Path, sequences: list[list[int]]) -> None:
        import numpy as np
        import onnxruntime as ort

        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in sess.get_inputs()}
        feeds = []
        for ids in sequences:
            n = len(ids)
            feed = {"input_ids": np.asarray([ids], dtype=np.int64)}
            if "attention_mask" in inputs:
                feed["attention_mask"] = np.ones((1, n), dtype=np.int64)
            if "position_ids" in inputs:
                feed["position_ids"] = np.arange(n, dtype=np.int64)[None, :]
            for name, meta in inputs.items():
                if name.startswith("past_key_values."):
                    feed[name] = np.zeros((1, meta.shape[1], 0, meta.shape[3]), dtype=np.float32)
            feeds.append(feed)
        self._it = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._it, None)


def _weight_only_int8(src: Path, dst: Path, exclude: list[str], level: int, external: bool) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=True, accuracy_level=level or None, bits=8
    )
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), nodes_to_exclude=exclude, algo_config=config)
    # It logs every node at INFO through its own handler.
    chatty = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        chatty.setLevel(level)
    quantizer.model.save_model_to_file(str(dst), external)


def quantize_onnx_int8(
    fp32_dir: str | Path,
    out_dir: str | Path,
    keep_fp32: tuple[str, ...] = (),
    calibration: list[list[int]] | None = None,
    weight_only: int | None = None,
) -> Path:
    """int8 MatMul weights of an fp32 export.

    Default: dynamic quantization, weights per output channel, activations per tensor with ranges measured
    per call. With token sequences as `calibration`: static QDQ, activation ranges fixed from those
    prefills (MinMax). `weight_only=L`: MatMulNBits, 8-bit weights in blocks of 32 along the input,
    computed at onnxruntime accuracy level L (0: fp32 activations, 4: int8 activations per block).
    `keep_fp32`: MatMul nodes whose name contains one of these stay fp32 (the sensitive ones). A tied
    output head multiplies by a transposed embedding, not a constant: no recipe quantizes it.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, out = Path(fp32_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    has_external = any(p.name != "model.onnx" and p.name.startswith("model.onnx") for p in src.iterdir())
    model = src / "model.onnx"
    common = {
        "per_channel": True,
        # Gather (the embedding) stays fp32: quantizing it costs accuracy and saves little here.
        "op_types_to_quantize": ["MatMul"],
        "nodes_to_exclude": matmul_nodes(model, keep_fp32),
        "use_external_data_format": has_external,
    }
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every skipped tensor on the root logger
    try:
        if weight_only is not None:
            _weight_only_int8(
                model, out / "model.onnx", common["nodes_to_exclude"], weight_only, has_external
            )
        elif calibration:
            quantize_static(
                str(model),
                str(out / "model.onnx"),
                _Calibration(model, calibration),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                **common,
            )
        else:
            quantize_dynamic(str(model), str(out / "model.onnx"), weight_type=QuantType.QInt8, **common)
    except Exception as e:
        raise NestlingError(f"{src}: onnxruntime could not quantize it ({type(e).__name__}: {e})") from None
    finally:
        root.setLevel(level)
    _copy_side_files(src, out)
    return out
