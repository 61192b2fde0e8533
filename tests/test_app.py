"""serve.app: /v1/answer, OpenAI-compatible chat (TestClient, and the openai SDK on a real uvicorn), health
while loading, auth, limits, overload (429/503), JSON errors, metrics."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from nestling.serve.app import create_app
from nestling.serve.routers.common import get_settings
from nestling.serve.runtime import Reasoner
from nestling.serve.settings import Settings, load_settings
from serve_fakes import FakeEngine, serve_in_thread

from nestling.core.errors import NestlingError


def make_app(gate=None, **settings):
    r = Reasoner(FakeEngine(gate=gate), variant="fake-a", name="tiny", task="rg:basic_arithmetic")
    return create_app(Settings(**settings), reasoner=r), r


@pytest.fixture
def client():
    app, _ = make_app()
    with TestClient(app) as c:
        yield c


def sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        event, data = "message", ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        out.append((event, data if data == "[DONE]" else json.loads(data)))
    return out


def test_answer_returns_checked_steps_latency_and_model(client):
    r = client.post("/v1/answer", json={"question": "What is 9 * 8? Or a wrong one"})
    assert r.status_code == 200
    body = r.json()
    assert body["answer"] == "64" and body["model"] == "tiny"
    assert [s["ok"] for s in body["steps"]] == [False, None]
    assert set(body["latency"]) == {
        "ttft_s", "total_s", "prompt_tokens", "completion_tokens", "tokens_per_s", "engine", "variant",
    }  # fmt: skip
    assert body["latency"]["completion_tokens"] == len(body["text"].encode())
    quick = client.post("/v1/answer", json={"question": "What is 3 + 4?", "explain": False}).json()
    assert (quick["answer"], quick["steps"]) == ("7", [])


def test_answer_streams_tokens_then_the_answer(client):
    r = client.post("/v1/answer", json={"question": "unicode please", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    tokens = [d["text"] for e, d in events if e == "token"]
    (last_event, final) = events[-1]
    assert last_event == "answer" and len(tokens) > 5
    assert "".join(tokens) == final["text"] and final["answer"] == "10 \u20ac"


def test_chat_completions_non_streaming_and_length(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2 + 5?"}]
    body = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": msgs, "temperature": 0.3}
    ).json()
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "Step 1: 2 + 5 = 7\nAnswer: 7"}
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert body["nestling"]["answer"] == "7" and body["nestling"]["steps"][0]["ok"] is True
    assert body["nestling"]["steps"][0]["status"] == "grounded" and body["nestling"]["marks"] == ["grounded"]
    assert body["nestling"]["complete"] is True and body["nestling"]["answer_derived"] is True
    cut = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "ramble"}], "max_tokens": 4}
    ).json()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 4


def test_chat_completions_streaming_with_usage(client):
    req = {
        "model": "tiny",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is 4 * 4?"}]}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(client.post("/v1/chat/completions", json=req).text)
    assert events[-1] == ("message", "[DONE]")
    chunks = [d for _, d in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == "Step 1: 4 * 4 = 16\nAnswer: 16"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(
        b"\n" + content.encode()
    )


def test_models_and_unknown_model(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    r = client.post(
        "/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 404 and "tiny" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"json": {}}, 422, "question"),
        ({"json": {"question": "hi", "max_tokens": 0}}, 422, "max_tokens"),
        ({"json": {"question": "hi", "max_tokens": 100_000}}, 422, "cap"),
        ({"json": {"question": "x" * 3000}}, 422, "3000 characters"),
        ({"json": {"question": "   "}}, 422, "empty"),
        ({"json": {"question": "hi", "bogus": 1}}, 422, "bogus"),
        ({"json": ["question"]}, 422, ""),
        ({"content": b'{"question": "' + b"x" * 20_000 + b'"}'}, 413, "body over"),
    ],
)
def test_malformed_requests_get_4xx_json(client, kwargs, status, fragment):
    r = client.post("/v1/answer", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["code"] == status


def test_body_limit_also_applies_without_content_length(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 1000

    r = client.post("/v1/answer", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_paths_and_methods_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = client.get("/v1/answer")
    assert r.status_code == 405 and "error" in r.json()
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
    assert chat.status_code == 422 and "user message" in chat.json()["error"]["message"]


def test_api_key_guards_the_api_but_not_health_or_the_page():
    app, _ = make_app(api_key="s3cret")
    with TestClient(app) as c:
        assert c.post("/v1/answer", json={"question": "What is 1 + 1?"}).status_code == 401
        wrong = c.post("/v1/answer", json={"question": "hi"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
        assert c.get("/metrics").status_code == 401 and c.get("/v1/models").status_code == 401
        ok = c.post(
            "/v1/answer", json={"question": "What is 1 + 1?"}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200 and ok.json()["answer"] == "2"
        assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("NESTLING_API_KEY", "from-env")
    monkeypatch.setenv("NESTLING_MAX_QUEUE", "3")
    s = load_settings(port=9000)
    assert s.api_key.get_secret_value() == "from-env" and s.max_queue == 3 and s.port == 9000
    assert s.host == "127.0.0.1"
    with pytest.raises(NestlingError, match="max_queue"):
        load_settings(max_queue=0)


def test_health_is_503_while_loading_then_200():
    release, loaded = threading.Event(), []

    def slow_loader(settings):
        release.wait(30)
        r = Reasoner(FakeEngine(), variant="fake-a", name="tiny")
        loaded.append(r)
        return r

    app = create_app(Settings(model_dir="unused"), loader=slow_loader)
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        busy = c.post("/v1/answer", json={"question": "What is 1 + 1?"})
        assert busy.status_code == 503 and busy.json()["error"]["type"] == "model_not_ready"
        release.set()
        for _ in range(3000):  # the load finishes on another thread; bounded wait for it
            if c.get("/health").status_code == 200:
                break
            threading.Event().wait(0.01)
        assert c.get("/health").json() == {
            "status": "ok",
            "model": "tiny",
            "engine": "fake",
            "variant": "fake-a",
        }
        assert c.post("/v1/answer", json={"question": "What is 1 + 1?"}).json()["answer"] == "2"
    assert loaded[0].engine.closed  # the app loaded it, so the app closes it


def test_a_failed_load_reports_and_calls_back():
    failures = []

    def broken(settings):
        raise NestlingError("model.gguf: sha256 does not match the manifest")

    app = create_app(Settings(model_dir="x"), loader=broken, on_load_failed=failures.append)
    with TestClient(app) as c:
        for _ in range(3000):
            if failures:
                break
            threading.Event().wait(0.01)
        r = c.get("/health")
        assert r.status_code == 503 and "sha256" in r.json()["error"]
    assert "sha256" in str(failures[0])


def test_no_model_dir_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NESTLING_MODEL_DIR", raising=False)
    with pytest.raises(NestlingError, match="NESTLING_MODEL_DIR"):
        create_app(Settings())


def test_overload_answers_429_and_503_and_recovers():
    gate = threading.Event()
    app, r = make_app(gate=gate, max_queue=2, queue_timeout_s=0.5)
    state = app.state.model
    results: dict[str, int] = {}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:

        def post(name: str, q: str) -> None:
            results[name] = c.post("/v1/answer", json={"question": q}).status_code

        first = threading.Thread(target=post, args=("first", "What is 1 + 2?"))
        first.start()
        assert r.engine.started.wait(10)  # the first request is inside the engine, held by the gate
        second = threading.Thread(target=post, args=("second", "What is 2 + 2?"))
        second.start()
        for _ in range(3000):
            if state.admitted == 2:
                break
            threading.Event().wait(0.01)
        third = c.post("/v1/answer", json={"question": "What is 3 + 3?"})
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        second.join(30)
        assert results["second"] == 503  # waited queue_timeout_s for the engine
        gate.set()
        first.join(30)
        assert results["first"] == 200
        assert c.post("/v1/answer", json={"question": "What is 5 + 5?"}).json()["answer"] == "10"
        metrics = c.get("/metrics").text
    assert 'nestling_requests_total{endpoint="/v1/answer",status="429"} 1' in metrics
    assert 'nestling_errors_total{endpoint="/v1/answer",status="503"} 1' in metrics
    assert state.admitted == 0


def test_metrics_count_requests_tokens_and_ttft(client):
    answers = [client.post("/v1/answer", json={"question": f"What is {i} + 1?"}).json() for i in range(3)]
    text = client.get("/metrics").text
    tokens = sum(a["latency"]["completion_tokens"] for a in answers)
    assert f"nestling_completion_tokens_total {tokens}" in text
    assert 'nestling_requests_total{endpoint="/v1/answer",status="200"} 3' in text
    assert "nestling_ttft_seconds_count 3" in text
    assert 'nestling_request_seconds_bucket{endpoint="/v1/answer",le="+Inf"} 3' in text
    assert "# TYPE nestling_ttft_seconds histogram" in text and "nestling_model_ready 1" in text


def test_openai_sdk_against_a_real_server():
    openai = pytest.importorskip("openai")
    app, _ = make_app(api_key="k")
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        msgs = [{"role": "user", "content": "What is 6 + 7?"}]
        done = client.chat.completions.create(model="tiny", messages=msgs)
        assert done.choices[0].message.content == "Step 1: 6 + 7 = 13\nAnswer: 13"
        assert done.choices[0].finish_reason == "stop" and done.usage.completion_tokens > 0
        stream = client.chat.completions.create(
            model="tiny", messages=msgs, stream=True, stream_options={"include_usage": True}, max_tokens=9
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Step 1: "  # 9 tokens: the opening newline (not sent) and 8 characters
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 9
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_answer_only_mode_via_the_explain_extension(client):
    req = {"messages": [{"role": "user", "content": "What is 2 + 9?"}], "explain": False}
    body = client.post("/v1/chat/completions", json=req).json()
    assert body["choices"][0]["message"]["content"] == "11" and body["nestling"]["steps"] == []


def test_cli_serve_exits_2_when_the_background_load_fails(tmp_path, capsys):
    import socket

    from nestling import cli as nestling_cli
    from serve_fakes import make_fake_export

    export = make_fake_export(tmp_path, variants={"gguf-x": "gguf"})
    (export / "gguf" / "gguf-x.bin").write_text("fake-model gguf-x\n" + "y" * 100)  # same size, new bytes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert nestling_cli.main(["serve", str(export), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert f"http://127.0.0.1:{port}" in captured.out
    last = captured.err.strip().split("\n")[-1]
    assert last.startswith("error: ") and "sha256 does not match" in last


def wait_for(condition, seconds: float = 30.0) -> bool:
    """Poll a condition another thread makes true; bounded, never a timing assumption."""
    done = threading.Event()
    for _ in range(int(seconds * 100)):
        if condition():
            return True
        done.wait(0.01)
    return condition()


def test_a_client_that_leaves_mid_stream_frees_its_engine_within_one_token():
    gate = threading.Semaphore(0)  # each release lets the engine make one token
    app, r = make_app(gate=gate, max_tokens_cap=5000)
    state = app.state.model
    counted = lambda: state.metrics.value(  # noqa: E731
        "nestling_requests_total", endpoint="/v1/answer", status="200"
    )
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        req = {"question": "ramble on", "stream": True, "max_tokens": 5000}
        with c.stream("POST", "/v1/answer", json=req) as resp:
            assert resp.status_code == 200
            for _ in range(3):
                gate.release()
            lines = resp.iter_lines()
            assert any(line.startswith("event: token") for line in lines)
        # the server notices the disconnect and its response ends (the middleware counts it)
        assert wait_for(lambda: counted() == 1)
        before = r.engine.yielded
        for _ in range(200):
            gate.release()
        assert wait_for(lambda: state.admitted == 0)
        assert r.engine.yielded - before <= 1  # the token it was making when the client left, no more
        assert c.post("/v1/answer", json={"question": "What is 1 + 2?"}).json()["answer"] == "3"


def test_a_stream_refused_by_the_engine_ends_with_a_4xx_error_event():
    class TooLong(FakeEngine):
        def stream(self, prompt_ids, max_tokens):
            raise NestlingError(f"{len(prompt_ids)} tokens exceed the context of 8; shorten the prompt")

    r = Reasoner(TooLong(), variant="fake-a", name="tiny", task="rg:basic_arithmetic")
    with TestClient(create_app(Settings(), reasoner=r)) as c:
        answer = sse_events(c.post("/v1/answer", json={"question": "q", "stream": True}).text)
        chat = c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}], "stream": True}
        )
    assert answer[-1][0] == "error" and answer[-1][1]["error"]["code"] == 422
    assert "exceed the context" in answer[-1][1]["error"]["message"]
    (_, err), (_, done) = sse_events(chat.text)[-2:]
    assert err["error"]["code"] == 422 and done == "[DONE]"


# ---- sampling, chat semantics, reasoning_content, queueing ---------------------------------------------

USER = [{"role": "user", "content": "What is 2 + 5?"}]


def test_ungrounded_steps_are_marked_apart_from_false_ones_on_both_endpoints(client):
    lucky = client.post("/v1/answer", json={"question": "lucky: 3 + 4?"}).json()
    assert [(s["ok"], s["status"]) for s in lucky["steps"]] == [(True, "ungrounded")]
    assert (lucky["verified"], lucky["complete"]) == (True, False)
    wrong = client.post("/v1/answer", json={"question": "a wrong one"}).json()
    assert [s["status"] for s in wrong["steps"]] == ["false", "unchecked"]
    msgs = [{"role": "user", "content": "lucky: 3 + 4?"}]
    ext = client.post("/v1/chat/completions", json={"messages": msgs}).json()["nestling"]
    assert ext["marks"] == ["ungrounded"] and ext["complete"] is False
    fixed = client.post("/v1/answer", json={"question": "lucky: 3 + 4?", "verify": 8, "seed": 0}).json()
    assert fixed["complete"] is True and fixed["steps"][0]["status"] == "grounded" and fixed["tries"] > 1
    with client.stream("POST", "/v1/chat/completions", json={"messages": msgs, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["nestling"]["marks"] == ["ungrounded"] and chunks[-1]["choices"][0]["finish_reason"]


def test_sampling_fields_are_honoured_on_both_endpoints(client):
    greedy = client.post("/v1/answer", json={"question": "a flaky one"}).json()
    assert greedy["answer"] == "64" and (greedy["verified"], greedy["tries"]) == (False, 1)

    def answer(s: int) -> str:
        return client.post(
            "/v1/answer", json={"question": "a flaky one", "temperature": 1.0, "seed": s}
        ).json()["answer"]

    def chat(s: int) -> str:
        msgs = [{"role": "user", "content": "a flaky one"}]
        body = {"messages": msgs, "temperature": 1.0, "seed": s}
        return client.post("/v1/chat/completions", json=body).json()["nestling"]["answer"]

    sampled = {s: answer(s) for s in range(10)}
    assert set(sampled.values()) == {"64", "72"}
    assert {s: chat(s) for s in sampled} == sampled  # the same sampler behind both endpoints
    stop = client.post("/v1/chat/completions", json={"messages": USER, "stop": "= 7"}).json()
    assert stop["choices"][0]["message"]["content"] == "Step 1: 2 + 5 "
    verified = client.post("/v1/answer", json={"question": "a flaky one", "verify": 8}).json()
    assert (verified["answer"], verified["verified"]) == ("72", True) and verified["tries"] > 1


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 1e9}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"seed": "42"}, "seed"),
        ({"stop": [str(i) for i in range(100)]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"n": 1000}, "n 1000"),
        ({"n": 2, "stream": True}, "n > 1"),
        ({"messages": []}, "messages"),
        ({"messages": USER * 10_000}, "body over"),
        ({"messages": USER * 65}, "messages"),
        (
            {
                "messages": [
                    {"role": "user", "content": "What is 1 + 1?"},
                    {"role": "assistant", "content": "2"},
                    *USER,
                ]
            },
            "earlier turns",
        ),
        ({"messages": [*USER, {"role": "assistant", "content": "7"}]}, "last message"),
        ({"reasoning_format": "html"}, "reasoning_format"),
        ({"presence_penalty": 0.5, "logprobs": True}, "logprobs, presence_penalty: not supported"),
    ],
)
def test_bad_chat_requests_get_4xx_json_never_5xx(client, extra, fragment):
    r = client.post("/v1/chat/completions", json={"messages": USER, **extra})
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["code"] == r.status_code


@pytest.mark.parametrize("extra", [{"temperature": -1}, {"seed": "x"}, {"stop": ["a"] * 100}, {"verify": 0}])
def test_bad_answer_requests_get_422(client, extra):
    r = client.post("/v1/answer", json={"question": "What is 1 + 1?", **extra})
    assert r.status_code == 422 and r.json()["error"]["code"] == 422


def test_system_messages_are_used_or_refused_never_dropped():
    app, _ = make_app()
    msgs = [{"role": "system", "content": "Be brief."}, *USER]
    with TestClient(app) as c:
        body = c.post("/v1/chat/completions", json={"messages": msgs}).json()
        assert body["nestling"]["question"] == "Be brief. What is 2 + 5?"
        app.dependency_overrides[get_settings] = lambda: Settings(system_messages="refuse")
        r = c.post("/v1/chat/completions", json={"messages": msgs})
        assert r.status_code == 422 and "system" in r.json()["error"]["message"]


def test_n_choices_with_seeds_seed_plus_i(client):
    req = {"messages": [{"role": "user", "content": "a flaky one"}], "n": 6, "temperature": 1.0, "seed": 0}
    body = client.post("/v1/chat/completions", json=req).json()
    contents = [c["message"]["content"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == list(range(6)) and len(set(contents)) == 2
    singles = [
        client.post("/v1/chat/completions", json={**req, "n": 1, "seed": i}).json()["choices"][0]["message"][
            "content"
        ]
        for i in range(6)
    ]
    assert singles == contents


def test_reasoning_content_holds_the_steps_and_content_the_answer(client):
    req = {"messages": [{"role": "user", "content": "a wrong one"}], "reasoning_format": "deepseek"}
    msg = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]
    assert msg == {
        "role": "assistant", "content": "64",
        "reasoning_content": "Step 1: 9 * 8 = 64\nStep 2: So the result is 64",
    }  # fmt: skip
    events = sse_events(client.post("/v1/chat/completions", json={**req, "stream": True}).text)
    deltas = [d["choices"][0]["delta"] for _, d in events[:-1] if d["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == msg["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == "64"
    plain = client.post("/v1/chat/completions", json={"messages": req["messages"]}).json()
    assert "reasoning_content" not in plain["choices"][0]["message"]  # the default is unchanged


def test_reasoning_format_server_default_and_answer_only_mode():
    app, _ = make_app(reasoning_format="deepseek")
    with TestClient(app) as c:
        msg = c.post("/v1/chat/completions", json={"messages": USER}).json()["choices"][0]["message"]
        assert (msg["content"], msg["reasoning_content"]) == ("7", "Step 1: 2 + 5 = 7")
        quick = c.post("/v1/chat/completions", json={"messages": USER, "explain": False}).json()
        assert quick["choices"][0]["message"] == {"role": "assistant", "content": "7"}
        none = c.post("/v1/chat/completions", json={"messages": USER, "reasoning_format": "none"}).json()
        assert none["choices"][0]["message"]["content"] == "Step 1: 2 + 5 = 7\nAnswer: 7"


def test_the_reasoning_splitter_never_leaks_a_split_answer_mark():
    from nestling.serve.routers.openai import ReasoningSplitter, split_reasoning

    text = "\nStep 1: An Answ is near\nStep 2: 3 + 4 = 7\nAnswer: 7"
    for size in (1, 2, 3, 7):
        s = ReasoningSplitter()
        out = [x for i in range(0, len(text), size) for x in s.feed(text[i : i + size])] + s.end()
        joined = {f: "".join(t for g, t in out if g == f) for f in ("reasoning_content", "content")}
        assert (joined["reasoning_content"], joined["content"]) == split_reasoning(text)
    assert split_reasoning("\nStep 1: cut sh") == ("Step 1: cut sh", "")


def test_requests_queue_for_a_free_engine_instead_of_being_refused():
    gate = threading.Event()
    engines = [FakeEngine(gate=gate), FakeEngine(gate=gate)]
    r = Reasoner(engines, variant="fake-a", name="tiny", task="rg:basic_arithmetic")
    app = create_app(Settings(max_queue=8), reasoner=r)
    state, results = app.state.model, {}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:

        def post(i: int) -> None:
            results[i] = c.post("/v1/answer", json={"question": f"What is {i} + 1?"})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        assert wait_for(lambda: state.admitted == 8)
        assert state.running == 2  # both engines busy, six wait in line
        refused = c.post("/v1/answer", json={"question": "What is 9 + 9?"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        gate.set()
        for t in threads:
            t.join(30)
    assert {i: x.json()["answer"] for i, x in results.items()} == {i: str(i + 1) for i in range(8)}
    assert state.admitted == 0 and state.metrics.value("nestling_queue_depth") == 0


def test_settings_are_a_dependency_tests_can_override(client):
    assert client.get("/v1/models").status_code == 200
    client.app.dependency_overrides[get_settings] = lambda: Settings(
        api_key="k", max_tokens_cap=4, default_max_tokens=4
    )
    assert client.get("/v1/models").status_code == 401
    auth = {"Authorization": "Bearer k"}
    r = client.post("/v1/answer", json={"question": "What is 1 + 1?", "max_tokens": 5}, headers=auth)
    assert r.status_code == 422 and "cap 4" in r.json()["error"]["message"]


def test_serve_flags_are_generated_from_the_settings(monkeypatch):
    import argparse

    from nestling.serve.settings import add_settings_args, settings_from_args

    p = argparse.ArgumentParser()
    add_settings_args(p, skip=("model_dir",))
    flags = {a.dest for a in p._actions} - {"help"}
    assert flags == set(Settings.model_fields) - {"model_dir"}
    monkeypatch.setenv("NESTLING_MAX_QUEUE", "5")
    monkeypatch.setenv("NESTLING_POOL", "3")
    s = settings_from_args(p.parse_args(["--pool", "2", "--reasoning-format", "deepseek"]))
    assert (s.pool, s.max_queue, s.reasoning_format) == (2, 5, "deepseek")  # a flag wins, env fills in
    with pytest.raises(NestlingError, match="verify"):
        settings_from_args(p.parse_args(["--verify", "0"]))
    assert "NESTLING_QUEUE_TIMEOUT_S" in p.format_help()


def test_fields_asking_for_nothing_are_accepted(client):
    extra = {"frequency_penalty": 0, "logprobs": False, "user": "u1", "response_format": {"type": "text"}}
    r = client.post("/v1/chat/completions", json={"messages": USER, **extra})
    assert r.status_code == 200 and r.json()["nestling"]["answer"] == "7"
