"""The export's human-facing files: an Ollama ``Modelfile`` and a model card (``README.md``).

modelfile("gguf/model-q8_0.gguf", "<|eos|>")    # FROM, TEMPLATE in the student prompt format, stop, temp 0
model_card(name, student_info, task, variants, ...)   # what it does, how it was distilled, accuracy, speed
"""

from __future__ import annotations

from typing import Any

from nestling.core.fmt import pct
from nestling.core.prompting import EXPLAIN_MARK, PROMPT_FORMAT


def modelfile(gguf_rel: str, eos_token: str | None) -> str:
    """Ollama Modelfile: the student's own prompt format, greedy, and stop at its eos."""
    lines = [
        f"FROM ./{gguf_rel}",
        "",
        "# nestling prompt format (" + PROMPT_FORMAT + "): the question, then the explain marker.",
        'TEMPLATE """Question: {{ .Prompt }}',
        f'{EXPLAIN_MARK}"""',
        "",
        "PARAMETER temperature 0",
        "PARAMETER top_k 1",
        "PARAMETER repeat_penalty 1.0",
        "PARAMETER num_predict 256",
    ]
    if eos_token:
        lines.append(f'PARAMETER stop "{eos_token}"')
    return "\n".join(lines) + "\n"


def _fmt(v: Any, as_pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if as_pct:
        return pct(v)
    if isinstance(v, float):
        return f"{v:,.{digits}g}" if abs(v) < 1 else f"{v:,.0f}"
    return str(v)


def model_card(
    name: str,
    student: dict[str, Any],
    task: str | None,
    variants: dict[str, dict[str, Any]],
    default_variant: str,
    pytorch: dict[str, Any],
    datacard: dict[str, Any] | None,
    prompt_source: str,
    n_prompts: int,
    threads: int = 1,
) -> str:
    """README.md for the export directory: what it is, how it was distilled, each variant, how to use it."""
    out = _card_intro(name, student, task)
    out += _card_provenance(datacard or {}, task, student)
    out += _card_variants(variants, default_variant, pytorch, prompt_source, n_prompts, threads)
    out += _card_usage(default_variant)
    return "\n".join(out) + "\n"


def _card_intro(name: str, student: dict[str, Any], task: str | None) -> list[str]:
    return [
        f"# {name}: a nestling student",
        "",
        f"A {student.get('params', 0) / 1e6:.1f}M-parameter {student.get('family', 'llama')} model"
        " distilled to answer"
        f" {('`' + task + '`') if task else 'its task'} questions with a short step-by-step explanation.",
        f"Prompt format `{PROMPT_FORMAT}`: `Question: <q>\\n{EXPLAIN_MARK}`; it writes `Step n: ...`"
        " lines and ends with `Answer: <a>`.",
        "",
    ]


def _card_provenance(dc: dict[str, Any], task: str | None, student: dict[str, Any]) -> list[str]:
    teacher = dc.get("teacher") or "unknown (no data card beside the student)"
    if isinstance(teacher, dict):
        teacher = teacher.get("spec") or teacher.get("name") or str(teacher)
    out = ["## How it was distilled", f"- Teacher: {teacher}", f"- Task: {task or 'unknown'}"]
    q = dc.get("questions") or {}
    if q:
        out.append(f"- Questions: {q.get('train', '?')} train, {q.get('heldout', '?')} held out")
    if "records" in dc:
        yld = dc.get("yield")
        yld_s = _fmt(yld, True) if isinstance(yld, float) else str(yld)
        acc_s = _fmt(dc.get("sample_accuracy"), True)
        out.append(
            f"- Teacher samples: {dc['records']} (per-sample accuracy {acc_s});"
            f" kept after verification and filters: {dc.get('kept', '?')} (yield {yld_s})"
        )
    base = (dc.get("trivial_baseline") or {}).get("heldout_accuracy")
    if base is not None:
        out.append(f"- Trivial baseline (most common answer) on held-out: {_fmt(base, True)}")
    sha = str(student.get("sha256", ""))[:12]
    return [*out, f"- Student: `{student.get('name')}` (sha256 of its files {sha}...)", ""]


def _card_variants(
    variants: dict[str, dict[str, Any]],
    default_variant: str,
    pytorch: dict[str, Any],
    prompt_source: str,
    n_prompts: int,
    threads: int,
) -> list[str]:
    out = [
        "## Accuracy and speed per variant",
        f"Held-out accuracy on {n_prompts} prompts ({prompt_source}); decode tokens/s, greedy, {threads}"
        f" thread{'s' if threads > 1 else ''}, on"
        " the export machine (other processes may have been running). Parity is against the PyTorch student.",
        "",
        "| variant | file | bytes | accuracy | vs PyTorch | greedy match | teacher-forced top-1"
        " | max abs logit diff | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| pytorch | model.safetensors | {_fmt(pytorch.get('bytes'))}"
        f" | {_fmt(pytorch.get('accuracy'), True)} | | | | | {_fmt(pytorch.get('tokens_per_s'))} |",
    ]
    for k, v in variants.items():
        p = v.get("parity", {})
        delta = v.get("accuracy_delta")
        star = " (default)" if k == default_variant else ""
        out.append(
            f"| {k}{star} | `{v['path']}` | {v['bytes']:,} | {_fmt(v.get('accuracy'), True)} |"
            f" {'n/a' if delta is None else f'{100 * delta:+.1f} pts'}"
            f" | {_fmt(p.get('greedy_match'), True)} |"
            f" {_fmt(p.get('teacher_forced_top1'), True)} | {p.get('max_abs_logit_diff', 0):.3g} |"
            f" {_fmt(v.get('tokens_per_s'))} |"
        )
    return [*out, ""]


def _card_usage(default_variant: str) -> list[str]:
    return [
        "## Use it",
        "```sh",
        f"nestling serve .            # the {default_variant} variant, explanations with checked steps",
        "ollama create nestling-student -f Modelfile && ollama run nestling-student 'What is 3 + 4?'",
        "```",
        "llama.cpp: `llama-cli -m gguf/model-q8_0.gguf --temp 0 --repeat-penalty 1.0 -p"
        f" $'Question: What is 3 + 4?\\n{EXPLAIN_MARK}'`.",
        "onnxruntime / optimum: `ORTModelForCausalLM.from_pretrained('onnx/fp32')`.",
        "",
        "## Limits",
        "A small model distilled from a small teacher: it is only as right as the rationales it learned from,"
        " and it cannot compute facts it never saw. Check the steps the runtime marks as wrong.",
        "",
        "Every file's sha256 is in `manifest.json`.",
    ]
