"""Compression: vocabulary trimming is lossless on task text, importance finds the idle layer, a trimmed and
pruned student saves, loads and exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from nestling.distill.fresh import draw_fresh
from nestling.distill.prune import keep_layers, layer_importance, prune_mlp, select_layers
from nestling.distill.students import (
    StudentPreset,
    count_params,
    load_student,
    new_student,
    save_student,
    train_tokenizer,
)
from nestling.distill.vocab import kept_token_ids, trim_vocab

from nestling.core.errors import NestlingError
from nestling.core.prompting import explain_target, student_prompt

# A tokenizer trained on wider text than the task uses, so trimming has something to drop.
WIDE = [
    "The quick brown fox jumps over the lazy dog while zebras and yaks watch quietly.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "Ünïcödé · naïve café 日本語 emoji 🙂 and   spaces\ttabs",
] * 20
TASK = [
    student_prompt(f"What is {a} + {b}?") + explain_target([f"{a} + {b} = {a + b}"], str(a + b))
    for a in range(10)
    for b in range(0, 10, 3)
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WIDE + TASK, vocab_size=600)


def tiny_llama(tok, layers: int = 4, seed: int = 0, tied: bool = True):
    torch.manual_seed(seed)
    model = new_student(StudentPreset(64, 128, layers, 4, 2, vocab_size=len(tok)), tok, seed=seed)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.02)
    return model.eval()


def test_kept_ids_include_specials_bytes_and_merge_parents(tok):
    kept = set(kept_token_ids(tok, TASK))
    assert set(tok.all_special_ids) <= kept
    assert len(kept) < len(tok)  # the wide text's words are gone
    vocab = tok.get_vocab()
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if vocab.get(a + b) in kept:
            assert vocab[a] in kept and vocab[b] in kept


@pytest.mark.parametrize("tied", [True, False])
def test_trim_is_lossless_on_the_corpus(tok, tied):
    model = tiny_llama(tok, tied=tied)
    enc = tok(TASK[:8], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**enc).logits  # (B, T, V)
    small, small_tok, kept = trim_vocab(model, tok, TASK)
    assert len(small_tok) == len(kept) == small.config.vocab_size < len(tok)
    for text in TASK:
        assert small_tok.tokenize(text) == tok.tokenize(text)
        ids = small_tok(text)["input_ids"]
        assert small_tok.convert_ids_to_tokens(ids) == tok.convert_ids_to_tokens(tok(text)["input_ids"])
    assert small_tok.eos_token == tok.eos_token and small.config.eos_token_id == small_tok.eos_token_id
    small_enc = small_tok(TASK[:8], return_tensors="pt", padding=True)
    with torch.no_grad():
        after = small(**small_enc).logits
    torch.testing.assert_close(after, before[..., kept], rtol=1e-5, atol=1e-5)
    assert (small.lm_head.weight is small.model.embed_tokens.weight) == tied
    # Text the corpus never used still encodes (byte-level symbols are kept) and decodes back.
    other = "zebras 日本"
    assert small_tok.decode(small_tok(other, add_special_tokens=False)["input_ids"]) == other


def _identity_at(model, i: int):
    """Layer i adds nothing to the residual stream: its output equals its input."""
    layer = model.model.layers[i]
    torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
    torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return model


def test_importance_finds_the_identity_layer(tok):
    model = _identity_at(tiny_llama(tok, layers=5, seed=1), 2)
    scores = layer_importance(model, tok, TASK[:6], batch_size=4)
    assert len(scores) == 5 and scores[2] < 1e-4 < min(s for i, s in enumerate(scores) if i != 2)
    assert select_layers(scores, 4) == [0, 1, 3, 4]
    assert select_layers(scores, 2) == [0, 4]
    with pytest.raises(NestlingError, match="keep_layers"):
        select_layers(scores, 6)


def test_dropping_the_identity_layer_changes_nothing(tok):
    model = _identity_at(tiny_llama(tok, layers=5, seed=2), 3)
    enc = tok(TASK[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**enc).logits
        after = keep_layers(model, [0, 1, 2, 4])(**enc).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert model.config.num_hidden_layers == 4


def test_prune_mlp_keeps_the_active_channels(tok):
    model = tiny_llama(tok, layers=2, seed=3)
    for layer in model.model.layers:  # half the channels never fire: pruning them is exact
        layer.mlp.up_proj.weight.data[64:] = 0
    enc = tok(TASK[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**enc).logits
        model = prune_mlp(model, tok, TASK[:8], intermediate_size=64)
        after = model(**enc).logits
    assert model.model.layers[0].mlp.down_proj.in_features == 64 == model.config.intermediate_size
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_compressed_student_saves_and_loads(tok, tmp_path: Path):
    model = tiny_llama(tok, layers=4, seed=4)
    small, small_tok, _ = trim_vocab(model, tok, TASK)
    small = keep_layers(small, select_layers(layer_importance(small, small_tok, TASK[:4]), 3))
    small = prune_mlp(small, small_tok, TASK[:4], 64)
    params = count_params(small)
    save_student(small, small_tok, tmp_path / "model")
    loaded, loaded_tok = load_student(tmp_path / "model")
    assert count_params(loaded) == params and loaded.config.num_hidden_layers == 3
    assert loaded_tok.get_vocab() == small_tok.get_vocab()
    enc = small_tok(TASK[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, small(**enc).logits)


def test_fresh_questions_never_touch_the_heldout_split():
    from nestling.distill.tasks import DEFAULT_TASK, load_task

    task = load_task(DEFAULT_TASK)
    rows = [
        {**ex.to_row(), "split": "heldout" if i % 2 else "train"} for i, ex in enumerate(task.examples(60))
    ]
    fresh = draw_fresh(DEFAULT_TASK, rows, 40, seed=0)
    held_q = {r["question"].lower() for r in rows if r["split"] == "heldout"}
    held_expr = {r["meta"].get("expression") for r in rows if r["split"] == "heldout"}
    seen = {r["question"].lower() for r in rows}
    assert fresh and len({ex.question for ex in fresh}) == len(fresh)
    for ex in fresh:
        assert ex.question.lower() not in seen | held_q
        assert ex.meta.get("expression") not in held_expr


def test_trimmed_pruned_student_exports_with_parity(tiny_student_dir: Path, tiny_prompts, tmp_path: Path):
    """A trimmed, width-pruned student goes through `nestling export` unchanged (GGUF tokenizer and
    ONNX both parity-checked against PyTorch by the export stage itself)."""
    from nestling.export.pipeline import ExportConfig, export_student

    from nestling.core.manifest import read_manifest

    model, tok = load_student(tiny_student_dir)
    corpus = [student_prompt(q) + explain_target([f"{q[8:-1]} = {g}"], g) for q, g in tiny_prompts]
    small, small_tok, kept = trim_vocab(model, tok, corpus)
    small = prune_mlp(small, small_tok, corpus, 256)
    assert len(kept) < len(tok)
    save_student(small, small_tok, tmp_path / "model")
    out = tmp_path / "export"
    cfg = ExportConfig(
        student=str(tmp_path / "model"), out=str(out), variants=["gguf-f16", "onnx-fp32"], threads=1
    )
    export_student(cfg, prompts=tiny_prompts)
    m = read_manifest(out, "export")
    assert set(m["variants"]) >= {"gguf-f16", "onnx-fp32"}
    for name in ("gguf-f16", "onnx-fp32"):
        assert m["variants"][name]["parity"]["teacher_forced_top1"] >= 0.99, name


@pytest.mark.slow  # ~40 s on the shared 2-core machine (KD training, reasoning-gym draws)
@pytest.mark.parametrize("objective", ["off-policy", "mix"])
def test_compress_stage_end_to_end_and_skip_on_rerun(
    tiny_student_dir: Path, tmp_path: Path, monkeypatch, objective: str
):
    """trim -> prune -> a few KD steps (mix: some on the student's samples) on a fake run; the recovery
    traces hold no held-out question."""
    import shutil

    import nestling.distill.compress as compress_mod
    from fake_run import make_run
    from nestling.distill.compress import CompressConfig, compress

    from nestling.core.manifest import read_jsonl, read_manifest

    run = make_run(tmp_path / "run", n=60, heldout=20)
    shutil.copytree(tiny_student_dir, run / "students" / "tiny" / "model")
    cfg = CompressConfig(
        run=str(run),
        source="tiny",
        keep_layers=2,
        intermediate_size=256,
        recover_steps=3,
        fresh=8,
        vocab_questions=16,
        objective=objective,
        lmbda=0.5,
        threads=1,
        progress=False,
    )
    import nestling.distill.students as students_mod

    saved: list[str] = []
    save = students_mod.save_student
    monkeypatch.setattr(students_mod, "save_student", lambda m, t, d: saved.append(str(d)) or save(m, t, d))
    out = compress(cfg)
    assert out == run / "students" / "tiny-c2-w256"
    # each model written once: the trim, the pruned init recovery trains from, the recovered student
    assert len(saved) == 3 and not (run / "compress").exists() and not list(out.glob("init-*"))
    m = read_manifest(out, "compress")["metrics"]
    model, tok = load_student(out / "model")
    _, source_tok = load_student(tiny_student_dir)
    assert len(tok) == m["vocab"] < len(source_tok) and model.config.intermediate_size == 256
    assert m["recovery"]["steps"] == 3 and m["params"] == count_params(model) < m["teacher_params"]
    assert (m["recovery"]["onpolicy_steps"] > 0) == (objective == "mix")
    trim_model, trim_tok = load_student(run / "students" / "tiny-trim" / "model")
    assert trim_tok.get_vocab() == tok.get_vocab() and trim_model.config.num_hidden_layers == 2
    held = {r["id"] for r in read_jsonl(run / "traces" / "questions.jsonl") if r["split"] == "heldout"}
    fresh = read_jsonl(out / "fresh.jsonl")
    assert len(fresh) == m["fresh_rows"] and not {r["qid"] for r in fresh} & held
    assert m["recovery"]["rows"] == m["train_rows"] + m["fresh_rows"]

    monkeypatch.setattr(compress_mod, "trim_vocab", lambda *a: pytest.fail("a fresh compress was rebuilt"))
    assert compress(cfg) == out


def test_students_cut_with_one_seed_share_the_sources_fresh_answers(tmp_path, tiny_student_dir, monkeypatch):
    """Another shape with the same seed reuses the trimmed source's fresh answers; another seed asks other
    questions and generates its own."""
    import shutil

    import nestling.distill.compress as compress_mod
    from fake_run import make_run
    from nestling.distill.compress import CompressConfig, compress

    from nestling.core.manifest import read_jsonl

    run = make_run(tmp_path / "run", n=60, heldout=20)
    shutil.copytree(tiny_student_dir, run / "students" / "tiny" / "model")
    base = dict(
        run=str(run), source="tiny", recover_steps=0, fresh=8, vocab_questions=16, threads=1, progress=False
    )
    first = compress(CompressConfig(keep_layers=2, **base))
    calls: list[int] = []
    real = compress_mod.fresh_rows
    monkeypatch.setattr(
        compress_mod, "fresh_rows", lambda m, t, ex, p: calls.append(len(ex)) or real(m, t, ex, p)
    )
    second = compress(CompressConfig(keep_layers=2, intermediate_size=256, **base))
    assert second != first and calls == []
    assert read_jsonl(second / "fresh.jsonl") == read_jsonl(first / "fresh.jsonl")
    compress(CompressConfig(keep_layers=2, intermediate_size=256, name="tiny-c2-w256-s1", seed=1, **base))
    assert calls == [8]


def test_prune_mlp_ranks_channels_by_what_they_write_not_how_loud_they_are(tok):
    model = tiny_llama(tok, layers=2, seed=3)
    for layer in model.model.layers:  # channels 0-63 fire loudest but write nothing into the residual
        layer.mlp.up_proj.weight.data[:64] *= 10
        layer.mlp.down_proj.weight.data[:, :64] = 0
    enc = tok(TASK[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**enc).logits
        model = prune_mlp(model, tok, TASK[:8], intermediate_size=model.config.intermediate_size - 64)
        after = model(**enc).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)  # only the silent channels went
