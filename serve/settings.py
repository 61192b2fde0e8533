"""Server settings from the environment (prefix ``NESTLING_``) or keyword arguments.

    NESTLING_MODEL_DIR=runs/default/exports/tiny NESTLING_API_KEY=s3cret nestling serve
    nestling serve runs/default/exports/tiny --max-queue 128 --pool 2   # the same fields as flags
    Settings(model_dir="runs/x/exports/tiny", port=8001)    # keyword arguments win over the environment

Every limit the server enforces lives here, so an operator tunes it without code. The `nestling serve` flags
are generated from these fields (``add_settings_args``): one source for names, types, help and defaults.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nestling.core.errors import NestlingError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NESTLING_", extra="ignore", frozen=True)

    model_dir: str | None = Field(None, description="export directory to serve (runs/NAME/exports/STUDENT)")
    engine: Literal["auto", "gguf", "onnx"] | str = Field("auto", description="auto | gguf | onnx")
    variant: str | None = Field(None, description="manifest variant; default: the export's default_variant")
    threads: int = Field(1, ge=1, le=256, description="engine threads (1 is often fastest for tiny models)")
    host: str = Field("127.0.0.1", description="bind address; 127.0.0.1 keeps the server off the network")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key: SecretStr | None = Field(
        None, description="when set, /v1/* and /metrics need 'Authorization: Bearer KEY' (or X-API-Key)"
    )
    model_name: str | None = Field(None, description="model id for /v1/models; default: the student's name")
    max_body_bytes: int = Field(16_384, ge=256, description="larger request bodies get 413")
    max_question_chars: int = Field(2_000, ge=1, description="longer questions get 422")
    max_tokens_cap: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    pool: int = Field(
        0,
        ge=0,
        le=64,
        description="engines answering at once, each its own KV cache over one shared model file; 0: one per "
        "`threads` cores (2 on a 2-core machine); 1: one at a time, as before",
    )
    batched: bool = Field(
        False,
        description="GGUF: the pool is slots of one llama.cpp context decoding together (as llama.cpp's "
        "server does) instead of separate engines; concurrent answers may then differ slightly from the "
        "single-sequence engine the export was parity-checked with",
    )
    max_queue: int = Field(
        64,
        ge=1,
        description="requests admitted at once (answering + waiting for an engine); more get 429 with "
        "Retry-After. Waiting ones are served in arrival order",
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, description="a request waiting longer than this for an engine gets 503 with Retry-After"
    )
    reasoning_format: Literal["none", "deepseek"] = Field(
        "none",
        description="chat completions: none puts steps and answer in content; deepseek puts the steps in "
        "reasoning_content and only the answer in content (a request's reasoning_format wins)",
    )
    system_messages: Literal["prepend", "refuse"] = Field(
        "prepend",
        description="chat: prepend puts system/developer text before the question (the student's prompt "
        "has no other slot for it); refuse answers 422",
    )
    verify: int = Field(
        1,
        ge=1,
        le=16,
        description="tries per explanation: > 1 resamples (seeded) while a checked step is false; 1: off",
    )
    verify_budget_s: float = Field(10.0, gt=0, description="stop resampling after this many seconds")
    calculator: bool = Field(
        False,
        description="explanations: a false result is replaced by the true one as it is written and the model "
        "goes on from it (the step keeps corrected_from); a request's calculator wins",
    )
    max_choices: int = Field(8, ge=1, le=64, description="largest n a chat completion may ask for")
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        le=3600,
        description="idle keep-alive connections close after this; uvicorn's 5 s default races clients that "
        "reuse a pooled connection just as it closes (a dropped request under load)",
    )

    @model_validator(mode="after")
    def _defaults_within_cap(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} exceeds max_tokens_cap {self.max_tokens_cap}"
            )
        return self


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment plus the given non-None overrides; bad values -> NestlingError."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "settings"
        raise NestlingError(
            f"setting {where}: {first['msg']} (fix --{where.replace('_', '-')} or NESTLING_{where.upper()})"
        ) from None


def _arg_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) for a field: Optional unwrapped, Literal as choices, SecretStr as str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    return (annotation if annotation in (int, float, bool) else str), None


def add_settings_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per Settings field, help from its description; an unset flag stays None, so the
    NESTLING_* variable or the field's default applies."""
    group = parser.add_argument_group("server settings (each flag is also a NESTLING_* environment variable)")
    for name, f in Settings.model_fields.items():
        if name in skip:
            continue
        tp, choices = _arg_type(f.annotation)
        said = f.default is None or "default" in (f.description or "")  # the text already says it
        help_ = f"{f.description} (NESTLING_{name.upper()}{'' if said else f'; default {f.default}'})"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=tp, choices=choices, metavar=None if choices else _metavar(name))
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def settings_from_args(ns: argparse.Namespace, **overrides: object) -> Settings:
    """Settings from the environment, then the flags given on the command line, then ``overrides``."""
    given = {name: getattr(ns, name, None) for name in Settings.model_fields}
    return load_settings(**{**given, **overrides})


def _metavar(name: str) -> str:
    return "SECONDS" if name.endswith("_s") else name.split("_")[-1].upper()
