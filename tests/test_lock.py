"""core.lock and the CLI's writer locks: one writer per run (and export) directory, the second refused at
once with the holder named or waiting with --wait, re-entrant nested stages, rank-0-only under a launcher,
and a kill -9 of the holder that frees the directory for a rerun that loses and repeats nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_run import make_run
from teacher_fakes import StandIn

from nestling.core.errors import NestlingError
from nestling.core.lock import LOCK_NAME, lock_file, locked_by_another, read_holder, writer_lock

ROOT = Path(__file__).resolve().parents[1]
EASY = (
    "rg:basic_arithmetic?min_terms=2&max_terms=2&min_digits=1&max_digits=1&operators=+,-&allow_negation=false"
    "&allow_parentheses=false"
)
HOLDER = """
import sys
from nestling.core.lock import writer_lock
with writer_lock(sys.argv[1], export=sys.argv[2] == "export"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes the pipe
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


class Holder:
    """A child process holding a writer lock until closed (the test waits for its "held" line)."""

    def __init__(self, tmp_path: Path, directory: Path, kind: str = "run"):
        script = tmp_path / "holder.py"
        script.write_text(HOLDER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(directory), kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=_env(), text=True,
        )  # fmt: skip
        assert self.proc.stdout.readline().strip() == "held"

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.close()


def nestling(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nestling", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, **kw)


def traces_args(run: Path, url: str, n: int = 8) -> list[str]:
    return ["traces", "--task", EASY, "--teacher", f"openai:m@{url}", "--samples", "2", "--n", str(n),
            "--heldout", "2", "--concurrency", "1", "--out", str(run)]  # fmt: skip


def test_a_second_writer_is_refused_naming_the_holder_and_the_record_survives_it(tmp_path):
    run = tmp_path / "run"
    with Holder(tmp_path, run) as h:
        with pytest.raises(NestlingError) as e:
            with writer_lock(run):
                pass
        msg = str(e.value)
        assert str(run) in msg and f"PID {h.proc.pid}" in msg and "holder.py" in msg and "--wait" in msg
        assert locked_by_another(run)
        # The refused attempt opened the lock file: the holder's record must still be there.
        assert read_holder(run / LOCK_NAME)["pid"] == h.proc.pid
    assert not locked_by_another(run)
    with writer_lock(run):  # free once the holder exits
        assert read_holder(run / LOCK_NAME)["pid"] == os.getpid()
    assert read_holder(run / LOCK_NAME) is None  # released: the record names nobody


def test_nested_stages_in_one_process_share_the_lock(tmp_path):
    run = tmp_path / "run"
    with writer_lock(run):
        with writer_lock(run):  # run -> traces: the same directory, already ours
            assert read_holder(run / LOCK_NAME)["pid"] == os.getpid()
        assert read_holder(run / LOCK_NAME)["pid"] == os.getpid()  # the inner exit released nothing


def test_exports_lock_their_run_directory_or_a_file_beside_them(tmp_path):
    assert lock_file(tmp_path / "run" / "exports" / "tiny", export=True) == tmp_path / "run" / LOCK_NAME
    assert lock_file(tmp_path / "out", export=True) == tmp_path / f".out{LOCK_NAME}"
    assert lock_file(tmp_path / "run") == tmp_path / "run" / LOCK_NAME


def test_under_a_launcher_only_rank_0_takes_the_jobs_lock(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    with Holder(tmp_path, run):  # rank 0 of a job (here: another process) holds it
        monkeypatch.setenv("RANK", "1")
        with writer_lock(run):  # the same job's rank 1 goes on: only rank 0 writes
            pass
        monkeypatch.setenv("RANK", "0")  # a second job's rank 0 is refused like a second process
        with pytest.raises(NestlingError, match="another nestling process"):
            with writer_lock(run):
                pass
    monkeypatch.setenv("RANK", "0")
    with writer_lock(run):
        assert read_holder(run / LOCK_NAME)["job"] == "job-a"  # the refusal names the job


def _stage_args(name: str, run: Path, url: str) -> list[str]:
    student = str(run / "students" / "nano" / "model")
    return {
        "traces": traces_args(run, url),
        "train": ["train", "--run", str(run), "--student", "nano", "--steps", "2"],
        "distill": ["distill", "--out", str(run), "--students", "nano", "--teacher", f"openai:m@{url}"],
        "compress": ["compress", "--run", str(run), "--source", "nano"],
        "export": ["export", student, "--out", str(run / "exports" / "nano")],
        "run": ["run", "--out", str(run), "--students", "nano", "--teacher", f"openai:m@{url}", "--n", "8"],
    }[name]


@pytest.mark.parametrize("stage", ["traces", "train", "distill", "compress", "export", "run"])
def test_every_writing_stage_exits_2_naming_the_holder_and_spends_nothing(tmp_path, stage):
    run = make_run(tmp_path / "run")
    with StandIn() as srv, Holder(tmp_path, run) as h:
        before = sorted(p.relative_to(run) for p in run.rglob("*"))
        r = nestling(*_stage_args(stage, run, srv.url))
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert str(run) in lines[0] and f"PID {h.proc.pid}" in lines[0] and "holder.py" in lines[0]
        assert srv.requests == []  # no teacher call
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written


def test_an_export_outside_a_run_is_locked_beside_it(tmp_path):
    out = tmp_path / "out"
    with Holder(tmp_path, out, "export") as h:
        r = nestling("export", str(tmp_path / "student"), "--out", str(out))
        assert r.returncode == 2 and f"PID {h.proc.pid}" in r.stderr, r.stderr
    assert not out.exists()


def test_wait_waits_for_the_holder_then_runs(tmp_path):
    run = tmp_path / "run"
    with StandIn() as srv:
        h = Holder(tmp_path, run)
        cmd = [sys.executable, "-m", "nestling", *traces_args(run, srv.url), "--wait"]
        waiter = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)  # fmt: skip
        line = ""
        while "waiting for" not in line and waiter.poll() is None:
            line = waiter.stderr.readline()
        assert "waiting for" in line and f"PID {h.proc.pid}" in line, line
        assert waiter.poll() is None and srv.requests == []  # still waiting, nothing spent
        h.close()
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err[-2000:]
        assert len(srv.requests) == 6 * 2  # 8 questions, 2 held out, 2 samples each


class GatedStandIn(StandIn):
    """Answers the first `open_for` requests, then holds every later one until `gate` is set."""

    def __init__(self, open_for: int):
        super().__init__()
        self.open_for, self.gate = open_for, threading.Event()

    def respond(self, h, body, action):
        with self.lock:
            blocked = len(self.requests) > self.open_for
        if blocked:
            self.gate.wait(60)
        super().respond(h, body, action)


def _wait_for(cond, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not cond():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_two_traces_runs_one_proceeds_the_other_is_refused_and_no_call_is_made_twice(tmp_path):
    run = tmp_path / "run"
    with GatedStandIn(open_for=3) as srv:
        cmd = [sys.executable, "-m", "nestling", *traces_args(run, srv.url, n=12)]
        first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)  # fmt: skip
        _wait_for(lambda: len(srv.requests) > 3, first, "the first run never reached the teacher")
        second = nestling(*traces_args(run, srv.url, n=12))
        assert second.returncode == 2 and f"PID {first.pid}" in second.stderr, second.stderr
        assert "traces" in second.stderr  # the holder's command line
        assert len(srv.requests) == 4  # the second asked nothing
        srv.gate.set()
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err[-2000:]
    records = [json.loads(line) for line in (run / "traces" / "traces.jsonl").read_text().splitlines()]
    assert len(srv.requests) == len(records) == 10 * 2  # 12 questions, 2 held out
    assert len({r["id"] for r in records}) == len(records)


def test_after_kill_9_of_the_holder_the_rerun_takes_the_lock_and_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    traces = run / "traces" / "traces.jsonl"
    with GatedStandIn(open_for=6) as srv:
        cmd = [sys.executable, "-m", "nestling", *traces_args(run, srv.url, n=12)]
        first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)  # fmt: skip
        # Six answered and stored (one fsync'd line each), the seventh held at the gate.
        _wait_for(lambda: traces.exists() and traces.read_bytes().count(b"\n") == 6, first, "no traces")
        _wait_for(lambda: len(srv.requests) == 7, first, "the seventh request never came")
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        first.stderr.close()
        done = traces.read_bytes()
        assert read_holder(run / LOCK_NAME)["pid"] == first.pid  # kill -9 left its record, not its lock
        srv.gate.set()
        t0 = time.monotonic()
        rerun = nestling(*traces_args(run, srv.url, n=12))
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "waiting" not in rerun.stderr and "another nestling process" not in rerun.stderr
        assert time.monotonic() - t0 < 60
    after = traces.read_bytes()
    assert after.startswith(done)  # the six finished records kept byte for byte
    ids = [json.loads(line)["id"] for line in after.splitlines()]
    assert len(ids) == len(set(ids)) == 20
    assert len(srv.requests) == 7 + (20 - 6)  # the rerun asked only for what was missing
