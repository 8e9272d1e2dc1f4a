"""STAT-Syn: the teacher writes new questions for each missing skill, solves each several times, and only
questions whose solutions agree (math-verify) are kept, with the agreeing solutions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stat_jax.data.records import MathProblem, SFTExample
from stat_jax.stat.sel import pair_rng, question_messages
from stat_jax.stat.skills import DEFAULT_SUBJECT
from stat_jax.teacher import prompts
from stat_jax.teacher.client import TeacherClient


def answers_equal(a: str, b: str) -> bool:
    """Whether two final answers are the same (exact after normalisation, else math-verify equivalence)."""
    from stat_jax.data import grader

    return grader.grade(f"\\boxed{{{a}}}", b).correct


def final_answer(solution: str, stated: str | None = None) -> str | None:
    """The last \\boxed{} of a solution; the separately stated answer only when the solution has no box."""
    from stat_jax.data.grader import last_boxed

    boxed = last_boxed(solution)
    return boxed if boxed is not None else (stated.strip() if stated and stated.strip() else None)


def consistency_filter(answers: Sequence[str | None], min_agree: int,
                       equal: Callable[[str, str], bool] = answers_equal) -> tuple[list[int], str | None]:
    """Indices of the largest group of mutually equal answers, and its answer, if it has >= min_agree members.

    Groups are formed greedily against each group's first member (equivalence is assumed transitive); a tie
    between equally large groups goes to the one formed first. Missing answers never agree with anything.
    """
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if equal(answers[g[0]], a):
                g.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return [], None
    best = max(groups, key=len)  # max keeps the first of equally large groups
    if len(best) < min_agree:
        return [], None
    return best, answers[best[0]]


def synthesis_requests(pairs: Sequence[tuple[str, str]], hard_subject: dict[str, str],
                       by_skill: dict[str, Sequence[MathProblem]], catalog_descriptions: dict[str, str],
                       *, num_references: int, num_new: int, seed: int, temperature: float
                       ) -> list[tuple[tuple[str, str], Any]]:
    """One `synthesize` request per (hard id, skill) that has reference questions with the skill."""
    out = []
    for hard_id, skill in pairs:
        pool = list(by_skill.get(skill, ()))
        if not pool:
            continue
        refs = pool if len(pool) <= num_references else pair_rng(seed, "syn", hard_id, skill).sample(pool, num_references)
        request = prompts.synthesize(skill, catalog_descriptions.get(skill, ""),
                                     [{"problem": p.problem, "solution": p.solution} for p in refs],
                                     hard_subject.get(hard_id, DEFAULT_SUBJECT), n=num_new, temperature=temperature)
        out.append(((hard_id, skill), request))
    return out


def build_syn(teacher: TeacherClient, pairs: Sequence[tuple[str, str]], hard_subject: dict[str, str],
              by_skill: dict[str, Sequence[MathProblem]], catalog_descriptions: dict[str, str], *,
              num_references: int, num_new: int, num_solutions: int, min_agree: int, seed: int, temperature: float,
              instruction: str, system_prompt: str = "") -> tuple[list[SFTExample], list[dict[str, Any]], dict[str, Any]]:
    """(SFT examples, one row per synthesized question with its verdict, stats)."""
    jobs = synthesis_requests(pairs, hard_subject, by_skill, catalog_descriptions, num_references=num_references,
                              num_new=num_new, seed=seed, temperature=temperature)
    jobs = [({"id": f"syn/{hard_id}/{skill}", "hard_id": hard_id, "skill": skill,
              "subject": hard_subject.get(hard_id, DEFAULT_SUBJECT)}, request) for (hard_id, skill), request in jobs]
    examples, rows, stats = write_and_solve(teacher, jobs, num_solutions=num_solutions, min_agree=min_agree,
                                            temperature=temperature, instruction=instruction,
                                            system_prompt=system_prompt, method="stat-syn")
    return examples, rows, {"pairs": len(pairs), **stats}


def write_and_solve(teacher: TeacherClient, jobs: Sequence[tuple[dict[str, Any], Any]], *, num_solutions: int,
                    min_agree: int, temperature: float, instruction: str, system_prompt: str = "",
                    method: str = "stat-syn") -> tuple[list[SFTExample], list[dict[str, Any]], dict[str, Any]]:
    """The teacher writes each job's `synthesize` request, solves every new question `num_solutions` times, and
    keeps a question (with its agreeing solutions) when >= min_agree final answers agree; STAT-Syn and Embed-Syn.

    jobs: (tags, request) with tags {"id" (the new questions' id prefix), "hard_id", "skill", "subject"}.
    """
    written = teacher.ask_many([r for _, r in jobs], desc=f"{method}: new questions")
    questions = []
    for (tags, _), answer in zip(jobs, written):
        for j, q in enumerate(answer["problems"]):
            questions.append({**tags, "id": f"{tags['id']}/{j}", "problem": q["problem"].strip()})
    solve_requests = [prompts.solve(q["problem"], q["subject"], sample_index=k, temperature=temperature)
                      for q in questions for k in range(num_solutions)]
    solved = teacher.ask_many(solve_requests, desc=f"{method}: solutions")
    examples, rows = [], []
    for i, q in enumerate(questions):
        sols = solved[i * num_solutions:(i + 1) * num_solutions]
        finals = [final_answer(s["solution"], s.get("answer")) for s in sols]
        kept, agreed = consistency_filter(finals, min_agree)
        rows.append({**q, "final_answers": finals, "kept_solutions": kept, "answer": agreed, "kept": bool(kept)})
        for k in kept:
            meta = {"method": method, "question_id": q["id"], "hard_id": q["hard_id"], "skill": q["skill"],
                    "answer": agreed, "solution_index": k}
            examples.append(SFTExample(messages=question_messages(q["problem"], instruction, system_prompt),
                                       response=sols[k]["solution"], meta={k2: v for k2, v in meta.items() if v != ""}))
    stats = {"synthesis_requests": len(jobs), "new_questions": len(questions),
             "kept_questions": sum(r["kept"] for r in rows), "examples": len(examples)}
    return examples, rows, stats
