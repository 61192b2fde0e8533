"""Inference engines for exported students: llama.cpp (GGUF) and onnxruntime (ONNX). Torch-free.

The runtime serves with these engines and ``export.parity`` verifies every artifact through them, so an
artifact that passed its export checks is checked by the very code that serves it.

    engine = load_engine("exports/tiny/gguf/model-q8_0.gguf", kind="gguf", n_threads=1)
    ids = engine.tokenize("Question: What is 2 + 3?\\nExplain:")   # bos added exactly as HF does
    out = list(engine.stream(ids, max_tokens=64))                    # greedy, stops at eos (not yielded)
    text = engine.detokenize(out)
    engine.logits(ids)                                               # (T, V) teacher-forced, for parity
    engine.close()

Heavy dependencies (llama_cpp, onnxruntime, tokenizers) are imported inside each engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from nestling.serve.errors import NestlingError
from nestling.serve.sampling import Sampler

log = logging.getLogger(__name__)

KINDS = ("gguf", "onnx")


class Engine(Protocol):
    kind: str
    path: Path
    eos_id: int | None
    bos_id: int | None

    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, ids: list[int]) -> str: ...
    def stream(
        self, prompt_ids: list[int], max_tokens: int, stop_at_eos: bool = True, sampler: Sampler | None = None
    ) -> Iterator[int]: ...
    def logits(self, ids: list[int]) -> np.ndarray: ...
    def close(self) -> None: ...


def guess_kind(path: str | Path) -> str:
    """'gguf' for a .gguf file, 'onnx' for a .onnx file or a directory holding model.onnx."""
    p = Path(path)
    if p.suffix == ".gguf":
        return "gguf"
    if p.suffix == ".onnx" or (p / "model.onnx").is_file():
        return "onnx"
    raise NestlingError(f"{p}: neither a .gguf file nor an ONNX directory with model.onnx; pass kind=")


def load_engine(
    path: str | Path, kind: str | None = None, n_threads: int = 1, n_ctx: int | None = None
) -> Engine:
    """Open an exported model; a missing, truncated or corrupt file raises NestlingError."""
    kind = kind or guess_kind(path)
    if kind not in KINDS:
        raise NestlingError(f"engine kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if n_threads < 1:
        raise NestlingError(f"n_threads={n_threads}: must be >= 1")
    if kind == "gguf":
        return GGUFEngine(path, n_threads=n_threads, n_ctx=n_ctx)
    return ONNXEngine(path, n_threads=n_threads)


# ---- llama.cpp ---------------------------------------------------------------------------------------


class GGUFEngine:
    """llama-cpp-python, greedy by argmax over the last logits (exactly greedy, no sampler state)."""

    kind = "gguf"

    def __init__(self, path: str | Path, n_threads: int = 1, n_ctx: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise NestlingError(f"{self.path}: GGUF file not found; export the student first")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise NestlingError(f"{self.path}: not a GGUF file (bad magic); re-export it")
        import llama_cpp

        self._lib = llama_cpp
        try:
            # Capped: an 8k-context model would otherwise reserve a large KV cache for short prompts;
            # never above the training context (RoPE positions past it are noise).
            n_ctx = n_ctx or min(2048, _gguf_context_length(self.path) or 2048)
            self._llm = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                # Defaults to every core otherwise: under contention prompt processing collapses.
                n_threads_batch=n_threads,
                logits_all=False,
                verbose=False,
            )
        except Exception as e:  # llama.cpp reports a truncated/corrupt file as ValueError
            raise NestlingError(
                f"{self.path}: llama.cpp cannot load it ({type(e).__name__}: {e}); the file is truncated "
                "or corrupt, re-export it"
            ) from None
        self.n_ctx = self._llm.n_ctx()
        self.n_vocab = self._llm.n_vocab()
        eos = self._llm.token_eos()
        bos = self._llm.token_bos()
        self.eos_id: int | None = eos if eos >= 0 else None
        self.bos_id: int | None = bos if bos >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        # special=True: HF parses special-token strings inside text; llama.cpp does so only with this flag.
        # add_bos=True adds bos only when the GGUF says add_bos_token, i.e. exactly when HF does.
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def detokenize(self, ids: list[int]) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def _last_logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _check_len(self, n: int) -> None:
        if n > self.n_ctx:
            raise NestlingError(f"{n} tokens exceed the context of {self.n_ctx}; shorten the prompt")

    def stream(
        self, prompt_ids: list[int], max_tokens: int, stop_at_eos: bool = True, sampler: Sampler | None = None
    ) -> Iterator[int]:
        """Tokens after the prompt, greedy unless a ``sampler`` picks them; eos ends the stream unyielded
        (stop_at_eos=False: benchmarks)."""
        if not prompt_ids:
            raise NestlingError("empty prompt: tokenize a non-empty text first")
        max_tokens = min(max_tokens, self.n_ctx - len(prompt_ids))
        self._check_len(len(prompt_ids))
        self._llm.reset()
        self._llm.eval(list(prompt_ids))
        for i in range(max_tokens):
            tok = _pick(self._last_logits(), sampler)
            if tok == self.eos_id and stop_at_eos:
                return
            yield tok
            if i + 1 < max_tokens:
                self._llm.eval([tok])

    def logits(self, ids: list[int]) -> np.ndarray:
        """(T, V): token by token through the KV cache, the same code path as decoding."""
        self._check_len(len(ids))
        self._llm.reset()
        out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
        for t, tok in enumerate(ids):
            self._llm.eval([int(tok)])
            out[t] = self._last_logits()
        return out

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None


def _gguf_context_length(path: Path) -> int | None:
    """The training context from the GGUF header, or None when it cannot be read (llama.cpp then reports)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
        return int(reader.fields[f"{arch}.context_length"].contents())
    except Exception:
        return None


