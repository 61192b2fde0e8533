"""SentencePiece-style students (what transformers makes of the Gemma, Llama 2, Mistral, Phi-3 and TinyLlama
GGUFs people download) export to GGUF exactly: Unigram as llama.cpp's "t5" (UGM), byte-fallback BPE as its
"llama" (SPM); and what cannot be written is refused at second 0, before any artifact."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from families import KINDS, LLAMA2, SPM, TRICKY, UNIGRAM, Kind, build_family, family_texts, train_steps
from nestling.distill.students import save_student
from nestling.export.gguf import check_gguf_writable, write_gguf
from nestling.export.pipeline import VARIANTS, ExportConfig, export_student, preflight

from nestling.core.errors import NestlingError

PROMPTS = [("What is 3 + 4?", "7"), ("What is 8 + 1?", "9")]
FAST = ["onnx-fp32", "gguf-f16"]
# family x tokenizer kind: a Gemma 3 GGUF read by transformers (Unigram, no '▁' prefix), a Llama 2-era one
# (Unigram with the prefix), and Llama 2 / TinyLlama's own tokenizer.json (byte-fallback BPE).
CASES: dict[str, tuple[str, Kind]] = {
    "gemma3-unigram": ("gemma3_text", dataclasses.replace(KINDS["gemma3_text"], tokenizer=UNIGRAM)),
    "llama2-unigram": ("llama", dataclasses.replace(LLAMA2, tokenizer=UNIGRAM)),
    "llama2-spm-bpe": ("llama", LLAMA2),
    # Phi-3 as released: Llama 2's sentencepiece BPE with byte fallback, '▁' prefix, rstrip on </s>, <|end|>.
    "phi3-spm-bpe": ("phi3", KINDS["phi3"]),
}
# Beyond the parity probes: runs of spaces, a leading tab, accents, digits glued to words.
MORE = ["a  b   c", " x", "\tx", "x\n\n\ny", "café 3x4 Ünï", "end ", "\n"]
# llama.cpp's UGM prepends its '▁' only before the first non-space character: a text of spaces alone gets
# none, where HF's Prepend normalizer adds it. The one known difference for a Unigram with a '▁' prefix.
SPACES_ONLY = "   "
NOT_IN_VOCAB = "Ωжψ✓"  # never in the training texts


@pytest.fixture(scope="session")
def spm_student(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """case -> a trained (8 steps) tiny student whose vocabulary holds every probe character."""
    import torch

    torch.set_num_threads(1)
    texts = family_texts() + TRICKY * 3 + MORE * 3
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            family, kind = CASES[case]
            model, tok = build_family(family, texts, kind=kind)
            train_steps(model, tok, texts, steps=8)
            cache[case] = save_student(model, tok, tmp_path_factory.mktemp(case) / "model")
        return cache[case]

    return get


def _kv(path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("case", CASES)
def test_gguf_tokenizer_metadata(spm_student, tmp_path, case):
    student = spm_student(case)
    _, kind = CASES[case]
    tj = json.loads((student / "tokenizer.json").read_text())
    kv = _kv(write_gguf(student, tmp_path / "m.gguf", vocab_only=True))
    unigram = kind.tokenizer == UNIGRAM
    assert kv["tokenizer.ggml.model"] == ("t5" if unigram else "llama")
    assert "tokenizer.ggml.pre" not in kv
    assert kv["tokenizer.ggml.add_space_prefix"] is kind.dummy_prefix
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    unk = tokens.index(kind.unk)
    assert kv["tokenizer.ggml.unknown_token_id"] == unk and types[unk] == 2  # UNKNOWN
    assert [types[tokens.index(s)] for s in kind.specials if s != kind.unk] == [3] * (len(kind.specials) - 1)
    assert sum(t == 6 for t in types) == 256 and types[tokens.index("<0x0A>")] == 6  # BYTE
    assert kv["tokenizer.ggml.bos_token_id"] == tokens.index(kind.bos)
    assert kv["tokenizer.ggml.eos_token_id"] == tokens.index(kind.eos)
    scores = np.array(kv["tokenizer.ggml.scores"])
    if unigram:  # the Unigram log-probabilities, which UGM's Viterbi sums
        want = np.array([s for _, s in tj["model"]["vocab"]], dtype=np.float32)
        assert np.array_equal(scores[: len(want)], want) and scores.min() < -3
    else:  # a piece made by merge r scores -r
        assert scores.max() == 0.0 and len(set(scores.tolist())) > 100


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_tokenizes_exactly_like_hf(spm_student, tmp_path, case):
    from nestling.serve.engines import load_engine
    from transformers import AutoTokenizer

    student = spm_student(case)
    tok = AutoTokenizer.from_pretrained(student)
    texts = TRICKY + MORE + [t + tok.eos_token + " after" for t in TRICKY[:3]]
    if CASES[case][1].tokenizer == SPM:
        texts += [NOT_IN_VOCAB, f"x {NOT_IN_VOCAB}y"]  # byte fallback, as HF
        assert tok.convert_ids_to_tokens(tok(NOT_IN_VOCAB)["input_ids"])[2].startswith("<0x")
    kind = CASES[case][1]
    e = load_engine(write_gguf(student, tmp_path / "m.gguf"), kind="gguf")
    try:
        assert [e.tokenize(t) for t in texts] == [tok(t)["input_ids"] for t in texts]
        if kind.tokenizer == UNIGRAM and kind.dummy_prefix:
            assert e.tokenize(SPACES_ONLY) != tok(SPACES_ONLY)["input_ids"]
        else:
            assert e.tokenize(SPACES_ONLY) == tok(SPACES_ONLY)["input_ids"]
        ids = tok(TRICKY[5])["input_ids"]  # bos first: llama-cpp-python drops the '▁' prefix after it
        assert e.detokenize(ids) == tok.decode(ids, skip_special_tokens=True) == TRICKY[5]
    finally:
        e.close()


def test_unigram_character_outside_the_vocab_is_refused(spm_student):
    """UGM has no byte fallback: llama.cpp gives <unk> where HF gives the bytes. The check says so, naming
    the text, instead of shipping a GGUF that tokenizes differently."""
    student = spm_student("gemma3-unigram")
    assert check_gguf_writable(student, texts=MORE) == "t5"
    with pytest.raises(NestlingError, match="'t5' tokenizer.*cannot be written as GGUF exactly") as e:
        check_gguf_writable(student, texts=[f"x {NOT_IN_VOCAB}"])
    assert "\n" not in str(e.value) and NOT_IN_VOCAB in str(e.value)


def _metaspace_student(src: Path, dst: Path, scheme: str, split: bool = False) -> Path:
    """`src` with its Prepend/Replace normalizer swapped for a Metaspace pre-tokenizer (what transformers
    writes for a non-legacy Llama tokenizer: prepend_scheme "first", split false)."""
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    tj["normalizer"] = None
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": split}
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


@pytest.mark.parametrize("case", ["llama2-spm-bpe", "llama2-unigram"])
def test_metaspace_never_is_exact_without_a_space_prefix(spm_student, tmp_path, case):
    """prepend_scheme "never" (split false) is llama.cpp's add_space_prefix=false: every probe identical."""
    from nestling.serve.engines import load_engine
    from transformers import AutoTokenizer

    student = _metaspace_student(spm_student(case), tmp_path / "s", "never")
    tok = AutoTokenizer.from_pretrained(student)
    texts = (
        TRICKY + MORE + [SPACES_ONLY] + [t + tok.eos_token + s for t in TRICKY[:3] for s in (" after", "x")]
    )
    path = write_gguf(student, tmp_path / "m.gguf")
    assert _kv(path)["tokenizer.ggml.add_space_prefix"] is False
    e = load_engine(path, kind="gguf")
    try:
        same = [e.tokenize(t) == tok(t)["input_ids"] for t in texts]
    finally:
        e.close()
    assert sum(same) == len(texts) == 27, [t for t, ok in zip(texts, same, strict=True) if not ok]
    assert check_gguf_writable(student) in ("llama", "t5")


