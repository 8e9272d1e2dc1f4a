"""The demo's built-in task: short arithmetic word problems composed from ten explicit skills.

A problem is a start value followed by 1-3 operations, each exercising one skill, e.g.
    "Ann has 47. She gets 38. Packs of 6: left?"  ->  "47+38=85\\n85%6=1\\n\\boxed{1}"
The problem text alone determines the computation (`parse_problem` reads it back), so the reference
solution, its per-step skill tags and the final answer are all recomputed from the text; the offline
teacher uses the same parser to "read" a question. Texts are short because the student is character-level.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from stat_jax.data.records import MathProblem

MAX_VALUE = 199  # intermediate values stay small: the student learns arithmetic from scratch on a CPU


@dataclasses.dataclass(frozen=True)
class Skill:
    """One skill of the catalog: how it reads in a problem and how its step is computed and written."""

    name: str
    description: str
    position: str  # "start" | "middle" | "final": where in a problem the operation may appear
    phrase: str  # text template with {p} (and {u} for units)
    pattern: str  # regex that reads the phrase back, one group per parameter
    step: Callable[[int, int], tuple[str, int]] = lambda x, p: ("", x)  # (solution line, value) on running value x
    valid: Callable[[int, int], bool] = lambda x, p: True  # whether p exercises the skill on x (a carry carries)
    draw: Callable[[random.Random], int] = lambda r: 0  # a candidate parameter


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of a problem: a skill and its parameter (p; for unit conversion also the unit)."""

    skill: str
    p: int
    unit: str = ""


@dataclasses.dataclass(frozen=True)
class Step:
    """One line of a reference solution: the skill it applies, the line as written, the value it yields."""

    skill: str
    text: str
    value: int


UNITS = {"dozen": 12, "score": 20}

_DIGIT = lambda r: r.randint(2, 9)  # noqa: E731
_LEFTOVER = lambda x, p: x % p != 0 and x > p  # noqa: E731  (a remainder that is not zero)

