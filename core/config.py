"""Dataclass configs as command lines: each field's ``metadata["help"]`` is its documented help text.

    @dataclass
    class TrainConfig:
        steps: int = field(default=400, metadata={"help": "optimizer steps"})
        def __post_init__(self): check(self.steps > 0, "steps must be > 0")

    add_config_args(parser, TrainConfig); cfg = config_from_args(TrainConfig, parser.parse_args())

``__post_init__`` validates with ``check``, which raises NestlingError: the CLI prints one line and exits 2.
Stdlib only, so every stage (and the edge runtime) can use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

from nestling.core.errors import NestlingError

T = TypeVar("T")


def check(condition: bool, message: str) -> None:
    if not condition:
        raise NestlingError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _help(f: dataclasses.Field, default: Any) -> str:
    """The field's help with its default appended once: not when the help already says what the default is,
    the field is required, or the default is empty (the help then says what empty means)."""
    text = f.metadata.get("help", "")
    if f.metadata.get("required") or "default" in text.lower() or default in (None, "", [], ()):
        return text
    if isinstance(default, list | tuple):
        default = " ".join(map(str, default))
    return f"{text} (default: {default})"


def add_config_args(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    flags: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """One ``--flag`` per dataclass field (a ``positional`` field is an argument instead), typed,
    defaulting to the field's default, help from its metadata. `flags` spells a field's flag otherwise
    ({"out": ("--run", "--out")}: --run first, --out kept as an alias)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        if f.metadata.get("positional"):
            _add_positional(parser, f)
        else:
            names = (flags or {}).get(f.name) or (_flag(f.name),)
            kwargs = _flag_kwargs(f, hints[f.name])
            if names[0] != _flag(f.name):
                kwargs["metavar"] = names[0].lstrip("-").upper()
            group.add_argument(*names, **kwargs)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _add_positional(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    required = f.metadata.get("required", False)
    parser.add_argument(
        f.name,
        metavar=f.metadata.get("metavar", f.name.upper()),
        nargs=None if required else "?",
        default=None if required else _default(f),
        help=f.metadata.get("help", ""),
    )


def _flag_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    tp, _ = _unwrap_optional(hint)
    default = _default(f)
    kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": _help(f, default)}
    if f.metadata.get("required"):
        kwargs.update(required=True, default=None)
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        kwargs.update(nargs="+", type=inner)
    else:
        kwargs["type"] = tp if tp in (int, float, str) else str
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    return kwargs


def config_from_args(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(overrides)
    try:
        return cls(**values)
    except TypeError as e:
        raise NestlingError(f"{cls.__name__}: {e}") from None
