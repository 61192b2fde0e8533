"""Spec strings, the one way every stage names a task, a student or a teacher: ``kind:NAME?key=value&...``,
and ``mix:SPEC,SPEC`` for several tasks.

    parse_query("rg:chain_sum?min_terms=2", what="task")   # -> ("rg:chain_sum", {"min_terms": "2"})
    split_mix("mix:rg:a?x=1,2,rg:b")                        # -> ["rg:a?x=1,2", "rg:b"]
"""

from __future__ import annotations

import re

from nestling.core.errors import NestlingError

TASK_KINDS = ("rg", "file", "hf")
# A comma starts a new task only where a task kind follows: option values may hold commas (operators=+,-).
_MIX_SEP = re.compile(r",(?=\s*(?:" + "|".join(TASK_KINDS) + r"):)")


def parse_query(spec: str, what: str = "spec") -> tuple[str, dict[str, str]]:
    """'name?a=1&b=x' -> ('name', {'a': '1', 'b': 'x'}); '+' is kept literally (operators=+,-)."""
    base, _, query = spec.partition("?")
    params: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise NestlingError(f"{what} {spec!r}: bad query part {part!r}; write key=value&key=value")
        params[key.strip()] = value.strip()
    return base.strip(), params


def split_mix(spec: str) -> list[str]:
    """The tasks of a ``mix:`` spec (a plain spec is a mix of one)."""
    if not spec.startswith("mix:"):
        return [spec]
    return [p.strip() for p in _MIX_SEP.split(spec.removeprefix("mix:")) if p.strip()]
