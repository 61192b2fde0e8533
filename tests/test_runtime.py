"""serve.runtime: Reasoner.load (variant choice, sha256 refusal), ask/stream, step checks, latency, locks."""

from __future__ import annotations

import json
import threading

import pytest
from nestling.serve.runtime import ENGINES, Answer, Reasoner
from nestling.serve.sampling import SamplingParams
from serve_fakes import FakeEngine, make_fake_export, register_fake

from nestling.core.errors import NestlingError


@pytest.fixture
def fake_export(tmp_path):
    register_fake()
    yield make_fake_export(tmp_path)
    ENGINES.pop("fake", None)


def reasoner(gate=None) -> Reasoner:
    return Reasoner(FakeEngine(gate=gate), variant="fake-a", task="rg:basic_arithmetic")


def test_ask_explain_gives_checked_steps_answer_and_latency():
    a = reasoner().ask("What is 7 + 5?")
    assert a.answer == "12"
    assert [s.text for s in a.steps] == ["7 + 5 = 12"]
    assert a.steps[0].ok is True and a.steps[0].claims[0]["value"] == "12"
    assert a.text == "\nStep 1: 7 + 5 = 12\nAnswer: 12"
    assert (a.finish_reason, a.stopped_by) == ("stop", "eos")
    lat = a.latency
    assert lat.prompt_tokens == 1 + len(b"Question: What is 7 + 5?\nExplain:")
    assert lat.completion_tokens == len(a.text.encode())
    assert 0 <= lat.ttft_s <= lat.total_s
    assert lat.tokens_per_s > 0 and (lat.engine, lat.variant) == ("fake", "fake-a")


def test_a_false_step_is_flagged_and_unverifiable_steps_are_none():
    a = reasoner().ask("a wrong one")
    assert [s.ok for s in a.steps] == [False, None]
    claim = a.steps[0].claims[0]
    assert (claim["stated"], claim["value"], claim["ok"]) == ("64", "72", False)
    assert a.answer == "64"


def test_answer_only_mode_is_the_fast_path():
    r = reasoner()
    quick, full = r.ask("What is 6 * 7?", explain=False), r.ask("What is 6 * 7?")
    assert quick.answer == full.answer == "42"
    assert quick.steps == [] and quick.text == " 42"
    assert quick.latency.completion_tokens < full.latency.completion_tokens


def test_stream_pieces_join_to_the_text_and_never_split_characters():
    r = reasoner()
    s = r.stream("unicode please")
    pieces = list(s)
    assert "".join(pieces) == s.answer.text == "\nStep 1: caf\u00e9 \u2192 5 \u00d7 2\nAnswer: 10 \u20ac"
    assert all("\ufffd" not in p for p in pieces)
    # bytes of one character arrive as several tokens but leave as one piece
    assert "\u20ac" in pieces and "\u2192" in pieces
    assert s.answer.answer == "10 \u20ac"
    assert s.answer.latency.completion_tokens == len(s.answer.text.encode())


def test_max_tokens_cuts_and_says_length():
    a = reasoner().ask("ramble on", max_tokens=7)
    assert (a.finish_reason, a.stopped_by) == ("length", "max_tokens")
    assert a.latency.completion_tokens == 7 and a.text == "la la l"


def test_text_after_the_answer_line_is_cut():
    a = reasoner().ask("what comes after")
    assert a.text == "\nStep 1: 2 + 2 = 4\nAnswer: 4"
    assert a.answer == "4" and len(a.steps) == 1
    assert (a.finish_reason, a.stopped_by) == ("stop", "answer_line")


def test_cancel_stops_a_stream_early():
    cancel = threading.Event()
    s = reasoner().stream("ramble on", max_tokens=5000, cancel=cancel)
    got = [next(s), next(s)]
    cancel.set()
    rest = list(s)
    assert s.answer.finish_reason == "cancelled"
    assert len("".join(got + rest)) < 50


@pytest.mark.parametrize("bad", [{"question": "  "}, {"question": "hi", "max_tokens": 0}])
def test_bad_arguments_are_nestling_errors(bad):
    with pytest.raises(NestlingError):
        reasoner().ask(**bad)