@pytest.mark.parametrize("scheme", ["first", "always"])
@pytest.mark.parametrize("case", ["llama2-spm-bpe", "llama2-unigram"])
def test_metaspace_that_prepends_is_refused_because_llama_cpp_differs(
    spm_student, tmp_path, monkeypatch, case, scheme
):
    """ "first" and "always" prepend no '▁' before a leading space (and "first" none after a special token);
    llama.cpp's add_space_prefix always does. Written anyway, llama.cpp differs exactly there; so both are
    refused, naming the scheme."""
    from nestling.export import gguf as gguf_mod
    from nestling.serve.engines import load_engine
    from transformers import AutoTokenizer

    student = _metaspace_student(spm_student(case), tmp_path / "s", scheme)
    with pytest.raises(
        NestlingError, match=f"prepend_scheme '{scheme}'.*cannot be written as GGUF exactly"
    ) as e:
        check_gguf_writable(student)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(gguf_mod, "metaspace_problem", lambda *a: None)  # what writing it would give
    tok = AutoTokenizer.from_pretrained(student)
    eng = load_engine(write_gguf(student, tmp_path / "m.gguf"), kind="gguf")
    try:
        assert eng.tokenize("x y") == tok("x y")["input_ids"]
        assert eng.tokenize(" x") != tok(" x")["input_ids"]
        after = f"x{tok.eos_token}y"
        assert (eng.tokenize(after) == tok(after)["input_ids"]) is (scheme == "always")
    finally:
        eng.close()


