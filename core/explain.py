"""Answers and explanations: extraction, step parsing and step checking, shared by every stage.

The distillation filter drops rationales with a false step; the runtime shows which steps check out. Both
call the same functions here, so a user sees exactly the checks the training data passed.

    extract_answer("9 + 8 = 17. The answer is 17.")        -> "17"
    answers_match("17.0", "17")                             -> True
    parse_steps("Step 1: 9 + 8 = 17\\nAnswer: 17")          -> ["9 + 8 = 17"]
    check_step("9 times 8 is 64, so 9 + 8 = 17").ok         -> False  (72 != 64)
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from nestling.core.specs import split_mix

# ---- answer extraction -------------------------------------------------------------------------------

_NUM = r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_ANSWER_LINE = re.compile(r"(?im)^\W*(?:final\s+)?answer\s*[:=]\s*(.+?)\s*$")
_ANSWER_IS = re.compile(
    r"(?i)\b(?:final\s+)?answer\s+(?:is|=|:|would be|will be)\s*[:=]?\s*(.+?)(?:\.\s|\.$|\n|$)"
)
_BOXED = re.compile(r"\\boxed\{([^{}]+)\}")
_LAST_NUM = re.compile(_NUM)


def clean_answer(s: str) -> str:
    """Strip markup and trailing punctuation a model wraps around an answer."""
    prev = None
    while s != prev:
        prev = s
        s = s.strip().strip("*_`$ ").rstrip(".!;,").strip()
        s = re.sub(r"^\\\(|\\\)$", "", s).strip()
        s = re.sub(r"^\\(?:boxed|text|mathrm)\{([^{}]*)\}$", r"\1", s).strip()
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
            s = s[1:-1]
    return s


def extract_answer(text: str) -> str | None:
    """Best-effort final answer from free text.

    Order: the last ``Answer:`` line, "the answer is X", ``\\boxed{X}``, then the last number. Small models
    often ignore the requested format, so each fallback matters; None when nothing answer-like is found.
    """
    if not text:
        return None
    for pattern in (_ANSWER_LINE, _ANSWER_IS, _BOXED):
        hits = [clean_answer(m) for m in pattern.findall(text)]
        hits = [h for h in hits if h]
        if hits:
            return hits[-1]
    nums = _LAST_NUM.findall(text)
    return clean_answer(nums[-1]) if nums else None


def parse_number(s: str) -> Fraction | None:
    """'1,234' / '-3.5' / '7/2' / '12.' as an exact Fraction; None when s is not one number."""
    s = clean_answer(s).replace(" ", "")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?", s) or len(s) > 64:
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_answer(s: str) -> str:
    """Case-, space- and punctuation-insensitive form used for exact-match comparison and voting."""
    n = parse_number(s)
    if n is not None:
        return str(n.numerator) if n.denominator == 1 else f"{n.numerator}/{n.denominator}"
    return " ".join(clean_answer(s).lower().split())


def answers_match(pred: str | None, gold: str) -> bool:
    """Numeric equality when both are numbers, normalised exact match otherwise."""
    if pred is None:
        return False
    return normalize_answer(pred) == normalize_answer(gold)


# ---- steps -------------------------------------------------------------------------------------------

_STEP_PREFIX = re.compile(r"^\s*(?:step\s*\d+\s*[:.)-]|\d+\s*[.):]|[-*\u2022]|#+)\s*", re.IGNORECASE)
_BOLD = re.compile(r"\*\*(?!\s*\d)|(?<!\d)\*\*|__")
# A sentence ends at . ! ? then space and a capital, a parenthesis, a digit or math ("down. 20 * 4 = 80."):
# free-form chains often start a sentence with the calculation. A decimal point has no space after it.
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\d\\$])")


def parse_steps(text: str) -> list[str]:
    """Rationale -> steps: one per line (numbering and bullets stripped), lines split into sentences.

    Works the same on "Step n:" lists, numbered or bulleted lists and free-form paragraphs (a reasoning
    model's chain): each sentence becomes a step. The final ``Answer:`` line is not a step.
    """
    steps: list[str] = []
    for line in text.splitlines():
        # Markdown bold ("**Step 1:**") is layout, not content; "2**3" (a power) is kept.
        line = _BOLD.sub("", line)
        line = _STEP_PREFIX.sub("", line).strip()
        if not line or _ANSWER_LINE.match(line):
            continue
        steps.extend(s.strip() for s in _SENTENCE_SPLIT.split(line) if s.strip())
    return steps


_FILLER = re.compile(
    r"(?i)^(?:sure|okay|ok|great|alright|of course|certainly|let'?s|let us|to (?:solve|find|calculate)|"
    r"we (?:need|want|have) to|i (?:will|'ll)|here'?s|here is|first,? we|step by step)\b"
)
_RESTATED_ANSWER = re.compile(
    r"(?i)^(?:so,?\s+|therefore,?\s+|thus,?\s+|hence,?\s+)?(?:the\s+)?(?:final\s+)?(?:answer|result)\s+"
    r"(?:is|=|would be|will be)\b"
)


_LABEL = re.compile(r"(?i)^(?:question|first|second|third|then|next|finally|solution|calculation)\s*:\s*")


def clean_steps(steps: list[str]) -> list[str]:
    """Drop steps that carry no reasoning: pleasantries without numbers, and restated final answers.

    Conservative on purpose: a step is dropped only when it has no checkable claim, and filler only when
    it contains no digit, so a step that says something about the problem is never lost.
    """
    out = []
    for step in steps:
        # "Question: 0 + 2 = 2" / "Second: 6 - 1 = 5": the label is layout; a bare label ("Question: ?") goes.
        step = _LABEL.sub("", step).strip()
        if not re.search(r"[A-Za-z0-9]", step):
            continue
        if not arithmetic_claims(step):
            if _RESTATED_ANSWER.match(step):
                continue
            if _FILLER.match(step) and not re.search(r"\d", step):
                continue
        out.append(step)
    return out


# ---- step checking -----------------------------------------------------------------------------------


@dataclass
class Claim:
    """One checkable statement in a step, e.g. ``9 * 8 = 64``: ``value`` is what it really equals."""

    expr: str
    stated: str
    value: str
    ok: bool


@dataclass
class StepCheck:
    text: str
    claims: list[Claim] = field(default_factory=list)
    status: str | None = None  # one of STEP_STATUSES once ground() has marked it, else None
    reason: str | None = None  # why it is false, ungrounded or unchecked (for the reader)

    @property
    def ok(self) -> bool | None:
        """True: every claim holds; False: at least one is false; None: nothing checkable in the step."""
        if not self.claims:
            return None
        return all(c.ok for c in self.claims)

    def to_dict(self) -> dict:
        d = {"text": self.text, "ok": self.ok, "claims": [asdict(c) for c in self.claims]}
        return {**d, "status": self.status, "reason": self.reason}


StepChecker = Callable[[str], list[Claim]]


class _Evaluator:
    """Recursive-descent evaluator for + - * / ^ and parentheses over Fractions. Never calls eval()."""

    _TOKEN = re.compile(r"\s*(\d+(?:\.\d+)?|[-+*/^()])")
    MAX_EXPONENT = 64

    def __init__(self, text: str):
        self.tokens: list[str] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = self._TOKEN.match(text, pos)
            if not m:
                raise ValueError(f"bad token at {text[pos:]!r}")
            self.tokens.append(m.group(1))
            pos = m.end()
        self.i = 0
        self.partials: list[Fraction] = []  # every sub-result (each operation, each parenthesis)

    def parse(self) -> Fraction:
        value = self._sum()
        if self.i != len(self.tokens):
            raise ValueError("trailing tokens")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self) -> str:
        tok = self._peek()
        if tok is None:
            raise ValueError("unexpected end")
        self.i += 1
        return tok

    def _sum(self) -> Fraction:
        value = self._product()
        while self._peek() in ("+", "-"):
            op = self._take()
            rhs = self._product()
            value = value + rhs if op == "+" else value - rhs
            self.partials.append(value)
        return value

    def _product(self) -> Fraction:
        value = self._power()
        while self._peek() in ("*", "/"):
            op = self._take()
            rhs = self._power()
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise ValueError("division by zero")
            else:
                value /= rhs
            self.partials.append(value)
        return value

    def _power(self) -> Fraction:
        base = self._unary()
        if self._peek() == "^":
            self._take()
            exp = self._power()
            if exp.denominator != 1 or abs(exp) > self.MAX_EXPONENT:
                raise ValueError("unsupported exponent")
            self.partials.append(base ** int(exp))
            return self.partials[-1]
        return base

    def _unary(self) -> Fraction:
        if self._peek() in ("-", "+"):
            sign = -1 if self._take() == "-" else 1
            return sign * self._unary()
        tok = self._take()
        if tok == "(":
            value = self._sum()
            if self._take() != ")":
                raise ValueError("unbalanced parentheses")
            self.partials.append(value)
            return value
        if tok in "+-*/^)":
            raise ValueError(f"unexpected {tok!r}")
        return Fraction(tok)


def safe_eval(expr: str) -> Fraction:
    """Evaluate an arithmetic expression exactly; ValueError when it is not one."""
    return eval_partials(expr)[0]


def eval_partials(expr: str) -> tuple[Fraction, list[Fraction]]:
    """(value, every intermediate result): "(2 + 3) * 4" -> (20, [5, 5, 20]). ValueError when not one."""
    if len(expr) > 200:
        raise ValueError("expression too long")
    ev = _Evaluator(expr)
    return ev.parse(), ev.partials


_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)}
_NUMBER_WORDS.update({w: str(v) for w, v in _TENS.items()}, hundred="100", thousand="1000")
_UNITS = "one two three four five six seven eight nine".split()
# "twenty-one" is 21, not 20 - 1: compounds become one number before the hyphen can read as a minus.
_COMPOUND = re.compile(rf"(?i)\b(twenty|{'|'.join(_TENS)})[-\s]({'|'.join(_UNITS)})\b")
_WORD_OPS = [
    (r"\bmultiplied\s+by\b|\btimes\b", "*"),
    (r"\bdivided\s+by\b", "/"),
    (r"\bplus\b|\badded\s+to\b", "+"),
    (r"\bminus\b|\bsubtract(?:ed)?\b(?=\s+\d)", "-"),
    (r"\bto\s+the\s+power\s+of\b", "^"),
    (r"\b(?:is\s+equal\s+to|equals?|is|are|gives?|makes?|results?\s+in|yields?)\b", "="),
]
_N = r"(\d+(?:\.\d+)?)"
# What a result is called in prose ("..., which gives us 7"): an equals sign; the comma before it goes too.
_GIVES = (
    r"\s*,?\s*(?:which\s+gives(?:\s+us)?|gives\s+us|(?:and\s+|to\s+|we\s+|you\s+)get|that\s+makes|"
    r"which\s+is)\b"
)
_BINARY_PHRASES = [
    (re.compile(rf"(?i)\bsubtract(?:ing)?\s+{_N}\s+from\s+{_N}"), r"\2 - \1"),
    (re.compile(rf"(?i)\badd(?:ing)?\s+{_N}\s+(?:and|to)\s+{_N}"), r"\1 + \2"),
    (re.compile(rf"(?i)\bmultiply(?:ing)?\s+{_N}\s+(?:by|and|with)\s+{_N}"), r"\1 * \2"),
    (re.compile(rf"(?i)\bdivid(?:e|ing)\s+{_N}\s+by\s+{_N}"), r"\1 / \2"),
    (re.compile(_GIVES, re.I), " = "),
    (re.compile(r"\bthe\s+sum\s+of\s+(\S+)\s+and\s+(\S+)", re.I), r"\1 + \2"),
    (re.compile(r"\bthe\s+product\s+of\s+(\S+)\s+and\s+(\S+)", re.I), r"\1 * \2"),
    (re.compile(r"\bthe\s+difference\s+(?:between|of)\s+(\S+)\s+and\s+(\S+)", re.I), r"\1 - \2"),
    (re.compile(r"\bthe\s+quotient\s+of\s+(\S+)\s+and\s+(\S+)", re.I), r"\1 / \2"),
]
_UNIT_WORD = re.compile(r"(\d)\s+[A-Za-z]+\b(?=\s*[-+*/=])")
_EXPR = r"[-+(]*\s*\d[\d.\s+\-*/^()]*"
# The stated value must end its equation: in "2 - 7 = 2 - 7 = -5" the claim is -5, not 2.
_CLAIM = re.compile(
    rf"(?=({_EXPR})=\s*([-+]?\s*\d+(?:\.\d+)?(?:\s*/\s*\d+)?)(?![\d.]*\s*[*/^]|\.\d|\d|\s*[-+]\s*\(?\s*\d))"
)


_LATEX = [
    (re.compile(r"\\(?:times|cdot|ast)\b"), " * "),
    (re.compile(r"\\div\b"), " / "),
    (re.compile(r"\\(?:text|mathrm|mathbf)\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\[dt]?frac\{\s*(\d+(?:\.\d+)?)\s*\}\{\s*(\d+(?:\.\d+)?)\s*\}"), r"\1/\2"),
    (re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}"), r"(\1)/(\2)"),
    (re.compile(r"\\left|\\right|\\[,;!]|\\[()\[\]]|\$"), " "),
]


def _symbolize(text: str) -> str:
    """Words, LaTeX and typographic symbols -> ASCII arithmetic, so one regex finds every claim."""
    t = text
    if "\\" in t or "$" in t:  # reasoning models write math as LaTeX: \( 7 \times 8 = 56 \)
        for pattern, repl in _LATEX:
            t = pattern.sub(repl, t)
    t = t.replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-").replace("\u2013", "-")
    t = t.replace("**", "^").replace("\u22c5", "*").replace("\u00b7", "*")
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)
    t = re.sub(r"(?<=\d)\s*[xX]\s*(?=\d)", " * ", t)
    t = _COMPOUND.sub(
        lambda m: str(int(_NUMBER_WORDS[m.group(1).lower()]) + _UNITS.index(m.group(2).lower()) + 1), t
    )
    t = re.sub(
        r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", lambda m: _NUMBER_WORDS[m.group(1).lower()], t, flags=re.I
    )
    for pattern, repl in _BINARY_PHRASES:
        t = pattern.sub(repl, t)
    for pattern, sym in _WORD_OPS:
        t = re.sub(pattern, f" {sym} ", t, flags=re.I)
    # "7 apples - 3 apples = 4": a unit word between a number and an operator is not part of the sum.
    return _UNIT_WORD.sub(r"\1", t)


def _close_enough(value: Fraction, stated_text: str, stated: Fraction) -> bool:
    if value == stated:
        return True
    # A rounded decimal ("10 / 3 = 3.33") is right when it is right to the digits it states.
    if "." in stated_text:
        digits = len(stated_text.split(".")[1])
        return abs(value - stated) <= Fraction(1, 2 * 10**digits)
    return False


def arithmetic_claims(step: str) -> list[Claim]:
    """Every ``expr = number`` with an operator in expr, in symbols or words ("9 times 8 is 72")."""
    text = _symbolize(step)
    claims: list[Claim] = []
    seen_spans: set[int] = set()
    for m in _CLAIM.finditer(text):
        lhs, rhs = m.group(1), m.group(2)
        # Keep the longest evaluable suffix of the left side: "so 2 + 3" -> "2 + 3".
        lhs = lhs.strip()
        eq_pos = m.start(1) + len(m.group(1))
        if eq_pos in seen_spans or not re.search(r"\d\s*[-+*/^]\s*[-+(]*\s*\d", lhs):
            continue
        # Later matches ending at this "=" are suffixes of this lhs, all tried below: once per "=" keeps a
        # long step linear in its "=" signs instead of quadratic in its length.
        seen_spans.add(eq_pos)
        value = None
        for start in range(len(lhs)):
            if start and not (lhs[start - 1].isspace() or lhs[start - 1] in "(=,"):
                continue
            try:
                value = safe_eval(lhs[start:])
                lhs = lhs[start:].strip()
                break
            except (ValueError, ZeroDivisionError, OverflowError):
                continue
        if value is None or not re.search(r"\d\s*[-+*/^]\s*[-+(]*\s*\d", lhs):
            continue
        stated_text = rhs.replace(" ", "")
        try:
            stated = safe_eval(stated_text)
        except (ValueError, ZeroDivisionError):
            continue
        ok = _close_enough(value, stated_text, stated)
        claims.append(Claim(expr=" ".join(lhs.split()), stated=stated_text, value=_fmt(value), ok=ok))
    known = {(c.expr, c.value, c.ok) for c in claims}
    return [c for c in _chain_claims(text) if (c.expr, c.value, c.ok) not in known] + claims


_HAS_OP = re.compile(r"\d\s*[-+*/^]\s*[-+(]*\s*\d")
_SEGMENT = r"[-+(]*\s*\d[\d.\s+\-*/^()]*"
_CHAIN = re.compile(rf"{_SEGMENT}(?:=\s*{_SEGMENT}){{2,}}")


def _eval_edge(segment: str, suffix: bool) -> Fraction | None:
    """Value of the longest evaluable suffix (first segment) or prefix (last segment) of a chain end."""
    seg = segment.strip()
    cuts = range(len(seg)) if suffix else range(len(seg), 0, -1)
    for cut in cuts:
        part = seg[cut:] if suffix else seg[:cut]
        try:
            return safe_eval(part)
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
    return None


def _chain_claims(text: str) -> list[Claim]:
    """Inner links of ``a = b = c`` chains: "3 + 4 = 7 + 1 = 8" claims 3 + 4 equals 7 + 1, which is false.

    The last link (``7 + 1 = 8``) is an ordinary claim found by arithmetic_claims.
    """
    claims: list[Claim] = []
    for m in _CHAIN.finditer(text):
        segs = m.group(0).split("=")
        values: list[Fraction | None] = [_eval_edge(segs[0], suffix=True)]
        for seg in segs[1:-1]:
            try:
                values.append(safe_eval(seg))
            except (ValueError, ZeroDivisionError, OverflowError):
                values.append(None)
        for i in range(len(segs) - 2):
            left, right = values[i], values[i + 1]
            if left is None or right is None or not any(_HAS_OP.search(x) for x in segs[i : i + 2]):
                continue
            claims.append(
                Claim(
                    expr=" ".join(segs[i].split()),
                    stated=" ".join(segs[i + 1].split()),
                    value=_fmt(left),
                    ok=left == right,
                )
            )
    return claims


def _fmt(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    return f"{float(x):.6g}"


_QUOTED = r"[\"'\u201c\u201d\u2018\u2019]"
_COUNT = r"(\d+|" + "|".join(_NUMBER_WORDS) + r"|once|twice|no)"
_LETTER_PATTERNS = [
    # letter "a" appears 2 times in "banana" / the letter a occurs twice in the word "banana"
    re.compile(
        rf"(?i)\bletter\s+{_QUOTED}?(?P<letter>[a-z]){_QUOTED}?\s+(?:appears|occurs|shows up)\s+"
        rf"{_COUNT.replace('(', '(?P<count>', 1)}(?:\s+times?)?\s+in\s+(?:the\s+(?:word|text|string)\s+)?"
        rf"{_QUOTED}(?P<text>[^\"'\u201c\u201d\u2018\u2019]+){_QUOTED}"
    ),
    # "banana" has 3 a's / "green" contains 2 "e"s
    re.compile(
        rf"(?i){_QUOTED}(?P<text>[^\"'\u201c\u201d\u2018\u2019]+){_QUOTED}\s+(?:has|contains|includes)\s+"
        rf"{_COUNT.replace('(', '(?P<count>', 1)}\s+(?:(?:letter|occurrences? of(?: the letter)?)\s+)?"
        rf"{_QUOTED}?(?P<letter>[a-z]){_QUOTED}?(?:'?s)?\b"
    ),
    # there are 2 "r"s in "strawberry"
    re.compile(
        rf"(?i)\bthere\s+(?:is|are)\s+{_COUNT.replace('(', '(?P<count>', 1)}\s+(?:letter\s+)?"
        rf"{_QUOTED}?(?P<letter>[a-z]){_QUOTED}?(?:'?s)?\s+in\s+(?:the\s+(?:word|text|string)\s+)?"
        rf"{_QUOTED}(?P<text>[^\"'\u201c\u201d\u2018\u2019]+){_QUOTED}"
    ),
]


def _count_word(word: str) -> int:
    w = word.lower()
    special = {"once": 1, "twice": 2, "no": 0}
    return special[w] if w in special else int(_NUMBER_WORDS.get(w, w))


def letter_count_claims(step: str) -> list[Claim]:
    """Claims such as 'the letter "a" appears 2 times in "banana"' (counted case-insensitively)."""
    claims: list[Claim] = []
    seen: set[tuple[str, str, str]] = set()
    for pattern in _LETTER_PATTERNS:
        for m in pattern.finditer(step):
            letter, text, count = m.group("letter").lower(), m.group("text"), m.group("count")
            key = (letter, text, count.lower())
            if key in seen:
                continue
            seen.add(key)
            stated = _count_word(count)
            value = text.lower().count(letter)
            claims.append(
                Claim(
                    expr=f'count("{letter}" in "{text}")',
                    stated=str(stated),
                    value=str(value),
                    ok=value == stated,
                )
            )
    return claims


# Per-task step checkers. Key: a task name prefix ("rg:basic_arithmetic") or "*" for every task.
STEP_CHECKERS: dict[str, list[StepChecker]] = {
    "*": [arithmetic_claims],
    "rg:letter_counting": [letter_count_claims],
}


def register_step_checker(checker: StepChecker, tasks: Iterable[str] = ("*",)) -> None:
    """Add a checker for tasks whose name starts with one of `tasks` ("*" = all)."""
    for t in tasks:
        STEP_CHECKERS.setdefault(t, []).append(checker)


def _checkers_for(task: str | None) -> list[StepChecker]:
    out = list(STEP_CHECKERS.get("*", []))
    if task:
        # A mix ("mix:rg:a,rg:b") gets the checkers of every task it names.
        parts = split_mix(task)
        for key, checkers in STEP_CHECKERS.items():
            if key != "*" and any(p.strip().startswith(key) for p in parts):
                out.extend(c for c in checkers if c not in out)
    return out


def check_step(step: str, task: str | None = None) -> StepCheck:
    claims: list[Claim] = []
    for checker in _checkers_for(task):
        claims.extend(checker(step))
    return StepCheck(text=step, claims=claims)


def check_steps(steps: Iterable[str], task: str | None = None) -> list[StepCheck]:
    return [check_step(s, task) for s in steps]


def explanation_consistent(steps: list[str], answer: str | None) -> bool:
    """The rationale's last stated result equals the answer (a claim's value, else the last number)."""
    if answer is None or not steps:
        return False
    for step in reversed(steps):
        claims = arithmetic_claims(step)
        if claims:
            return answers_match(claims[-1].stated, answer)
        nums = _LAST_NUM.findall(step)
        if nums:
            return answers_match(nums[-1], answer)
    return False


# ---- grounding: every number a step uses comes from the question or an earlier step -------------------

# A step's mark against its question (StepCheck.status):
#   grounded    every claim holds and uses only numbers stated in the question or derived by earlier steps
#   false       a claim does not hold (its arithmetic or count is wrong)
#   ungrounded  the claims hold but use a number from nowhere (or compute something the question does not
#               ask), or a step without a claim states a number from nowhere
#   unchecked   nothing to check: no claim and no new number (prose, a restatement), or past the limits
STEP_STATUSES = ("grounded", "false", "ungrounded", "unchecked")
# The work is bounded by construction: at most MAX_CHECKED_STEPS steps of at most MAX_STEP_CHARS characters
# are checked (the regexes are at worst quadratic in a step's length); the rest are unchecked and the
# explanation is not complete. A student's explanation is a few hundred tokens, far inside both.
MAX_CHECKED_STEPS = 256
MAX_STEP_CHARS = 400
MAX_QUESTION_CHARS = 4000
# Place-value splits followed at once (each closes with at most 8 parts): a real chain works one or two.
MAX_SPLITS = 32

_PLAIN_NUM = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:/\d+)?(?![\w])")
_STEP_REF = re.compile(r"(?i)\bsteps?\s+\d+")
_LETTER_EXPR = re.compile(r'^count\("(.)" in "(.*)"\)$', re.S)
# Numbers a word in the question implies: "a dozen eggs" states 12, "20%" states 100, "per hour" 60.
_IMPLIED = [
    (re.compile(r"(?i)\bdozens?\b"), (12,)),
    (re.compile(r"(?i)\bhalf\b|\bhalve[sd]?\b|\btwice\b|\bdouble[sd]?\b|\bpairs?\b"), (2,)),
    (re.compile(r"(?i)\btriple[sd]?\b|\bthrice\b"), (3,)),
    (re.compile(r"(?i)\bquarters?\b"), (4,)),
    (re.compile(r"%|\bpercent\b|\bcents?\b"), (100,)),
    (re.compile(r"(?i)\bhours?\b|\bminutes?\b"), (60,)),
    (re.compile(r"(?i)\bweeks?\b"), (7,)),
    (re.compile(r"(?i)\bdays?\b"), (24,)),
    (re.compile(r"(?i)\byears?\b"), (12, 52, 365)),
]


def _numbers(text: str, fractions: bool = False) -> list[Fraction]:
    """The numbers written in symbolized text, as absolute values; ``fractions``: "3/4" also gives 3/4."""
    out: list[Fraction] = []
    for m in re.finditer(r"\d+(?:\.\d+)?(?:/\d+)?", text):
        parts = [Fraction(p) for p in m.group(0).split("/")]
        out.extend(parts)
        if fractions and len(parts) == 2 and parts[1]:
            out.append(parts[0] / parts[1])
    return out


def question_numbers(question: str) -> set[Fraction]:
    """Every number the question states, in digits or words, and those its words imply ("dozen": 12)."""
    q = question[:MAX_QUESTION_CHARS]
    known = set(_numbers(_symbolize(q), fractions=True))
    for pattern, values in _IMPLIED:
        if pattern.search(q):
            known.update(Fraction(v) for v in values)
    if "%" in q or re.search(r"(?i)\bpercent\b", q):
        known.update(n / 100 for n in list(known))
    return known


def grounding_applies(question: str | None, task: str | None = None) -> bool:
    """Grounding is asked of arithmetic and word problems (questions that state at least two numbers, in
    digits, words or implied: "three apples and a dozen pears"), and of tasks with their own checker
    (letter counting: the counted word must be quoted from the question)."""
    if not question:
        return False
    q = question[:MAX_QUESTION_CHARS]
    stated = len(_numbers(_symbolize(q))) + sum(bool(p.search(q)) for p, _ in _IMPLIED)
    return stated >= 2 or len(_checkers_for(task)) > len(STEP_CHECKERS.get("*", []))


@dataclass
class Target:
    """The expression an arithmetic question states ("Calculate 4 - 1." -> 4 - 1): its numbers and value."""

    expr: str
    value: Fraction
    leaves: list[Fraction]


def question_expression(question: str) -> Target | None:
    """The one arithmetic expression the question states, None when it states none or several."""
    text = _symbolize(question[:MAX_QUESTION_CHARS])
    found = []
    for m in re.finditer(r"[-+(]*\s*\d[\d.\s+\-*/^()]*", text):
        seg = m.group(0).strip().rstrip("+-*/^ .(")
        if not _HAS_OP.search(seg):
            continue
        for cut in range(len(seg), 0, -1):
            try:
                value = safe_eval(seg[:cut])
            except (ValueError, ZeroDivisionError, OverflowError):
                continue
            if _HAS_OP.search(seg[:cut]):
                found.append(Target(" ".join(seg[:cut].split()), value, sorted(_numbers(seg[:cut]))))
            break
    return found[0] if len(found) == 1 else None


# The operation a one-step word problem's words ask for. Only a question whose cues name exactly one
# operation is judged by them ("buys 4 more" and "in total" together: + or *, so neither is asserted).
_COMPARE = re.compile(
    r"(?i)\bhow\s+(?:many|much)\s+(?:\w+\s+)?(?:more|fewer|less|older|younger|taller|shorter|longer|heavier)\b"
)
_WORD_CUES = [
    ("/", re.compile(r"(?i)\b(?:shared?|split|divided|equal(?:ly)?|shares)\b")),
    ("-", re.compile(r"(?i)\b(?:left|remain(?:s|ing)?|gave|gives?\s+away|give|lost|loses|lose|ate|eats|spent|"
                     r"spends|sold|sells|fewer|less|took\s+away|takes\s+away|used|away|off|younger|shorter|"
                     r"(?:drive|drives|drove|walk|walks|walked|go|goes|went|get|gets|got|move|moves|moved)\s+out)\b")),
    ("+", re.compile(r"(?i)\b(?:more|buys|bought|gets|got|finds|found|receives|received|gains|gained|"
                     r"altogether|total|combined|together|picks\s+up|adds?|in\s+all|older|taller|longer)\b")),
    ("*", re.compile(r"(?i)\b(?:each|per|every|holds|a\s+(?:day|week|month|hour)|rows?\s+of|times)\b")),
]  # fmt: skip
_CHECK_WORDS = re.compile(r"(?i)\b(?:check(?:s|ed|ing)?|verif(?:y|ies|ied|ication)|confirm(?:s|ed)?)\b")
# Two amounts joined by "and" with no other cue ("8 red cars and 6 blue cars. How many cars?"): a sum.
_JOINED = re.compile(r"(?i)\d[^.?!]{0,40}?\band\b[^.?!]{0,20}?\d")


def question_operation(question: str) -> str | None:
    """The one operation a word problem over two written numbers asks for, from its words; None when it
    states another count of numbers, names none or several, or is an arithmetic expression.

    question_operation("Sam has 5 apples and buys 3 more. How many apples now?") -> "+"
    """
    q = question[:MAX_QUESTION_CHARS]
    if question_expression(q) is not None or len(_numbers(_symbolize(q))) != 2:
        return None
    if _COMPARE.search(q):
        return "-"
    ops = {op for op, cue in _WORD_CUES if cue.search(q)}
    if "/" in ops:
        ops.discard("*")  # "shared equally ... how many does each get?"
    if not ops and _JOINED.search(_symbolize(q)):
        ops = {"+"}
    return ops.pop() if len(ops) == 1 else None


@dataclass
class Explanation:
    """A whole explanation checked against its question: every step marked, and the answer's footing.

    ``answer_derived``: the answer is the steps' last result (or each of its numbers is a derived result).
    ``on_question``: the last result is the value of the expression the question states (None: it states
    none). ``complete``: grounding applies, no step is false or ungrounded, at least one is grounded, the
    answer is derived and on_question is not False: an explanation a user can follow from the question to
    the answer. ``grounding``: whether the question is one grounding is asked of (``grounding_applies``).
    """

    steps: list[StepCheck]
    answer: str | None
    answer_derived: bool
    on_question: bool | None
    complete: bool
    grounding: bool
    reason: str | None = None  # why the explanation is not complete

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "steps"}
        return {**d, "steps": [s.to_dict() for s in self.steps]}


def place_value_split(parts: Iterable[Fraction], n: Fraction) -> bool:
    """``parts`` are an exact place-value split of ``n``: 23 -> 20 + 3, 125 -> 100 + 25 or 100 + 20 + 5; not
    23 -> 13 + 10 or 18 + 5 (the parts' digits overlap) nor 20 + 4 (they do not sum to 23)."""
    ps = sorted(parts, reverse=True)
    if len(ps) < 2 or n.denominator != 1 or any(p.denominator != 1 or p <= 0 for p in ps) or sum(ps) != n:
        return False
    for hi, lo in itertools.pairwise(ps):
        digits = str(hi.numerator)
        if lo >= 10 ** (len(digits) - len(digits.rstrip("0"))):
            return False  # lo reaches into hi's digits: no carry-free split
    return True


def place_value_part(p: Fraction, n: Fraction) -> bool:
    """``p`` is one part of some place-value split of ``n``: 20 and 3 of 23, 25 of 125; not 23 of 23."""
    if p.denominator != 1 or n.denominator != 1 or not 0 < p < n:
        return False
    pi, ni = p.numerator, n.numerator
    digits = str(pi)
    low = 10 ** (len(digits) - len(digits.rstrip("0")))
    return any(ni % 10**k - ni % low == pi for k in range(len(str(low)), len(str(ni)) + 1))


_BINARY = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*$")
_PLUS_ONLY = re.compile(r"^\s*\d+(?:\s*\+\s*\d+)+\s*$")
_PAREN_SUM = re.compile(r"\((\s*\d+(?:\s*\+\s*\d+)+\s*)\)")
_TERMS = re.compile(r"^\s*\d+\s*([*/])\s*\d+(?:\s*\+\s*\d+\s*\1\s*\d+)+\s*$")


@dataclass
class _Split:
    """A stated number worked in place-value parts, grounded only once the parts are used consistently.

    ``op`` "*" or "/": each part meets the same ``other`` operand (23 * 4 as 20 * 4 and 3 * 4) and the
    partial results are recombined by a sum (80 + 12). ``op`` "+" or "-": the parts are taken in turn
    (47 + 38 as 47 + 30 = 77, then 77 + 8), ``other`` being the running result.
    """

    op: str
    other: Fraction
    parts: list[Fraction] = field(default_factory=list)
    partials: list[Fraction] = field(default_factory=list)
    steps: list[StepCheck] = field(default_factory=list)  # steps grounded only if the split closes
    done: bool = False


class _Ground:
    """The numbers a step may use: the question's, then every result the steps derive, in order."""

    def __init__(self, question: str):
        self.question = question[:MAX_QUESTION_CHARS].lower()
        self.known = question_numbers(question)
        self.given = frozenset(self.known)  # what the question states, before any step derives more
        self.target = question_expression(question)
        self.word_op = None if self.target else question_operation(question)
        numbers = sorted(_numbers(_symbolize(question[:MAX_QUESTION_CHARS])))
        # A word problem over two numbers: a step combining exactly them is judged by the operation its
        # words ask for; where they name none (or several), the step cannot be checked against them.
        self.word_numbers = numbers if not self.target and len(numbers) == 2 else []
        self.word_op_unconfirmed = False
        self.results: set[Fraction] = set()  # derived by the steps (not stated by the question)
        self.last: Fraction | None = None
        self.last_text: str | None = None
        # Integers the question writes (not implies) that a step may work in place-value parts.
        written = _numbers(_symbolize(question[:MAX_QUESTION_CHARS]))
        self.stated = sorted({x for x in written if x.denominator == 1 and x >= 10})
        self.splits: list[_Split] = []

    def derive(self, c: Claim, partials: Iterable[Fraction] = ()) -> None:
        new = {abs(x) for x in partials}
        for text in (c.stated, c.value):
            try:
                new.add(abs(safe_eval(text)))
            except (ValueError, ZeroDivisionError):
                continue
            if not c.ok:
                break  # a false claim's true value was never derived: only what it states
        self.results |= new
        self.known |= new

    def mark(self, sc: StepCheck) -> None:
        if not sc.claims:
            self._mark_prose(sc)
            return
        missing = self._ground_claims(sc)
        last = sc.claims[-1]
        if not self._is_check(sc, last):
            self.last, self.last_text = _value_of(last.stated), last.stated
        if any(not c.ok for c in sc.claims):
            sc.status, sc.reason = "false", "a claim does not hold"
        elif missing:
            sc.status, sc.reason = "ungrounded", missing
        else:
            sc.status = "grounded"

    def _is_check(self, sc: StepCheck, claim: Claim) -> bool:
        """A step that says it checks the result by recomputing a stated number from it ("Check: 8 + 2 =
        10" after 10 - 2 = 8): the answer stays the result it checks."""
        value = _value_of(claim.stated)
        return (
            self.last is not None
            and value is not None
            and _CHECK_WORDS.search(sc.text) is not None
            and abs(value) in self.given
            and abs(self.last) in {abs(x) for x in _numbers(claim.expr)}
        )

    def _ground_claims(self, sc: StepCheck) -> str | None:
        """Ground the step's claims (in any order: a step may use a result it states later in the same
        sentence); why the first ungrounded one is, or None."""
        claims = sc.claims
        pending, why = list(claims), None
        progress = True
        while pending and progress:
            progress = False
            for c in list(pending):
                leaves, partials, ok_words = self._leaves(c)
                if ok_words and self._recombines(c, leaves):
                    self.derive(c, partials)
                elif ok_words and all(x in self.known for x in leaves):
                    self.derive(c, partials)
                    self._split_step(c, sc, needed=False)
                elif not (ok_words and self._split_step(c, sc, needed=True)):
                    continue
                pending.remove(c)
                progress = True
        for c in pending:
            leaves, _, ok_words = self._leaves(c)
            nowhere = [x for x in leaves if x not in self.known]
            why = why or (
                f"{c.expr}: the text is not in the question"
                if not ok_words
                else f"{c.expr}: {_fmt(nowhere[0])} is not in the question or an earlier step"
            )
            self.derive(c)  # later steps are judged on their own numbers, not blamed for this one's
        off = None if self._is_check(sc, claims[-1]) else self._off_question(claims)
        return why or off

    def _leaves(self, c: Claim) -> tuple[list[Fraction], list[Fraction], bool]:
        """(the numbers a claim uses, its intermediate results, whether the words it counts in are quoted
        from the question)."""
        m = _LETTER_EXPR.match(c.expr)
        if m:
            return [], [], m.group(2).lower() in self.question
        leaves = _numbers(self._whole(c.expr))
        partials: list[Fraction] = []
        for side in (c.expr, c.stated):
            try:
                partials += eval_partials(side)[1]
            except (ValueError, ZeroDivisionError, OverflowError):
                pass
        if _HAS_OP.search(c.stated):
            # A chain link "(2 + 3) * 4 = 5 * 4": the right side may use what the left side computes.
            leaves += [x for x in _numbers(self._whole(c.stated)) if x not in {abs(p) for p in partials}]
        return leaves, partials, True

    # -- place-value splits: 23 * 4 worked as 20 * 4 = 80, 3 * 4 = 12, 80 + 12 = 92 -----------------------

    def _split_of(self, parts: list[Fraction]) -> Fraction | None:
        """The stated number ``parts`` are an exact place-value split of, or None."""
        return next((n for n in self.stated if place_value_split(parts, n)), None)

    def _part_of(self, p: Fraction) -> Fraction | None:
        return next((n for n in self.stated if place_value_part(p, n)), None)

    def _whole(self, expr: str) -> str:
        """The expression with a split written out put back whole: "(20 + 3) * 4" and "20 * 4 + 3 * 4" read
        as 23 * 4 when 23 is stated; anything else is left as it is."""

        def whole(m: re.Match) -> str:
            n = self._split_of(_numbers(m.group(1)))
            return str(n) if n is not None else m.group(0)

        expr = _PAREN_SUM.sub(whole, expr)
        m = _TERMS.match(expr)
        if m:
            terms = [_numbers(t) for t in expr.split("+")]
            sides = [0, 1] if m.group(1) == "*" else [0]  # a quotient splits its dividend only
            for side in sides:
                others = {t[1 - side] for t in terms}
                n = self._split_of([t[side] for t in terms]) if len(others) == 1 else None
                if n is not None:
                    return f"{n} {m.group(1)} {_fmt(others.pop())}"
        return expr

    def _split_step(self, c: Claim, sc: StepCheck, needed: bool) -> bool:
        """A claim that works one place-value part of a stated number ("20 * 4 = 80" for 23 * 4): held
        as grounded until the parts close (finish() marks it ungrounded if they never do). ``needed``: the
        claim is not grounded otherwise, so its step waits on the split; else it is only noted (a part the
        question also states, "3 * 3" for 23 * 3)."""
        if needed and self._states_split(c):
            return True
        m = _BINARY.match(c.expr)
        if not m:
            return False
        a, op, b = Fraction(m.group(1)), m.group(2), Fraction(m.group(3))
        result = _value_of(c.stated)
        if result is None:
            return False
        # (the part, what it meets): a product splits either factor, a quotient its dividend, a sum or a
        # difference takes the part in turn (base + part, base - part).
        pairs = {"*": [(a, b), (b, a)], "/": [(a, b)], "+": [(b, a), (a, b)], "-": [(b, a)]}[op]
        for part, other in pairs:
            if self._part_of(part) is None:
                continue
            if op in "*/" and other in self.known:
                return self._distributed(op, other, part, result, sc if needed else None)
            if op in "+-" and self._in_turn(op, other, part, result, sc if needed else None):
                return True
        return False

    def _names_split(self, nums: list[Fraction], nowhere: list[Fraction]) -> bool:
        """The step's numbers name a place-value split of a stated number that takes in every number from
        nowhere ("Break 38 into 30 and 8", where 8 is stated as well)."""
        for n in self.stated:
            parts = list(dict.fromkeys(x for x in nums if place_value_part(x, n)))
            if set(nowhere) <= set(parts) and place_value_split(parts, n):
                return True
        return False

    def _states_split(self, c: Claim) -> bool:
        """ "20 + 3 = 23": the split of a stated number, itself. It derives nothing new."""
        value = _value_of(c.stated)
        return (
            bool(_PLUS_ONLY.match(c.expr)) and value is not None and self._split_of(_numbers(c.expr)) == value
        )

    def _distributed(
        self, op: str, other: Fraction, part: Fraction, r: Fraction, sc: StepCheck | None
    ) -> bool:
        g = next((g for g in self.splits if (g.op, g.other) == (op, other) and not g.done), None)
        if g is None or part in g.parts or len(g.parts) >= 8:
            if len(self.splits) >= MAX_SPLITS:
                return False
            g = _Split(op, other)
            self.splits.append(g)
        g.parts.append(part)
        g.partials.append(abs(r))
        if sc is not None:
            g.steps.append(sc)
        return True

    def _in_turn(self, op: str, base: Fraction, part: Fraction, r: Fraction, sc: StepCheck | None) -> bool:
        """47 + 30 = 77 then 77 + 8 = 85: the running result meets the next part of the same number."""
        g = next((g for g in self.splits if g.op == op and g.other == base and not g.done), None)
        if g is None:
            if base not in self.known or len(self.splits) >= MAX_SPLITS:
                return False
            g = _Split(op, base)
            self.splits.append(g)
        g.parts.append(part)
        g.other = abs(r)
        if sc is not None:
            g.steps.append(sc)
        if self._split_of(g.parts) is not None:
            g.done = True
            self.results.add(abs(r))
            self.known.add(abs(r))
        return True

    def _recombines(self, c: Claim, leaves: list[Fraction]) -> bool:
        """A sum of exactly the partial results of one split's parts ("80 + 12" after 20 * 4 and 3 * 4):
        the split closes and its steps stay grounded."""
        if not _PLUS_ONLY.match(c.expr) or all(x in self.known for x in leaves):
            return False
        want = sorted(leaves)
        for g in self.splits:
            if g.done or g.op not in "*/" or len(g.parts) > 8:
                continue
            for k in range(2, len(g.parts) + 1):
                for idx in itertools.combinations(range(len(g.parts)), k):
                    if sorted(g.partials[i] for i in idx) == want and self._split_of(
                        [g.parts[i] for i in idx]
                    ):
                        g.done = True
                        return True
        return False

    def finish(self) -> None:
        """A part whose split never closed (a part left out, never recombined) was a number from nowhere."""
        for g in self.splits:
            if g.done:
                continue
            for sc in g.steps:
                if sc.status == "grounded":
                    part = next(p for p in g.parts if self._part_of(p) is not None)
                    sc.status = "ungrounded"
                    sc.reason = (
                        f"{_fmt(part)} is a place-value part of {_fmt(self._part_of(part))}, "
                        "but the parts are not all used and recombined"
                    )

    def _off_question(self, claims: list[Claim]) -> str | None:
        """A claim over exactly the question's numbers that computes another value ("7 + 3" for 7 - 3)."""
        t = self.target
        for c in claims:
            if t and not _LETTER_EXPR.match(c.expr) and sorted(_numbers(c.expr)) == t.leaves:
                value = _value_of(c.value)
                if value is not None and value != t.value:
                    return f"{c.expr}: the question asks {t.expr}"
            m = _BINARY.match(c.expr) if self.word_numbers else None
            if not m or sorted(_numbers(c.expr)) != self.word_numbers:
                continue
            if self.word_op is None:
                self.word_op_unconfirmed = True
            elif m.group(2) != self.word_op:  # the question's two numbers, combined by another operation
                return f"{c.expr}: the question's words ask for {self.word_op}"
        return None

    def _mark_prose(self, sc: StepCheck) -> None:
        """A step without a claim: unchecked, unless it states a number from nowhere. A derived result it
        restates becomes the last result ("So the total is 12.")."""
        text = _STEP_REF.sub(" ", re.sub(r"(?<=\d),(?=\d{3}\b)", "", sc.text))
        nums = [abs(Fraction(n)) for n in _PLAIN_NUM.findall(text)]
        nowhere = [n for n in nums if n not in self.known]
        if nowhere and self._names_split(nums, nowhere):
            nowhere = []  # "Break 23 into 20 and 3.": a split named, nothing derived from it yet
        if nowhere:
            sc.status, sc.reason = (
                "ungrounded",
                f"{_fmt(nowhere[0])} is not in the question or an earlier step",
            )
            return
        sc.status = "unchecked"
        # Numbers are read unsigned here ("- Check: -4 ..." is a bullet, then a sign): a restated result keeps
        # the sign the steps derived it with.
        restated = [n for n in nums if n in self.results or -n in self.results]
        if restated:
            n = restated[-1]
            if not (self.last is not None and abs(self.last) == n):
                self.last = n if n in self.results else -n
            self.last_text = _fmt(self.last)

    def answer_derived(self, answer: str | None) -> bool:
        if answer is None or self.last is None:
            return False
        value = parse_number(answer)
        if value is not None:
            return value == self.last
        nums = _numbers(_symbolize(answer))
        # "3, 5" or "x = 3, y = 5": a combination of results, each derived by the steps.
        return len(nums) >= 2 and all(n in self.results for n in nums)


def _value_of(text: str) -> Fraction | None:
    try:
        return safe_eval(text.replace(" ", ""))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def ground(question: str, steps: list[str], answer: str | None, task: str | None = None) -> Explanation:
    """Check every step against the question and the steps before it, and the answer against the steps.

    e = ground("Calculate 7 - 3.", ["7 + 3 = 10"], "10")
    e.steps[0].status -> "ungrounded" (it computes 7 + 3), e.complete -> False
    ground("Calculate 7 - 3.", ["7 - 3 = 4"], "4").complete -> True
    """
    g = _Ground(question or "")
    checks: list[StepCheck] = []
    for i, text in enumerate(steps):
        if i >= MAX_CHECKED_STEPS or len(text) > MAX_STEP_CHARS:
            why = "too many steps to check" if i >= MAX_CHECKED_STEPS else "step too long to check"
            checks.append(StepCheck(text=text[:MAX_STEP_CHARS], status="unchecked", reason=why))
            continue
        sc = check_step(text, task)
        g.mark(sc)
        checks.append(sc)
    g.finish()
    statuses = [c.status for c in checks]
    derived = g.answer_derived(answer)
    on_question = None if g.target is None else (g.last is not None and g.last == g.target.value)
    applies = grounding_applies(question, task)
    reason = _why_incomplete(statuses, derived, on_question, applies, len(steps) > MAX_CHECKED_STEPS)
    if reason is None and g.word_op_unconfirmed:
        reason = "the question's words do not say which operation to check the steps against"
    return Explanation(checks, answer, derived, on_question, reason is None, applies, reason)


def _why_incomplete(
    statuses: list[str | None], derived: bool, on_question: bool | None, applies: bool, cut: bool
) -> str | None:
    if not applies:
        return "the question states fewer than two numbers: nothing to ground the steps in"
    if cut:
        return "too many steps to check"
    for status in ("false", "ungrounded"):
        if status in statuses:
            return f"step {statuses.index(status) + 1} is {status}"
    if "grounded" not in statuses:
        return "no step states a checkable calculation"
    if not derived:
        return "the answer is not the steps' last result"
    if on_question is False:
        return "the steps do not compute the question's expression"
    return None