def test_concurrent_calls_are_serialized():
    r = reasoner()
    out: list[Answer] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            out.append(r.ask(f"What is {i} + {i}?"))
        except BaseException as e:  # FakeEngine raises on re-entrant use
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(int(a.answer) for a in out) == [2 * i for i in range(8)]


def test_an_abandoned_stream_releases_the_engine():
    r = reasoner()
    s = r.stream("ramble on", max_tokens=100)
    next(s)
    s.close()
    assert r.ask("What is 1 + 1?").answer == "2"


# ---- load ------------------------------------------------------------------------------------------


def test_load_verifies_and_picks_the_default_variant(fake_export):
    r = Reasoner.load(fake_export)
    assert (r.variant, r.name, r.task) == ("fake-a", "tiny", "rg:basic_arithmetic")
    assert r.ask("What is 2 + 3?").answer == "5"
    assert Reasoner.load(fake_export, variant="fake-b").variant == "fake-b"


def test_auto_skips_a_variant_whose_engine_is_not_installed(fake_export):
    m = json.loads((fake_export / "manifest.json").read_text())
    m["variants"]["fake-a"]["engine"] = "missing"
    m["default_variant"] = "fake-a"
    (fake_export / "manifest.json").write_text(json.dumps(m))
    from nestling.serve.runtime import register_engine

    register_engine("missing", lambda p, n: None, lambda: False)
    try:
        assert Reasoner.load(fake_export).variant == "fake-b"
        with pytest.raises(NestlingError, match="not installed"):
            Reasoner.load(fake_export, engine="missing")
    finally:
        ENGINES.pop("missing", None)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:10]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"!"), "sha256"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_a_damaged_artifact_is_refused_at_load(fake_export, damage, message):
    damage(fake_export / "fake" / "fake-a.bin")
    with pytest.raises(NestlingError, match=message):
        Reasoner.load(fake_export)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "nope"}, "not in the export"),
        ({"engine": "tpu"}, "unknown"),
        ({"engine": "gguf"}, "no such variant"),
        ({"n_threads": 0}, "threads"),
    ],
)
def test_bad_load_options_say_what_to_do(fake_export, kwargs, message):
    with pytest.raises(NestlingError, match=message):
        Reasoner.load(fake_export, **kwargs)


def test_load_refuses_a_directory_without_an_export_manifest(tmp_path):
    with pytest.raises(NestlingError, match="no manifest"):
        Reasoner.load(tmp_path)
    with pytest.raises(NestlingError, match="not a directory"):
        Reasoner.load(tmp_path / "nope")


def test_an_unloadable_file_with_a_matching_hash_is_a_clear_error(tmp_path):
    register_fake()
    try:
        out = make_fake_export(tmp_path)
        p = out / "fake" / "fake-a.bin"
        p.write_text("garbage")
        from nestling.core.manifest import write_manifest

        m = json.loads((out / "manifest.json").read_text())
        extra = {k: m[k] for k in ("prompt_format", "student", "task", "default_variant", "variants")}
        write_manifest(out, stage="export", files=list(m["files"]), **extra)
        with pytest.raises(NestlingError, match="cannot load"):
            Reasoner.load(out)
    finally:
        ENGINES.pop("fake", None)


# ---- `nestling ask` --------------------------------------------------------------------------------------


