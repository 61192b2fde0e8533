"""A bounded load test on loopback: 32 concurrent clients against `nestling serve` (the tiny GGUF export in
a child process) for a few seconds, then stop. Below the queue cap every request waits its turn and is
answered (no 429), p50/p99 reported, RSS stable. The side-by-side version is benchmarks/bench_serve.py."""

from __future__ import annotations

import json

import pytest
from serve_fakes import run_load, serve_process

pytestmark = pytest.mark.slow


def test_32_clients_below_the_queue_cap_are_all_answered_and_memory_stays_flat(tiny_export_dir, capsys):
    env = {"NESTLING_MAX_QUEUE": "64", "NESTLING_QUEUE_TIMEOUT_S": "30", "NESTLING_POOL": "4"}
    with serve_process(tiny_export_dir, env) as (proc, url):
        warm = run_load(url, clients=32, seconds=3, pid=proc.pid)
        out = run_load(url, clients=32, seconds=12, pid=proc.pid)
        assert proc.poll() is None  # still up
    for run in (warm, out):
        assert run["transport_failures"] == []
        assert set(run["statuses"]) == {"200"}, run["statuses"]  # 32 clients < max_queue 64: none refused
    assert out["statuses"]["200"] >= 50 and out["p99_s"] >= out["p50_s"] > 0
    # memory: after warm-up, the server's resident set does not keep growing
    rss = out["rss_mb"]
    assert max(rss) - warm["rss_mb"][-1] < 25, rss
    with capsys.disabled():
        summary = {k: out[k] for k in ("statuses", "answers_per_s", "p50_s", "p99_s")}
        summary["rss_mb"] = [round(warm["rss_mb"][-1], 1), round(max(rss), 1)]
        print("\nload:", json.dumps(summary))
