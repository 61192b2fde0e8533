"""Tiny random students of every supported family, with a small tokenizer of that family's kind (no download).

    model, tok = build_family("qwen2", texts)           # 2 layers, GQA, qwen2's regex byte-level BPE
    train_steps(model, tok, texts, steps=8)             # a few full fine-tuning steps, so weights move
    save_student(model, tok, tmp_path / "qwen2")

Tokenizer kinds: Llama 3 and Qwen2/3 are byte-level BPE split by their own regex first (llama.cpp "llama-bpe"
and "qwen2"); Gemma, Mistral (v0.1-0.3) and Phi-3 are sentencepiece-style byte-fallback BPE over '▁'-escaped
text (llama.cpp tokenizer model "llama", scores and types), with a '▁' prefix except for Gemma.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from nestling.export.gguf_arch import LLAMA3_REGEX, QWEN2_REGEX
from nestling.export.parity import TOKENIZATION_PROBES

from nestling.core.prompting import explain_target, student_prompt

SPM = "spm"
UNIGRAM = "unigram"


@dataclass(frozen=True)
class Kind:
    """One family's test model: its config class and extra config, its tokenizer kind and special tokens."""

    config: str  # transformers config class name
    tokenizer: str  # a Split regex (byte-level BPE), SPM (byte-fallback BPE) or UNIGRAM (byte fallback)
    specials: tuple[str, ...]  # in id order, from 0
    bos: str | None
    eos: str
    pad: str
    unk: str | None = None
    dummy_prefix: bool = False  # SPM only: prepend '▁' (llama 2 / Mistral / Phi-3 do, Gemma does not)
    nfc: bool = False
    rstrip: tuple[str, ...] = ()  # added tokens that eat the whitespace after them (Phi-3's)
    tied: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


