"""Training checkpoints: weights in safetensors, optimizer state, and a JSON sidecar, in one place.

    ckpt = find_resumable(root, recipe, inputs)       # newest complete checkpoint to continue, or None
    save_checkpoint(root, step, model, tok, optimizer, state, keep=2)
    save_model_dir(out / "model", model, tok)         # the final student, LoRA merged in

Layout: ROOT/step-NNNNNN/ holds the student in save_pretrained form (or, for a LoRA run, the adapter as peft
writes it: adapter_config.json + adapter_model.safetensors), optimizer.pt (AdamW moments and the torch RNG,
read back with torch.load(weights_only=True), which unpickles tensors and plain containers only) and
trainer_state.json: step, tokens, seconds, losses, the recipe and the traces' sha256 it was trained on.
Every directory is written under a temporary name and renamed, so a kill leaves either nothing or a whole
checkpoint, and the sidecar is written last: a step-* directory without it is never read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from nestling.core.errors import NestlingError
from nestling.core.manifest import atomic_write_json

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
ADAPTER = "adapter_model.safetensors"


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def newest_checkpoint(root: Path) -> Path | None:
    """The newest step-* directory that finished writing (temp dirs never match the pattern)."""
    done = [p for p in root.glob("step-*") if (p / STATE).is_file()]
    return max(done, key=_step_of, default=None)


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE).read_text())


def find_resumable(root: Path, recipe: dict[str, Any], inputs: dict[str, str]) -> Path | None:
    """The newest checkpoint written by this recipe on these traces; None when there is none to continue.

    A checkpoint from other traces is ignored (its weights and tokenizer belong to other data); one from
    another recipe is refused, because silently starting over would throw away the user's hours.
    """
    ckpt = newest_checkpoint(root)
    if ckpt is None:
        return None
    saved = read_state(ckpt)
    if saved.get("inputs") != inputs:
        log.warning("%s: trained on other traces; starting over instead of resuming", ckpt)
        return None
    if saved.get("recipe") != json.loads(json.dumps(recipe)):
        raise NestlingError(
            f"{ckpt}: written with a different recipe; pass the same flags, --no-resume, or remove {root}"
        )
    return ckpt


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def save_checkpoint(
    root: Path, step: int, model: Any, tok: Any, optimizer: Any, state: dict, keep: int
) -> Path:
    """Write step-NNNNNN under a temp name, then rename; keep the newest `keep` checkpoints."""
    import torch
    from nestling.distill.students import save_student

    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if _is_peft(model):  # the frozen base is rebuilt from the student spec on resume; only the adapter moves
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    else:
        save_student(model, tok, tmp)
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / OPTIMIZER)
    atomic_write_json(tmp / STATE, state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted(root.glob("step-*"), key=_step_of)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_adapter(ckpt: Path, model: Any) -> None:
    """Put a checkpoint's LoRA weights into a freshly wrapped peft model of the same recipe."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / ADAPTER))


def load_optimizer(ckpt: Path, optimizer: Any) -> None:
    """AdamW moments and the torch RNG as they were when the checkpoint was written."""
    import torch

    extra = torch.load(ckpt / OPTIMIZER, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["torch_rng"])


def save_model_dir(target: Path, model: Any, tok: Any) -> Any:
    """The final student at `target` in plain save_pretrained form, replacing any previous one whole;
    returns the model saved.

    A LoRA model is merged first, so export and serving see an ordinary model of its family.
    """
    from nestling.distill.students import save_student

    if _is_peft(model):
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.eval()
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(model.to("cpu"), tok, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return model
