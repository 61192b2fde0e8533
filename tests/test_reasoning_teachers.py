"""Reasoning teachers: the chain wherever the teacher puts it, pipelined requests, bad servers, long to short.

Every server here is tests/teacher_fakes.StandIn on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from nestling import cli as nestling_cli
from nestling.distill.filters import FilterConfig, filter_traces, shorten, training_steps, training_text
from nestling.distill.prompts import teacher_messages
from nestling.distill.tasks import Example
from nestling.distill.teachers import (
    Generation,
    Job,
    Sampling,
    Teacher,
    default_max_tokens,
    load_teacher,
    split_think,
    with_chain,
)
from nestling.distill.traces import TracesConfig, run_traces
from teacher_fakes import StandIn

from nestling.core.errors import NestlingError
from nestling.core.manifest import read_manifest

EASY = (
    "rg:basic_arithmetic?min_terms=2&max_terms=2&min_digits=1&max_digits=1&operators=+,-&allow_negation=false"
    "&allow_parentheses=false"
)


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


def traces_cfg(tmp_path: Path, url: str, **kw) -> TracesConfig:
    base = dict(task=EASY, teacher=f"openai:m@{url}", n=10, heldout=2, samples=2, out=str(tmp_path / "run"))
    return TracesConfig(**{**base, **kw})


# ---- where the chain is --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, chain, answer, unclosed",
    [
        ("<think>3 + 4 = 7</think>\nAnswer: 7", "3 + 4 = 7", "Answer: 7", False),
        ("3 + 4 = 7\n</think>\n\nAnswer: 7", "3 + 4 = 7", "Answer: 7", False),  # template opened the block
        ("<think>\n3 + 4 = 7, and then", "3 + 4 = 7, and then", "", True),
        ("Step 1: 3 + 4 = 7\nAnswer: 7", None, "Step 1: 3 + 4 = 7\nAnswer: 7", False),
    ],
)
def test_split_think(text, chain, answer, unclosed):
    assert split_think(text) == (chain, answer, unclosed)


def test_a_reasoning_field_wins_and_a_stray_think_block_leaves_the_answer():
    g = with_chain(Generation("<think>x</think>Answer: 7", 5, 0.1), {"reasoning_content": "3 + 4 = 7"})
    assert (g.reasoning, g.reasoning_source, g.text) == ("3 + 4 = 7", "reasoning_content", "Answer: 7")
    g = with_chain(Generation("Answer: 7", 5, 0.1), {"reasoning": " 3 + 4 = 7 ", "reasoning_content": None})
    assert (g.reasoning, g.reasoning_source) == ("3 + 4 = 7", "reasoning")


def test_budgets_follow_the_teacher_kind_and_can_be_overridden(tmp_path):
    assert (
        default_max_tokens("gguf:smollm2") == 64 < default_max_tokens("hf:x") < default_max_tokens("openai:m")
    )
    assert TracesConfig(out=str(tmp_path)).max_tokens == 64
    assert TracesConfig(teacher="openai:m@http://h/v1", out=str(tmp_path)).max_tokens == 4096
    assert TracesConfig(teacher="openai:m@http://h/v1", max_tokens=300, out=str(tmp_path)).max_tokens == 300


@pytest.mark.parametrize("mode", ["reasoning_content", "reasoning", "think"])
def test_a_reasoning_server_gives_kept_rows_and_the_card_counts_chain_sources(tmp_path, mode):
    """The issue's report: chain in reasoning_content, `Answer: N` in content gave 0 kept rows, silently."""
    with StandIn(mode) as srv:
        out = run_traces(traces_cfg(tmp_path, srv.url), progress=False)
        assert srv.requests[0]["max_tokens"] == 4096
    card = json.loads((out / "datacard.json").read_text())
    assert card["records"] == 16 and card["chains"][mode] == 16 and card["chains"]["none"] == 0
    assert card["kept"] == 8 and card["coverage"] == 1.0  # both samples are the same text: dedupe keeps 1
    rec = read_jsonl(out / "traces.jsonl")[0]
    assert rec["chain_source"] == mode and rec["rationale"].startswith("Answer:") and "=" in rec["chain"]
    row = read_jsonl(out / "kept.jsonl")[0]
    assert row["steps"] == row["steps_full"] and len(row["steps_short"]) < len(row["steps_full"])
    assert card["styles"]["rows_with_chain"] == 8


