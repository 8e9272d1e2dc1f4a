"""What a run will ask the teacher, before it asks: calls, tokens and price per teacher stage (`run --dry-run`).

Every estimate renders the real prompts (`teacher.prompts`) for the run's own data rows. Input tokens are
prompt characters / CHARS_PER_TOKEN; output tokens are each task's cap (`teacher.max_output_tokens_by_task`,
which on Gemini 2.5 also bounds the thinking tokens), so the output side is an upper bound. What the teacher has
not written yet is stood in for by placeholders of stated size (PLACEHOLDER_*): the catalog before the skills
stage, the student's answer before the rollout, which questions are hard before the hard stage. Call counts are
upper bounds too: no re-asks or retries, and every diagnosis names stat.diagnose_max_skills skills.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

from stat_jax.data.records import MathProblem
from stat_jax.stat import baselines, skills
from stat_jax.teacher import prompts

CHARS_PER_TOKEN = 4  # English + LaTeX averages about 4 characters a token on GPT/Gemini tokenizers
# A skill as the teacher writes it: a snake_case name and a one-sentence description.
PLACEHOLDER_SKILL = {"name": "x" * 24, "description": "y" * 100}
# The per-subject sample the plan prices beside a whole-training-set catalog (stat.skills_sample_per_subject=0).
SAMPLE_ALTERNATIVE = 200


@dataclasses.dataclass
class PlannedStage:
    """One row of the plan: a stage's calls of one teacher task."""

    stage: str
    task: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float = 0.0
    note: str = ""


def _tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def _mean_tokens(texts: Sequence[str]) -> float:
    return sum(map(_tokens, texts)) / len(texts) if texts else 0.0


def output_cap(tc: Any, task: str) -> int:
    """The per-task output cap (`teacher.max_output_tokens_by_task`, else `teacher.max_output_tokens`)."""
    by_task = tc.get("max_output_tokens_by_task", {}) or {}
    cap = int(by_task.get(task, 0) or tc.max_output_tokens or 0)
    if cap <= 0:
        raise ValueError(f"teacher.max_output_tokens_by_task.{task} is unset (and teacher.max_output_tokens is 0): "
                         "an output cap is needed to estimate (and bound) the output tokens of this task")
    return cap


def _placeholder_catalog(size: int) -> list[dict[str, str]]:
    return [{"name": f"{PLACEHOLDER_SKILL['name']}{i:02d}", "description": PLACEHOLDER_SKILL["description"]}
            for i in range(size)]


@dataclasses.dataclass
class _Plan:
    """What every stage's planner reads: the run's settings and rows, and the rows of the plan so far."""

    config: Any
    train: Sequence[MathProblem]
    heldout: Sequence[MathProblem]
    catalog: dict[str, Any] | None
    rows: list[PlannedStage] = dataclasses.field(default_factory=list)

    @property
    def s(self) -> Any:
        return self.config.stat

    @property
    def num_hard(self) -> int:
        return min(int(self.s.num_hard), len(self.heldout))

    @property
    def pairs(self) -> int:  # (hard question, missing skill) pairs, every diagnosis naming the most skills
        return self.num_hard * int(self.s.diagnose_max_skills)

    def add(self, stage: str, task: str, calls: int, mean_input: float, note: str = "") -> None:
        self.rows.append(PlannedStage(stage, task, int(calls), round(calls * mean_input),
                                      int(calls) * output_cap(self.config.teacher, task), note=note))

    def skill_list(self, problem: MathProblem) -> list[dict[str, str]]:
        subject = skills.subject_of(problem)
        if self.catalog and subject in self.catalog:
            return [{"name": s["name"], "description": s["description"]} for s in self.catalog[subject]]
        return _placeholder_catalog(self.s.catalog_max_skills)

    @functools.cached_property
    def solve_tokens(self) -> float:  # a solve prompt of a training question, on average
        return _mean_tokens([prompts.solve(p.problem, skills.subject_of(p)).prompt for p in self.train])

    def answer_calls(self, stage: str, questions: int, target: int, note: str) -> None:
        """The teacher's answers to a set's chosen questions (none with dataset solutions)."""
        s = self.s
        if s.sel_answer_source == "dataset":
            return
        teacher_answers = s.sel_answers_per_question - (1 if s.sel_answer_source == "dataset+teacher" else 0)
        slots = questions * s.sel_answers_per_question
        calls = min(slots, target) if target > 0 else slots
        self.add(stage, "solve", round(calls * teacher_answers / s.sel_answers_per_question), self.solve_tokens,
                 note)

    def references(self) -> list[MathProblem]:
        return list(self.train[:max(1, self.s.syn_reference_questions)])


