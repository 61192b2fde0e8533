"""Real peer processes for end-to-end tests: llama.cpp's own server on loopback, stopped after the test."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_cpp_server(model: Path, log_path: Path, n_ctx: int = 1024, wait_s: float = 120) -> Iterator[str]:
    """`python -m llama_cpp.server` on 127.0.0.1 with one thread; yields its base URL (no /v1)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "1", "--n_threads_batch", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + wait_s
            while True:  # readiness poll with a deadline: the server needs a moment to import and load
                assert proc.poll() is None, Path(log_path).read_text()[-2000:]
                try:
                    if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"llama_cpp.server did not start in {wait_s:.0f} s"
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