def test_request_fields_concurrency_and_timeout_reach_the_server(tmp_path):
    extra = '{"chat_template_kwargs": {"enable_thinking": true}, "reasoning_effort": "low"}'
    with StandIn("reasoning_content") as srv:
        cfg = traces_cfg(tmp_path, srv.url, request_extra=extra, concurrency=3, timeout=30, retries=0)
        run_traces(cfg, progress=False)
        body = srv.requests[0]
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["reasoning_effort"] == "low"
    assert "request_extra" in read_jsonl(tmp_path / "run" / "traces" / "traces.jsonl")[0]["sampling"]
    for bad, fragment in [("[1]", "JSON object"), ("{oops", "not JSON")]:
        with pytest.raises(NestlingError, match=fragment):
            traces_cfg(tmp_path, "http://h/v1", request_extra=bad)
    with pytest.raises(NestlingError, match="only openai"):
        TracesConfig(teacher="gguf:smollm2", request_extra="{}", out=str(tmp_path))


# ---- pipelining and bad servers ----------------------------------------------------------------------


def test_results_arrive_as_each_finishes_not_per_batch():
    """A hung request does not hold back the ones behind it: they are handed over first."""
    with StandIn("plain", script=["hang"]) as srv:
        t = load_teacher(f"openai:m@{srv.url}", concurrency=2, timeout=2.0, retries=0)
        jobs = [Job(i, teacher_messages(f"What is {i} + 1?")) for i in range(6)]
        order = [(key, g.error is None) for key, _, g in t.stream(jobs, Sampling())]
        t.close()
    # Whichever request reached the server first hangs; the other five come back before it times out.
    assert [ok for _, ok in order] == [True] * 5 + [False] and sorted(k for k, _ in order) == list(range(6))


@pytest.mark.parametrize("action", ["garbage", "html", "torn", 503])
def test_a_run_of_failures_stops_with_one_line(action):
    with StandIn("plain", script=[action] * 20) as srv:
        t = load_teacher(f"openai:m@{srv.url}", concurrency=1, retries=0, max_failures=3)
        with pytest.raises(NestlingError, match="the last 3 requests .* failed"):
            t.generate([teacher_messages(f"What is {i} + 1?") for i in range(5)], 1, Sampling())


def test_bad_replies_are_counted_nothing_is_lost_and_a_rerun_fills_the_gaps(tmp_path):
    script = ["ok", "html", "garbage", "torn", 503, "hang", "no_answer", "unclosed", "wrong"]
    with StandIn("reasoning_content", script=script) as srv:
        cfg = traces_cfg(tmp_path, srv.url, concurrency=1, timeout=1.0, retries=0)
        out = run_traces(cfg, progress=False)
        first = (out / "traces.jsonl").read_bytes()
        card = json.loads((out / "datacard.json").read_text())
        assert card["teacher_errors"]["failed_requests_last_run"] == {
            "bad_reply": 2,
            "connection": 1,
            "http_503": 1,
            "timeout": 1,
        }
        assert card["teacher_errors"]["samples_missing"] == 5 and card["records"] == 11
        assert card["no_final_answer"] == 2 and card["unclosed_think"] == 1
        assert read_manifest(out, stage="traces")["metrics"]["samples_missing"] == 5
        out = run_traces(cfg, progress=False)  # the server is healthy now: only the 5 gaps are asked for
    after = (out / "traces.jsonl").read_bytes()
    assert after.startswith(first) and len(after.splitlines()) == 16 and len(srv.requests) == 16 + 5
    card = json.loads((out / "datacard.json").read_text())
    # One question got only "no_answer" and "unclosed" (requests go in order at concurrency 1): 7 of 8 kept.
    assert card["teacher_errors"]["samples_missing"] == 0 and card["kept"] == 7