def _plan_skills(plan: _Plan) -> None:
    from stat_jax.stat.pipeline import stat_seed  # the seed the skills stage samples with

    s, tc, subject = plan.s, plan.config.teacher, skills.subject_of

    def proposals(per_subject: int) -> tuple[list[MathProblem], float]:
        sample = skills.sample_per_subject(plan.train, per_subject, stat_seed(plan.config))
        return sample, _mean_tokens([prompts.propose_skills(p.problem, p.solution, subject(p),
                                                            max_skills=s.propose_max_skills).prompt for p in sample])

    chosen = int(s.skills_sample_per_subject)
    sample, mean_input = proposals(chosen)
    # The catalog's cost depends most on how many questions name skills: the plan prices the other choice too.
    other = 0 if chosen > 0 else SAMPLE_ALTERNATIVE
    other_sample, other_input = proposals(other)
    other_cost = _cost(tc, len(other_sample) * other_input, len(other_sample) * output_cap(tc, "propose_skills"))
    plan.add("skills", "propose_skills", len(sample), mean_input,
             (f"{chosen} questions per subject (a sample)" if chosen else "every training question (the paper)")
             + f"; stat.skills_sample_per_subject={other}: {len(other_sample)} calls, ${other_cost:.2f}")
    subjects = sorted({subject(p) for p in plan.train})
    per_subject = {k: sum(subject(p) == k for p in sample) for k in subjects}
    merges = [prompts.merge_skills(k, [{**PLACEHOLDER_SKILL, "name": f"{PLACEHOLDER_SKILL['name']}{i}", "count": 1}
                                       for i in range(per_subject[k] * s.propose_max_skills)],
                                   max_skills=s.catalog_max_skills).prompt for k in subjects]
    plan.add("skills", "merge_skills", len(merges), _mean_tokens(merges), "every proposed skill distinct (upper bound)")


def _plan_label(plan: _Plan) -> None:
    s = plan.s
    plan.add("label", "label_skills", len(plan.train),
             _mean_tokens([prompts.label_skills(p.problem, p.solution, skills.subject_of(p), plan.skill_list(p),
                                                max_skills=s.label_max_skills).prompt for p in plan.train]),
             "" if plan.catalog else f"catalog: {s.catalog_max_skills} placeholder skills per subject")


def _plan_diagnose(plan: _Plan) -> None:
    s = plan.s
    response = "r" * (int(s.rollout_max_new_tokens) * CHARS_PER_TOKEN)  # the student's answer, at its cap
    plan.add("diagnose", "diagnose", plan.num_hard,
             _mean_tokens([prompts.diagnose(p.problem, p.solution, p.answer, response, skills.subject_of(p),
                                            plan.skill_list(p), max_skills=s.diagnose_max_skills).prompt
                           for p in plan.heldout]),
             f"{plan.num_hard} hard questions (stat.num_hard), mean over the held-out rows; student answer "
             f"{s.rollout_max_new_tokens} tokens")


def _plan_sel(plan: _Plan) -> None:
    s = plan.s
    plan.answer_calls("sel", plan.pairs * int(s.sel_questions_per_skill), int(s.sel_target_size),
                      f"{plan.pairs} (hard, skill) pairs x {s.sel_questions_per_skill} questions x "
                      f"{s.sel_answers_per_question} answers, capped at stat.sel_target_size")


def _plan_math_hard(plan: _Plan) -> None:
    s, train = plan.s, plan.train
    if s.math_hard_rating == "teacher":
        plan.add("math_hard", "rate_difficulty", len(train),
                 _mean_tokens([prompts.rate_difficulty(p.problem, p.solution, skills.subject_of(p)).prompt
                               for p in train]), "every training question rated 1-5")
        # Which questions the teacher rates hardest is not known before it rates them: MATH's levels stand in.
        chosen, note = (len(baselines.hardest_levels(train, s.math_hard_top_levels)) if train else 0,
                        "as many questions as the hardest levels hold (the ratings are not known yet)")
    elif s.math_hard_rating == "prm":
        chosen, note = math.ceil(float(s.math_hard_share) * len(train)), "stat.math_hard_share of the questions"
    else:
        chosen, note = (len(baselines.hardest_levels(train, s.math_hard_top_levels)) if train else 0,
                        "the hardest levels' questions")
    plan.answer_calls("math_hard", chosen, baselines.budget(plan.config), f"{note}, capped at the baseline budget")


def _plan_embed_sel(plan: _Plan) -> None:
    s = plan.s
    plan.answer_calls("embed_sel", plan.num_hard * int(s.embed_per_question), baselines.budget(plan.config),
                      f"{plan.num_hard} hard x {s.embed_per_question} neighbours, capped at the baseline budget")


