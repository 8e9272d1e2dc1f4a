"""An offline, rule-based teacher for the demo task: the same jobs as the Gemini teacher, no network.

It reads `TeacherRequest.task` and the structured `payload` (never the prompt text) and answers with JSON
fitting the request's schema. It "understands" a question by parsing it with the task grammar
(`data.arith_task.parse_problem`), so its skill labels are exact, its diagnosis checks every step of a student's
answer against the reference computation, and its synthesized problems really exercise the asked skill.
Its written solutions slip with a configurable probability (one step's result off by a few, carried
forward), which gives STAT-Syn's consistency filter real work to do.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

from stat_jax.data import arith_task as demo_task
from stat_jax.data.records import bare_skill_name
from stat_jax.teacher.base import TeacherBackend, TeacherError, TeacherRequest, TeacherResponse


_NUMBER = re.compile(r"-?\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _payload(request: TeacherRequest, key: str) -> Any:
    """A required payload value, or an error naming the task and the keys that were sent."""
    if key not in request.payload:
        raise TeacherError(f"offline teacher: request task {request.task!r} has no payload key {key!r}; "
                           f"payload keys: {sorted(request.payload)}")
    return request.payload[key]


def _problem_text(value: Any) -> str:
    """A problem given as text or as a MathProblem-like dict."""
    if isinstance(value, dict):
        value = value.get("problem", value.get("question", ""))
    return str(value)


def _last_number(line: str) -> int | None:
    """The result a solution line claims: the number after its last '=' or '~'."""
    for sep in ("=", "~"):
        if sep in line:
            found = _NUMBER.findall(line.rsplit(sep, 1)[1])
            return int(found[0]) if found else None
    return None


def diagnose_steps(problem: str, response: str, max_skills: int = 3) -> list[str]:
    """Skills whose step the response gets wrong, checked line by line against the reference computation.

    Each reference step is compared with the response's line at the same position, computed from the
    response's own previous result: a carried-forward error is not blamed on a later, correctly applied
    skill. A missing line counts as not applying its skill. If every line is right but the boxed answer is
    wrong, the last skill is blamed.
    """
    start, ops = demo_task.parse_problem(problem)
    reference = demo_task.solve_ops(start, ops)
    lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip() and "\\boxed" not in ln]
    missing: list[str] = []
    x = start
    for i, (op, ref) in enumerate(zip(ops, reference)):
        expected = demo_task.apply_op(op, x)  # what this skill yields on the response's own running value
        line = lines[i] if i < len(lines) else None
        if line is None or line != expected.text:
            missing.append(op.skill)
        claimed = _last_number(line) if line is not None else None
        x = claimed if claimed is not None else ref.value
    boxed = _BOXED.findall(response)
    if not missing and (not boxed or boxed[-1].strip() != str(reference[-1].value if reference else start)):
        missing.append(ops[-1].skill if ops else "")
    unique = list(dict.fromkeys(s for s in missing if s))
    return unique[:max_skills]


def _slipped_solution(problem: str, rng: random.Random, slip_rate: float) -> tuple[str, str]:
    """A solution, with probability `slip_rate` one step's result off by 1-9 and carried forward."""
    start, ops = demo_task.parse_problem(problem)
    slip_at = rng.randrange(len(ops)) if ops and rng.random() < slip_rate else -1
    x, lines = start, []
    for i, op in enumerate(ops):
        step = demo_task.apply_op(op, x)
        value = step.value
        if i == slip_at:
            delta = rng.choice([d for d in range(-9, 10) if d and value + d >= 1])
            value += delta
            head = step.text.rsplit("~" if op.skill == "rounding" else "=", 1)[0]
            tail = f"{value}" + (f" r{x % op.p}" if op.skill == "division_remainder" else "")
            lines.append(f"{head}{'~' if op.skill == 'rounding' else '='}{tail}")
        else:
            lines.append(step.text)
        x = value
    lines.append(f"\\boxed{{{x}}}")
    return "\n".join(lines), str(x)


