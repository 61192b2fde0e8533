"""serve.engines: the exact-greedy, KV-cached engines the runtime serves with and export checks through."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nestling.serve.engines import load_engine

from nestling.core.errors import NestlingError
from nestling.core.prompting import student_prompt

ENGINES = {"gguf": "gguf/model-f16.gguf", "onnx": "onnx/fp32"}


def tricky_texts(n: int = 300, seed: int = 0) -> list[str]:
    """Digits, runs of spaces, tabs/newlines, accents, CJK, emoji, specials in text, arithmetic."""
    rng = random.Random(seed)
    pieces = [
        "What is", "12", "345", "6789", "0.5", "-3", "1,000", "3/4", " ", "  ", "   ", "\t", "\n", "\n\n",
        "é", "ñ", "ü", "café", "naïve", "日本", "語", "🙂", "👍🏽", "Ω", "∑", "Step 1:", "Answer:", "+", "-",
        "*", "=", "?", "!", "'s", "don't", "ABC", "x", "<|eos|>", "<|bos|>",
    ]  # fmt: skip
    out = []
    for _ in range(n):
        k = rng.randint(1, 12)
        out.append("".join(rng.choice(pieces) for _ in range(k)))
    return out


@pytest.fixture(scope="module")
def hf(tiny_student_dir: Path):
    from nestling.distill.students import load_student

    return load_student(tiny_student_dir)


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request, tiny_export_dir: Path):
    e = load_engine(tiny_export_dir / ENGINES[request.param], kind=request.param, n_threads=1)
    yield e
    e.close()


def _torch_greedy(model, ids: list[int], max_new: int, eos: int) -> list[int]:
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=eos)
    new = out[0, len(ids) :].tolist()
    return new[: new.index(eos)] if eos in new else new


def test_tokenization_matches_hf_on_tricky_texts(engine, hf):
    _, tok = hf
    texts = tricky_texts()
    bad = [t for t in texts if engine.tokenize(t) != tok(t)["input_ids"]]
    assert not bad, f"{engine.kind}: {len(bad)}/{len(texts)} differ, e.g. {bad[:3]!r}"
    assert engine.tokenize("7")[0] == tok.bos_token_id == engine.bos_id  # bos exactly as HF adds it


def test_detokenize_round_trips(engine, hf):
    _, tok = hf
    for text in ["What is 3 + 4?", "café 日本 🙂", "Step 1: 2 + 2 = 4\nAnswer: 4"]:
        ids = engine.tokenize(text)[1:]  # without bos
        assert engine.detokenize(ids) == text == tok.decode(ids)


def test_stream_is_greedy_and_stops_at_eos(engine, hf, tiny_prompts):
    model, tok = hf
    stopped = 0
    for q, _ in tiny_prompts[:6]:
        ids = engine.tokenize(student_prompt(q))
        got = list(engine.stream(ids, 40))
        assert got == _torch_greedy(model, ids, 40, tok.eos_token_id)
        assert engine.eos_id == tok.eos_token_id and engine.eos_id not in got
        stopped += len(got) < 40
    assert stopped > 0, "the tiny student should end some answers with eos"


def test_stream_honours_max_tokens(engine, hf):
    ids = engine.tokenize("What is")
    assert len(list(engine.stream(ids, 3))) <= 3
    assert list(engine.stream(ids, 3)) == list(engine.stream(ids, 10))[:3]  # fresh state every call


def test_teacher_forced_logits_match_pytorch(engine, hf):
    import torch

    model, tok = hf
    ids = tok(student_prompt("What is 4 + 4?") + "\nStep 1: 4 + 4 = 8")["input_ids"]
    got = engine.logits(ids)
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert got.shape == want.shape == (len(ids), len(tok))
    tol = 1e-3 if engine.kind == "onnx" else 0.25  # fp32 graph vs f16 weights
    assert np.abs(got - want).max() < tol
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_truncated_or_foreign_files_raise(tiny_export_dir: Path, tmp_path: Path):
    gguf = (tiny_export_dir / "gguf/model-f16.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(gguf[: len(gguf) // 2])
    (tmp_path / "text.gguf").write_text("not a model")
    for name in ("cut.gguf", "text.gguf", "missing.gguf"):
        with pytest.raises(NestlingError, match="re-export|not found|not a GGUF"):
            load_engine(tmp_path / name, kind="gguf")

    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    src = tiny_export_dir / "onnx/fp32"
    for f in src.iterdir():
        data = f.read_bytes()
        (onnx_dir / f.name).write_bytes(data[: len(data) // 3] if f.name == "model.onnx" else data)
    with pytest.raises(NestlingError, match="onnxruntime cannot load"):
        load_engine(onnx_dir, kind="onnx")
    with pytest.raises(NestlingError, match="unknown"):
        load_engine(onnx_dir, kind="tflite")


def test_engines_do_not_import_torch(tiny_export_dir: Path):
    code = (
        "import sys\nfrom serve.engines import load_engine\n"
        f"for p, k in [({str(tiny_export_dir / ENGINES['gguf'])!r}, 'gguf'), "
        f"({str(tiny_export_dir / ENGINES['onnx'])!r}, 'onnx')]:\n"
        "    e = load_engine(p, kind=k)\n    list(e.stream(e.tokenize('What is 1 + 1?'), 4))\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
