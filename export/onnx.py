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

from nestling.serve.errors import NestlingError

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


def quantize_onnx_int8(fp32_dir: str | Path, out_dir: str | Path) -> Path:
    """Dynamic (weight-only, activations at run time) int8 quantization of MatMul weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, out = Path(fp32_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    has_external = any(p.name != "model.onnx" and p.name.startswith("model.onnx") for p in src.iterdir())
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every skipped tensor on the root logger
    try:
        quantize_dynamic(
            str(src / "model.onnx"),
            str(out / "model.onnx"),
            weight_type=QuantType.QInt8,
            per_channel=True,
            # Gather (the embedding) stays fp32: quantizing it costs accuracy and saves little here.
            op_types_to_quantize=["MatMul"],
            use_external_data_format=has_external,
        )
    except Exception as e:
        raise NestlingError(f"{src}: onnxruntime could not quantize it ({type(e).__name__}: {e})") from None
    finally:
        root.setLevel(level)
    _copy_side_files(src, out)
    return out
