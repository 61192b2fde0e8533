"""A stand-in OpenAI-compatible teacher server on 127.0.0.1, in a thread or as its own process.

    with StandIn(mode="reasoning_content", latency=0.2) as srv:
        load_teacher(f"openai:m@{srv.url}")          # srv.url ends in /v1

It answers "a op b" questions (the last user message) right, with the chain where ``mode`` puts it:
``plain`` (steps in content), ``reasoning_content`` (vLLM, llama.cpp --reasoning-format deepseek),
``reasoning`` (Ollama) or ``think`` (``<think>chain</think>`` in content). ``script`` scripts the first
POSTs, one action each: an HTTP status (401, 429, 503, ...), "hang", "html", "garbage", "torn" (a chunked
body cut off mid-stream), "no_answer" (a chain and no final answer), "unclosed" (``<think>`` never closed),
"wrong" (a wrong answer); later requests are answered normally.

    python tests/teacher_fakes.py --port 8011 --latency 0.2 --mode plain    # as a process (benchmarks)
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("plain", "reasoning_content", "reasoning", "think")


def solve(question: str) -> tuple[str, str, int] | None:
    m = re.search(r"(-?\d+)\s*([-+*])\s*(-?\d+)", question)
    if not m:
        return None
    a, op, b = m.groups()
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    return f"{a} {op} {b}", op, value


def chain_for(question: str, wrong: bool = False) -> tuple[str, str]:
    """(free-form chain, final answer line): paragraphs and a bullet, no "Step n:", every claim true."""
    solved = solve(question)
    if solved is None:
        return "I do not know how to solve this.", "Answer: unknown"
    expr, _, value = solved
    value += 1 if wrong else 0
    chain = (
        f"Okay, the question asks for {expr}. Let me think about it carefully.\n\n"
        f"First I write the calculation out: {expr} = {value}.\n"
        f"- Check: {value} is what the calculation gives.\n\n"
        f"So the result is {value}."
    )
    return chain, f"Answer: {value}"


class StandIn:
    """ThreadingHTTPServer with keep-alive and a deep accept queue, so 64 clients connect at once."""

    def __init__(self, mode: str = "plain", latency: float = 0.0, script=(), port: int = 0):
        assert mode in MODES, mode
        self.mode, self.latency, self.script = mode, latency, list(script)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # ends every "hang" when the server closes
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes: with Nagle on, the client's delayed ACK held each reply
            # back ~40 ms (measured: 247 ms per request against a 200 ms latency).
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with outer.lock:
                    outer.requests.append({**body, "auth": self.headers.get("Authorization")})
                    action = outer.script.pop(0) if outer.script else "ok"
                if outer.latency:
                    time.sleep(outer.latency)
                outer.respond(self, body, action)

            def _send(self, status, obj, headers=()):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that hung up (a timeout, a test's abandoned request) is not news

        self.server = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def message(self, body: dict, action: str) -> tuple[dict, str]:
        question = body["messages"][-1]["content"]
        chain, answer = chain_for(question, wrong=action == "wrong")
        if action == "no_answer":
            answer = ""
        if action == "unclosed":
            return {"role": "assistant", "content": f"<think>\n{chain}"}, "length"
        if self.mode == "plain":
            return {"role": "assistant", "content": f"{chain}\n{answer}".strip()}, "stop"
        if self.mode == "think":
            return {"role": "assistant", "content": f"<think>\n{chain}\n</think>\n\n{answer}"}, "stop"
        return {"role": "assistant", "content": answer, self.mode: chain}, "stop"

    def respond(self, h: BaseHTTPRequestHandler, body: dict, action) -> None:
        if action == "hang":
            self.release.wait(60)
            return
        if isinstance(action, int):
            # retry-after-ms keeps the SDK's backoff short in tests; it honours the header.
            h._send(action, {"error": {"message": f"scripted {action}"}}, [("retry-after-ms", "5")])
            return
        if action in ("html", "garbage", "torn"):
            raw = {
                "html": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                "garbage": b'\x00\xff{"choices": [[[ not json',
                "torn": b'{"id": "x", "choices": [{"message": {"content": "Step 1',
            }[action]
            h.send_response(200)
            h.send_header("Content-Type", "text/html" if action == "html" else "application/json")
            if action == "torn":
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
                h.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")  # no final chunk: cut off
                h.wfile.flush()
                h.close_connection = True
                return
            h.send_header("Content-Length", str(len(raw)))
            h.end_headers()
            h.wfile.write(raw)
            return
        message, finish = self.message(body, action)
        text = f"{message.get(self.mode, '')} {message['content']}"
        h._send(
            200,
            {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "stand-in"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 0},
            },
        )

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PromptLogprobsStandIn(StandIn):
    """/v1/completions as vLLM answers ``prompt_logprobs``: per prompt token a {id: {logprob, rank,
    decoded_token}} dict of the top-k plus the token itself, None for the first. ``score(ids, k)`` gives,
    for each position t >= 1, the (id, logprob) pairs of the distribution of token t, most likely first
    (all of them, or at least k plus the prompt's token)."""

    def __init__(self, score, **kw):
        super().__init__(**kw)
        self.score = score

    def respond(self, h: BaseHTTPRequestHandler, body: dict, action) -> None:
        if "prompt" not in body or action != "ok":
            return super().respond(h, body, action)
        ids, k = list(body["prompt"]), int(body["prompt_logprobs"])
        entries: list[dict | None] = [None]
        for t, pairs in enumerate(self.score(ids, k), start=1):
            top = dict(pairs[:k])
            top.setdefault(ids[t], dict(pairs)[ids[t]])  # vLLM adds the prompt's own token
            entries.append({str(i): {"logprob": lp, "rank": 1, "decoded_token": ""} for i, lp in top.items()})
        choice = {"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": entries}
        h._send(200, {"id": "cmpl-standin", "object": "text_completion", "created": 0,
                      "model": body.get("model", "stand-in"), "choices": [choice]})  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description="stand-in OpenAI-compatible teacher server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--mode", default="plain", choices=MODES)
    a = p.parse_args()
    srv = StandIn(a.mode, a.latency, port=a.port)
    print(srv.url, flush=True)
    try:
        srv.thread.join()
    except KeyboardInterrupt:
        srv.close()


if __name__ == "__main__":
    main()