_QWEN = Kind(
    "Qwen2Config",
    QWEN2_REGEX,
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    None,  # Qwen adds no bos
    "<|im_end|>",
    "<|endoftext|>",
    nfc=True,
    extra={"rope_theta": 1000000.0},
)
KINDS: dict[str, Kind] = {
    # Llama 3.x: rope scaling with a short original context so that the scaled frequencies matter here.
    "llama": Kind(
        "LlamaConfig",
        LLAMA3_REGEX,
        ("<|begin_of_text|>", "<|eot_id|>", "<|pad|>"),
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|pad|>",
        extra={
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "mistral": Kind(
        "MistralConfig",
        SPM,
        ("<unk>", "<s>", "</s>"),
        "<s>",
        "</s>",
        "</s>",
        "<unk>",
        dummy_prefix=True,
        tied=False,
        extra={"sliding_window": None},
    ),
    "qwen2": _QWEN,
    # Qwen3: head_dim 128 (as released; transformers' GGUF loader assumes it) differs from hidden / heads.
    "qwen3": dataclasses.replace(_QWEN, config="Qwen3Config", tied=False, extra={"head_dim": 128}),
    # Gemma 3: a sliding window shorter than the parity sequences, so the window metadata is exercised;
    # head_dim 256 = query_pre_attn_scalar as released (transformers' GGUF loader assumes 256).
    "gemma3_text": Kind(
        "Gemma3TextConfig",
        SPM,
        ("<pad>", "<eos>", "<bos>", "<unk>"),
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        extra={"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 16, "rope_theta": 1000000.0},
    ),
    "phi3": Kind(
        "Phi3Config",
        SPM,
        ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|end|>"),
        "<s>",
        "<|end|>",
        "<|endoftext|>",
        "<unk>",
        dummy_prefix=True,
        tied=False,
        rstrip=("</s>", "<|end|>"),
        extra={"original_max_position_embeddings": 256, "sliding_window": None},
    ),
}
FAMILY_NAMES = list(KINDS)

# Llama 2 / TinyLlama: the llama architecture with a sentencepiece vocabulary, '▁' prefix, untied head.
LLAMA2 = dataclasses.replace(KINDS["mistral"], config="LlamaConfig", extra={})

# The strings export's parity check tokenizes with both llama.cpp and HF: digits, spacing, non-ASCII.
TRICKY = TOKENIZATION_PROBES


def family_texts(n: int = 300, seed: int = 0) -> list[str]:
    """Student-format arithmetic rationales (what the tiny students learn) plus text for a varied vocab."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append(
            student_prompt(f"What is {a} + {b}?") + explain_target([f"{a} + {b} = {a + b}"], str(a + b))
        )
    return out + ["The quick brown fox jumps over the lazy dog. Numbers 2024, 3.14; tabs\tnew\nlines"] * 3


def byte_level_bpe(texts: list[str], kind: Kind, vocab_size: int) -> Any:
    """Byte-level BPE split by the family's regex (Llama 3 also ignores merges for whole-vocab words)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=kind.tokenizer == LLAMA3_REGEX))
    if kind.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(kind.tokenizer), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(kind.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def byte_fallback_bpe(texts: list[str], kind: Kind, vocab_size: int) -> Any:
    """Sentencepiece-style BPE: specials, the 256 <0xXX> byte tokens, characters, then learned pieces.

    Merges list every split of every piece, ordered by the piece (what HF's sentencepiece conversion
    writes): merging by rank then equals sentencepiece's merging by score, which is what llama.cpp runs.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    steps = ([normalizers.Prepend("▁")] if kind.dummy_prefix else []) + [normalizers.Replace(" ", "▁")]
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence(steps)
    learner.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, max_token_length=8, show_progress=False)
    )
    learned = [t for t, _ in sorted(learner.get_vocab().items(), key=lambda kv: kv[1])]
    pieces = list(kind.specials) + [f"<0x{b:02X}>" for b in range(256)] + learned
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    merges = []
    for piece in learned:
        merges += [
            (piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=kind.unk, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if kind.dummy_prefix else []))
    return tok


def byte_fallback_unigram(texts: list[str], kind: Kind, vocab_size: int) -> Any:
    """A sentencepiece-style Unigram (what transformers makes of a Gemma or other SPM GGUF): specials, the
    256 <0xXX> byte tokens, then the learned pieces with their log-probabilities; Viterbi over the whole
    '▁'-escaped text, bytes for characters outside the vocabulary."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    steps = ([normalizers.Prepend("▁")] if kind.dummy_prefix else []) + [normalizers.Replace(" ", "▁")]
    learner = Tokenizer(models.Unigram())
    learner.normalizer = normalizers.Sequence(steps)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, max_piece_length=8, show_progress=False)
    learner.train_from_iterator(texts, trainer)
    pieces = [(p, 0.0) for p in kind.specials] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    taken = {p for p, _ in pieces}
    # float32 scores, as sentencepiece's model file (and so every tokenizer.json made from one or from a
    # GGUF) holds them: GGUF stores float32, and Viterbi's near-ties must round alike on both sides.
    learned = json.loads(learner.to_str())["model"]["vocab"]
    pieces += [(p, float(np.float32(s))) for p, s in learned if p not in taken]
    unk = [p for p, _ in pieces].index(kind.unk) if kind.unk else None
    tok = Tokenizer(models.Unigram(pieces, unk_id=unk, byte_fallback=True))
    tok.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if kind.dummy_prefix else []))
    return tok


def build_tokenizer(family: str, texts: list[str], vocab_size: int = 512, kind: Kind | None = None) -> Any:
    """The family's kind of tokenizer (or `kind`'s), trained on `texts`, wrapped for transformers."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    from nestling.core.prompting import CHAT_TEMPLATE

    kind = kind or KINDS[family]
    builders = {SPM: byte_fallback_bpe, UNIGRAM: byte_fallback_unigram}
    tok = builders.get(kind.tokenizer, byte_level_bpe)(texts, kind, vocab_size)
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False, rstrip=s in kind.rstrip) for s in kind.specials]
    )
    if kind.bos:
        bos_id = tok.token_to_id(kind.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{kind.bos} $A", pair=f"{kind.bos} $A {kind.bos} $B", special_tokens=[(kind.bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=kind.bos,
        eos_token=kind.eos,
        pad_token=kind.pad,
        unk_token=kind.unk,
        model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_family(
    family: str, texts: list[str], seed: int = 0, vocab_size: int = 512, kind: Kind | None = None
) -> tuple[Any, Any]:
    """A 2-layer random model of `family` (hidden 256, 4 query / 2 key-value heads) and its tokenizer
    (the family's own kind, or `kind`: e.g. a Unigram vocabulary on gemma3_text)."""
    import torch
    import transformers

    kind = kind or KINDS[family]
    tok = build_tokenizer(family, texts, vocab_size, kind)
    config = getattr(transformers, kind.config)(
        **{
            "vocab_size": len(tok),
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": kind.tied,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            **kind.extra,
        }
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF zero-initialises biases and Gemma's norm deltas: give every rule work to do
        for name, p in model.named_parameters():
            if name.endswith(".bias") or (family == "gemma3_text" and name.endswith("norm.weight")):
                p.normal_(0.0, 0.5)
    return model.eval(), tok


def train_steps(
    model: Any, tok: Any, texts: list[str], steps: int = 8, lr: float = 3e-3, seed: int = 0
) -> Any:
    """A few full fine-tuning steps on `texts` (batch 8), so that exported weights are trained ones."""
    import torch

    enc = [tok(t + tok.eos_token)["input_ids"][:96] for t in texts]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = [enc[i] for i in torch.randint(0, len(enc), (8,), generator=gen).tolist()]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = torch.tensor(r)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
