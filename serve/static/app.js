// The nestling page: POST /v1/answer with stream=true, read server-sent events from the fetch body, show
// tokens as they arrive, then the steps marked against the question, and the latency.
"use strict";
const $ = (id) => document.getElementById(id);
// A step's status (core.explain): an ungrounded step is right arithmetic on a number the question never
// stated and no earlier step derived, so it is shown apart from a false one.
const MARK = {
  grounded: ["\u2713", "ok", "checks out and uses the question's numbers"],
  false: ["\u2717", "bad", "a calculation is wrong"],
  ungrounded: ["?", "ungrounded", "a number from nowhere"],
  unchecked: ["\u00b7", "unchecked", "nothing to check"],
};
const BY_OK = { true: "grounded", false: "false", null: "unchecked" }; // a server without step statuses
const VERDICT = { true: "explanation complete: every step follows from the question to the answer",
                  false: "explanation incomplete", null: "" };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function health() {
  try {
    const r = await fetch("/health");
    const j = await r.json();
    $("model").textContent = r.ok ? `${j.model} · ${j.variant} (${j.engine})` : `${j.status}…`;
    if (!r.ok) setTimeout(health, 1000);
  } catch (e) { $("model").textContent = "unreachable"; }
}

function showAnswer(a, clientTtft) {
  const ol = $("steps");
  ol.innerHTML = "";
  for (const s of a.steps) {
    const [sym, cls, title] = MARK[s.status] || MARK[BY_OK[String(s.ok)]];
    const li = document.createElement("li");
    li.className = "step " + cls;
    li.title = s.reason ? `${title}: ${s.reason}` : title;
    li.textContent = `${sym} ${s.text}` +
      (s.corrected_from != null ? ` (calculator: the model wrote ${s.corrected_from})` : "");
    ol.appendChild(li);
  }
  $("answer").textContent = "Answer: " + (a.answer ?? "(none)");
  const verdict = a.steps.length ? VERDICT[String(a.complete ?? null)] : "";
  $("verdict").textContent = verdict && a.complete === false && a.answer_derived === false
    ? verdict + " (the answer is not the steps' last result)" : verdict;
  $("verdict").className = a.complete ? "ok" : "unchecked";
  const l = a.latency;
  $("latency").textContent =
    `time to first token ${(1000 * l.ttft_s).toFixed(1)} ms · total ${(1000 * l.total_s).toFixed(1)} ms · ` +
    `${l.prompt_tokens} prompt + ${l.completion_tokens} completion tokens · ${l.tokens_per_s.toFixed(0)} tokens/s · ` +
    `${l.variant} (${l.engine}) · in the browser: first token after ${clientTtft.toFixed(0)} ms` +
    (a.finish_reason === "length" ? " · cut at max tokens" : "");
}

async function ask(ev) {
  ev.preventDefault();
  for (const id of ["live", "answer", "verdict", "latency", "error"]) $(id).textContent = "";
  $("steps").innerHTML = "";
  $("go").disabled = true;
  const t0 = performance.now();
  let firstAt = null;
  try {
    // The calculator corrects text before it is shown, so its answer comes whole, not as a stream.
    const calculator = $("calculator").checked;
    const body = { question: $("question").value, explain: $("explain").checked, stream: !calculator };
    if (calculator) body.calculator = true;
    const n = parseInt($("max_tokens").value, 10);
    if (n > 0) body.max_tokens = n;
    const r = await fetch("/v1/answer", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      throw new Error(`${r.status}: ${(j.error && j.error.message) || r.statusText}`);
    }
    if (calculator) {
      const a = await r.json();
      $("live").textContent = a.text.replace(/^\n+/, "");
      showAnswer(a, performance.now() - t0);
      return;
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const raw = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let event = "message", data = "";
        for (const line of raw.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (!data) continue; // a keep-alive comment (": ping"), not an event
        const msg = JSON.parse(data);
        if (event === "token") {
          if (firstAt === null) firstAt = performance.now() - t0;
          const live = $("live");
          live.textContent += live.textContent ? msg.text : msg.text.replace(/^\n+/, "");
        } else if (event === "answer") {
          showAnswer(msg, firstAt ?? performance.now() - t0);
        } else if (event === "error") {
          throw new Error(msg.error.message);
        }
      }
    }
  } catch (e) {
    $("error").textContent = String(e.message || e);
  } finally {
    $("go").disabled = false;
  }
}

$("ask").addEventListener("submit", ask);
health();
