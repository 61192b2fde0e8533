"""Server settings from the environment (prefix ``NESTLING_``) or keyword arguments.

    NESTLING_MODEL_DIR=runs/default/exports/tiny NESTLING_API_KEY=s3cret nestling serve
    Settings(model_dir="runs/x/exports/tiny", port=8001)    # keyword arguments win over the environment

Every limit the server enforces lives here, so an operator tunes it without code.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nestling.serve.errors import NestlingError


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
    max_queue: int = Field(
        16, ge=1, description="requests admitted at once (running + waiting); more get 429"
    )
    queue_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer for the model gets 503")
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