def test_cli_ask_prints_marked_steps_answer_and_one_latency_line(fake_export, capsys):
    from nestling import cli as nestling_cli

    assert nestling_cli.main(["ask", str(fake_export), "a wrong one"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert lines[0] == "  \u2717 Step 1: 9 * 8 = 64"
    assert lines[1] == "  \u00b7 Step 2: So the result is 64"
    assert lines[2] == "Answer: 64"
    assert lines[3].startswith("latency: first token ") and "(fake-a on fake)" in lines[3] and len(lines) == 4
    assert nestling_cli.main(["ask", str(fake_export), "lucky: 3 + 4?"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert lines[0] == "  ? Step 1: 2 + 5 = 7" and "explanation incomplete" in lines[2]
    argv = ["ask", str(fake_export), "What is 2 + 2?", "--no-explain", "--variant", "fake-b"]
    assert nestling_cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[0] == "Answer: 4" and "(fake-b on fake)" in lines[1]


def test_cli_ask_and_serve_turn_bad_input_into_one_line_errors(fake_export, tmp_path, capsys):
    from nestling import cli as nestling_cli

    assert nestling_cli.main(["ask", str(fake_export), "hi", "--max-tokens", "0"]) == 2
    assert nestling_cli.main(["ask", str(tmp_path / "missing"), "hi"]) == 2
    assert nestling_cli.main(["serve", str(fake_export), "--variant", "nope"]) == 2
    assert nestling_cli.main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 4 and all(e.startswith("error: ") for e in err)
    assert "--max-tokens 0" in err[0] and "not a directory" in err[1]
    assert "nope" in err[2] and "manifest" in err[3]


# ---- real artifacts: the tiny student exported to GGUF and ONNX (tests/conftest.py) ------------------------


@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_real_engines_answer_stream_and_match_the_raw_engine(tiny_export_dir, kind):
    with Reasoner.load(tiny_export_dir, engine=kind) as r:
        assert r.engine.kind == kind and r.manifest["variants"][r.variant]["engine"] == kind
        a = r.ask("What is 3 + 4?", max_tokens=48)
        s = r.stream("What is 3 + 4?", max_tokens=48)
        assert "".join(s) == s.answer.text == a.text
        # the runtime adds nothing to the engine: same greedy tokens, decoded
        prompt = r.engine.tokenize("Question: What is 3 + 4?\nExplain:")
        raw = list(r.engine.stream(prompt, 48))
        assert a.latency.prompt_tokens == len(prompt)
        assert a.latency.completion_tokens <= len(raw)
        assert r.engine.detokenize(raw).startswith(a.text)
        assert a.finish_reason == ("length" if a.latency.completion_tokens == 48 else "stop")
        quick = r.ask("What is 3 + 4?", explain=False, max_tokens=16)
        assert quick.steps == [] and quick.latency.variant == r.variant


def test_auto_loads_the_default_variant(tiny_export_dir):
    m = json.loads((tiny_export_dir / "manifest.json").read_text())
    with Reasoner.load(tiny_export_dir) as r:
        assert r.variant == m["default_variant"]


@pytest.mark.parametrize("variant", ["gguf-q8_0", "onnx-fp32"])
def test_truncated_or_tampered_real_artifacts_are_refused(tiny_export_dir, tmp_path, variant):
    import shutil

    from nestling.core.manifest import write_manifest

    out = tmp_path / "copy"
    shutil.copytree(tiny_export_dir, out)
    m = json.loads((out / "manifest.json").read_text())
    rel = m["variants"][variant]["path"]
    target = out / rel if (out / rel).is_file() else out / rel / "model.onnx"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(NestlingError, match="truncated"):
        Reasoner.load(out, variant=variant)
    target.write_bytes(data[:-9] + bytes(b ^ 0xFF for b in data[-9:]))
    with pytest.raises(NestlingError, match="sha256"):
        Reasoner.load(out, variant=variant)
    # A truncated file whose manifest was rewritten to match is still refused, by the engine, in one line.
    target.write_bytes(data[: len(data) // 2])
    extra = {k: v for k, v in m.items() if k not in ("format", "stage", "created", "files")}
    write_manifest(out, stage="export", files=list(m["files"]), **extra)
    with pytest.raises(NestlingError) as e:
        Reasoner.load(out, variant=variant)
    assert "\n" not in str(e.value) and "re-export" in str(e.value)


def test_a_reply_cut_by_the_engine_context_says_length():
    class ShortContext(FakeEngine):
        """Like the real engines: the context caps the generation budget."""

        n_ctx = 40

        def stream(self, prompt_ids, max_tokens):
            return super().stream(prompt_ids, min(max_tokens, self.n_ctx - len(prompt_ids)))

    r = Reasoner(ShortContext(), variant="fake-a", task="rg:basic_arithmetic")
    a = r.ask("What is 7 + 5?", max_tokens=200)
    assert a.latency.completion_tokens == 40 - a.latency.prompt_tokens
    assert a.finish_reason == "length" and a.stopped_by == "max_tokens"


# ---- sampling, stop strings, verification, the engine pool ----------------------------------------------


def test_sampling_is_seeded_and_greedy_stays_the_default():
    r = reasoner()
    assert r.ask("a flaky one").answer == "64"  # greedy takes the likelier, wrong script
    picks = {
        s: r.ask("a flaky one", sampling=SamplingParams(temperature=1.0, seed=s)).answer for s in range(12)
    }
    assert set(picks.values()) == {"64", "72"}  # the seed decides...
    again = {s: r.ask("a flaky one", sampling=SamplingParams(temperature=1.0, seed=s)).answer for s in picks}
    assert again == picks  # ...the same way every time
    assert r.ask("a flaky one", sampling=SamplingParams(temperature=1.0, top_k=1, seed=3)).answer == "64"


def test_the_sampler_keeps_only_top_k_and_top_p_tokens():
    import numpy as np

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = lambda **kw: {SamplingParams(temperature=1.0, seed=s, **kw).sampler()(logits) for s in range(200)}  # noqa: E731
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7: the token crossing the mass stays, the rest go
    assert SamplingParams().sampler() is None  # greedy: engines take argmax, bit for bit as before


def test_the_nucleus_from_top_candidates_is_exactly_the_full_sorts_prefix():
    """The shortcut (sort the 64 most likely first) must keep the same tokens in the same order as sorting the
    whole vocabulary, ties included, whether the nucleus lies in the candidates or not."""
    import numpy as np
    from nestling.serve.sampling import _nucleus

    def full(probs, top_p):
        order = np.argsort(-probs, kind="stable")
        return order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]

    rng, shortcut = np.random.default_rng(0), 0
    for t in range(600):
        x = rng.normal(size=int(rng.choice([50, 300, 5000]))) * rng.choice([0.3, 3.0, 10.0])
        x = np.round(x, 1) if t % 2 else x  # ties
        p = np.exp(x - x.max())
        p /= p.sum()
        top_p = float(rng.choice([0.5, 0.9, 0.95, 0.999]))
        got = _nucleus(p, top_p)
        assert np.array_equal(got, full(p, top_p))
        shortcut += len(p) > 128 and len(got) < 63
    assert shortcut > 100  # the fast path was taken, not only the fallback


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 1e9}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": "42"}, "seed"),
    ],
)
def test_out_of_range_sampling_is_a_nestling_error(kwargs, message):
    with pytest.raises(NestlingError, match=message):
        SamplingParams(**kwargs)


def test_stop_strings_end_the_text_and_are_never_streamed():
    r = reasoner()
    a = r.ask("What is 7 + 5?", stop=["= 1"])
    assert (a.text, a.finish_reason, a.stopped_by) == ("\nStep 1: 7 + 5 ", "stop", "stop")
    s = r.stream("What is 7 + 5?", stop=["xyz", "5 = "])
    pieces = list(s)
    assert "".join(pieces) == s.answer.text == "\nStep 1: 7 + "
    # a held-back prefix that never becomes a stop string is still sent
    s = r.stream("What is 7 + 5?", stop=["12!"])
    assert "".join(s) == s.answer.text == "\nStep 1: 7 + 5 = 12\nAnswer: 12"
    with pytest.raises(NestlingError, match="at most"):
        r.ask("What is 1 + 1?", stop=[str(i) for i in range(100)])


def test_verification_resamples_until_the_checked_steps_hold():
    r = reasoner()
    plain = r.ask("a flaky one")
    assert (plain.verified, plain.tries, plain.answer) == (False, 1, "64")
    checked = r.ask("a flaky one", verify=8, sampling=SamplingParams(seed=0))
    assert (checked.verified, checked.answer) == (True, "72") and 1 < checked.tries <= 8
    assert checked.latency.total_s >= checked.latency.ttft_s > 0
    assert r.ask("a flaky one", verify=8).tries == checked.tries  # seeded: the same tries every time
    hopeless = r.ask("a wrong one", verify=3)
    assert (hopeless.verified, hopeless.tries, hopeless.answer) == (False, 3, "64")  # the first, marked
    assert r.ask("What is 2 + 2?", verify=5).tries == 1 and r.ask("What is 2 + 2?").verified is True
    assert r.ask("What is 2 + 2?", explain=False).verified is None


def test_verification_resamples_until_the_explanation_is_complete():
    r = reasoner()
    lucky = r.ask("lucky: 3 + 4?")
    assert (lucky.answer, lucky.verified, lucky.complete, lucky.answer_derived) == ("7", True, False, True)
    assert lucky.steps[0].ok is True and lucky.steps[0].status == "ungrounded"
    assert "2 is not in the question" in lucky.steps[0].reason
    complete = r.ask("lucky: 3 + 4?", verify=8, sampling=SamplingParams(seed=0))
    assert complete.complete is True and complete.steps[0].status == "grounded" and complete.tries > 1
    good = r.ask("What is 2 + 2?", verify=5)
    assert (good.complete, good.tries, good.steps[0].status) == (True, 1, "grounded")
    # no numbers in the question: nothing to ground, verification falls back to the arithmetic
    assert r.ask("a flaky one").complete is None and r.ask("What is 2 + 2?", explain=False).complete is None


def test_a_pool_answers_as_many_questions_at_once_as_it_has_engines():
    gate = threading.Event()
    engines = [FakeEngine(gate=gate), FakeEngine(gate=gate)]
    r = Reasoner(engines, variant="fake-a", task="rg:basic_arithmetic")
    out: dict[int, str | None] = {}
    threads = [
        threading.Thread(target=lambda i=i: out.update({i: r.ask(f"What is {i} + 1?").answer}))
        for i in range(5)
    ]
    for t in threads:
        t.start()
    assert all(e.started.wait(10) for e in engines)  # two questions are inside engines at the same moment
    assert sum(e.calls for e in engines) == 2  # the other three wait for a free one
    gate.set()
    for t in threads:
        t.join(30)
    assert out == {i: str(i + 1) for i in range(5)}
    assert r.ask_many([f"What is {i} * 3?" for i in range(6)], explain=False)[4].answer == "12"
    r.close()
    assert all(e.closed for e in engines)


def test_load_with_a_pool_loads_that_many_engines(tmp_path):
    loaded = register_fake()
    try:
        r = Reasoner.load(make_fake_export(tmp_path), pool=3)
        assert r.pool == 3 and len(loaded) == 3 and r.ask("What is 2 + 3?").answer == "5"
        assert Reasoner.load(make_fake_export(tmp_path / "b"), pool=0).pool >= 1  # one per core
    finally:
        ENGINES.pop("fake", None)


def test_cli_ask_file_answers_every_line_as_jsonl(fake_export, tmp_path, capsys):
    from nestling import cli as nestling_cli

    qs = tmp_path / "q.jsonl"
    qs.write_text('{"question": "What is 2 + 2?"}\n\n"What is 3 * 3?"\n{"question": "a flaky one"}\n')
    assert (
        nestling_cli.main(["ask", str(fake_export), "--file", str(qs), "--verify", "8", "--pool", "2"]) == 0
    )
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.strip().split("\n")]
    assert [(x["question"], x["answer"]) for x in rows] == [
        ("What is 2 + 2?", "4"), ("What is 3 * 3?", "9"), ("a flaky one", "72"),
    ]  # fmt: skip
    assert rows[2]["verified"] is True and rows[2]["tries"] > 1 and "3 answers in" in out.err
    qs.write_text('{"question": "hi"}\nnot json\n')
    assert nestling_cli.main(["ask", str(fake_export), "--file", str(qs)]) == 2
    assert nestling_cli.main(["ask", str(fake_export), "hi", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert "q.jsonl:2: not JSON" in err[0] and "temperature" in err[1]


def test_a_batched_gguf_pool_answers_like_one_engine_and_reuses_cancelled_slots(tiny_export_dir):
    qs = [f"What is {a} + {b}?" for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 0), (6, 3)]]
    with Reasoner.load(tiny_export_dir, engine="gguf", variant="gguf-f16") as one:
        want = [one.ask(q, max_tokens=24).text for q in qs]
    with Reasoner.load(tiny_export_dir, engine="gguf", variant="gguf-f16", pool=3, batched=True) as r:
        assert r.pool == 3 and len({id(e) for e in r.engines}) == 3
        assert [a.text for a in r.ask_many(qs, max_tokens=24)] == want  # decoded together, same tokens
        for _ in range(3):  # leave streams early: each slot's cache must be cleared for the next question
            s = r.stream("What is 9 + 9?", max_tokens=40)
            next(s)
            s.close()
        assert [a.text for a in r.ask_many(qs, max_tokens=24)] == want
        seeded = SamplingParams(temperature=0.9, seed=7)
        assert len({r.ask(qs[0], sampling=seeded, max_tokens=24).text for _ in range(3)}) == 1
