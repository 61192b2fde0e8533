"""Every supported family: a tiny trained student exports to GGUF and ONNX that match PyTorch, tokenizes like
Hugging Face in llama.cpp, and each family rule of the GGUF writer is needed (leave one out: parity fails)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from families import FAMILY_NAMES, KINDS, TRICKY, build_family, family_texts, train_steps
from nestling.distill.students import FAMILIES, check_student_dir, init_student, save_student
from nestling.export import gguf_arch
from nestling.export.pipeline import ExportConfig, export_student

from nestling.core.errors import NestlingError
from nestling.core.prompting import student_prompt

PROMPTS = [("What is 3 + 4?", "7"), ("What is 8 + 1?", "9"), ("What is 5 + 5?", "10")]
FAST = ["onnx-fp32", "gguf-f16"]


@pytest.fixture(scope="session")
def family_student(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> a trained (8 full fine-tuning steps) tiny student directory, built once per session."""
    import torch

    torch.set_num_threads(1)
    texts = family_texts()
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            model, tok = build_family(family, texts)
            train_steps(model, tok, texts, steps=8)
            cache[family] = save_student(model, tok, tmp_path_factory.mktemp(family) / "model")
        return cache[family]

    return get


def _gguf_kv(path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.") and k not in skip}


def test_one_family_list_everywhere():
    assert set(FAMILIES) == set(gguf_arch.FAMILIES) == set(KINDS)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_exports_match_pytorch(family_student, tmp_path, family):
    """f16 GGUF and fp32 ONNX of a trained tiny student: exact greedy, logits within the export tolerances,
    llama.cpp and onnxruntime tokenize prompts, outputs and tricky strings exactly like HF."""
    student = family_student(family)
    out = tmp_path / "export"
    cfg = ExportConfig(student=str(student), out=str(out), variants=FAST, max_new_tokens=24, threads=1)
    m = export_student(cfg, prompts=PROMPTS)  # raises NestlingError on any parity failure
    for name in FAST:
        p = m["variants"][name]["parity"]
        assert p["tokenization_match"] == 1.0 and p["greedy_match_within_tol"] == 1.0
        assert p["max_abs_logit_diff"] <= p["logit_tol"]
    kv = _gguf_kv(out / "gguf" / "model-f16.gguf")
    fam, kind = gguf_arch.FAMILIES[family], KINDS[family]
    arch = kv["general.architecture"]
    assert arch == gguf_arch.gguf.MODEL_ARCH_NAMES[fam.arch]
    assert kv["tokenizer.ggml.model"] == ("llama" if kind.tokenizer == "spm" else "gpt2")
    if kind.tokenizer != "spm":
        assert kv["tokenizer.ggml.pre"] == ("llama-bpe" if family == "llama" else "qwen2")
    else:
        assert kv["tokenizer.ggml.add_space_prefix"] is kind.dummy_prefix
    assert kv["tokenizer.ggml.add_bos_token"] is (kind.bos is not None)
    assert kv[f"{arch}.attention.head_count_kv"] == 2 and kv[f"{arch}.attention.head_count"] == 4
    assert "Modelfile" in m["files"] and f'PARAMETER stop "{kind.eos}"' in (out / "Modelfile").read_text()
    assert (
        m["student"]["family"] == family and f"M-parameter {family} model" in (out / "README.md").read_text()
    )
    # The chat template llama.cpp server and Ollama render: the student's own prompt format, for every family.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(kv["tokenizer.chat_template"])
    rendered = template.render(messages=[{"role": "user", "content": " What is 3 + 4? "}], bos_token="<B>")
    assert rendered == ("<B>" if kind.bos else "") + student_prompt("What is 3 + 4?")


def test_gguf_carries_each_family_s_metadata(family_student, tmp_path):
    from nestling.export.gguf import write_gguf

    kv = _gguf_kv(write_gguf(family_student("gemma3_text"), tmp_path / "g.gguf"))
    assert kv["gemma3.attention.sliding_window"] == 16
    assert kv["gemma3.attention.key_length"] == 256  # as the released Gemma 3 models
    kv = _gguf_kv(write_gguf(family_student("qwen3"), tmp_path / "q.gguf"))
    assert kv["qwen3.attention.key_length"] == kv["qwen3.attention.value_length"] == 128
    from gguf import GGUFReader

    names = {t.name: t for t in GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert "blk.0.attn_q_norm.weight" in names and "output.weight" in names  # qwen3 test model is untied
    llama = {
        t.name: t for t in GGUFReader(str(write_gguf(family_student("llama"), tmp_path / "l.gguf"))).tensors
    }
    assert "rope_freqs.weight" in llama and "output.weight" not in llama  # Llama 3 scaling, tied head
    factors = llama["rope_freqs.weight"].data
    assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)
    phi = {
        t.name: t for t in GGUFReader(str(write_gguf(family_student("phi3"), tmp_path / "p.gguf"))).tensors
    }
    # llama.cpp's phi3 loader: fused qkv (q + 2 kv heads x 64) and a 2x-wide gate|up
    assert list(phi["blk.0.attn_qkv.weight"].shape) == [256, 256 + 2 * 2 * 64]
    assert list(phi["blk.0.ffn_up.weight"].shape) == [256, 2 * 512] and "blk.0.ffn_gate.weight" not in phi


def _drop_biases(monkeypatch: pytest.MonkeyPatch) -> None:
    import nestling.export.gguf as export_gguf

    load = export_gguf._load_tensors
    monkeypatch.setattr(
        export_gguf, "_load_tensors", lambda d: {k: v for k, v in load(d).items() if not k.endswith(".bias")}
    )


def _rule(family: str, **change) -> Callable[[pytest.MonkeyPatch], None]:
    def apply(monkeypatch: pytest.MonkeyPatch) -> None:
        entry = dataclasses.replace(gguf_arch.FAMILIES[family], **change)
        monkeypatch.setitem(gguf_arch.FAMILIES, family, entry)

    return apply


@pytest.mark.parametrize(
    ("family", "leave_out", "failure"),
    [
        ("qwen2", _drop_biases, "greedy tokens differ|logit diff"),  # q/k/v biases not written
        (
            "gemma3_text",
            _rule("gemma3_text", norm_offset=0.0),
            "greedy tokens differ|logit diff",
        ),  # w, not 1 + w
        (
            "phi3",
            _rule("phi3", permute_qk=True),
            "greedy tokens differ|logit diff",
        ),  # llama's rule on fused qkv
        ("qwen3", _rule("qwen3", permute_qk=True), "greedy tokens differ|logit diff"),
        ("llama", _rule("llama", permute_qk=False), "greedy tokens differ|logit diff"),
    ],
    ids=[
        "qwen2-biases",
        "gemma3-norm-offset",
        "phi3-no-permutation",
        "qwen3-no-permutation",
        "llama-permutation",
    ],
)
def test_leaving_out_a_family_rule_breaks_parity(
    family_student, tmp_path, monkeypatch, family, leave_out, failure
):
    leave_out(monkeypatch)
    cfg = ExportConfig(student=str(family_student(family)), out=str(tmp_path / "x"), variants=["gguf-f16"])
    with pytest.raises(NestlingError, match=f"export parity failed.*gguf-f16.*({failure})"):
        export_student(cfg, prompts=PROMPTS)
    assert not (tmp_path / "x").exists()


def test_a_wrong_pre_tokenizer_name_is_caught_by_parity(family_student, tmp_path):
    # Llama 3 groups digits by three, Qwen2 splits them one by one: the wrong name changes tokens silently.
    cfg = ExportConfig(
        student=str(family_student("llama")), out=str(tmp_path / "x"), variants=["gguf-f16"], gguf_pre="qwen2"
    )
    # Caught before any artifact, by the vocab-only check export runs first.
    with pytest.raises(NestlingError, match="GGUF export refused: .*'gpt2' tokenizer.* unlike Hugging Face"):
        export_student(cfg, prompts=PROMPTS)
    assert not (tmp_path / "x").exists()


def test_gemma3_values_llama_cpp_hard_codes_are_refused(family_student, tmp_path):
    from nestling.export.gguf import write_gguf

    student = tmp_path / "gemma"
    import shutil

    shutil.copytree(family_student("gemma3_text"), student)
    cfg = json.loads((student / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "sliding_attention"]
    (student / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NestlingError, match="every 6th layer global"):
        write_gguf(student, tmp_path / "out" / "g.gguf")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("gpt2", "nestling students are one of llama, mistral, qwen2, qwen3, gemma3_text, phi3"),
        ("pickle", "pickled weights are never loaded"),
        ("no-tokenizer", "no tokenizer.json"),
    ],
)
def test_bad_student_directories_get_one_line(family_student, tmp_path, how, message):
    import shutil

    student = tmp_path / "s"
    shutil.copytree(family_student("qwen2"), student)
    if how == "gpt2":
        cfg = json.loads((student / "config.json").read_text())
        (student / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    elif how == "pickle":
        (student / "model.safetensors").rename(student / "pytorch_model.bin")
    else:
        (student / "tokenizer.json").unlink()
    for call in (lambda: check_student_dir(student), lambda: init_student(f"hf:{student}")):
        with pytest.raises(NestlingError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


def test_pretrained_family_student_loads_and_prunes(family_student):
    """hf:DIR of a non-llama family is a pretrained student: loaded, pruned (Gemma's layer_types follow)."""
    model, tok = init_student(f"hf:{family_student('gemma3_text')}?keep_layers=1")
    assert model.config.model_type == "gemma3_text" and len(model.model.layers) == 1
    assert model.config.layer_types == ["sliding_attention"]
    assert tok.eos_token == "<eos>"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tricky_strings_tokenize_alike_in_llama_cpp(family_student, tmp_path, family):
    from nestling.export.gguf import write_gguf
    from nestling.serve.engines import load_engine
    from transformers import AutoTokenizer

    student = family_student(family)
    tok = AutoTokenizer.from_pretrained(student)
    e = load_engine(write_gguf(student, tmp_path / "m.gguf"), kind="gguf")
    try:
        texts = TRICKY + [t + tok.eos_token + " after" for t in TRICKY[:3]]  # special tokens inside text
        assert [e.tokenize(t) for t in texts] == [tok(t)["input_ids"] for t in texts]
    finally:
        e.close()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_trained_by_the_recipe_exports_every_variant_and_answers(family_student, tmp_path, family):
    """The whole path for each family: `nestling train` (full fine-tune, a few steps) on a run's traces,
    every export variant, transformers reading our f16 GGUF, and the Reasoner answering from the export."""
    import torch
    from fake_run import make_run
    from nestling.distill.students import load_student
    from nestling.distill.train import TrainConfig, train
    from nestling.serve.runtime import Reasoner
    from transformers import AutoModelForCausalLM

    from nestling.core.prompting import student_prompt

    run = make_run(tmp_path / "run", n=60, heldout=10)
    cfg = TrainConfig(
        run=str(run),
        student=f"hf:{family_student(family)}",
        name=family,
        steps=4,
        batch_size=4,
        lr=1e-3,
        threads=1,
        progress=False,
        checkpoint_every=0,
    )
    student = train(cfg) / "model"
    out = tmp_path / "export"
    m = export_student(ExportConfig(student=str(student), out=str(out), parity_prompts=4, max_new_tokens=24))
    assert set(m["variants"]) == {"onnx-fp32", "onnx-int8", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"}
    for name, v in m["variants"].items():
        assert v["parity"]["tokenization_match"] == 1.0, name
        assert v["parity"]["teacher_forced_top1"] >= (1.0 if name in FAST else 0.5), name

    # transformers 4.57 maps a llama-arch GGUF whose name contains "mistral" to a "mistral" arch that gguf-py
    # 0.19 does not list, and refuses it: our Mistral student is named "mistral", so that check is skipped.
    if family != "mistral":
        model, tok = load_student(student)
        gg = AutoModelForCausalLM.from_pretrained(out / "gguf", gguf_file="model-f16.gguf")
        ids = torch.tensor([tok(student_prompt("What is 5 + 3?") + "\nStep 1: 5 + 3 = 8")["input_ids"]])
        with torch.inference_mode():
            a, b = model(ids).logits, gg(ids).logits
        assert torch.equal(a.argmax(-1), b.argmax(-1))  # transformers undoes our conventions: same model

    for engine in ("gguf", "onnx"):
        r = Reasoner.load(out, engine=engine)
        answer = r.ask("What is 2 + 3?", max_tokens=24)
        assert answer.latency.engine == engine and answer.latency.prompt_tokens > 0
        want = list(r.engine.stream(r.engine.tokenize(student_prompt("What is 2 + 3?")), 24))
        assert answer.text.strip() == r.engine.detokenize(want).strip() or answer.stopped_by != "eos"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "phi3"])
def test_llama_cpp_server_renders_the_chat_template_into_the_student_prompt(family_student, tmp_path, family):
    """A chat request to llama.cpp's server (which renders the GGUF's template) answers exactly as the
    completion of the student prompt does: the template is right for this family's tokenizer and specials."""
    import httpx
    from nestling.export.gguf import write_gguf
    from peers import llama_cpp_server

    path = write_gguf(family_student(family), tmp_path / "m.gguf")
    q = "What is 3 + 4?"
    greedy = {"max_tokens": 16, "temperature": 0, "top_k": 1, "repeat_penalty": 1.0}
    with llama_cpp_server(path, tmp_path / "server.log", n_ctx=256) as url:
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": q}], **greedy},
            timeout=60,
        ).json()
        plain = httpx.post(
            f"{url}/v1/completions", json={"prompt": student_prompt(q), **greedy}, timeout=60
        ).json()
    assert chat["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
