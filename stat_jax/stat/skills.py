"""The skill catalog and the Skill-Map (Didolkar et al. 2024): propose per question, merge per subject, label.

Catalog skill names are qualified by their subject (`number_theory:modular_arithmetic`): two subjects' catalogs
may both hold a `basic_arithmetic`, and STAT-Sel must not pool one subject's questions under the other's skill.
"""

from __future__ import annotations

import collections
import random
import re
from collections.abc import Sequence
from typing import Any

from stat_jax.data.records import MathProblem, bare_skill_name
from stat_jax.teacher import prompts
from stat_jax.teacher.client import TeacherClient

DEFAULT_SUBJECT = "general"  # questions without a subject share one catalog


def subject_of(problem: MathProblem) -> str:
    return problem.subject or DEFAULT_SUBJECT


def normalize_skill_name(name: str) -> str:
    """snake_case, so 'Completing the Square' and 'completing_the_square' count as one proposed skill."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def qualified_skill_name(subject: str, name: str) -> str:
    """`subject:name`, the catalog's name for a skill of `subject` (names are unique within a subject only)."""
    return f"{normalize_skill_name(subject)}:{normalize_skill_name(bare_skill_name(name))}"


def sample_per_subject(problems: Sequence[MathProblem], per_subject: int, seed: int) -> list[MathProblem]:
    """Up to `per_subject` questions of each subject (all when 0), chosen by `seed`, in input order."""
    if per_subject <= 0:
        return list(problems)
    by_subject: dict[str, list[int]] = collections.defaultdict(list)
    for i, p in enumerate(problems):
        by_subject[subject_of(p)].append(i)
    rng = random.Random(seed)
    keep = set()
    for subject in sorted(by_subject):
        indices = by_subject[subject]
        keep.update(indices if len(indices) <= per_subject else rng.sample(indices, per_subject))
    return [p for i, p in enumerate(problems) if i in keep]


def propose_skills(teacher: TeacherClient, problems: Sequence[MathProblem], max_skills: int) -> list[dict[str, Any]]:
    """One row per question: {id, subject, skills: [{name, description}]} with normalized names."""
    requests = [prompts.propose_skills(p.problem, p.solution, subject_of(p), max_skills=max_skills) for p in problems]
    answers = teacher.ask_many(requests, desc="propose skills")
    rows = []
    for p, answer in zip(problems, answers):
        skills = [{"name": normalize_skill_name(s["name"]), "description": s["description"]} for s in answer["skills"]]
        rows.append({"id": p.id, "subject": subject_of(p), "skills": [s for s in skills if s["name"]][:max_skills]})
    return rows


def count_proposed(proposed: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """subject -> [{name, description (first seen), count}] sorted by count desc, then name."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    descriptions: dict[tuple[str, str], str] = {}
    for row in proposed:
        for s in row["skills"]:
            counts[row["subject"]][s["name"]] += 1
            descriptions.setdefault((row["subject"], s["name"]), s["description"])
    return {subject: [{"name": n, "description": descriptions[(subject, n)], "count": c}
                      for n, c in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]
            for subject, counter in sorted(counts.items())}


def merge_catalog(teacher: TeacherClient, proposed_by_subject: dict[str, list[dict[str, Any]]],
                  max_skills: int) -> dict[str, list[dict[str, Any]]]:
    """subject -> compact catalog [{name (qualified by the subject), description, merged_from (proposed names)}]."""
    subjects = sorted(proposed_by_subject)
    requests = [prompts.merge_skills(s, proposed_by_subject[s], max_skills=max_skills) for s in subjects]
    answers = teacher.ask_many(requests, desc="merge skills")
    catalog = {}
    for subject, answer in zip(subjects, answers):
        merged: dict[str, dict[str, Any]] = {}
        for s in answer["skills"]:
            name = qualified_skill_name(subject, s["name"]) if normalize_skill_name(s["name"]) else ""
            entry = merged.setdefault(name, {"name": name, "description": s["description"], "merged_from": []})
            entry["merged_from"] = sorted(set(entry["merged_from"]) | {normalize_skill_name(m)
                                                                       for m in s.get("merged_from", [])})
        catalog[subject] = [merged[n] for n in merged if n][:max_skills]
    return catalog


def catalog_for(catalog: dict[str, list[dict[str, Any]]], subject: str) -> list[dict[str, str]]:
    """The catalog of `subject` as [{name, description}], or a clear error when the subject has none."""
    if subject not in catalog:
        raise KeyError(f"no skill catalog for subject {subject!r} (catalog subjects: {sorted(catalog)}); "
                       "re-run the skills stage with questions of that subject in the training data")
    return [{"name": s["name"], "description": s["description"]} for s in catalog[subject]]


def label_problems(teacher: TeacherClient, problems: Sequence[MathProblem], catalog: dict[str, list[dict[str, Any]]],
                   max_skills: int) -> list[MathProblem]:
    """The Skill-Map: copies of `problems` with `skills` set to 1..max_skills catalog skills each."""
    requests = [prompts.label_skills(p.problem, p.solution, subject_of(p), catalog_for(catalog, subject_of(p)),
                                     max_skills=max_skills) for p in problems]
    answers = teacher.ask_many(requests, desc="label skills")
    labelled = []
    for p, answer in zip(problems, answers):
        row = MathProblem.from_dict(p.to_dict())
        row.skills = list(dict.fromkeys(answer["skills"]))
        labelled.append(row)
    return labelled


def problems_by_skill(labelled: Sequence[MathProblem]) -> dict[str, list[MathProblem]]:
    """skill -> questions labelled with it, in input order."""
    index: dict[str, list[MathProblem]] = collections.defaultdict(list)
    for p in labelled:
        for s in p.skills or []:
            index[s].append(p)
    return dict(index)
