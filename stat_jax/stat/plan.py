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
TASKS = ("propose_skills", "merge_skills", "label_skills", "diagnose", "synthesize", "solve", "rate_difficulty")


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


def _catalog(catalog: dict[str, Any] | None, subject: str, size: int) -> list[dict[str, str]]:
    if catalog and subject in catalog:
        return [{"name": s["name"], "description": s["description"]} for s in catalog[subject]]
    return _placeholder_catalog(size)


def plan_teacher(config: Any, train: Sequence[MathProblem], heldout: Sequence[MathProblem],
                 stages: Sequence[str], catalog: dict[str, Any] | None = None) -> list[PlannedStage]:
    """The teacher calls of `stages` for these training and held-out rows (see the module docstring)."""
    s, tc = config.stat, config.teacher
    subject = skills.subject_of
    rows: list[PlannedStage] = []

    def add(stage: str, task: str, calls: int, mean_input: float, note: str = "") -> None:
        rows.append(PlannedStage(stage, task, int(calls), round(calls * mean_input), int(calls) * output_cap(tc, task),
                                 note=note))

    subjects = sorted({subject(p) for p in train})
    if "skills" in stages:
        def proposals(per_subject: int) -> tuple[list[MathProblem], float]:
            sample = skills.sample_per_subject(train, per_subject, config.seed)
            return sample, _mean_tokens([prompts.propose_skills(p.problem, p.solution, subject(p),
                                                                max_skills=s.propose_max_skills).prompt
                                         for p in sample])

        chosen = int(s.skills_sample_per_subject)
        sample, mean_input = proposals(chosen)
        # The catalog's cost depends most on how many questions name skills: the plan prices the other choice too.
        other = 0 if chosen > 0 else SAMPLE_ALTERNATIVE
        other_sample, other_input = proposals(other)
        other_cost = _cost(tc, len(other_sample) * other_input, len(other_sample) * output_cap(tc, "propose_skills"))
        add("skills", "propose_skills", len(sample), mean_input,
            (f"{chosen} questions per subject (a sample)" if chosen else "every training question (the paper)")
            + f"; stat.skills_sample_per_subject={other}: {len(other_sample)} calls, ${other_cost:.2f}")
        per_subject = {k: sum(subject(p) == k for p in sample) for k in subjects}
        merges = [prompts.merge_skills(k, [{**PLACEHOLDER_SKILL, "name": f"{PLACEHOLDER_SKILL['name']}{i}", "count": 1}
                                           for i in range(per_subject[k] * s.propose_max_skills)],
                                       max_skills=s.catalog_max_skills).prompt for k in subjects]
        add("skills", "merge_skills", len(merges), _mean_tokens(merges),
            "every proposed skill distinct (upper bound)")
    if "label" in stages:
        add("label", "label_skills", len(train),
            _mean_tokens([prompts.label_skills(p.problem, p.solution, subject(p),
                                               _catalog(catalog, subject(p), s.catalog_max_skills),
                                               max_skills=s.label_max_skills).prompt for p in train]),
            "" if catalog else f"catalog: {s.catalog_max_skills} placeholder skills per subject")
    num_hard = min(int(s.num_hard), len(heldout))
    response = "r" * (int(s.rollout_max_new_tokens) * CHARS_PER_TOKEN)  # the student's answer, at its cap
    if "diagnose" in stages:
        add("diagnose", "diagnose", num_hard,
            _mean_tokens([prompts.diagnose(p.problem, p.solution, p.answer, response, subject(p),
                                           _catalog(catalog, subject(p), s.catalog_max_skills),
                                           max_skills=s.diagnose_max_skills).prompt for p in heldout]),
            f"{num_hard} hard questions (stat.num_hard), mean over the held-out rows; student answer "
            f"{s.rollout_max_new_tokens} tokens")
    pairs = num_hard * int(s.diagnose_max_skills)
    solve_tokens = _mean_tokens([prompts.solve(p.problem, subject(p)).prompt for p in train])

    def answer_calls(stage: str, questions: int, target: int, note: str) -> None:
        if s.sel_answer_source == "dataset":
            return
        teacher_answers = s.sel_answers_per_question - (1 if s.sel_answer_source == "dataset+teacher" else 0)
        slots = questions * s.sel_answers_per_question
        calls = min(slots, target) if target > 0 else slots
        calls = round(calls * teacher_answers / s.sel_answers_per_question)
        add(stage, "solve", calls, solve_tokens, note)

    if "sel" in stages:
        answer_calls("sel", pairs * int(s.sel_questions_per_skill), int(s.sel_target_size),
                     f"{pairs} (hard, skill) pairs x {s.sel_questions_per_skill} questions x "
                     f"{s.sel_answers_per_question} answers, capped at stat.sel_target_size")
    size = baselines.budget(config) if any(m in stages for m in ("math_hard", "embed_sel", "embed_syn")) else 0
    if "math_hard" in stages:
        if s.math_hard_rating == "teacher":
            add("math_hard", "rate_difficulty", len(train),
                _mean_tokens([prompts.rate_difficulty(p.problem, p.solution, subject(p)).prompt for p in train]),
                "every training question rated 1-5")
            # Which questions the teacher rates hardest is not known before it rates them: MATH's levels stand in.
            chosen, note = (len(baselines.hardest_levels(train, s.math_hard_top_levels)) if train else 0,
                            "as many questions as the hardest levels hold (the ratings are not known yet)")
        elif s.math_hard_rating == "prm":
            chosen, note = math.ceil(float(s.math_hard_share) * len(train)), "stat.math_hard_share of the questions"
        else:
            chosen, note = (len(baselines.hardest_levels(train, s.math_hard_top_levels)) if train else 0,
                            "the hardest levels' questions")
        answer_calls("math_hard", chosen, size, f"{note}, capped at the baseline budget")
    if "embed_sel" in stages:
        answer_calls("embed_sel", num_hard * int(s.embed_per_question), size,
                     f"{num_hard} hard x {s.embed_per_question} neighbours, capped at the baseline budget")
    if "embed_syn" in stages:
        requests = num_hard * int(s.embed_syn_requests_per_question)
        refs = list(train[:max(1, s.syn_reference_questions)])
        reference = [{"problem": p.problem, "solution": p.solution} for p in refs]
        add("embed_syn", "synthesize", requests,
            _mean_tokens([prompts.synthesize("", "", reference, subject(p), n=s.syn_new_questions).prompt
                          for p in refs]), f"{num_hard} hard x {s.embed_syn_requests_per_question} requests")
        add("embed_syn", "solve", requests * int(s.syn_new_questions) * int(s.syn_solutions), solve_tokens,
            f"{requests * int(s.syn_new_questions)} new questions x {s.syn_solutions} solutions")
    if "syn" in stages:
        refs = list(train[:max(1, s.syn_reference_questions)])
        reference = [{"problem": p.problem, "solution": p.solution} for p in refs]
        synth = [prompts.synthesize(PLACEHOLDER_SKILL["name"], PLACEHOLDER_SKILL["description"], reference, subject(p),
                                    n=s.syn_new_questions).prompt for p in refs]
        add("syn", "synthesize", pairs, _mean_tokens(synth), f"{pairs} (hard, skill) pairs")
        questions = pairs * int(s.syn_new_questions)
        # A new question is about as long as a training question.
        add("syn", "solve", questions * int(s.syn_solutions), solve_tokens,
            f"{questions} new questions x {s.syn_solutions} solutions")
    for row in rows:
        row.cost_usd = _cost(tc, row.input_tokens, row.output_tokens)
    return rows


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