SKILLS: dict[str, Skill] = {s.name: s for s in [
    Skill("unit_conversion", "convert a count in dozens (12) or scores (20) into units", "start",
          "Ann has {p} {u}.", r"Ann has (\d+) (dozen|score)\."),  # its step: `apply_op` (it needs the unit)
    Skill("carry_addition", "add a one-digit number where the ones column carries", "middle",
          " She gets {p}.", r" She gets (\d+)\.", lambda x, p: (f"{x}+{p}={x + p}", x + p),
          lambda x, p: x % 10 + p % 10 >= 10 and x + p <= MAX_VALUE, _DIGIT),
    Skill("borrow_subtraction", "subtract a one-digit number where the ones column borrows", "middle",
          " She loses {p}.", r" She loses (\d+)\.", lambda x, p: (f"{x}-{p}={x - p}", x - p),
          lambda x, p: p < x and p % 10 > x % 10, _DIGIT),
    Skill("multiply_by_digit", "multiply a two-digit number by a one-digit number", "middle",
          " Then {p} times that.", r" Then (\d+) times that\.", lambda x, p: (f"{x}*{p}={x * p}", x * p),
          lambda x, p: 10 <= x <= 39 and 2 <= p <= 9 and x * p <= MAX_VALUE, _DIGIT),
    Skill("percent", "take 10, 20 or 50 percent of a number (the result is whole)", "middle",
          " She keeps {p}%.", r" She keeps (\d+)%\.", lambda x, p: (f"{p}% of {x}={x * p // 100}", x * p // 100),
          lambda x, p: x * p % 100 == 0 and x >= 10, lambda r: r.choice([10, 20, 50])),
    Skill("halving", "halve an even number", "middle",
          " She keeps half.", r" She keeps half\.()", lambda x, p: (f"{x}/2={x // 2}", x // 2),
          lambda x, p: x % 2 == 0 and x >= 10),
    Skill("division_remainder", "divide with a remainder and report the quotient", "final",
          " Split in {p}: each?", r" Split in (\d+): each\?", lambda x, p: (f"{x}/{p}={x // p} r{x % p}", x // p),
          _LEFTOVER, _DIGIT),
    Skill("modular_reduction", "find the remainder after division (the leftover)", "final",
          " Packs of {p}: left?", r" Packs of (\d+): left\?", lambda x, p: (f"{x}%{p}={x % p}", x % p),
          _LEFTOVER, _DIGIT),
    Skill("comparison", "compare two numbers and report the larger", "final",
          " Bo has {p}: max?", r" Bo has (\d+): max\?", lambda x, p: (f"max({x},{p})={max(x, p)}", max(x, p)),
          lambda x, p: p != x and len(str(p)) == len(str(x)), lambda r: r.randint(10, MAX_VALUE)),
    Skill("rounding", "round a number to the nearest ten (halves round up)", "final",
          " Round to tens.", r" Round to tens\.()", lambda x, p: (f"{x}~{(x + 5) // 10 * 10}", (x + 5) // 10 * 10),
          lambda x, p: x % 10 != 0 and x >= 10),
]}
SKILL_NAMES: tuple[str, ...] = tuple(SKILLS)
SUBJECT = "arithmetic"  # one subject: the whole task shares one skill catalog
PLAIN_START = ("Ann has {p}.", r"Ann has (\d+)\.")
NO_FINAL_QUESTION = " How many?"


class ProblemParseError(ValueError):
    """A text is not a problem of the demo task (the message quotes the unread part)."""


# ----- computing steps --------------------------------------------------------------------------------------
def apply_op(op: Op, x: int) -> Step:
    """The solution line of `op` applied to the running value `x` (x is unused by a start op)."""
    if op.skill == "unit_conversion":
        v = op.p * UNITS[op.unit]
        return Step(op.skill, f"{op.p}*{UNITS[op.unit]}={v}", v)
    if op.skill not in SKILLS:
        raise KeyError(f"unknown skill {op.skill!r}; known: {SKILL_NAMES}")
    return Step(op.skill, *SKILLS[op.skill].step(x, op.p))


def solve_ops(start: int, ops: Sequence[Op]) -> list[Step]:
    """The reference solution steps for a start value (ignored after a unit conversion) and operations."""
    x, steps = start, []
    for op in ops:
        step = apply_op(op, x)
        steps.append(step)
        x = step.value
    return steps


def render_solution(steps: Sequence[Step], start: int) -> str:
    answer = steps[-1].value if steps else start
    return "\n".join([s.text for s in steps] + [f"\\boxed{{{answer}}}"])


# ----- text <-> operations ----------------------------------------------------------------------------------
def render_problem(start: int, ops: Sequence[Op]) -> str:
    parts = []
    if not ops or ops[0].skill != "unit_conversion":
        parts.append(PLAIN_START[0].format(p=start))
    for op in ops:
        parts.append(SKILLS[op.skill].phrase.format(p=op.p, u=op.unit))
    if not ops or SKILLS[ops[-1].skill].position != "final":
        parts.append(NO_FINAL_QUESTION)
    return "".join(parts)


def parse_problem(text: str) -> tuple[int, list[Op]]:
    """Reads a problem text back into (start value, operations); raises ProblemParseError otherwise."""
    rest = text.strip()
    ops: list[Op] = []
    m = re.match(SKILLS["unit_conversion"].pattern, rest)
    if m:
        start = int(m.group(1))
        ops.append(Op("unit_conversion", start, m.group(2)))
    else:
        m = re.match(PLAIN_START[1], rest)
        if not m:
            raise ProblemParseError(f"problem does not start with 'Ann has N.': {text!r}")
        start = int(m.group(1))
    rest = rest[m.end():]
    while rest and rest != NO_FINAL_QUESTION:
        for skill in SKILL_NAMES[1:]:
            m = re.match(SKILLS[skill].pattern, rest)
            if m:
                ops.append(Op(skill, int(m.group(1)) if m.group(1) else 0))
                rest = rest[m.end():]
                break
        else:
            raise ProblemParseError(f"cannot read {rest!r} in problem {text!r}")
    return start, ops


def reference_steps(text: str) -> list[Step]:
    """The step-by-step reference computation of a problem text."""
    start, ops = parse_problem(text)
    return solve_ops(start, ops)


def reference_answer(text: str) -> str:
    steps = reference_steps(text)
    return str(steps[-1].value if steps else parse_problem(text)[0])


def problem_skills(text: str) -> list[str]:
    """The skills a problem exercises, in step order (the ground-truth Skill-Map label)."""
    return [s.skill for s in reference_steps(text)]


# ----- generation --------------------------------------------------------------------------------------------
_MIDDLE = [s for s in SKILL_NAMES if SKILLS[s].position == "middle"]
_FINAL = [s for s in SKILL_NAMES if SKILLS[s].position == "final"]


def _try_op(rng: random.Random, skill: str, x: int, tries: int = 40) -> Op | None:
    """A parameter that makes `skill` valid on `x`, or None."""
    for _ in range(tries):
        op = Op(skill, SKILLS[skill].draw(rng))
        if SKILLS[skill].valid(x, op.p):
            return op
    return None


def generate_problem(rng: random.Random, must_include: str | None = None) -> tuple[int, list[Op]]:
    """One random problem with 1-3 skills; `must_include` forces a skill into it."""
    while True:
        skills: list[str] = []
        if rng.random() < 0.2:
            skills.append("unit_conversion")
        skills += rng.sample(_MIDDLE, rng.choice([0, 1, 1, 2]))
        if rng.random() < 0.6:
            skills.append(rng.choice(_FINAL))
        if must_include and must_include not in skills:
            pos = SKILLS[must_include].position
            if pos == "start":
                skills.insert(0, must_include)
            elif pos == "final":
                skills = [s for s in skills if SKILLS[s].position != "final"] + [must_include]
            else:
                idx = 1 if skills and skills[0] == "unit_conversion" else 0
                skills.insert(idx, must_include)
        if not skills or len(skills) > 3:
            continue
        ops: list[Op] = []
        if skills[0] == "unit_conversion":
            unit = rng.choice(sorted(UNITS))
            ops.append(Op("unit_conversion", rng.randint(2, 9), unit))
            start = ops[0].p
            x = ops[0].p * UNITS[unit]
        else:
            start = x = rng.randint(10, 99)
        for skill in skills[len(ops):]:
            op = _try_op(rng, skill, x)
            if op is None:
                break
            ops.append(op)
            x = apply_op(op, x).value
        else:
            if x <= MAX_VALUE:
                return start, ops


def to_record(start: int, ops: Sequence[Op], pid: str, source: str) -> MathProblem:
    steps = solve_ops(start, ops)
    return MathProblem(
        id=pid, problem=render_problem(start, ops), answer=str(steps[-1].value),
        solution=render_solution(steps, start), subject=SUBJECT, level=str(len(steps)), source=source,
        skills=[s.skill for s in steps],
    )


def _keep_probability(skills: Iterable[str], weights: Mapping[str, float]) -> float:
    return min(float(weights.get(s, 1.0)) for s in skills)


LAST_SPLIT = "grpo"  # generated after every other split: adding it (or resizing it) changes none of them


def make_splits(
    seed: int,
    sizes: Mapping[str, int],
    train_skill_weights: Mapping[str, float] | None = None,
) -> dict[str, list[MathProblem]]:
    """Disjoint splits (by problem text) generated from `seed`.

    The "train" split is skill-imbalanced: a problem is kept with probability min(weights of its skills),
    so rare skills stay rare in the natural training distribution. Other splits (held-out for profiling,
    test for evaluation) are balanced: problem i must include skill i mod 10, so every skill is measured. Test problems are generated first,
    so the test split for a seed does not depend on the other sizes; LAST_SPLIT is generated last.
    """
    unknown = set(train_skill_weights or {}) - set(SKILL_NAMES)
    if unknown:
        raise KeyError(f"train_skill_weights names unknown skills {sorted(unknown)}; known: {SKILL_NAMES}")
    order = sorted(sizes, key=lambda name: (name != "test", name != "heldout", name == LAST_SPLIT, name))
    seen: set[str] = set()
    out: dict[str, list[MathProblem]] = {}
    for name in order:
        rng = random.Random(f"demo-task:{seed}:{name}")
        rows: list[MathProblem] = []
        while len(rows) < sizes[name]:
            balanced = name != "train"
            start, ops = generate_problem(rng, SKILL_NAMES[len(rows) % len(SKILL_NAMES)] if balanced else None)
            text = render_problem(start, ops)
            if text in seen:
                continue
            if name == "train" and train_skill_weights:
                if rng.random() >= _keep_probability((o.skill for o in ops), train_skill_weights):
                    continue
            seen.add(text)
            rows.append(to_record(start, ops, f"demo-{name}-{len(rows):05d}", f"demo:{name}"))
        out[name] = rows
    return out


def new_problems_for_skill(rng: random.Random, skill: str, n: int, avoid: set[str]) -> list[str]:
    """`n` fresh problem texts exercising `skill`, none in `avoid` (used by the offline teacher)."""
    if skill not in SKILLS:
        raise KeyError(f"unknown skill {skill!r}; known: {SKILL_NAMES}")
    out: list[str] = []
    while len(out) < n:
        text = render_problem(*generate_problem(rng, must_include=skill))
        if text not in avoid and text not in out:
            out.append(text)
    return out


def skill_catalog() -> list[dict[str, str]]:
    return [{"name": s.name, "description": s.description} for s in SKILLS.values()]