def test_unauthorized_server_stops_with_one_line_and_keeps_what_was_written(tmp_path, capsys):
    with StandIn("reasoning_content", script=["ok", "ok", "ok", 401]) as srv:
        args = ["traces", "--task", EASY, "--teacher", f"openai:m@{srv.url}", "--n", "10", "--heldout", "2"]
        code = nestling_cli.main(
            [*args, "--samples", "2", "--concurrency", "1", "--out", str(tmp_path / "r")]
        )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "HTTP 401" in lines[0] and "Traceback" not in err
    assert len(read_jsonl(tmp_path / "r" / "traces" / "traces.jsonl")) == 3


# ---- long to short, free-form steps ------------------------------------------------------------------


LONG_CHAIN = (
    "Okay, so I need 23 * 4. Let me think. Hmm, multiplication by 4 is doubling twice.\n\n"
    "Break it down. 20 * 4 = 80. 3 * 4 = 12.\n"
    "- Adding them: 80 + 12 = 92.\n"
    "Wait, let me double check: 23 * 4 = 92. Yes, that matches what I had before.\n\n"
    "So the product is 92 apples in total."
)


def test_shorten_keeps_each_claim_once_and_the_conclusion():
    from nestling.distill.filters import record_steps

    full, short = record_steps({"chain": LONG_CHAIN, "rationale": "Answer: 92"}, "rg:basic_arithmetic")
    assert short == [
        "20 * 4 = 80.",
        "3 * 4 = 12.",
        "Adding them: 80 + 12 = 92.",
        "Wait, let me double check: 23 * 4 = 92.",
        "So the product is 92 apples in total.",
    ]
    assert len(full) > len(short) and full[-1] == short[-1]
    assert shorten([]) == [] and shorten(["no claims here"]) == ["no claims here"]


def test_long_chains_are_kept_checked_and_both_styles_stored():
    examples = [Example("q1", "rg:basic_arithmetic", "Calculate 23 * 4.", "92", {})]
    # Filler without numbers: a number from nowhere would make the chain ungrounded (not what this tests).
    long = (
        "\n".join("Hmm, I keep thinking about " + "another " * i + "part." for i in range(20))
        + "\n"
        + LONG_CHAIN
    )
    wrong = LONG_CHAIN.replace("3 * 4 = 12", "3 * 4 = 13")
    records = [
        {
            "id": "q1:0",
            "qid": "q1",
            "rationale": "Answer: 92",
            "chain": long,
            "answer": "92",
            "correct": True,
        },
        {
            "id": "q1:1",
            "qid": "q1",
            "rationale": "Answer: 92",
            "chain": wrong,
            "answer": "92",
            "correct": True,
        },
    ]
    # The default filter keeps only grounded chains: 20 * 4 and 3 * 4 are grounded as 23's place-value parts.
    kept, stats = filter_traces(records, examples, FilterConfig())
    assert [r["trace"] for r in kept] == ["q1:0"] and stats["right_answer_wrong_steps"] == 1
    row = kept[0]
    assert len(row["steps_full"]) > 20  # more than max_steps: a chain is not dropped for its length
    assert training_steps(row, "short") == row["steps_short"] and training_steps(row) == row["steps_full"]
    assert training_text(row, "short").endswith("Answer: 92") and "Step 1: 20 * 4 = 80." in training_text(
        row, "short"
    )
    old = {"answer": "7", "steps": ["3 + 4 = 7"]}  # a row written before both styles were stored
    assert training_steps(old, "short") == ["3 + 4 = 7"]
    kept, _ = filter_traces(records[:1], examples, FilterConfig(style="short"))
    assert kept[0]["steps"] == kept[0]["steps_short"]


