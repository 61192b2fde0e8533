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

import importlib
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from nestling.serve.sampling import Sampler

from nestling.core.errors import NestlingError
from nestling.core.manifest import read_json

log = logging.getLogger(__name__)

KINDS = ("gguf", "onnx")


def _require(module: str, extra: str, what: str) -> Any:
    """Import an engine library, or say in one line which extra brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise NestlingError(
            f"{what} needs {module}, which is not installed: pip install 'nestling[{extra}]'"
        ) from None


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


# Optional: ``resume(prompt_ids, max_tokens, sampler=None)`` streams like ``stream`` but may keep the work of
# the longest prefix it has already read (the calculator's restarts use it where an engine has it).


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
        llama_cpp = _require("llama_cpp", "gguf", "a GGUF export")
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

    @property
    def llm(self) -> Any:
        """The llama_cpp.Llama this engine drives (its metadata and chat template)."""
        return self._llm

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
        yield from self._decode(list(prompt_ids), max_tokens, stop_at_eos, sampler)

    def resume(self, prompt_ids: list[int], max_tokens: int, sampler: Sampler | None = None) -> Iterator[int]:
        """``stream``, keeping the KV cache of the longest prefix already evaluated: a calculator restart
        re-reads only the corrected tail, not the prompt and every step before it."""
        if not prompt_ids:
            raise NestlingError("empty prompt: tokenize a non-empty text first")
        max_tokens = min(max_tokens, self.n_ctx - len(prompt_ids))
        self._check_len(len(prompt_ids))
        llm, keep = self._llm, 0
        for have, want in zip(llm.input_ids[: llm.n_tokens], prompt_ids, strict=False):
            if int(have) != want:
                break
            keep += 1
        # at least the last prompt token is evaluated again: its logits pick the first new token
        llm.n_tokens = min(keep, len(prompt_ids) - 1)
        yield from self._decode(list(prompt_ids[llm.n_tokens :]), max_tokens, True, sampler)

    def _decode(
        self, new_ids: list[int], max_tokens: int, stop_at_eos: bool, sampler: Sampler | None
    ) -> Iterator[int]:
        self._llm.eval(new_ids)  # from n_tokens on; llama.cpp drops the KV cache past it first
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


@dataclass
class _Seq:
    """One sequence in a batched context: its prompt, budget, sampler and the queue its tokens go to."""

    prompt: list[int]
    max_tokens: int
    stop_at_eos: bool
    sampler: Sampler | None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # ints, then None or an exception
    cancelled: bool = False
    pos: int = 0  # tokens in the KV cache
    made: int = 0
    next_tok: int | None = None  # sampled, not yet decoded


class GGUFBatch:
    """One llama.cpp context that decodes up to ``slots`` sequences together, as llama.cpp's server does:
    each step is one ``llama_decode`` over every running sequence's next token (and new prompts), so the
    weights are read once per step, not once per sequence. ``views()`` gives one Engine per slot; the
    runtime's pool hands each to one request at a time.

        views = GGUFBatch("model.gguf", slots=8, n_threads=1).views()
        r = Reasoner(views, variant="gguf-q8_0")       # up to 8 questions decode together
    """

    def __init__(self, path: str | Path, slots: int, n_threads: int = 1, n_ctx: int | None = None) -> None:
        self.base = GGUFEngine(path, n_threads=n_threads, n_ctx=n_ctx)  # tokenizer, eos, logits()
        lib, self._lib = self.base._lib, self.base._lib
        self.n_ctx, self.slots, self.n_vocab = self.base.n_ctx, slots, self.base.n_vocab
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx * slots  # split evenly: each sequence gets the single engine's context
        params.n_seq_max = slots
        # Room for a whole prompt beside every running sequence's token: a new request never starves.
        params.n_batch = params.n_ubatch = max(512, self.n_ctx + slots)
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = False
        self._ctx = lib.llama_init_from_model(self.base._llm._model.model, params)
        if not self._ctx:
            raise NestlingError(f"{path}: llama.cpp cannot make a {slots}-sequence context; lower --pool")
        self._n_batch = int(params.n_batch)
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        self._mem = lib.llama_get_memory(self._ctx)
        self._new: queue.SimpleQueue[tuple[int, _Seq] | None] = queue.SimpleQueue()
        self._open = slots
        self._thread = threading.Thread(target=self._loop, name="gguf-batch", daemon=True)
        self._thread.start()

    def views(self) -> list[GGUFSlot]:
        return [GGUFSlot(self, i) for i in range(self.slots)]

    def submit(self, slot: int, seq: _Seq) -> None:
        self._new.put((slot, seq))

    def release(self) -> None:
        """A view closed; the last one stops the loop and frees the context."""
        self._open -= 1
        if self._open == 0:
            self._new.put(None)
            self._thread.join()
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self.base.close()

    def _loop(self) -> None:
        running: dict[int, _Seq] = {}
        waiting: list[tuple[int, _Seq]] = []
        while True:
            if not running and not waiting:
                item = self._new.get()  # idle: block until a request comes
                if item is None:
                    return
                waiting.append(item)
            while not self._new.empty():
                item = self._new.get()
                if item is None:
                    return
                waiting.append(item)
            for slot in [s for s, q in running.items() if q.cancelled]:
                self._finish(slot, running.pop(slot), None)  # the client left: free the slot now
            waiting = self._step(running, waiting)

    def _step(self, running: dict[int, _Seq], waiting: list[tuple[int, _Seq]]) -> list[tuple[int, _Seq]]:
        """One decode over every running sequence's next token plus whole new prompts that fit."""
        rows: list[tuple[int, _Seq, int]] = []  # (slot, seq, batch index of its logits)
        n = 0
        for slot, q in running.items():
            assert q.next_tok is not None
            self._put(n, q.next_tok, q.pos, slot, True)
            rows.append((slot, q, n))
            n += 1
        later = []
        for slot, q in waiting:
            if q.cancelled:
                q.out.put(None)
            elif n + len(q.prompt) > self._n_batch:
                later.append((slot, q))  # next step: the batch is full
            else:
                for i, tok in enumerate(q.prompt):
                    self._put(n + i, tok, i, slot, i == len(q.prompt) - 1)
                n += len(q.prompt)
                rows.append((slot, q, n - 1))
                running[slot] = q
        if n == 0:
            return later
        self._batch.n_tokens = n
        if self._lib.llama_decode(self._ctx, self._batch) != 0:
            err = NestlingError(
                "llama.cpp could not decode the batch (context full); retry with fewer tokens"
            )
            for slot, _, _ in rows:
                self._finish(slot, running.pop(slot), err)
            return later
        for slot, q, at in rows:
            q.pos = q.pos + 1 if q.next_tok is not None else len(q.prompt)
            logits = np.ctypeslib.as_array(
                self._lib.llama_get_logits_ith(self._ctx, at), shape=(self.n_vocab,)
            )
            self._advance(slot, q, _pick(logits, q.sampler), running)
        return later

    def _advance(self, slot: int, q: _Seq, tok: int, running: dict[int, _Seq]) -> None:
        if q.cancelled or (tok == self.base.eos_id and q.stop_at_eos):
            self._finish(slot, running.pop(slot), None)
            return
        q.out.put(tok)
        q.made += 1
        q.next_tok = tok
        if q.made >= q.max_tokens:
            self._finish(slot, running.pop(slot), None)

    def _put(self, i: int, tok: int, pos: int, slot: int, logits: bool) -> None:
        b = self._batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
        b.seq_id[i][0] = slot

    def _finish(self, slot: int, q: _Seq, end: BaseException | None) -> None:
        self._lib.llama_memory_seq_rm(self._mem, slot, -1, -1)
        q.out.put(end)