def test_metaspace_split_is_refused_when_a_piece_spans_words(spm_student, tmp_path):
    student = _metaspace_student(spm_student("llama2-spm-bpe"), tmp_path / "s", "never", split=True)
    with pytest.raises(NestlingError, match="split=true never forms pieces such as"):
        check_gguf_writable(student)


def test_phi3_gguf_student_without_byte_fallback_is_refused_at_once(tmp_path, capsys):
    """transformers reads a Phi-3 GGUF into a BPE with no byte fallback, normalizer or pre-tokenizer: it
    drops spaces and every character outside the vocabulary, which no llama.cpp tokenizer does. Refused
    at second 0 with that reason, nothing written."""
    import torch
    from nestling import cli as nestling_cli
    from nestling.distill.students import init_student

    torch.set_num_threads(1)
    texts = family_texts() + TRICKY * 3
    model, tok = build_family("phi3", texts)
    released = write_gguf(save_student(model, tok, tmp_path / "src" / "model"), tmp_path / "g" / "phi3.gguf")
    student = save_student(*init_student(f"gguf:{released}"), tmp_path / "student" / "model")
    tj = json.loads((student / "tokenizer.json").read_text())
    assert (
        tj["model"]["type"] == "BPE" and not tj["model"].get("byte_fallback") and tj["pre_tokenizer"] is None
    )
    from transformers import AutoTokenizer

    assert "▁" not in "".join(
        AutoTokenizer.from_pretrained(student).tokenize("What is 3 + 4?")
    )  # spaces gone
    out = tmp_path / "exports" / "x"
    capsys.readouterr()  # what loading the GGUF printed
    t0 = time.perf_counter()
    rc = nestling_cli.main(["export", str(student), "--out", str(out)])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert rc == 2 and seconds < 5, (rc, seconds)
    assert "neither byte fallback nor a byte-level pre-tokenizer" in err and "\n" not in err
    assert "--variants onnx-fp32 onnx-int8" in err and not out.parent.exists()


