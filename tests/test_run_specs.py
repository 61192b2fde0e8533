"""`nestling run` and `nestling distill` check every spec before the teacher is asked anything: a bad student,
compress shape, export variant, task or teacher fails in seconds with one line and no teacher call."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nestling.distill.pipeline import DistillConfig, check_specs
from nestling.distill.students import check_student_spec, parse_student_spec
from teacher_fakes import StandIn

from nestling.core.errors import NestlingError

ROOT = Path(__file__).resolve().parents[1]
TASK = "rg:basic_arithmetic?min_terms=2&max_terms=2&max_digits=1"


def _no_weights_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return d


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens once the socket is closed


CASES = {
    "student without weights": (["--students", "hf:{empty}"], "no .safetensors weights"),
    "student path missing": (["--students", "hf:{tmp}/nope"], "not found"),
    "keep_layers beyond the model": (["--students", "tiny?keep_layers=9"], "only 4 layers"),
    "compress deeper than its source": (
        ["--students", "nano", "--compress", "nano:5"],
        "keeps 5 layers but 'nano' has only 1",
    ),
    "compress wider than its source": (
        ["--students", "tiny", "--compress", "tiny:4:1024"],
        "has only 768 per layer",
    ),
    "unknown export variant": (["--students", "tiny", "--variants", "onnx-fp99"], "--variants"),
    "missing task file": (["--students", "tiny", "--task", "file:{tmp}/none.jsonl"], "none.jsonl"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_spec_given_to_run_fails_in_seconds_with_no_teacher_call(tmp_path, case):
    flags, fragment = CASES[case]
    empty = _no_weights_dir(tmp_path)
    flags = [f.format(empty=empty, tmp=tmp_path) for f in flags]
    out = tmp_path / "run"
    with StandIn() as srv:
        cmd = [sys.executable, "-m", "nestling", "run", "--out", str(out), "--n", "8", "--task", TASK,
               "--teacher", f"openai:m@{srv.url}", *flags]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        seconds = time.monotonic() - t0
        assert srv.requests == []  # the teacher was asked nothing
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert seconds < 10
    assert not (out / "traces").exists()


def test_an_unreachable_teacher_is_refused_before_traces(tmp_path):
    cfg = DistillConfig(out=str(tmp_path / "run"), students=["nano"], task=TASK,
                        teacher=f"openai:m@{_closed_port_url()}")  # fmt: skip
    with pytest.raises(NestlingError, match="cannot reach"):
        check_specs(cfg)
    with pytest.raises(NestlingError, match="file not found"):
        check_specs(DistillConfig(students=["nano"], task=TASK, teacher=f"gguf:{tmp_path}/no.gguf"))
    with pytest.raises(NestlingError, match="use gguf:smollm2"):
        check_specs(DistillConfig(students=["nano"], task=TASK, teacher="vllm:m"))


def test_good_specs_resolve_to_their_shapes_without_loading_weights():
    with StandIn() as srv:
        cfg = DistillConfig(
            students=["nano", "t=tiny?keep_layers=2"], task=TASK, teacher=f"openai:m@{srv.url}"
        )
        shapes = check_specs(cfg)
        assert srv.requests == []  # one GET of /models, no completion
    assert (shapes["nano"].layers, shapes["nano"].intermediate_size) == (1, 512)
    assert (shapes["t"].layers, shapes["t"].intermediate_size) == (2, 768)


def test_the_bundled_gguf_student_has_its_shape_read_from_metadata():
    shape = check_student_spec(parse_student_spec("gguf:smollm2?keep_layers=12"))
    assert (shape.layers, shape.intermediate_size) == (12, 1536)
    with pytest.raises(NestlingError, match="only 30 layers"):
        check_student_spec(parse_student_spec("gguf:smollm2?keep_layers=31"))