def _plan_embed_syn(plan: _Plan) -> None:
    s = plan.s
    requests = plan.num_hard * int(s.embed_syn_requests_per_question)
    reference = [{"problem": p.problem, "solution": p.solution} for p in plan.references()]
    plan.add("embed_syn", "synthesize", requests,
             _mean_tokens([prompts.synthesize("", "", reference, skills.subject_of(p), n=s.syn_new_questions).prompt
                           for p in plan.references()]),
             f"{plan.num_hard} hard x {s.embed_syn_requests_per_question} requests")
    plan.add("embed_syn", "solve", requests * int(s.syn_new_questions) * int(s.syn_solutions), plan.solve_tokens,
             f"{requests * int(s.syn_new_questions)} new questions x {s.syn_solutions} solutions")


def _plan_syn(plan: _Plan) -> None:
    s = plan.s
    reference = [{"problem": p.problem, "solution": p.solution} for p in plan.references()]
    synth = [prompts.synthesize(PLACEHOLDER_SKILL["name"], PLACEHOLDER_SKILL["description"], reference,
                                skills.subject_of(p), n=s.syn_new_questions).prompt for p in plan.references()]
    plan.add("syn", "synthesize", plan.pairs, _mean_tokens(synth), f"{plan.pairs} (hard, skill) pairs")
    questions = plan.pairs * int(s.syn_new_questions)
    # A new question is about as long as a training question.
    plan.add("syn", "solve", questions * int(s.syn_solutions), plan.solve_tokens,
             f"{questions} new questions x {s.syn_solutions} solutions")


# teacher stage -> its planner, in the order the plan lists them
PLANNERS = {"skills": _plan_skills, "label": _plan_label, "diagnose": _plan_diagnose, "sel": _plan_sel,
            "math_hard": _plan_math_hard, "embed_sel": _plan_embed_sel, "embed_syn": _plan_embed_syn,
            "syn": _plan_syn}


def plan_teacher(config: Any, train: Sequence[MathProblem], heldout: Sequence[MathProblem],
                 stages: Sequence[str], catalog: dict[str, Any] | None = None) -> list[PlannedStage]:
    """The teacher calls of `stages` for these training and held-out rows (see the module docstring)."""
    plan = _Plan(config, train, heldout, catalog)
    for stage, planner in PLANNERS.items():
        if stage in stages:
            planner(plan)
    for row in plan.rows:
        row.cost_usd = _cost(config.teacher, row.input_tokens, row.output_tokens)
    return plan.rows


def _cost(tc: Any, input_tokens: float, output_tokens: float) -> float:
    return (input_tokens * tc.price_input_per_mtok + output_tokens * tc.price_output_per_mtok) / 1e6


def plan_summary(rows: Sequence[PlannedStage], tc: Any) -> dict[str, Any]:
    """The plan as JSON: rows, totals, the prices and the call cap it was checked against."""
    total = {k: sum(getattr(r, k) for r in rows) for k in ("calls", "input_tokens", "output_tokens", "cost_usd")}
    return {"model": tc.model, "price_input_per_mtok": tc.price_input_per_mtok,
            "price_output_per_mtok": tc.price_output_per_mtok, "max_calls": tc.max_calls,
            "chars_per_token": CHARS_PER_TOKEN, "stages": [dataclasses.asdict(r) for r in rows], "total": total}


def check_cap(summary: dict[str, Any]) -> None:
    """Raises BudgetFailure when the planned calls exceed teacher.max_calls (0 = no cap)."""
    from stat_jax.errors import BudgetFailure

    cap, calls = int(summary["max_calls"] or 0), int(summary["total"]["calls"])
    if cap and calls > cap:
        raise BudgetFailure(f"the run plans {calls} teacher calls, more than teacher.max_calls={cap}",
                            hint="raise --config.teacher.max_calls, or shrink the run (stat.train_limit, "
                                 "stat.num_hard, stat.sel_target_size, ...); `stat-jax run --dry-run` shows the plan")


def format_table(summary: dict[str, Any]) -> str:
    """The plan as a text table, one line per stage and task, then the total."""
    lines = [f"teacher plan ({summary['model']}, ${summary['price_input_per_mtok']}/M in, "
             f"${summary['price_output_per_mtok']}/M out; input = chars/{summary['chars_per_token']}, output = "
             "the per-task cap: upper bounds)",
             f"{'stage':<10} {'task':<15} {'calls':>8} {'input tok':>12} {'output tok':>12} {'USD':>9}"]
    for r in summary["stages"]:
        lines.append(f"{r['stage']:<10} {r['task']:<15} {r['calls']:>8} {r['input_tokens']:>12} "
                     f"{r['output_tokens']:>12} {r['cost_usd']:>9.2f}" + (f"  ({r['note']})" if r["note"] else ""))
    t = summary["total"]
    lines.append(f"{'total':<26} {t['calls']:>8} {t['input_tokens']:>12} {t['output_tokens']:>12} "
                 f"{t['cost_usd']:>9.2f}  (teacher.max_calls={summary['max_calls'] or 'no cap'})")
    return "\n".join(lines)