class ThinkTeacher(Teacher):
    """A local teacher that writes R1-style output; text goes through the same split as gguf: and hf:."""

    spec, params, batch = "think", 1, 4

    def _generate_one(self, messages, sampling, seed):
        a, op, b = re.search(r"(\d+) ([-+]) (\d+)", messages[-1]["content"]).groups()
        v = int(a) + int(b) if op == "+" else int(a) - int(b)
        text = f"<think>\nThe sum asked is {a} {op} {b}. Working it out, {a} {op} {b} = {v}.\n</think>\n"
        return with_chain(Generation(text + f"Answer: {v}", 20, 0.01))


def test_a_think_teacher_through_the_traces_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "nestling.distill.traces.load_teacher", lambda spec, n_threads=None, **kw: ThinkTeacher()
    )
    out = run_traces(
        TracesConfig(task=EASY, teacher="hf:think", n=10, heldout=2, samples=2, out=str(tmp_path / "r")),
        progress=False,
    )
    card = json.loads((out / "datacard.json").read_text())
    assert card["chains"]["think"] == 16 and card["kept"] == 8
    row = read_jsonl(out / "kept.jsonl")[0]
    assert row["chain_source"] == "think" and any("=" in s for s in row["steps_short"])


@pytest.mark.slow
@pytest.mark.parametrize("source", ["reasoning_content", "think"])
def test_reasoning_teacher_end_to_end_traces_train_export_serve(tmp_path, monkeypatch, source):
    """A chain from a server's reasoning_content or a local <think> teacher: kept, checked, trained on,
    exported (GGUF f16 only, for time) and answered by the torch-free Reasoner."""
    from nestling.distill.train import TrainConfig, train
    from nestling.export.pipeline import ExportConfig, export_student
    from nestling.serve.runtime import Reasoner

    run = tmp_path / "run"
    base = dict(task=EASY, n=60, heldout=8, samples=2, out=str(run))
    if source == "think":
        monkeypatch.setattr(
            "nestling.distill.traces.load_teacher", lambda spec, n_threads=None, **kw: ThinkTeacher()
        )
        out = run_traces(TracesConfig(teacher="hf:think", **base), progress=False)
    else:
        with StandIn(source) as srv:
            out = run_traces(TracesConfig(teacher=f"openai:m@{srv.url}", **base), progress=False)
    card = json.loads((out / "datacard.json").read_text())
    assert card["chains"][source] == card["records"] == 104 and card["kept"] == 52
    assert card["right_answer_wrong_steps"] == 0 and card["filters"][3]["kept"] == 104  # every step checked
    student = train(
        TrainConfig(run=str(run), student="nano", steps=40, batch_size=8, threads=1, progress=False)
    )
    m = json.loads((student / "manifest.json").read_text())["metrics"]
    assert m["steps"] == 40 and m["final_loss"] < 10
    export = tmp_path / "export"
    cfg = ExportConfig(
        student=str(student / "model"),
        out=str(export),
        variants=["gguf-f16"],
        parity_prompts=4,
        max_new_tokens=32,
    )
    export_student(cfg)
    r = Reasoner.load(export)
    a = r.ask("What is 3 + 4?", max_tokens=48)
    assert a.text and isinstance(a.steps, list) and all(s.ok in (True, False, None) for s in a.steps)
    r.close()


def test_the_traces_summary_reports_chains_bad_output_and_failed_requests(tmp_path, capsys):
    with StandIn("reasoning_content", script=["html", "unclosed"]) as srv:
        args = ["traces", "--task", EASY, "--teacher", f"openai:m@{srv.url}", "--n", "10", "--heldout", "2"]
        code = nestling_cli.main(
            [*args, "--concurrency", "1", "--retries", "0", "--out", str(tmp_path / "r")]
        )
    out = capsys.readouterr().out
    assert code == 0 and "30 in reasoning_content, 1 in think" in out and "1 unclosed think" in out
    assert "1 bad_reply; 1 samples missing: re-run to retry" in out
