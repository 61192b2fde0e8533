"""LoRA students: adapters on every family's linear layers, merged into a plain save_pretrained model whose
logits are the adapted model's; a missing target refused in one line; a LoRA run resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fake_run import make_run
from families import FAMILY_NAMES, build_family, family_texts
from nestling.distill.train import TrainConfig, train

from nestling.core.errors import NestlingError

REPO = Path(__file__).resolve().parents[1]


def _adapter_steps(model, tok, steps: int = 3) -> None:
    """A few optimizer steps on the adapters only, so that lora_B leaves zero and the merge has work to do."""
    import torch

    ids = torch.tensor([tok("What is 3 + 4? Step 1: 3 + 4 = 7")["input_ids"]] * 2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merged_student_has_the_adapted_logits_and_saves_plain(tmp_path, family):
    import torch
    from nestling.distill.checkpoint import save_model_dir
    from nestling.distill.lora import LORA_RECIPES, add_lora, linear_names, lora_recipe
    from nestling.distill.students import load_student
    from safetensors import safe_open

    base, tok = build_family(family, family_texts(60))
    base_keys = set(base.state_dict())
    recipe = lora_recipe(base)
    assert recipe == LORA_RECIPES[base.config.model_type] and set(recipe.targets) == linear_names(base)
    model = add_lora(base, recipe)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the base stays frozen
    _adapter_steps(model, tok)
    ids = torch.tensor([tok("What is 12 - 5? Step 1: 12 - 5 = 7")["input_ids"]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits

    saved = save_model_dir(tmp_path / "model", model, tok)
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any("lora" in k or "base_layer" in k for k in keys)  # a plain model of its family
    assert keys <= base_keys and not (tmp_path / "model" / "adapter_config.json").exists()
    reloaded, _ = load_student(tmp_path / "model")
    assert reloaded.config.model_type == base.config.model_type
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def _family_student(tmp_path: Path, family: str) -> str:
    from nestling.distill.students import save_student

    from nestling.core.prompting import explain_target, student_prompt

    texts = [student_prompt(f"What is {a} + {b}?") + explain_target([f"{a} + {b} = {a + b}"], str(a + b))
             for a in range(10) for b in range(10)]  # fmt: skip
    model, tok = build_family(family, texts + family_texts(60))
    save_student(model, tok, tmp_path / family)
    return f"hf:{tmp_path / family}"


def _cfg(run: Path, student: str, **kw) -> TrainConfig:
    base = dict(run=str(run), student=student, name="s", lora=True, steps=6, batch_size=4, lr=1e-2, warmup=0,
                threads=1, progress=False, precision="fp32")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_train_with_lora_changes_only_the_targets_and_saves_a_plain_student(tmp_path):
    from safetensors.torch import load_file

    student = _family_student(tmp_path, "phi3")  # fused qkv_proj / gate_up_proj targets
    run = make_run(tmp_path / "run", n=40, heldout=5)
    out = train(_cfg(run, student))
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["lora"] is True and m["metrics"]["lora"] is True
    before = load_file(Path(student[3:]) / "model.safetensors")
    after = load_file(out / "model/model.safetensors")
    assert after.keys() == before.keys()
    targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    for name, w in after.items():
        assert (not w.equal(before[name])) == (name.split(".")[-2] in targets), name
    assert not (out / "checkpoints").exists()


def test_a_lora_target_the_model_lacks_is_one_line_and_writes_nothing(tmp_path):
    student = _family_student(tmp_path, "llama")
    run = make_run(tmp_path / "run", n=20, heldout=5)
    with pytest.raises(NestlingError, match="qkv_proj: not a linear layer of this llama student"):
        train(_cfg(run, student, lora_targets=["q_proj,qkv_proj"]))
    proc = subprocess.run(
        [sys.executable, "-m", "nestling", "train", "--run", str(run), "--student", student, "--lora",
         "--lora-targets", "gate_up_proj", "--steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "gate_up_proj" in errors[0] and "q_proj" in errors[0], proc.stderr[-2000:]
    assert not (run / "students").exists()


def test_a_lora_run_resumes_from_its_adapter_checkpoint_to_the_same_weights(tmp_path, monkeypatch, caplog):
    import nestling.distill.train as train_mod
    import torch
    from safetensors.torch import load_file

    student = _family_student(tmp_path, "qwen2")
    a, b = make_run(tmp_path / "a", n=30, heldout=5), make_run(tmp_path / "b", n=30, heldout=5)
    train(_cfg(a, student, steps=8, checkpoint_every=3))

    real = train_mod.train_step

    def crash_at_7(job, step):
        if step == 6:
            raise KeyboardInterrupt  # stands in for a kill after the step-6 checkpoint
        return real(job, step)

    monkeypatch.setattr(train_mod, "train_step", crash_at_7)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(b, student, steps=8, checkpoint_every=3))
    ckpt = b / "students/s/checkpoints/step-000006"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    monkeypatch.setattr(train_mod, "train_step", real)
    with caplog.at_level("INFO", logger="nestling.distill.train"):
        train(_cfg(b, student, steps=8, checkpoint_every=3))
    assert "resuming s from step-000006" in caplog.text
    wa, wb = (
        load_file(a / "students/s/model/model.safetensors"),
        load_file(b / "students/s/model/model.safetensors"),
    )
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
