"""A scripted, deterministic engine for the serve tests: byte-level tokens, no model, no torch.

    eng = FakeEngine()                     # tokens are UTF-8 bytes (0-255), bos 256, eos 257
    export = make_fake_export(tmp_path)    # an export dir whose manifest names engine "fake"
    r = Reasoner.load(export)              # after register_fake()

What it "generates" for ``Question: Q\\nExplain:`` (answer mode ``Answer:`` gives `` X``):
  "What is A op B?"  -> "\\nStep 1: A op B = R\\nAnswer: R"     (R is right)
  "... wrong ..."    -> "\\nStep 1: 9 * 8 = 64\\nStep 2: So the result is 64\\nAnswer: 64"  (step 1 is false)
  "... unicode ..."  -> "\\nStep 1: caf\u00e9 \u2192 5 \u00d7 2\\nAnswer: 10 \u20ac"  (multi-byte characters)
  "... ramble ..."   -> "la " forever (only max_tokens stops it)
  "... after ..."    -> "\\nStep 1: 2 + 2 = 4\\nAnswer: 4\\nStep 2: more" (text after the answer line)
  "... flaky ..."    -> greedy: the wrong script above; sampled: the sampler picks between it (logit 1) and
                        "\\nStep 1: 9 * 8 = 72\\nAnswer: 72" (logit 0), so the seed decides
  "lucky: 3 + 4?"    -> greedy: "\\nStep 1: 2 + 5 = 7\\nAnswer: 7" (true arithmetic on numbers from nowhere);
                        sampled: that or "\\nStep 1: 3 + 4 = 7\\nAnswer: 7", as the sampler picks
  "slip: 9 * 8 + 3?" -> "\\nStep 1: 9 * 8 = 64\\nStep 2: 64 + 3 = 67\\nAnswer: 67": step 1 slips, and every
                        later step builds on whatever step 1 states (a prompt that goes on past ``Explain:``
                        with "...9 * 8 = 72" gets "\\nStep 2: 72 + 3 = 75\\nAnswer: 75")
A prompt that goes on past its mode marker with the start of the script gets the rest of it (what a model
continuing its own text does); with anything else, eos at once. Every byte of the script is one token.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from nestling.core.manifest import write_manifest
from nestling.core.prompting import EXPLAIN_MARK

BOS, EOS = 256, 257
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def script(prompt: str, sampler=None) -> str:
    """The continuation of a student prompt, or of a prompt plus the start of its script (eos follows it)."""
    head, mark, done = prompt.partition("\n" + EXPLAIN_MARK)
    if not mark:
        return _script(prompt, sampler)
    q = head.split("\n")[0]
    full = _slip(done) if "slip" in q else _script(head + mark, sampler)
    return full[len(done) :] if full.startswith(done) else ""


def _slip(done: str) -> str:
    m = re.match(r"\nStep 1: 9 \* 8 = (\d+)", done)
    r1 = int(m.group(1)) if m else 64
    return f"\nStep 1: 9 * 8 = {r1}\nStep 2: {r1} + 3 = {r1 + 3}\nAnswer: {r1 + 3}"


def _script(prompt: str, sampler=None) -> str:
    explain = prompt.endswith(EXPLAIN_MARK)
    q = prompt.split("\n")[0]
    if "flaky" in q and sampler is not None:
        import numpy as np

        if sampler(np.array([1.0, 0.0])) == 1:
            return "\nStep 1: 9 * 8 = 72\nAnswer: 72" if explain else " 72"
    if "lucky" in q and explain:
        grounded = sampler is not None and sampler(__import__("numpy").array([1.0, 0.0])) == 1
        return "\nStep 1: 3 + 4 = 7\nAnswer: 7" if grounded else "\nStep 1: 2 + 5 = 7\nAnswer: 7"
    if "ramble" in q:
        return "la " * 10_000
    if "wrong" in q or "flaky" in q:
        return "\nStep 1: 9 * 8 = 64\nStep 2: So the result is 64\nAnswer: 64" if explain else " 64"
    if "unicode" in q:
        return "\nStep 1: caf\u00e9 \u2192 5 \u00d7 2\nAnswer: 10 \u20ac" if explain else " 10 \u20ac"
    if "after" in q:
        return "\nStep 1: 2 + 2 = 4\nAnswer: 4\nStep 2: more"
    m = re.search(r"(\d+)\s*([-+*])\s*(\d+)", q)
    if m:
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        r = _OPS[op](a, b)
        return f"\nStep 1: {a} {op} {b} = {r}\nAnswer: {r}" if explain else f" {r}"
    return "\nStep 1: I do not know\nAnswer: unknown" if explain else " unknown"


class FakeEngine:
    """The engine protocol of docs/DESIGN.md over a byte vocabulary; refuses re-entrant use loudly.

    ``gate``: when given, every token waits for it (tests hold a request in the engine deterministically):
    an Event (set: all tokens flow) or a Semaphore (each release lets one token through).
    """

    kind = "fake"
    bos_id = BOS
    eos_id = EOS

    def __init__(self, path: str = "fake", gate: threading.Event | None = None):
        self.path = path
        self.gate = gate
        self.busy = threading.Lock()
        self.started = threading.Event()  # set when a generation has begun (tests wait on it)
        self.calls = 0
        self.yielded = 0  # tokens handed out, over all calls
        self.closed = False

    def tokenize(self, text: str) -> list[int]:
        return [BOS, *text.encode("utf-8")]

    def detokenize(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream(self, prompt_ids: list[int], max_tokens: int, stop_at_eos=True, sampler=None) -> Iterator[int]:
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("FakeEngine used by two threads at once")
        try:
            self.calls += 1
            self.started.set()
            text = script(self.detokenize(prompt_ids), sampler)
            wait = None if self.gate is None else getattr(self.gate, "wait", None) or self.gate.acquire
            for n, b in enumerate(text.encode("utf-8")):
                if n >= max_tokens:
                    return
                if wait is not None:
                    wait()
                self.yielded += 1
                yield b
        finally:
            self.busy.release()

    def logits(self, ids: list[int]):  # pragma: no cover - parity is export's business
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True


def register_fake(gate: threading.Event | None = None) -> list[FakeEngine]:
    """Register engine kind "fake" with the runtime; returns the list every loaded FakeEngine is put in."""
    from nestling.serve.runtime import register_engine

    loaded: list[FakeEngine] = []

    def load(path: str, n_threads: int) -> FakeEngine:
        text = Path(path).read_text(encoding="utf-8")
        if not text.startswith("fake-model"):
            raise ValueError("not a fake model file")
        eng = FakeEngine(path, gate)
        loaded.append(eng)
        return eng

    register_engine("fake", load, lambda: True)
    return loaded


def make_fake_export(root: Path, name: str = "tiny", variants: dict[str, str] | None = None) -> Path:
    """An export directory with fake-engine variants, a manifest with sha256 for each file."""
    out = Path(root) / "exports" / name
    variants = variants or {"fake-a": "fake", "fake-b": "fake"}
    specs = {}
    for v, engine in variants.items():
        rel = f"{engine}/{v}.bin"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(f"fake-model {v}\n" + "x" * 100, encoding="utf-8")
        specs[v] = {"engine": engine, "path": rel, "bytes": (out / rel).stat().st_size}
    write_manifest(
        out,
        stage="export",
        files=[s["path"] for s in specs.values()],
        prompt_format="nestling-v1",
        student={"name": name, "sha256": "0" * 64, "params": 1},
        task="rg:basic_arithmetic",
        default_variant=next(iter(variants)),
        variants=specs,
    )
    return out


@contextlib.contextmanager
def serve_in_thread(app, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` under a real uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:  # readiness, not a timing assumption: bounded by `timeout`
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


@contextlib.contextmanager
def serve_process(
    export_dir: Path,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    argv: list[str] | None = None,
    health: str = "/health",
) -> Iterator[tuple]:
    """`nestling serve DIR` (or ``argv``, e.g. another server) in a child process on a free port; yields
    (Popen, URL) once ``health`` answers 200."""
    import httpx

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from nestling.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [*(argv or [sys.executable, "-c", code, "serve", str(export_dir)]), "--port", str(port)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # stderr to a file, not a pipe: a chatty server (llama_cpp.server logs every request) would fill an unread
    # pipe and block mid-request.
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:  # readiness poll, bounded by `timeout`
            if proc.poll() is not None:
                err.seek(0)
                raise RuntimeError(f"server exited: {err.read().decode()[-2000:]}")
            try:
                if httpx.get(url + health, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy")
            time.sleep(0.05)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_load(
    url: str,
    clients: int = 32,
    seconds: float = 10.0,
    pid: int | None = None,
    api_key: str | None = None,
    body: dict | None = None,
    path: str = "/v1/answer",
) -> dict:
    """`clients` concurrent loops POSTing `path` (/v1/answer) for `seconds`, then stop. Latency percentiles
    over 200s; a 429/503 is answered by waiting its Retry-After (capped at 50 ms) as a polite client would.

    aiohttp, not httpx: with 32 connections httpx's pool spent more CPU than the server it measured (every
    server here, llama_cpp.server too, fell to a third of its 16-client rate)."""
    import asyncio

    import aiohttp

    body = body or {"question": "What is 3 + 4?", "max_tokens": 32}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    rss: list[float] = []
    failures: list[str] = []

    async def client(c: aiohttp.ClientSession, stop: float) -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                async with c.post(url + path, json=body, headers=headers) as r:
                    await r.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                failures.append(f"{type(e).__name__}: {e}")
                continue
            statuses[r.status] = statuses.get(r.status, 0) + 1
            if r.status == 200:
                latencies.append(time.perf_counter() - t0)
            elif r.status in (429, 503):
                await asyncio.sleep(0.05)

    async def sample(stop: float) -> None:
        while pid is not None and time.monotonic() < stop:
            rss.append(rss_mb(pid))
            await asyncio.sleep(0.25)

    async def main() -> float:
        conn = aiohttp.TCPConnector(limit=clients)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as c:
            t0 = time.monotonic()
            stop = t0 + seconds
            await asyncio.gather(sample(stop), *(client(c, stop) for _ in range(clients)))
            return time.monotonic() - t0

    wall = asyncio.run(main())
    latencies.sort()

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None

    return {
        "clients": clients,
        "seconds": wall,
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "transport_failures": failures[:5],
        "answers_per_s": len(latencies) / wall,
        "p50_s": pct(0.50),
        "p99_s": pct(0.99),
        "rss_mb": rss,
        "latencies_s": latencies,
    }