class GGUFSlot:
    """One slot of a GGUFBatch behind the Engine protocol; one caller at a time (the runtime's pool)."""

    kind = "gguf"

    def __init__(self, batch: GGUFBatch, slot: int) -> None:
        self._b, self._slot = batch, slot
        self.path, self.n_ctx = batch.base.path, batch.n_ctx
        self.eos_id, self.bos_id = batch.base.eos_id, batch.base.bos_id

    def tokenize(self, text: str) -> list[int]:
        return self._b.base.tokenize(text)

    def detokenize(self, ids: list[int]) -> str:
        return self._b.base.detokenize(ids)

    def stream(
        self, prompt_ids: list[int], max_tokens: int, stop_at_eos: bool = True, sampler: Sampler | None = None
    ) -> Iterator[int]:
        if not prompt_ids:
            raise NestlingError("empty prompt: tokenize a non-empty text first")
        self._b.base._check_len(len(prompt_ids))
        budget = min(max_tokens, self.n_ctx - len(prompt_ids))
        return self._tokens(_Seq(list(prompt_ids), budget, stop_at_eos, sampler)) if budget > 0 else iter(())

    def _tokens(self, seq: _Seq) -> Iterator[int]:
        self._b.submit(self._slot, seq)
        try:
            while (tok := seq.out.get()) is not None:
                if isinstance(tok, BaseException):
                    raise tok
                yield tok
        finally:
            seq.cancelled = True  # closed early: the loop frees the slot before its next decode

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._b.base.logits(ids)

    def close(self) -> None:
        self._b.release()


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
    return read_json(path, default={}, fix="the export is damaged; export the student again")


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
        ort = _require("onnxruntime", "serve", "an ONNX export")
        Tokenizer = _require("tokenizers", "serve", "an ONNX export").Tokenizer

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
