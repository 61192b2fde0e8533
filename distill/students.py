"""Students: always ``LlamaForCausalLM`` (ONNX and GGUF export both work), in ``save_pretrained`` form.

    tok = train_tokenizer(texts, vocab_size=2048)
    model = new_student("tiny", tok)          # from-scratch preset, ~3-5M parameters
    save_student(model, tok, "runs/x/students/tiny/model")

Hidden and intermediate sizes are multiples of 256 so that llama.cpp's K-quants apply to every tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serve.errors import NestlingError
from serve.prompting import CHAT_TEMPLATE

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2


@dataclass(frozen=True)
class StudentPreset:
    """Shape of a from-scratch llama student. Sizes are multiples of 256 for llama.cpp K-quants."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 2048
    max_position_embeddings: int = 512


PRESETS: dict[str, StudentPreset] = {
    # ~1M parameters: a smoke-test student; learns formats, few facts.
    "nano": StudentPreset(256, 512, 1, 4, 4, vocab_size=1024),
    # ~3-5M: the fast edge student (measured ~5,000+ tokens/s through llama.cpp on one core).
    "tiny": StudentPreset(256, 768, 4, 4, 4),
    # ~25-35M: more capacity, still ~4x smaller than SmolLM2-135M.
    "small": StudentPreset(512, 1536, 8, 8, 4, vocab_size=4096),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, wrapped for transformers; adds <|bos|> to every encoded text.

    Byte-level with the GPT-2 pre-tokenizer so llama.cpp tokenizes identically (tokenizer.ggml.pre="gpt-2").
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        # Without this, transformers returns token_type_ids and generate() rejects them.
        model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def new_student(
    preset: str | StudentPreset, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised llama student sized by `preset`, with tied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise NestlingError(
                f"student preset {preset!r} does not exist; choose one of {', '.join(PRESETS)}"
            )
        preset = PRESETS[preset]
    p = asdict(preset)
    head_dim = p["hidden_size"] // p["num_attention_heads"]
    config = LlamaConfig(
        **{**p, "vocab_size": len(tokenizer)},
        head_dim=head_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_params(model: LlamaForCausalLM) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_student(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """save_pretrained form: safetensors, tokenizer with chat template, generation config stopping at eos."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=128,
    )
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def load_student(model_dir: str | Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a saved student, refusing anything that is not a llama checkpoint in safetensors form."""
    import json

    from transformers import AutoTokenizer, LlamaForCausalLM

    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise NestlingError(f"{d}: no config.json; pass a student directory written by `nestling train`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise NestlingError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("model_type") != "llama":
        raise NestlingError(
            f"{d}: model_type is {cfg.get('model_type')!r}; nestling students are llama-architecture only"
        )
    if not list(d.glob("*.safetensors")):
        raise NestlingError(f"{d}: no .safetensors weights (pickled weights are never loaded)")
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer_config.json").is_file():
        raise NestlingError(f"{d}: no tokenizer files; the student directory is incomplete")
    try:
        model = LlamaForCausalLM.from_pretrained(d, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(d)
    except Exception as e:  # corrupt safetensors, mismatched shapes, ...
        raise NestlingError(f"{d}: cannot load the student ({type(e).__name__}: {e})") from None
    model.eval()
    return model, tok