def _wordpiece_student(src: Path, dst: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    shutil.copytree(src, dst)
    vocab = json.loads((src / "tokenizer.json").read_text())["added_tokens"]
    wp = Tokenizer(models.WordPiece({a["content"]: a["id"] for a in vocab}, unk_token="<unk>"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.save(str(dst / "tokenizer.json"))
    return dst


@pytest.mark.parametrize("how", ["wordpiece", "config", "metaspace-first"])
def test_unwritable_student_is_refused_at_second_zero(spm_student, tmp_path, capsys, how):
    from nestling import cli as nestling_cli

    student = tmp_path / "student"
    if how == "wordpiece":
        _wordpiece_student(spm_student("llama2-spm-bpe"), student)
        message = "WordPiece tokenizer"
    elif how == "metaspace-first":
        _metaspace_student(spm_student("llama2-spm-bpe"), student, "first")
        message = "Metaspace prepend_scheme 'first'"
    else:
        shutil.copytree(spm_student("gemma3-unigram"), student)
        cfg = json.loads((student / "config.json").read_text())
        (student / "config.json").write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
        message = "final_logit_softcapping"
    out = tmp_path / "exports" / "x"
    t0 = time.perf_counter()
    rc = nestling_cli.main(["export", str(student), "--out", str(out)])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert rc == 2 and seconds < 5, (rc, seconds)
    assert err.startswith("error: GGUF export refused") and message in err and "\n" not in err
    assert "--variants onnx-fp32 onnx-int8" in err
    assert not out.parent.exists() or not list(out.parent.iterdir())  # nothing written, no tmp dir
    # Skipping GGUF knowingly passes the check (the ONNX export itself is exercised elsewhere).
    preflight(ExportConfig(student=str(student), out=str(out), variants=["onnx-fp32", "onnx-int8"]))
    with pytest.raises(NestlingError, match=message):  # a quantized GGUF needs the f16 one: refused too
        preflight(ExportConfig(student=str(student), out=str(out), variants=["gguf-q8_0"]))


@pytest.mark.parametrize("case", CASES)
def test_every_variant_exports_with_parity_and_reasoner_answers(spm_student, tmp_path, case):
    """All five variants: tokenization as HF, f16 GGUF and fp32 ONNX greedy and logits as PyTorch, the
    quantized ones close; the Reasoner answers from the GGUF export as llama.cpp's own greedy decoding."""
    from nestling.serve.runtime import Reasoner

    from nestling.core.prompting import student_prompt

    out = tmp_path / "export"
    cfg = ExportConfig(student=str(spm_student(case)), out=str(out), max_new_tokens=24)
    m = export_student(cfg, prompts=PROMPTS)  # raises NestlingError on any parity failure
    assert set(m["variants"]) == set(VARIANTS)
    for name, v in m["variants"].items():
        p = v["parity"]
        assert p["tokenization_match"] == 1.0, name
        assert p["teacher_forced_top1"] >= (1.0 if name in FAST else 0.5), name
        if name in FAST:
            assert p["greedy_match_within_tol"] == 1.0 and p["max_abs_logit_diff"] <= p["logit_tol"], name
    r = Reasoner.load(out, engine="gguf")
    answer = r.ask("What is 2 + 3?", max_tokens=16)
    want = list(r.engine.stream(r.engine.tokenize(student_prompt("What is 2 + 3?")), 16))
    assert answer.latency.engine == "gguf" and answer.latency.prompt_tokens > 0
    assert answer.text.strip() == r.engine.detokenize(want).strip() or answer.stopped_by != "eos"


def test_student_taken_from_a_gemma3_gguf_ships_back_as_gguf(tmp_path, caplog):
    """The issue's path, without a download: a Gemma 3 model with a sentencepiece vocabulary written as GGUF
    ("llama" SPM, as released), taken as a `gguf:FILE` student (transformers turns its vocabulary into a
    byte-fallback Unigram tokenizer.json), exports to every variant with parity, its tokenizer as "t5"."""
    import torch

    torch.set_num_threads(1)
    texts = family_texts() + TRICKY * 3
    model, tok = build_family("gemma3_text", texts)
    train_steps(model, tok, texts, steps=4)
    released = write_gguf(save_student(model, tok, tmp_path / "src" / "model"), tmp_path / "g" / "gemma.gguf")
    assert _kv(released)["tokenizer.ggml.model"] == "llama"
    student = _trained_student_from(released, tmp_path / "run")
    tj = json.loads((student / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "Unigram" and tj["model"]["byte_fallback"] is True
    out = tmp_path / "export"
    with caplog.at_level("INFO", logger="nestling.export.gguf"):
        m = export_student(
            ExportConfig(student=str(student), out=str(out), max_new_tokens=24), prompts=PROMPTS
        )
    # transformers' Gemma conversion renames the byte piece <0x09> to "\t": not the same tokens, so the
    # source's fields are not carried; the export derives them and says why.
    assert "not carried over (the source has token 13 is '<0x09>'" in caplog.text
    assert set(m["variants"]) == set(VARIANTS)
    for name in FAST:
        p = m["variants"][name]["parity"]
        assert p["tokenization_match"] == 1.0 and p["greedy_match_within_tol"] == 1.0, name
    assert _kv(out / "gguf" / "model-q8_0.gguf")["tokenizer.ggml.model"] == "t5"


def _trained_student_from(released: Path, run: Path) -> Path:
    """What `nestling train --student gguf:FILE` leaves: RUN/students/NAME/model and a train manifest naming
    the source (training itself is not what is tested here)."""
    from nestling.distill.students import init_student

    from nestling.core.manifest import write_manifest

    student = save_student(*init_student(f"gguf:{released}"), run / "students" / "s" / "model")
    write_manifest(student.parent, stage="train", files=["model"], student={"source": f"gguf:{released}"})
    return student


def _released_spm_gguf(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Llama 2-style GGUF as released: sentencepiece scores (not merge ranks: here 0.25 * -rank - 2, in the
    same order) that transformers turns into BPE merges, written with gguf-py's GGUFWriter."""
    import torch
    from nestling.export import gguf as gguf_mod

    torch.set_num_threads(1)
    texts = family_texts() + TRICKY * 3 + MORE * 3
    model, tok = build_family("llama", texts, kind=LLAMA2)
    ranks = gguf_mod._merge_scores
    with monkeypatch.context() as m:
        m.setattr(
            gguf_mod, "_merge_scores", lambda names, merges: [0.25 * s - 2 for s in ranks(names, merges)]
        )
        return write_gguf(save_student(model, tok, root / "src" / "model"), root / "g" / "llama2.gguf")


def test_tokenizer_fields_carried_over_from_the_source_gguf(tmp_path, monkeypatch, caplog):
    """A student from `gguf:FILE` exports with the source's scores and types (not re-derived merge ranks),
    checked first against its tokenizer.json, and llama.cpp still tokenizes every probe exactly as HF."""
    from nestling.export.gguf import source_gguf
    from nestling.serve.engines import load_engine
    from transformers import AutoTokenizer

    released = _released_spm_gguf(tmp_path, monkeypatch)
    student = _trained_student_from(released, tmp_path / "run")
    assert source_gguf(student) == released
    src, derived = _kv(released), _kv(write_gguf(student, tmp_path / "derived.gguf", vocab_only=True))
    assert src["tokenizer.ggml.scores"] != derived["tokenizer.ggml.scores"]  # what carrying changes
    with caplog.at_level("INFO", logger="nestling.export.gguf"):
        path = write_gguf(student, tmp_path / "m.gguf", source=source_gguf(student))
    assert "tokenizer scores, types carried over from" in caplog.text
    kv = _kv(path)
    for key in ("scores", "token_type", "tokens", "add_space_prefix", "add_bos_token", "bos_token_id"):
        assert kv[f"tokenizer.ggml.{key}"] == src[f"tokenizer.ggml.{key}"], key
    assert kv["tokenizer.ggml.model"] == "llama"
    tok = AutoTokenizer.from_pretrained(student)
    texts = (
        TRICKY
        + MORE
        + [NOT_IN_VOCAB, f"x {NOT_IN_VOCAB}y"]
        + [t + tok.eos_token + " after" for t in TRICKY[:3]]
    )
    e = load_engine(path, kind="gguf")
    try:
        same = [e.tokenize(t) == tok(t)["input_ids"] for t in texts]
    finally:
        e.close()
    assert sum(same) == len(texts) == 25, [t for t, ok in zip(texts, same, strict=True) if not ok]
    assert check_gguf_writable(student, source=released) == "llama"


def test_source_gguf_that_does_not_match_is_logged_and_derived(tmp_path, monkeypatch, caplog):
    """Another vocabulary (or a changed flag) in the source: nothing is carried, the reason is logged."""
    import torch

    released = _released_spm_gguf(tmp_path, monkeypatch)
    student = _trained_student_from(released, tmp_path / "run")
    derived = _kv(write_gguf(student, tmp_path / "derived.gguf", vocab_only=True))
    torch.set_num_threads(1)
    model, tok = build_family("llama", family_texts()[:50], kind=LLAMA2)
    other = write_gguf(save_student(model, tok, tmp_path / "o" / "model"), tmp_path / "o" / "other.gguf")
    with caplog.at_level("INFO", logger="nestling.export.gguf"):
        kv = _kv(write_gguf(student, tmp_path / "m.gguf", vocab_only=True, source=other))
    assert "not carried over (the source has" in caplog.text and "tokens" in caplog.text
    assert kv["tokenizer.ggml.scores"] == derived["tokenizer.ggml.scores"]


def test_export_of_a_gguf_student_carries_its_source_tokenizer(tmp_path, monkeypatch):
    """Through `export_student`: preflight and the f16 writer find the source in the train manifest."""
    released = _released_spm_gguf(tmp_path, monkeypatch)
    student = _trained_student_from(released, tmp_path / "run")
    out = tmp_path / "export"
    cfg = ExportConfig(student=str(student), out=str(out), variants=["gguf-f16"], max_new_tokens=16)
    m = export_student(cfg, prompts=PROMPTS)
    p = m["variants"]["gguf-f16"]["parity"]
    assert p["tokenization_match"] == 1.0 and p["greedy_match_within_tol"] == 1.0
    kv = _kv(out / "gguf" / "model-f16.gguf")
    assert kv["tokenizer.ggml.scores"] == _kv(released)["tokenizer.ggml.scores"]