class OfflineTeacher(TeacherBackend):
    """Rule-based teacher for the demo task (answers depend only on the request and these settings)."""

    durable_answers = False  # free and deterministic: the demo's ~11,000 answers skip ~10 s of fsyncs

    def __init__(self, *, seed: int = 0, solution_slip_rate: float = 0.25, label_noise: float = 0.0,
                 max_missing_skills: int = 3):
        if not 0 <= solution_slip_rate <= 1 or not 0 <= label_noise <= 1:
            raise ValueError("solution_slip_rate and label_noise must be probabilities in [0, 1]")
        self.seed = seed
        self.solution_slip_rate = solution_slip_rate
        self.label_noise = label_noise
        self.max_missing_skills = max_missing_skills
        self._jobs: dict[str, Callable[[TeacherRequest, random.Random], dict[str, Any]]] = {
            "propose_skills": self._propose_skills,
            "merge_skills": self._merge_skills,
            "label_skills": self._label_skills,
            "diagnose": self._diagnose,
            "synthesize": self._synthesize,
            "solve": self._solve,
            "rate_difficulty": self._rate_difficulty,
        }

    @property
    def backend_id(self) -> str:
        return (f"offline-demo:v1:seed={self.seed}:slip={self.solution_slip_rate}:"
                f"label_noise={self.label_noise}:max_missing={self.max_missing_skills}")

    def complete(self, request: TeacherRequest, *, reask_error: str | None = None) -> TeacherResponse:
        job = self._jobs.get(request.task)
        if job is None:
            raise TeacherError(f"offline teacher: unknown task {request.task!r}; it answers {sorted(self._jobs)}")
        # One RNG per request (and sample index): answers are reproducible and independent of call order.
        rng = random.Random(request.cache_key(self.backend_id))
        try:
            answer = job(request, rng)
        except demo_task.ProblemParseError as e:
            raise TeacherError(f"offline teacher ({request.task}): {e}") from e
        text = json.dumps(answer)
        # Token counts approximate an LLM's (4 characters per token) so the ledger and budget behave alike.
        return TeacherResponse(text=text, input_tokens=len(request.prompt) // 4 + 1,
                               output_tokens=len(text) // 4 + 1, model="offline-demo")

    # ----- jobs (payload keys and answer schemas: docs/ARCHITECTURE.md, "Teacher tasks") ----------------
    @staticmethod
    def _in_catalog(request: TeacherRequest, skills: list[str]) -> list[str]:
        """The catalog's names of `skills`, dropping the ones it lacks (answers are schema-checked against its
        enum); catalog names may be qualified by the subject ("arithmetic:percent")."""
        catalog = request.payload.get("catalog")
        if not catalog:
            return skills
        names = {bare_skill_name(c["name"]): c["name"] for c in catalog}
        return [names[s] for s in skills if s in names]

    def _propose_skills(self, request: TeacherRequest, rng: random.Random) -> dict[str, Any]:
        """The skills this one question needs (named as the task's skills: this teacher knows them exactly)."""
        names = list(dict.fromkeys(demo_task.problem_skills(_problem_text(_payload(request, "problem")))))
        names = names[: int(request.payload.get("max_skills", len(names)) or len(names))]
        return {"skills": [{"name": n, "description": demo_task.SKILLS[n].description} for n in names]}

    def _merge_skills(self, request: TeacherRequest, rng: random.Random) -> dict[str, Any]:
        """Groups proposed names under the catalog skill they belong to (unknown names are dropped)."""
        merged: dict[str, list[str]] = {}
        for proposed in _payload(request, "skills"):
            name = str(proposed["name"])
            home = name if name in demo_task.SKILLS else next(
                (s for s in demo_task.SKILL_NAMES if name.startswith(s)), None)
            if home is not None:
                merged.setdefault(home, []).append(name)
        limit = int(request.payload.get("max_skills", len(merged)) or len(merged))
        return {"skills": [{"name": n, "description": demo_task.SKILLS[n].description, "merged_from": merged[n]}
                           for n in demo_task.SKILL_NAMES if n in merged][:limit]}

    def _label_skills(self, request: TeacherRequest, rng: random.Random) -> dict[str, Any]:
        skills = list(dict.fromkeys(demo_task.problem_skills(_problem_text(_payload(request, "problem")))))
        if self.label_noise and rng.random() < self.label_noise:
            skills[rng.randrange(len(skills))] = rng.choice(demo_task.SKILL_NAMES)
            skills = list(dict.fromkeys(skills))
        limit = int(request.payload.get("max_skills", len(skills)) or len(skills))
        known = self._in_catalog(request, skills)[:limit]
        if not known:
            raise TeacherError(f"offline teacher: the catalog has none of the skills {skills} of "
                               f"{request.payload['problem']!r}; build the catalog from more questions "
                               "(stat.skills_sample_per_subject)")
        return {"skills": known}

    def _diagnose(self, request: TeacherRequest, rng: random.Random) -> dict[str, Any]:
        problem = _problem_text(_payload(request, "problem"))
        response = str(_payload(request, "response"))
        limit = min(self.max_missing_skills, int(request.payload.get("max_skills", self.max_missing_skills)))
        wrong = diagnose_steps(problem, response, limit)
        if not wrong:
            return {"missing_skills": [], "none_missing_reason": "every step and the boxed answer are right"}
        # The schema asks for at least `least` skills (2-3 as the paper's prompt): after the wrong steps' skills,
        # the skills of the steps nearest the first wrong one, which an answer that went wrong there may also miss.
        order = demo_task.problem_skills(problem)
        first = order.index(wrong[0]) if wrong[0] in order else 0
        near = sorted(range(len(order)), key=lambda i: (abs(i - first), i < first))
        # The schema's minimum (stat.diagnose_min_skills: 2 as in the paper, 1 names only the wrong steps).
        least = request.schema["anyOf"][0]["properties"]["missing_skills"]["minItems"]
        named = list(dict.fromkeys(wrong + [order[i] for i in near]))
        if len(named) < least:  # a one-skill question: another catalog skill at random, as a guessing teacher would
            others = [bare_skill_name(c["name"]) for c in request.payload.get("catalog") or []
                      if bare_skill_name(c["name"]) not in named]
            named += [rng.choice(others)] if others else []
        missing = self._in_catalog(request, named)[:max(least, len(self._in_catalog(request, wrong)))][:limit]
        return {"missing_skills": missing,
                "explanation": "wrong or missing step for: " + ", ".join(wrong)
                               + ("; next to it: " + ", ".join(missing[len(wrong):]) if len(missing) > len(wrong)
                                  else "")}

    def _synthesize(self, request: TeacherRequest, rng: random.Random) -> dict[str, Any]:
        skill = bare_skill_name(str(_payload(request, "skill")))
        examples = request.payload.get("examples") or []
        if not skill:  # Embed-Syn names no skill: write for the first example's skills, one at a time
            skills = demo_task.problem_skills(_problem_text(examples[0])) if examples else list(demo_task.SKILL_NAMES)
            skill = skills[rng.randrange(len(skills))]
        n = int(request.payload.get("n", 2))
        avoid = {_problem_text(e) for e in examples}
        return {"problems": [{"problem": p} for p in demo_task.new_problems_for_skill(rng, skill, n, avoid)]}

    def _rate_difficulty(self, request: TeacherRequest, rng: random.Random) -> dict[str, Any]:
        """A question's difficulty is its number of steps (the task's own level), capped at 5."""
        steps = len(demo_task.problem_skills(_problem_text(_payload(request, "problem"))))
        return {"difficulty": max(1, min(5, steps)), "reason": f"{steps} steps"}

    def _solve(self, request: TeacherRequest, rng: random.Random) -> dict[str, Any]:
        problem = _problem_text(_payload(request, "problem"))
        solution, answer = _slipped_solution(problem, rng, self.solution_slip_rate)
        return {"solution": solution, "answer": answer}
