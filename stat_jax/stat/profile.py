"""Diagnosis of hard questions and the Missing-Skill-Profile (counts, frequencies, a bar chart)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stat_jax.stat.skills import DEFAULT_SUBJECT, catalog_for
from stat_jax.teacher import prompts
from stat_jax.teacher.client import TeacherClient


def diagnose_hard(teacher: TeacherClient, hard: Sequence[dict[str, Any]], catalog: dict[str, list[dict[str, Any]]],
                  max_skills: int, min_skills: int = 2) -> list[dict[str, Any]]:
    """One row per hard question: {id, subject, missing_skills, explanation, none_missing}.

    `none_missing` is the teacher's explicit "every skill was applied" (its reason is the explanation); the
    schema admits no other empty diagnosis.
    """
    requests = []
    for row in hard:
        subject = row.get("subject") or DEFAULT_SUBJECT
        requests.append(prompts.diagnose(row["problem"], row.get("solution"), row["answer"], row["response"], subject,
                                         catalog_for(catalog, subject), max_skills=max_skills,
                                         min_skills=min_skills))
    answers = teacher.ask_many(requests, desc="diagnose")
    return [{"id": row["id"], "subject": row.get("subject") or DEFAULT_SUBJECT,
             "missing_skills": list(dict.fromkeys(a["missing_skills"])),
             "explanation": a["explanation"] if a["missing_skills"] else a["none_missing_reason"],
             "none_missing": not a["missing_skills"]}
            for row, a in zip(hard, answers)]


def missing_skill_profile(diagnoses: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts of each missing skill over the diagnosed questions and its frequency (count / all mentions).

    A skill is counted at most once per question. `question_fraction` is count / number of questions.
    """
    counts: collections.Counter = collections.Counter()
    for d in diagnoses:
        counts.update(set(d["missing_skills"]))
    total = sum(counts.values())
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    n = len(diagnoses)
    return {
        "num_questions": n,
        "num_with_missing_skills": sum(1 for d in diagnoses if d["missing_skills"]),
        "num_none_missing": sum(1 for d in diagnoses if d.get("none_missing")),
        "total_mentions": total,
        "skills": [{"skill": s, "count": c, "frequency": c / total, "question_fraction": c / n} for s, c in ordered],
    }


def plot_profile(profile: dict[str, Any], path: Path, *, top: int = 30, title: str = "Missing-Skill-Profile") -> None:
    """A horizontal bar chart of the `top` most frequently missing skills, most frequent at the top."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    rows = profile["skills"][:top]
    names = [r["skill"] for r in rows][::-1]
    counts = [r["count"] for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * max(1, len(rows))))
    bars = ax.barh(names, counts, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{c} ({100 * c / max(1, profile['total_mentions']):.0f}%)" for c in counts],
                 padding=3, fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)  # counts
    ax.set_xlabel(f"times missing, over {profile['num_questions']} hard questions")
    ax.set_title(title)
    ax.margins(x=0.15)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
