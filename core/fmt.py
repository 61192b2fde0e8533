"""How every table in nestling writes a rate: ``pct(0.755) == "75.5%"``, ``pct(0.75, [0.6, 0.86]) ==
"75.0% [60-86]"`` (a 95% interval in points), ``pct(None) == "-"``."""

from __future__ import annotations

from collections.abc import Sequence


def pct(x: float | None, ci: Sequence[float] | None = None, none: str = "-") -> str:
    if x is None:
        return none
    return f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]" if ci else "")
