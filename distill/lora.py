"""LoRA through peft for students too large to fine-tune fully; merged before saving, so nothing downstream
ever sees an adapter.

    recipe = lora_recipe(model, rank=None, alpha=None, targets=None)   # the family's defaults, overridable
    model = add_lora(model, recipe)                                      # peft model; only adapters train
    plain = model.merge_and_unload()                                     # (checkpoint.save_model_dir does it)

Targets: every linear projection of attention and MLP, not only q/v: on small models, adapting all linear
layers is what lets LoRA match full fine-tuning (Dettmers et al. 2023, QLoRA, section 4). peft's own table
(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) lists q_proj/v_proj only and has no phi3 entry, hence
this one, keyed by the config's model_type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nestling.core.errors import NestlingError

_SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraRecipe:
    rank: int
    alpha: float
    targets: tuple[str, ...]


# alpha = 2 x rank, the usual scale. Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: one
# adapter then serves two or three projections, so it gets twice the rank to keep a comparable capacity.
LORA_RECIPES: dict[str, LoraRecipe] = {
    "llama": LoraRecipe(16, 32.0, _SPLIT),
    "mistral": LoraRecipe(16, 32.0, _SPLIT),
    "qwen2": LoraRecipe(16, 32.0, _SPLIT),
    "qwen3": LoraRecipe(16, 32.0, _SPLIT),
    "gemma3_text": LoraRecipe(16, 32.0, _SPLIT),
    "phi3": LoraRecipe(32, 64.0, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}


def lora_recipe(
    model: Any, rank: int | None = None, alpha: float | None = None, targets: list[str] | None = None
) -> LoraRecipe:
    """The family's recipe with any given override; refuses a target that is not a linear layer of `model`."""
    model_type = model.config.model_type
    base = LORA_RECIPES.get(model_type)
    if base is None and not targets:
        raise NestlingError(
            f"--lora: no LoRA targets known for model_type {model_type!r} "
            f"(known: {', '.join(LORA_RECIPES)}); name them with --lora-targets"
        )
    rank = rank or (base.rank if base else 16)
    scale = base.alpha / base.rank if base else 2.0  # a new rank keeps the family's alpha / rank
    recipe = LoraRecipe(rank, alpha or scale * rank, tuple(targets) if targets else base.targets)
    check_targets(model, recipe.targets)
    return recipe


def linear_names(model: Any) -> set[str]:
    """Last name component of every nn.Linear in the decoder layers (what peft matches targets to)."""
    import torch

    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    }


def check_targets(model: Any, targets: tuple[str, ...]) -> None:
    have = linear_names(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise NestlingError(
            f"--lora-targets {','.join(missing)}: not a linear layer of this {model.config.model_type} "
            f"student; it has {', '.join(sorted(have))}"
        )


def add_lora(model: Any, recipe: LoraRecipe) -> Any:
    """Wrap `model` in peft LoRA adapters (no dropout, so a resumed run reproduces the uninterrupted one)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(recipe.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
