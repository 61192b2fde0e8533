"""Students: spec syntax, preset shapes, depth pruning, save/load contract, refusal of other architectures."""

from __future__ import annotations

import json

import pytest
from nestling.distill.students import (
    PRESETS,
    count_params,
    init_student,
    load_student,
    parse_student_spec,
    prune_layers,
    save_student,
    train_tokenizer,
)

from nestling.core.errors import NestlingError
from nestling.core.prompting import CHAT_TEMPLATE

TEXTS = [
    f"Question: What is {a} + {b}?\nExplain:\nStep 1: {a} + {b} = {a + b}\nAnswer: {a + b}"
    for a in range(10)
    for b in range(10)
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=2048)


def test_spec_syntax():
    s = parse_student_spec("gguf:smollm2?keep_layers=8")
    assert (s.name, s.source, s.keep_layers, s.pretrained) == ("smollm2-k8", "gguf:smollm2", 8, True)
    s = parse_student_spec("fast=tiny?seed=3&vocab=1024")
    assert (s.name, s.source, s.seed, s.vocab_size, s.pretrained) == ("fast", "tiny", 3, 1024, False)
    assert parse_student_spec("hf:/models/my-llama").name == "my-llama"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("huge", "does not exist"),
        ("tiny?layers=3", "bad option"),
        ("gguf:smollm2?keep_layers=x", "not an integer"),
        ("gguf:smollm2?keep_layers=0", "keep_layers"),
        ("gguf:smollm2?vocab=100", "presets only"),
        ("bad name=tiny", "name"),
        # hf: is a transformers checkpoint wherever a spec is read; the bundled GGUF is gguf:, as for teachers
        ("hf:smollm2", "the bundled SmolLM2 is gguf:smollm2"),
        ("gguf:", "name the weights"),
    ],
)
def test_bad_specs_say_what_to_do(spec, message):
    with pytest.raises(NestlingError, match=message):
        parse_student_spec(spec)


@pytest.mark.parametrize(
    "name, low, high", [("nano", 0.5e6, 1.5e6), ("tiny", 3e6, 5e6), ("small", 20e6, 40e6)]
)
def test_preset_sizes_and_kquant_friendly_shapes(tok, name, low, high):
    preset = PRESETS[name]
    assert preset.hidden_size % 256 == 0 and preset.intermediate_size % 256 == 0
    model, _ = init_student(f"{name}?vocab={preset.vocab_size}", TEXTS)
    assert low <= count_params(model) <= high
    assert model.config.tie_word_embeddings


def _tiny_llama(tok, layers=4):
    from nestling.distill.students import StudentPreset, new_student

    return new_student(StudentPreset(256, 512, layers, 4, 2, vocab_size=len(tok)), tok, seed=0)


def test_pruning_keeps_evenly_spaced_layers_and_the_kv_cache_still_works(tok):
    import torch

    model = _tiny_llama(tok, layers=5).eval()
    weights = [layer.mlp.down_proj.weight.clone() for layer in model.model.layers]
    prune_layers(model, 3)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    for layer, original in zip(model.model.layers, (0, 2, 4), strict=True):  # evenly spaced, ends kept
        assert torch.equal(layer.mlp.down_proj.weight, weights[original])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    ids = tok("Question: What is 3 + 4?\nExplain:", return_tensors="pt").input_ids
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, min_new_tokens=8)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, min_new_tokens=8)
    assert torch.equal(cached, uncached)
    with pytest.raises(NestlingError, match="only 3 layers"):
        prune_layers(model, 4)


def test_save_then_load_round_trip_with_the_nestling_chat_template(tmp_path, tok):
    import torch

    model = _tiny_llama(tok, layers=1).eval()
    tok.chat_template = "{{ 'some other format' }}"  # a pretrained tokenizer's own template must not survive
    out = save_student(model, tok, tmp_path / "m")
    assert (out / "model.safetensors").is_file()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
    loaded, ltok = load_student(out)
    assert ltok.chat_template == CHAT_TEMPLATE
    ids = ltok("Question: 1 + 1", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_unsupported_families_and_pickles_are_refused(tmp_path, tok):
    model = _tiny_llama(tok, layers=1)
    out = save_student(model, tok, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(NestlingError, match="nestling students are one of llama, mistral"):
        load_student(out)
    with pytest.raises(NestlingError, match="llama"):
        init_student(f"hf:{out}")
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(NestlingError, match="safetensors"):
        load_student(out)
    with pytest.raises(NestlingError, match="not found"):
        init_student(f"hf:{tmp_path / 'missing'}")


def test_from_scratch_presets_need_texts():
    with pytest.raises(NestlingError, match="texts"):
        init_student("nano", [])


@pytest.mark.slow
def test_smollm2_loads_from_the_bundled_gguf_with_its_real_eos_and_prunes():
    model, tok = init_student("gguf:smollm2?keep_layers=8")
    assert tok.eos_token == "<|im_end|>" and model.config.eos_token_id == tok.eos_token_id
    assert len(model.model.layers) == 8
    full_layers = 30
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert count_params(model) == pytest.approx(134_515_008 - (full_layers - 8) * per_layer, rel=1e-6)
    assert tok.chat_template == CHAT_TEMPLATE


def test_gguf_and_hf_students_are_named_as_teachers_are(tmp_path):
    from nestling.distill.students import load_pretrained

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(NestlingError, match=r"a GGUF file is gguf:"):
        load_pretrained(f"hf:{gguf}")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(NestlingError, match=r"holds 0 \.gguf files"):
        load_pretrained(f"gguf:{ckpt}")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NestlingError, match=r"not a \.gguf file; a checkpoint dir is hf:DIR"):
        load_pretrained(f"gguf:{tmp_path / 'weights.bin'}")
