"""A calculator in the decoding loop: the first false result on a line, found and corrected.

A small model's explanations mostly fail on arithmetic slips ("9 * 8 = 64"), not on the procedure. As in
GSM8K's calculator annotations (Cobbe et al., 2021), the runtime checks each finished line of an explanation
and, where a stated result is false, cuts the line right after that result, writes the true value instead
and lets the model go on from there, so later steps build on the right number.

    first_slip("Step 1: 9 * 8 = 64, so 64 + 3 = 67")
        -> Slip(text="Step 1: 9 * 8 = 72", expr="9 * 8", stated="64", value="72")
    first_slip("Step 1: 9 * 8 = 72")                 -> None
    first_slip("Answer: 64")                         -> None  (an answer line states no calculation)

Only symbolic arithmetic is touched (digits, + - * / ^, parentheses, x or a times sign between numbers): what
a student writes. Claims in words are left to the step checker, which still marks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from nestling.core.explain import safe_eval

MAX_LINE = 400  # characters of one line the calculator reads; past it a line is left as written
_ARITH = set("0123456789.+-*/^() ")
_HAS_OP = re.compile(r"\d\s*[-+*/^]\s*[-+(]*\s*\d")
# One character for one, so positions in the translated line are positions in the line as written.
_SYMBOLS = str.maketrans(
    {"\u00d7": "*", "\u22c5": "*", "\u00b7": "*", "\u00f7": "/", "\u2212": "-", "\u2013": "-"}
)
_TIMES_X = re.compile(r"(?<=[\d ])[xX](?=[ \d])")
_ANSWER = re.compile(r"(?i)^\W*(?:final\s+)?answer\s*[:=]")


@dataclass(frozen=True)
class Slip:
    """A false result and its correction: ``text`` is the line up to and including the true value."""

    text: str
    expr: str
    stated: str
    value: str

    @property
    def claim(self) -> str:
        return f"{self.expr} = {self.value}"

    def stated_in(self, text: str) -> bool:
        """Does ``text`` (a step) state the corrected claim, however it spaces it or writes its signs?"""
        return "".join(self.claim.split()) in "".join(_translate(text).split())


def first_slip(line: str) -> Slip | None:
    """The first ``expr = result`` on ``line`` whose result is false, corrected; None when all hold."""
    if len(line) > MAX_LINE or _ANSWER.match(line) or "=" not in line:
        return None
    t = _translate(line)
    for eq in (i for i, c in enumerate(t) if c == "="):
        left = _left_expr(t, eq)
        right = _right_value(t, eq)
        if left is None or right is None:
            continue
        (expr, value), (stated, stated_value) = left, right
        if _agrees(value, stated, stated_value):
            continue
        space = " " if t[eq + 1 : eq + 2] == " " else ""
        return Slip(line[: eq + 1] + space + format_value(value), expr, stated, format_value(value))
    return None


def read_lines(text: str, start: int, final: bool) -> tuple[int, Slip | None]:
    """The calculator over ``text``'s finished lines from ``start`` (and its last line when ``final``):
    (where the first line not yet read starts, the first slip). On a slip that is the slipped line's start."""
    while True:
        end = text.find("\n", start)
        if end < 0 and not final:
            return start, None
        slip = first_slip(text[start : end if end >= 0 else len(text)])
        if slip is not None or end < 0:
            return start, slip
        start = end + 1


def format_value(x: Fraction) -> str:
    """An exact integer, else a decimal of at most 6 places (what a student writes for 7 / 2)."""
    if x.denominator == 1:
        return str(x.numerator)
    text = f"{float(x):.6f}".rstrip("0").rstrip(".")
    return text


def _translate(line: str) -> str:
    # "3 x 4": an x between numbers is a times sign; elsewhere it stays a letter
    return _TIMES_X.sub("*", line.translate(_SYMBOLS))


def _left_expr(t: str, eq: int) -> tuple[str, Fraction] | None:
    """The longest evaluable arithmetic just before position ``eq`` that has an operator in it."""
    start = eq
    while start > 0 and t[start - 1] in _ARITH:
        start -= 1
    region = t[start:eq]
    for i in range(len(region)):
        if i and not (region[i - 1] == " " or region[i - 1] == "("):
            continue
        candidate = region[i:].strip()
        if not _HAS_OP.search(candidate):
            return None  # shorter suffixes have no more operators than this one
        try:
            return " ".join(candidate.split()), safe_eval(candidate)
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
    return None


def _right_value(t: str, eq: int) -> tuple[str, Fraction] | None:
    """What the line states after ``=``: the longest evaluable arithmetic there (a number, or the next
    link of a chain such as ``= 2 + 12 = 14``)."""
    end = eq + 1
    while end < len(t) and t[end] in _ARITH:
        end += 1
    region = t[eq + 1 : end].rstrip(" .")
    for cut in range(len(region), 0, -1):
        if (
            cut < len(region) and region[cut] != " "
        ):  # whole tokens only: "= 7 8" may state 7, never "7 8"[:2]
            continue
        candidate = region[:cut].strip()
        if not candidate:
            continue
        try:
            return " ".join(candidate.split()), safe_eval(candidate)
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
    return None


def _agrees(value: Fraction, stated_text: str, stated: Fraction) -> bool:
    if value == stated:
        return True
    # "10 / 3 = 3.33": a rounded decimal is right to the digits it states (as the step checker reads it)
    if re.fullmatch(r"-?\d+\.\d+", stated_text):
        digits = len(stated_text.split(".")[1])
        return abs(value - stated) <= Fraction(1, 2 * 10**digits)
    return False