# ---- onnxruntime -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


class ONNXEngine:
    """onnxruntime over optimum's decoder-with-past ``model.onnx``: a KV-cache loop in numpy."""

    kind = "onnx"

    def __init__(self, path: str | Path, n_threads: int = 1) -> None:
        p = Path(path)
        self.path = p
        model = p if p.suffix == ".onnx" else p / "model.onnx"
        d = model.parent
        if not model.is_file():
            raise NestlingError(f"{model}: ONNX model not found; export the student first")
        if not (d / "tokenizer.json").is_file():
            raise NestlingError(f"{d}: no tokenizer.json beside model.onnx; re-export the student")
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = n_threads
        opts.inter_op_num_threads = 1
        # Spinning threads starve the other process on a 2-core box; measured ~2x faster without.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise NestlingError(
                f"{model}: onnxruntime cannot load it ({type(e).__name__}: {str(e)[:200]}); the file is "
                "truncated or corrupt, re-export it"
            ) from None
        try:
            self._tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:
            raise NestlingError(f"{d / 'tokenizer.json'}: cannot read it ({e}); re-export it") from None
        self._inputs = {i.name: i for i in self._sess.get_inputs()}
        self._past_names = [n for n in self._inputs if n.startswith("past_key_values.")]
        self._present_names = [
            "present" + n[len("past_key_values") :] for n in self._past_names
        ]  # past_key_values.0.key -> present.0.key
        outputs = {o.name for o in self._sess.get_outputs()}
        missing = [n for n in ["input_ids", "logits"] if n not in self._inputs and n not in outputs]
        if missing or any(n not in outputs for n in self._present_names):
            raise NestlingError(
                f"{model}: not a decoder-with-past export (inputs {sorted(self._inputs)}); export with "
                "task text-generation-with-past"
            )
        self._past_shape, self._past_dtype = self._past_layout(d)
        cfg = _read_json(d / "config.json")
        gen = _read_json(d / "generation_config.json")
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        self.eos_id = _first_id(eos)
        # transformers' generate() stops at any id of an eos list; so do we.
        self._stops = {int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None}
        self.bos_id = _first_id(gen.get("bos_token_id", cfg.get("bos_token_id")))
        self.n_ctx = int(cfg.get("max_position_embeddings", 2048))

    def _past_layout(self, d: Path) -> tuple[tuple[int, int], Any]:
        """(num_kv_heads, head_dim) from the graph's static dims (config.json as fallback) and dtype."""
        if not self._past_names:
            return (0, 0), np.float32
        meta = self._inputs[self._past_names[0]]
        dtype = np.float16 if "float16" in meta.type else np.float32
        shape = meta.shape  # [batch_size, num_kv_heads, past_sequence_length, head_dim]
        if len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[3], int):
            return (shape[1], shape[3]), dtype
        cfg = _read_json(d / "config.json")
        heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return (int(heads), int(head_dim)), dtype

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)  # the post-processor adds bos as HF does

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def _run(self, ids: list[int], past: list[np.ndarray] | None, start: int) -> tuple[np.ndarray, list]:
        n = len(ids)
        feed: dict[str, np.ndarray] = {"input_ids": np.asarray([ids], dtype=np.int64)}
        if "attention_mask" in self._inputs:
            feed["attention_mask"] = np.ones((1, start + n), dtype=np.int64)
        if "position_ids" in self._inputs:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None, :]
        if past is None:
            empty = np.zeros((1, self._past_shape[0], 0, self._past_shape[1]), dtype=self._past_dtype)
            past = [empty] * len(self._past_names)
        feed.update(zip(self._past_names, past, strict=True))
        out = self._sess.run(["logits", *self._present_names], feed)
        return out[0][0], out[1:]

    def stream(
        self, prompt_ids: list[int], max_tokens: int, stop_at_eos: bool = True, sampler: Sampler | None = None
    ) -> Iterator[int]:
        """Tokens after the prompt, greedy unless a ``sampler`` picks them; eos ends the stream unyielded."""
        if not prompt_ids:
            raise NestlingError("empty prompt: tokenize a non-empty text first")
        if len(prompt_ids) > self.n_ctx:
            raise NestlingError(f"{len(prompt_ids)} tokens exceed the context of {self.n_ctx}")
        max_tokens = min(max_tokens, self.n_ctx - len(prompt_ids))
        logits, past = self._run(list(prompt_ids), None, 0)
        pos = len(prompt_ids)
        for i in range(max_tokens):
            tok = _pick(logits[-1], sampler)
            if tok in self._stops and stop_at_eos:
                return
            yield tok
            if i + 1 < max_tokens:
                logits, past = self._run([tok], past, pos)
                pos += 1

    def logits(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise NestlingError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        logits, _ = self._run(list(ids), None, 0)
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        self._sess = None


def _pick(logits: np.ndarray, sampler: Sampler | None) -> int:
    return int(np.argmax(logits)) if sampler is None else sampler(logits)


def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return int(v) if v is not None else None
