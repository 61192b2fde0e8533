"""A labelled set of rationales for measuring core.explain.ground as a classifier of "complete".

    items = labelled_set(seed=0)          # [Item(question, text, label, family, kind), ...], deterministic
    scores = score(items)                 # precision / recall of "complete" and the rate per kind

Correct chains come in the shapes models write them (the teacher's "Step n:" format, free-form sentences,
words for operations and numbers, LaTeX, markdown, running totals, units in word problems); corruptions
are controlled edits of a correct chain: an operand swapped for another number, an operator changed, a
result copied from nowhere, an answer that differs from the last result, a false step. Decomposed chains
(23 * 4 worked as 20 * 4 = 80, 3 * 4 = 12, 80 + 12 = 92; 47 + 38 as 47 + 30 = 77, 77 + 8 = 85) come with
their own corruptions: a wrong part, parts that do not sum to the stated number, a part left out, a
recombination that adds the part instead of its product. Each item is labelled complete (True) only when
it is a correct chain.

``BLIND_SPOTS`` are the corruptions grounding cannot see by construction (it checks where numbers come
from, not which operation a word problem's words ask for): they are measured and reported apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
OP_WORDS = {"+": ["plus", "added to"], "-": ["minus"], "*": ["times", "multiplied by"]}
BLIND_SPOTS: set[tuple[str, str]] = set()  # none left: a word problem's operation is read from its words


@dataclass
class Item:
    question: str
    text: str
    answer: str
    label: bool  # True: a correct chain (should be complete)
    family: str  # arithmetic | chain | word | place (place-value decomposition)
    # correct | operand_swapped | operator_changed | result_from_nowhere | answer_differs | false_step;
    # place: wrong_part | parts_do_not_sum | part_left_out | recombination_skips_a_part
    kind: str


def _calc(a: int, op: str, b: int) -> int:
    return OPS[op](a, b)


def _correct_two_term(rng: random.Random, a: int, op: str, b: int) -> str:
    r = _calc(a, op, b)
    tex = "\\times" if op == "*" else op
    shapes = [
        f"Step 1: {a} {op} {b} = {r}.\nAnswer: {r}",
        f"Step 1: We need to calculate {a} {op} {b}.\nStep 2: {a} {op} {b} = {r}\nAnswer: {r}",
        f"To find the result, we compute {a} {op} {b} = {r}. The answer is {r}.",
        f"Step 1: {a} {rng.choice(OP_WORDS[op])} {b} is {r}.\nAnswer: {r}",
        f"**Step 1:** {a} {op} {b} = {r}\n**Answer:** {r}",
        f"We compute \\( {a} {tex} {b} = {r} \\).\nAnswer: {r}",
        f"Sure! Let's solve it step by step.\n1. {a} {op} {b} = {r}\nAnswer: {r}",
    ]
    if 0 <= r <= 12:
        shapes.append(
            f"Step 1: {WORDS[a]} {rng.choice(OP_WORDS[op])} {WORDS[b]} equals {WORDS[r]}.\nAnswer: {r}"
        )
    if op == "-" and r >= 0:
        shapes.append(f"We subtract {b} from {a}, which gives us {r}.\nAnswer: {r}")
    if op == "+":
        shapes.append(f"Step 1: Add {a} and {b} to get {r}.\nAnswer: {r}")
    if op == "-":  # a check after the result: grounding reads its 7 as the last result (a known miss)
        shapes.append(f"Step 1: {a} - {b} = {r}\nStep 2: Check: {r} + {b} = {a}\nAnswer: {r}")
    shapes.append(f"{a} {op} {b} = {r}, so the answer is {r}.")
    return rng.choice(shapes)


def _other(rng: random.Random, avoid: set[int], lo: int = 0, hi: int = 12) -> int:
    return rng.choice([x for x in range(lo, hi + 1) if x not in avoid])


def _arithmetic(rng: random.Random) -> list[Item]:
    a, b, op = rng.randint(0, 10), rng.randint(0, 10), rng.choice("+-*")
    q = f"Calculate {a} {op} {b}."
    r = _calc(a, op, b)
    items = [Item(q, _correct_two_term(rng, a, op, b), str(r), True, "arithmetic", "correct")]
    b2 = _other(rng, {a, b})
    r2 = _calc(a, op, b2)
    items.append(Item(q, f"Step 1: {a} {op} {b2} = {r2}.\nAnswer: {r2}", str(r2), False, "arithmetic",
                      "operand_swapped"))  # fmt: skip
    op2 = rng.choice([o for o in "+-*" if _calc(a, o, b) != r] or ["+"])
    r3 = _calc(a, op2, b)
    if r3 != r:
        items.append(Item(q, f"Step 1: {a} {op2} {b} = {r3}.\nAnswer: {r3}", str(r3), False, "arithmetic",
                          "operator_changed"))  # fmt: skip
    x = _other(rng, {a, b, r, abs(r)}, 0, 99)
    items.append(Item(q, f"Step 1: {a} {op} {b} = {r}.\nStep 2: So the total is {x}.\nAnswer: {x}", str(x),
                      False, "arithmetic", "result_from_nowhere"))  # fmt: skip
    d = r + rng.choice([-2, -1, 1, 2])
    items.append(Item(q, f"Step 1: {a} {op} {b} = {r}.\nAnswer: {d}", str(d), False, "arithmetic",
                      "answer_differs"))  # fmt: skip
    items.append(Item(q, f"Step 1: {a} {op} {b} = {r + 1}.\nAnswer: {r + 1}", str(r + 1), False,
                      "arithmetic", "false_step"))  # fmt: skip
    return items


def _running(terms: list[int], ops: list[str]) -> list[tuple[int, str, int, int]]:
    """(left, op, right, result) of each running-total step."""
    out, acc = [], terms[0]
    for op, t in zip(ops, terms[1:], strict=True):
        new = _calc(acc, op, t)
        out.append((acc, op, t, new))
        acc = new
    return out


def _chain_text(rng: random.Random, steps: list[tuple[int, str, int, int]], answer: int) -> str:
    if rng.random() < 0.5:
        body = "\n".join(f"Step {i}: {a} {op} {b} = {r}" for i, (a, op, b, r) in enumerate(steps, 1))
        return f"{body}\nAnswer: {answer}"
    sentences = ["First, " + f"{steps[0][0]} {steps[0][1]} {steps[0][2]} = {steps[0][3]}."]
    sentences += [f"Then {a} {op} {b} = {r}." for a, op, b, r in steps[1:]]
    return " ".join(sentences) + f"\nAnswer: {answer}"


def _chain(rng: random.Random) -> list[Item]:
    n = rng.randint(3, 4)
    terms = [rng.randint(1, 99) for _ in range(n)]
    ops = [rng.choice("+-") for _ in range(n - 1)]
    expr = " ".join([str(terms[0])] + [f"{o} {t}" for o, t in zip(ops, terms[1:], strict=True)])
    q = f"State the final answer to the following arithmetic problem: {expr} ="
    steps = _running(terms, ops)
    r = steps[-1][3]
    items = [Item(q, _chain_text(rng, steps, r), str(r), True, "chain", "correct")]
    k = rng.randrange(n - 1)
    swapped = list(terms)
    swapped[k + 1] = _other(rng, set(terms), 1, 99)
    s2 = _running(swapped, ops)
    items.append(Item(q, _chain_text(rng, s2, s2[-1][3]), str(s2[-1][3]), False, "chain", "operand_swapped"))
    ops2 = list(ops)
    ops2[k] = "+" if ops[k] == "-" else "-"
    s3 = _running(terms, ops2)
    items.append(Item(q, _chain_text(rng, s3, s3[-1][3]), str(s3[-1][3]), False, "chain", "operator_changed"))
    x = _other(rng, set(terms) | {abs(s[3]) for s in steps}, 100, 300)
    s4 = steps[:-1] + [(steps[-1][0], steps[-1][1], steps[-1][2], steps[-1][3])]
    text = _chain_text(rng, s4, x).replace(f"\nAnswer: {x}", f"\nStep {n}: That leaves {x}.\nAnswer: {x}")
    items.append(Item(q, text, str(x), False, "chain", "result_from_nowhere"))
    d = r + rng.choice([-10, -1, 1, 10])
    items.append(Item(q, _chain_text(rng, steps, d), str(d), False, "chain", "answer_differs"))
    bad = steps[:k] + [(steps[k][0], steps[k][1], steps[k][2], steps[k][3] + 1)] + steps[k + 1 :]
    items.append(Item(q, _chain_text(rng, bad, r), str(r), False, "chain", "false_step"))
    return items


# (question, op, the first step's prose, unit). {a} is the first operand, {b} the second, wherever the
# question states them; "/" questions state {a} = {b} * k. The first ten are the templates the word cues were
# developed on; WORD_TEMPLATES_NEW were written afterwards and never checked against the cues before being
# measured, so their family ("word_new") shows how the cues carry to phrasing they were not fitted to.
WORD_TEMPLATES = [
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", "+",
     "buys {b} more", "apples"),
    ("{name} had {a} stickers and gave {b} to a friend. How many stickers are left?", "-",
     "gives away {b}", "stickers"),
    ("A box holds {a} pencils. How many pencils are in {b} boxes?", "*", "has {b} boxes", "pencils"),
    ("{name} reads {a} pages a day for {b} days. How many pages is that?", "*",
     "reads for {b} days", "pages"),
    ("There are {a} birds on a fence. {b} fly away. How many birds are on the fence now?", "-",
     "{b} fly away", "birds"),
    ("{name} baked {a} muffins in the morning and {b} in the afternoon. How many muffins did {name} bake?",
     "+", "bakes {b} more later", "muffins"),
    ("{b} children share {a} crayons equally. How many crayons does each child get?", "/",
     "shares them among {b}", "crayons"),
    ("A car park has {a} cars. {b} cars drive out. How many cars are in the car park now?", "-",
     "{b} leave", "cars"),
    ("{name} is {a} years old. {name}'s sister is {b} years older. How old is the sister?", "+",
     "the sister is {b} years older", "years"),
    ("A bus has {a} passengers. At the stop, {b} get off. How many passengers are on the bus?", "-",
     "{b} get off", "passengers"),
]  # fmt: skip
WORD_TEMPLATES_NEW = [
    ("{name} picked {a} flowers. {b} of them wilted. How many flowers are still fresh?", "-",
     "{b} wilted", "flowers"),
    ("Each bag has {a} candies. {name} has {b} bags. How many candies does {name} have?", "*",
     "has {b} bags", "candies"),
    ("{name} had {a} balloons. {b} balloons popped. How many balloons does {name} have now?", "-",
     "{b} popped", "balloons"),
    ("A farmer has {a} cows and {b} sheep. How many animals does the farmer have?", "+",
     "also has {b} sheep", "animals"),
    ("{name} walks {a} blocks to school and {b} blocks to the park. How far does {name} walk?", "+",
     "then walks {b} more", "blocks"),
    ("{a} pencils are packed into boxes of {b}. How many boxes are filled?", "/",
     "packs {b} per box", "pencils"),
    ("{name} earns {a} dollars an hour. How much does {name} earn in {b} hours?", "*",
     "works {b} hours", "dollars"),
    ("There were {a} people on the train. {b} more people got on. How many people are on the train?", "+",
     "{b} got on", "people"),
]  # fmt: skip
NAMES = ["Sam", "Ana", "Lee", "Mia", "Tom"]


def _word(rng: random.Random) -> list[Item]:
    family = "word_new" if rng.random() < 0.4 else "word"
    template, op, prose, unit = rng.choice(WORD_TEMPLATES_NEW if family == "word_new" else WORD_TEMPLATES)
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    if op == "-":
        a, b = max(a, b), min(a, b)
    if op == "/":
        a = b * rng.randint(2, 9)
    name = rng.choice(NAMES)
    spelled = a < len(WORDS) and rng.random() < 0.4  # "three apples": the question states numbers in words
    q = template.format(name=name, a=WORDS[a] if spelled else a, b=b)
    r = _calc(a, op, b)

    def chain(x: int, o: str, y: int, res: int, answer: int) -> str:
        first = f"Step 1: {name} starts with {a} {unit} and {prose.format(b=b)}."
        if rng.random() < 0.5:
            return f"{first}\nStep 2: {x} {o} {y} = {res} {unit}.\nAnswer: {answer}"
        return f"{x} {unit} {o} {y} {unit} = {res} {unit}. So the answer is {answer}.\nAnswer: {answer}"

    def item(text: str, answer: int, label: bool, kind: str) -> Item:
        return Item(q, text, str(answer), label, family, kind)

    items = [item(chain(a, op, b, r, r), r, True, "correct")]
    b2 = _other(rng, {a, b}, 2, 12)
    if op == "/":
        b2 = rng.choice([d for d in range(2, 10) if a % d == 0 and d != b] or [1])
    items.append(item(chain(a, op, b2, _calc(a, op, b2), _calc(a, op, b2)), _calc(a, op, b2), False,
                      "operand_swapped"))  # fmt: skip
    op2 = "+" if op != "+" else "*"
    items.append(item(chain(a, op2, b, _calc(a, op2, b), _calc(a, op2, b)), _calc(a, op2, b), False,
                      "operator_changed"))  # fmt: skip
    x = _other(rng, {a, b, r}, 13, 150)
    nowhere = chain(a, op, b, r, x).replace(
        f"\nAnswer: {x}", f"\nStep 3: Altogether {x} {unit}.\nAnswer: {x}"
    )
    items.append(item(nowhere, x, False, "result_from_nowhere"))
    d = r + rng.choice([-1, 1, 2])
    items.append(item(chain(a, op, b, r, d), d, False, "answer_differs"))
    items.append(item(chain(a, op, b, r + 1, r + 1), r + 1, False, "false_step"))
    return items


def _place_mul_text(rng: random.Random, a: int, b: int, parts: list[int], recombine: bool = True) -> str:
    """23 * 4 worked in place-value parts: 20 * 4 = 80, 3 * 4 = 12, 80 + 12 = 92 (``parts`` as written)."""
    partial = [p * b for p in parts]
    total = " + ".join(map(str, partial))
    r = sum(partial)
    shape = rng.randrange(4)
    if shape == 0:
        lines = [f"Step {i}: {p} * {b} = {p * b}" for i, p in enumerate(parts, 1)]
        if recombine:
            lines.append(f"Step {len(parts) + 1}: {total} = {r}")
        return "\n".join(lines) + f"\nAnswer: {r if recombine else partial[0]}"
    if shape == 1:
        split = " and ".join(map(str, parts))
        body = " ".join(f"{p} * {b} = {p * b}." for p in parts)
        end = f" Then {total} = {r}." if recombine else ""
        return f"Break {a} into {split}. {body}{end}\nAnswer: {r if recombine else partial[0]}"
    if shape == 2 and recombine:
        expanded = " + ".join(f"{p} * {b}" for p in parts)
        written = " + ".join(map(str, parts))
        return f"{a} * {b} = ({written}) * {b} = {expanded} = {total} = {r}\nAnswer: {r}"
    body = " ".join(f"{b} times {p} is {p * b}." for p in parts)
    end = f" Adding them, {total.replace('+', 'plus')} equals {r}." if recombine else ""
    return f"Sure! {body}{end}\nAnswer: {r if recombine else partial[0]}"


def _place(rng: random.Random) -> list[Item]:
    """Decomposed chains: 23 * 4 in place-value parts, 47 + 38 as 47 + 30 then + 8, and their corruptions."""
    a, b = rng.randint(11, 99), rng.randint(2, 9)
    while a % 10 == 0:
        a = rng.randint(11, 99)
    tens, units = a - a % 10, a % 10
    if rng.random() < 0.5:
        q = f"Calculate {a} * {b}."
    else:
        q = f"A box holds {a} pencils. How many pencils are in {b} boxes?"

    def item(text: str, label: bool, kind: str) -> Item:
        from nestling.core.explain import extract_answer

        return Item(q, text, extract_answer(text) or "", label, "place", kind)

    items = [item(_place_mul_text(rng, a, b, [tens, units]), True, "correct")]
    wrong_tens = tens + 10 if tens < 90 else tens - 10
    items.append(item(_place_mul_text(rng, a, b, [wrong_tens, units]), False, "wrong_part"))
    off = _other(rng, {units, 0, b} if units != b else {units, 0}, 1, 9)
    items.append(item(_place_mul_text(rng, a, b, [tens, off]), False, "parts_do_not_sum"))
    items.append(item(_place_mul_text(rng, a, b, [tens, units], recombine=False), False, "part_left_out"))
    # the recombination adds the part itself, not its product: 20 * 4 = 80, 80 + 3 = 83
    skip = f"Step 1: {tens} * {b} = {tens * b}\nStep 2: {tens * b} + {units} = {tens * b + units}"
    items.append(item(f"{skip}\nAnswer: {tens * b + units}", False, "recombination_skips_a_part"))
    r = a * b
    d = r + rng.choice([-10, -1, 1, 10])
    right = _place_mul_text(rng, a, b, [tens, units])
    items.append(item(right.rsplit("Answer:", 1)[0] + f"Answer: {d}", False, "answer_differs"))
    bad = f"Step 1: {tens} * {b} = {tens * b}\nStep 2: {units} * {b} = {units * b + 1}"
    bad += f"\nStep 3: {tens * b} + {units * b + 1} = {r + 1}\nAnswer: {r + 1}"
    items.append(item(bad, False, "false_step"))
    # addition taking the second addend's parts in turn: 47 + 30 = 77, 77 + 8 = 85
    x = rng.randint(11, 99)
    qa = f"Calculate {x} + {a}."
    turn = f"Step 1: {x} + {tens} = {x + tens}\nStep 2: {x + tens} + {units} = {x + a}\nAnswer: {x + a}"
    items.append(Item(qa, turn, str(x + a), True, "place", "correct"))
    u2 = _other(rng, {units, 0}, 1, 9)
    wrong = f"Step 1: {x} + {tens} = {x + tens}\nStep 2: {x + tens} + {u2} = {x + tens + u2}"
    items.append(Item(qa, f"{wrong}\nAnswer: {x + tens + u2}", str(x + tens + u2), False, "place",
                      "parts_do_not_sum"))  # fmt: skip
    half = f"Step 1: {x} + {tens} = {x + tens}\nAnswer: {x + tens}"
    items.append(Item(qa, half, str(x + tens), False, "place", "part_left_out"))
    return items


def labelled_set(seed: int = 0, per_family: int = 40) -> list[Item]:
    """Deterministic: the same seed gives the same items. 40 per family: about 1,100 items, 240 correct."""
    rng = random.Random(seed)
    items: list[Item] = []
    for _ in range(per_family):
        items += _arithmetic(rng) + _chain(rng) + _word(rng) + _place(rng)
    return items


def score(items: list[Item]) -> dict:
    """Precision and recall of "complete" (blind spots apart), and the share called complete per kind."""
    from nestling.core.explain import clean_steps, extract_answer, ground, parse_steps

    called: list[tuple[Item, bool]] = []
    for it in items:
        answer = extract_answer(it.text)
        called.append((it, ground(it.question, clean_steps(parse_steps(it.text)), answer).complete))
    seen = [(it, c) for it, c in called if (it.family, it.kind) not in BLIND_SPOTS]
    tp = sum(c and it.label for it, c in seen)
    fp = sum(c and not it.label for it, c in seen)
    positives = sum(it.label for it, _ in seen)
    by_kind: dict[str, dict[str, float]] = {}
    for it, c in called:
        k = by_kind.setdefault(f"{it.family}/{it.kind}", {"n": 0, "called_complete": 0})
        k["n"] += 1
        k["called_complete"] += c
    for k in by_kind.values():
        k["called_complete"] = round(k["called_complete"] / k["n"], 4)
    corrupted = [(it, c) for it, c in seen if not it.label]
    return {
        "items": len(items),
        "correct_chains": positives,
        "corrupted_chains": len(corrupted),
        "true_complete": tp,
        "false_complete": fp,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / positives if positives else 0.0,
        "corrupted_called_complete": fp / len(corrupted) if corrupted else 0.0,
        "by_kind": dict(sorted(by_kind.items())),
        "blind_spots": sorted(f"{f}/{k}" for f, k in BLIND_SPOTS),
        "misses": [
            {"question": it.question, "text": it.text, "label": it.label, "kind": f"{it.family}/{it.kind}"}
            for it, c in seen
            if c != it.label
        ][:20],
    }
