"""STAT-Sel: map the Missing-Skill-Profile through the Skill-Map onto existing training questions and answers."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from stat_jax.data.records import MathProblem, SFTExample
from stat_jax.stat.skills import subject_of
from stat_jax.teacher import prompts
from stat_jax.teacher.client import TeacherClient

log = logging.getLogger(__name__)

ANSWER_SOURCES = ("dataset", "teacher", "dataset+teacher")
# "reference" drops a teacher answer whose final answer disagrees with the dataset's: a use of the labels, which
# the paper's STAT-Sel does not make; the stats and the log say so when it is on.
ANSWER_FILTERS = ("none", "reference")


def missing_pairs(diagnoses: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(hard question id, missing skill) for every diagnosis, in diagnosis order."""
    return [(d["id"], s) for d in diagnoses for s in d["missing_skills"]]


def pair_rng(seed: int, *parts: str) -> random.Random:
    """An RNG that depends only on the seed and the pair, so one pair's draw never shifts another's."""
    return random.Random(":".join([str(seed), *parts]))


def select_by_profile(pairs: Sequence[tuple[str, str]], by_skill: dict[str, Sequence[MathProblem]],
                      per_pair: int, seed: int) -> list[dict[str, Any]]:
    """For each (hard id, skill): `per_pair` distinct training questions labelled with the skill (all if fewer).

    Returns [{hard_id, skill, problem: MathProblem}], pairs in order; a skill no question carries is skipped.
    """
    selected = []
    for hard_id, skill in pairs:
        pool = list(by_skill.get(skill, ()))
        chosen = pool if len(pool) <= per_pair else pair_rng(seed, hard_id, skill).sample(pool, per_pair)
        selected.extend({"hard_id": hard_id, "skill": skill, "problem": p} for p in chosen)
    return selected


def profile_prompts(pairs: Sequence[tuple[str, str]], by_skill: dict[str, Sequence[MathProblem]], per_pair: int,
                    seed: int) -> list[MathProblem]:
    """Skill-targeted GRPO prompts (`grpo.prompt_weighting=profile`): for each (hard id, missing skill) of the
    diagnoses, `per_pair` Skill-Map questions labelled with the skill (seeded; a skill with fewer questions repeats
    them), so each skill's share of the prompts is its share of the Missing-Skill-Profile."""
    prompts = []
    for hard_id, skill in pairs:
        pool = list(by_skill.get(skill, ()))
        order = pair_rng(seed, hard_id, skill).sample(pool, len(pool))
        prompts.extend(order[i % len(order)] for i in range(per_pair if order else 0))
    return prompts


def answer_slots(source: str, answers_per_question: int, has_dataset_solution: bool) -> list[str | int]:
    """The answers one selected question gets: "dataset" and/or teacher sample indices 0, 1, ..."""
    if source not in ANSWER_SOURCES:
        raise ValueError(f"stat.sel_answer_source={source!r}: choose one of {ANSWER_SOURCES}")
    if source == "dataset":
        # A dataset has one reference solution per question; repeating it would only re-weight the question.
        return ["dataset"] if has_dataset_solution else []
    if source == "dataset+teacher" and has_dataset_solution:
        return ["dataset", *range(answers_per_question - 1)]
    return list(range(answers_per_question))


def subsample(items: Sequence[Any], target: int, seed: int) -> list[Any]:
    """A seeded random subset of `target` items (all when target <= 0 or there are fewer), in input order."""
    if target <= 0 or len(items) <= target:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), target))
    return [items[i] for i in keep]


def question_messages(problem: str, instruction: str, system_prompt: str = "") -> list[dict[str, str]]:
    """The chat turns before an SFT response: the same rendering eval and rollouts use (`data.prompting`)."""
    from stat_jax.data.prompting import build_messages

    return build_messages(problem, instruction=instruction, system_prompt=system_prompt)


def build_sel(teacher: TeacherClient | None, selected: Sequence[dict[str, Any]], *, source: str,
              answers_per_question: int, target_size: int, seed: int, instruction: str,
              system_prompt: str = "", grade_workers: int = 0, answer_filter: str = "none"
              ) -> tuple[list[SFTExample], dict[str, Any]]:
    """STAT-Sel examples: expand selections into answer slots, subsample to `target_size`, then fill the slots.

    Subsampling happens before teacher solutions are requested, so only solutions that are used are paid for.
    answer_filter="reference" drops a teacher solution whose final answer disagrees with the dataset answer
    (counted in the stats, which then say the set used the reference labels); "none" keeps every one.
    """
    if answer_filter not in ANSWER_FILTERS:
        raise ValueError(f"stat.sel_answer_filter={answer_filter!r}: choose one of {ANSWER_FILTERS}")
    slots = [(sel, slot) for sel in selected
             for slot in answer_slots(source, answers_per_question, bool(sel["problem"].solution))]
    kept = subsample(slots, target_size, seed)
    needed = sorted({(sel["problem"].id, slot) for sel, slot in kept if slot != "dataset"})
    problems = {sel["problem"].id: sel["problem"] for sel, _ in kept}
    solutions: dict[tuple[str, int], str | None] = {}
    if needed:
        if teacher is None:
            raise ValueError(f"stat.sel_answer_source={source!r} needs teacher solutions but no teacher was given")
        requests = [prompts.solve(problems[pid].problem, subject_of(problems[pid]), sample_index=k)
                    for pid, k in needed]
        answers = teacher.ask_many(requests, desc="sel: teacher solutions")
        if answer_filter == "reference":
            log.info("sel: teacher solutions are filtered against the dataset's reference answers (uses labels; "
                     "stat.sel_answer_filter=reference)")
            verdicts = _agrees_with_reference([a["solution"] for a in answers],
                                              [problems[pid].answer for pid, _ in needed], grade_workers)
        else:
            verdicts = [True] * len(answers)
        solutions = {key: (a["solution"] if ok else None) for key, a, ok in zip(needed, answers, verdicts)}
    examples = []
    for sel, slot in kept:
        p = sel["problem"]
        response = p.solution if slot == "dataset" else solutions[(p.id, slot)]
        if response is None:
            continue
        examples.append(SFTExample(messages=question_messages(p.problem, instruction, system_prompt), response=response, meta={
            "method": "stat-sel", "question_id": p.id, "hard_id": sel["hard_id"], "skill": sel["skill"],
            "answer_source": "dataset" if slot == "dataset" else f"teacher:{slot}"}))
    stats = {"selected_questions": len(selected), "unique_questions": len({s["problem"].id for s in selected}),
             "answer_slots": len(slots), "after_subsample": len(kept), "teacher_solutions": len(needed),
             "teacher_solutions_rejected": sum(1 for v in solutions.values() if v is None),
             "answer_filter": answer_filter, "uses_reference_labels": answer_filter == "reference" and bool(needed),
             "examples": len(examples)}
    return examples, stats


def _agrees_with_reference(solutions: Sequence[str], references: Sequence[str], workers: int) -> list[bool]:
    from stat_jax.data import grader

    pairs = list(zip(solutions, references))
    if workers > 0:
        return [g.correct for g in grader.grade_many(pairs, workers=workers, progress=False)]
    return [grader.grade(s, r).correct for s, r in pairs]
