"""Training on two CPU processes under torchrun: one student, the single-process result, a clear failure
when a rank dies, and a rerun that resumes from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_run import make_run

REPO = Path(__file__).resolve().parents[1]
# Two processes each take half of every global batch of 8 and DDP averages their gradients: the same
# arithmetic as one process up to float summation order. Measured: final losses equal to 4 decimals, weights
# within 6e-6 after 30 steps. fp32, so that the tolerance measures the sharding and not bf16 rounding of
# differently padded shards.
LOSS_TOLERANCE = 1e-3
WEIGHT_TOLERANCE = 1e-4


def _flags(run: Path, steps: int) -> list[str]:
    return [
        "train", "--run", str(run), "--student", "nano", "--steps", str(steps), "--batch-size", "8",
        "--lr", "3e-3", "--warmup", "3", "--threads", "1", "--checkpoint-every", "5", "--no-progress",
        "--precision", "fp32",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _torchrun(run: Path, steps: int) -> subprocess.Popen:
    # `--` ends torchrun's own flags: its --run-path would otherwise swallow --run.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.Popen(
        [*cmd, "-m", "nestling", "--", *_flags(run, steps)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _single(run: Path, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nestling", *_flags(run, steps)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _metrics(run: Path) -> dict:
    return json.loads((run / "students/nano/manifest.json").read_text())["metrics"]


def _assert_same_weights(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    wa = load_file(a / "students/nano/model/model.safetensors")
    wb = load_file(b / "students/nano/model/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=WEIGHT_TOLERANCE)


def _rank_pid(launcher: subprocess.Popen, rank: int, deadline: float) -> int:
    import psutil

    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise AssertionError("torchrun never started the ranks")


@pytest.mark.slow
def test_two_processes_train_one_student_with_the_single_process_loss(tmp_path):
    one, two = make_run(tmp_path / "one"), make_run(tmp_path / "two")
    proc = _torchrun(two, 30)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]  # torchrun exits 0 only when every rank did
    single = _single(one, 30)
    assert single.returncode == 0, single.stderr[-2000:]

    m1, m2 = _metrics(one), _metrics(two)
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert m2["train_tokens"] == m1["train_tokens"]  # the same global batches
    assert abs(m2["final_loss"] - m1["final_loss"]) <= LOSS_TOLERANCE
    _assert_same_weights(one, two)
    assert [p.name for p in (two / "students").iterdir()] == ["nano"]
    assert sorted(p.name for p in (two / "students/nano").iterdir()) == ["manifest.json", "model"]


@pytest.mark.slow
def test_killing_one_rank_fails_the_job_and_the_rerun_resumes(tmp_path):
    run, ref = make_run(tmp_path / "run"), make_run(tmp_path / "ref")
    steps = 400  # long enough for the kill to land mid-run: a checkpoint every 5 steps, polled every 20 ms
    proc = _torchrun(run, steps)
    deadline = time.monotonic() + 180
    victim = _rank_pid(proc, 1, deadline)
    ckpts = run / "students/nano/checkpoints"
    while not list(ckpts.glob("step-*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "exitcode  : -9" in out  # torchrun names the rank that died ...
    assert (
        "another training process failed" in out and "re-run the same command to resume" in out
    )  # ... rank 0 says what to do
    assert not (run / "students/nano/model").exists()
    last = max(
        int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if (p / "trainer_state.json").is_file()
    )
    assert 0 < last < steps

    rerun = _torchrun(run, steps)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    assert f"resuming nano from step-{last:06d}" in out
    # The uninterrupted two-process run: hundreds of steps amplify float summation-order noise between one
    # and two processes, but a resumed run repeats the same arithmetic as an uninterrupted one.
    uninterrupted = _torchrun(ref, steps)
    out, _ = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, out[-3000:]
    _assert_same_weights(ref, run)
    assert _metrics(run)["steps"] == steps and _metrics(run)["train_tokens"] == _metrics(ref)["train_tokens"]


_DISTILL_DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import nestling.distill.pipeline as pipeline
import nestling.distill.teachers as teachers
from fake_run import make_run
from test_evaluate import ScriptedTeacher

def fake_traces(cfg):  # rank 0 only: the other rank must find the store after the barrier
    make_run(Path(cfg.out), n=80, heldout=10)
    return Path(cfg.out) / "traces"

pipeline._traces = fake_traces
teachers.load_teacher = ScriptedTeacher
teachers.check_teacher_spec = lambda spec: None  # gguf:fake names no file
from nestling.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_distill_trains_through_the_launcher_and_evaluates_once(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_DISTILL_DRIVER.format(tests=str(REPO / "tests")))
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(driver),
    ]
    flags = ["distill", "--out", str(run), "--teacher", "gguf:fake", "--students", "nano", "--steps", "8",
             "--threads", "1"]  # fmt: skip
    proc = subprocess.run([*cmd, *flags], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _metrics(run)["processes"] == 2
    assert proc.stdout.count("student nano") == 1  # the table, printed by rank 0 alone
    assert (run / "eval.json").is_file()
