"""Every prompt the teacher sees, in one place: one function per task, each returning a `TeacherRequest`.

A request carries the rendered `prompt` (for an LLM teacher), the structured `payload` it was rendered from
(an offline teacher answers from these keys without parsing text) and the JSON `schema` the answer must fit.
The payload keys and schemas are the contract with every backend; docs/ARCHITECTURE.md ("Teacher tasks")
lists them. Skill names are short snake_case identifiers, qualified by their subject in a catalog
(`algebra:completing_the_square`, see stat_jax/stat/skills.py); catalog-constrained answers use a JSON-schema
`enum` of the catalog names, so an answer naming an unknown skill fails validation and is re-asked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from stat_jax.teacher.base import TeacherRequest

PROMPT_VERSION = "v2"  # part of every prompt, hence of every cache key: bump it when a prompt changes meaning

_SKILL_OBJECT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "description": {"type": "string"}},
    "required": ["name", "description"],
}


def _skill_names_schema(catalog: Sequence[dict[str, str]], min_items: int, max_items: int) -> dict[str, Any]:
    names = sorted({s["name"] for s in catalog})
    return {"type": "array", "items": {"type": "string", "enum": names}, "minItems": min_items,
            "maxItems": max_items}


def _catalog_text(catalog: Sequence[dict[str, str]]) -> str:
    return "\n".join(f"- {s['name']}: {s.get('description', '')}" for s in catalog)


def _header(task: str) -> str:
    return f"[stat-jax teacher prompt {PROMPT_VERSION}: {task}]\nYou are an expert mathematics teacher.\n"


def propose_skills(problem: str, solution: str | None, subject: str, *, max_skills: int = 3) -> TeacherRequest:
    """Asks for the fine-grained skills needed to solve one question (Didolkar et al. 2024, stage 1).

    payload: problem, solution (str or None), subject, max_skills.
    schema: {"skills": [{"name": snake_case str, "description": str}, ...]} (at least one).
    """
    prompt = (
        _header("propose_skills")
        + f"Subject: {subject}\n\nQuestion:\n{problem}\n\n"
        + (f"Reference solution:\n{solution}\n\n" if solution else "")
        + f"Name up to {max_skills} fine-grained mathematical skills a student must apply to solve this question. "
        "Each skill gets a short snake_case name (e.g. completing_the_square) and a one-sentence description. "
        'Answer with JSON: {"skills": [{"name": ..., "description": ...}]}.'
    )
    schema = {"type": "object", "properties": {"skills": {"type": "array", "items": _SKILL_OBJECT, "minItems": 1}},
              "required": ["skills"]}
    payload = {"problem": problem, "solution": solution, "subject": subject, "max_skills": max_skills}
    return TeacherRequest(task="propose_skills", prompt=prompt, schema=schema, payload=payload)


def merge_skills(subject: str, proposed: Sequence[dict[str, Any]], *, max_skills: int = 25) -> TeacherRequest:
    """Asks to merge the skills proposed for one subject into a compact catalog (Didolkar et al. 2024, stage 2).

    payload: subject, skills ([{"name", "description", "count"}], count = how many questions proposed it),
      max_skills.
    schema: {"skills": [{"name", "description", "merged_from": [proposed names] (optional)}]} (at least one).
    """
    listing = "\n".join(f"- {s['name']} (x{s.get('count', 1)}): {s.get('description', '')}" for s in proposed)
    prompt = (
        _header("merge_skills")
        + f"Subject: {subject}\n\nThese fine-grained skills were named for individual questions:\n{listing}\n\n"
        f"Merge them into a compact catalog of at most {max_skills} distinct skills for this subject: group "
        "near-duplicates and overly specific skills under one representative snake_case name with a "
        "one-sentence description, and list the proposed names each catalog skill covers. "
        'Answer with JSON: {"skills": [{"name": ..., "description": ..., "merged_from": [...]}]}.'
    )
    item = {"type": "object",
            "properties": {**_SKILL_OBJECT["properties"], "merged_from": {"type": "array", "items": {"type": "string"}}},
            "required": ["name", "description"]}
    schema = {"type": "object", "properties": {"skills": {"type": "array", "items": item, "minItems": 1}},
              "required": ["skills"]}
    payload = {"subject": subject, "skills": [dict(s) for s in proposed], "max_skills": max_skills}
    return TeacherRequest(task="merge_skills", prompt=prompt, schema=schema, payload=payload)


def label_skills(problem: str, solution: str | None, subject: str, catalog: Sequence[dict[str, str]],
                 *, max_skills: int = 3) -> TeacherRequest:
    """Asks which 1..max_skills catalog skills a question exercises (the Skill-Map).

    payload: problem, solution (str or None), subject, catalog ([{"name", "description"}]), max_skills.
    schema: {"skills": [catalog name, ...]} with 1..max_skills items, names from the catalog (enum).
    """
    prompt = (
        _header("label_skills")
        + f"Subject: {subject}\n\nSkill catalog:\n{_catalog_text(catalog)}\n\nQuestion:\n{problem}\n\n"
        + (f"Reference solution:\n{solution}\n\n" if solution else "")
        + f"Which 1 to {max_skills} skills from the catalog does solving this question require most? "
        'Use catalog names exactly. Answer with JSON: {"skills": [...]}.'
    )
    schema = {"type": "object", "properties": {"skills": _skill_names_schema(catalog, 1, max_skills)},
              "required": ["skills"]}
    payload = {"problem": problem, "solution": solution, "subject": subject,
               "catalog": [dict(s) for s in catalog], "max_skills": max_skills}
    return TeacherRequest(task="label_skills", prompt=prompt, schema=schema, payload=payload)


def diagnose_schema(catalog: Sequence[dict[str, str]], *, min_skills: int = 2, max_skills: int = 3
                    ) -> dict[str, Any]:
    """The diagnosis answer: 2..max_skills catalog names with an explanation, or none with a reason.

    Two shapes under `anyOf` (Gemini's structured output takes anyOf, not oneOf/const): a list of one skill, or
    an empty list without `none_missing_reason`, fits neither and is re-asked. A catalog with fewer skills than
    `min_skills` (or max_skills below it) lowers the minimum to that.
    """
    names = {s["name"] for s in catalog}
    low = max(1, min(min_skills, max_skills, len(names)))
    named = {"type": "object",
             "properties": {"missing_skills": _skill_names_schema(catalog, low, max(low, max_skills)),
                            "explanation": {"type": "string", "minLength": 1}},
             "required": ["missing_skills", "explanation"]}
    none = {"type": "object",
            "properties": {"missing_skills": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
                           "none_missing_reason": {"type": "string", "minLength": 1}},
            "required": ["missing_skills", "none_missing_reason"]}
    return {"anyOf": [named, none]}


def diagnose(problem: str, reference_solution: str | None, reference_answer: str, response: str, subject: str,
             catalog: Sequence[dict[str, str]], *, max_skills: int = 3, min_skills: int = 2) -> TeacherRequest:
    """Asks which 2-3 catalog skills the student failed to apply in its answer (the Missing-Skill-Profile input).

    payload: problem, reference_solution (str or None), reference_answer, response (the student's answer),
      subject, catalog ([{"name", "description"}]), max_skills, min_skills.
    schema (`diagnose_schema`): {"missing_skills": [min_skills (2, the paper's)..max_skills catalog names, enum],
      "explanation": str}, or
      {"missing_skills": [], "none_missing_reason": str} when the teacher finds no missing skill (e.g. the
      answer was right after all), said explicitly, never as a silently empty list.
    """
    prompt = (
        _header("diagnose")
        + f"Subject: {subject}\n\nSkill catalog:\n{_catalog_text(catalog)}\n\nQuestion:\n{problem}\n\n"
        + (f"Reference solution:\n{reference_solution}\n\n" if reference_solution else "")
        + f"Reference final answer: {reference_answer}\n\nStudent's answer:\n{response}\n\n"
        f"Read the student's answer step by step. Name the {min_skills} to {max_skills} skills from the catalog that the "
        "student failed to apply correctly (catalog names exactly), most important first, and explain briefly: "
        'answer with JSON {"missing_skills": [...], "explanation": ...}. Only if the student applied every '
        'skill correctly, answer {"missing_skills": [], "none_missing_reason": ...} saying why.'
    )
    payload = {"problem": problem, "reference_solution": reference_solution, "reference_answer": reference_answer,
               "response": response, "subject": subject, "catalog": [dict(s) for s in catalog],
               "max_skills": max_skills, "min_skills": min_skills}
    return TeacherRequest(task="diagnose", prompt=prompt,
                          schema=diagnose_schema(catalog, min_skills=min_skills, max_skills=max_skills),
                          payload=payload)


def synthesize(skill: str, skill_description: str, examples: Sequence[dict[str, Any]], subject: str,
               *, n: int = 2, temperature: float = 0.7) -> TeacherRequest:
    """Asks for `n` new questions that exercise `skill`, modelled on reference questions (STAT-Syn).

    payload: skill (catalog name, qualified by its subject), skill_description, examples ([{"problem",
      "solution"}] reference questions labelled with the skill, or the nearest ones for Embed-Syn), subject, n.
      `skill` "" asks for questions like the examples without naming a skill (Embed-Syn).
    schema: {"problems": [{"problem": str}, ...]} with exactly n items.
    """
    shown = "\n\n".join(f"Example {i + 1}:\n{e['problem']}" for i, e in enumerate(examples))
    # The prompt shows the bare name: the subject is on the line above it.
    target = (f"Skill: {skill.rsplit(':', 1)[-1]} -- {skill_description}\n\n", "require the skill above") if skill \
        else ("\n", "exercise what the examples exercise")
    prompt = (
        _header("synthesize")
        + f"Subject: {subject}\n{target[0]}{shown}\n\n"
        f"Write {n} new, self-contained questions that {target[1]}, of similar difficulty to the "
        "examples but not copies of them, each with a single well-defined final answer. "
        'Answer with JSON: {"problems": [{"problem": ...}]}.'
    )
    schema = {"type": "object",
              "properties": {"problems": {"type": "array", "minItems": n, "maxItems": n,
                                          "items": {"type": "object", "properties": {"problem": {"type": "string"}},
                                                    "required": ["problem"]}}},
              "required": ["problems"]}
    payload = {"skill": skill, "skill_description": skill_description,
               "examples": [{"problem": e["problem"], "solution": e.get("solution")} for e in examples],
               "subject": subject, "n": n}
    return TeacherRequest(task="synthesize", prompt=prompt, schema=schema, payload=payload, temperature=temperature)


def rate_difficulty(problem: str, solution: str | None, subject: str) -> TeacherRequest:
    """Asks how hard a question is, 1 (routine) to 5 (competition-hard) as MATH's levels (MATH-Hard by rating).

    payload: problem, solution (str or None), subject.
    schema: {"difficulty": integer 1..5, "reason": str}.
    """
    prompt = (
        _header("rate_difficulty")
        + f"Subject: {subject}\n\nQuestion:\n{problem}\n\n"
        + (f"Reference solution:\n{solution}\n\n" if solution else "")
        + "Rate how hard this question is for a strong high-school student on the scale of the MATH dataset's "
        "levels: 1 = a routine one-step exercise, 5 = among the hardest competition questions. "
        'Answer with JSON: {"difficulty": 1-5, "reason": one sentence}.'
    )
    schema = {"type": "object",
              "properties": {"difficulty": {"type": "integer", "minimum": 1, "maximum": 5},
                             "reason": {"type": "string"}},
              "required": ["difficulty", "reason"]}
    return TeacherRequest(task="rate_difficulty", prompt=prompt, schema=schema,
                          payload={"problem": problem, "solution": solution, "subject": subject})


def solve(problem: str, subject: str | None = None, *, sample_index: int = 0, temperature: float = 0.7) -> TeacherRequest:
    """Asks for a step-by-step solution ending in \\boxed{answer} (STAT-Sel/Syn answers); one sample per index.

    payload: problem, subject (str or None).
    schema: {"solution": str (ends with \\boxed{...}), "answer": str (the boxed final answer)}.
    """
    prompt = (
        _header("solve")
        + (f"Subject: {subject}\n\n" if subject else "")
        + f"Question:\n{problem}\n\nSolve the question step by step and end the solution with the final answer "
        "in \\boxed{}. Answer with JSON: {\"solution\": ..., \"answer\": ...} where answer is the boxed content."
    )
    schema = {"type": "object",
              "properties": {"solution": {"type": "string"}, "answer": {"type": "string"}},
              "required": ["solution", "answer"]}
    payload = {"problem": problem, "subject": subject}
    return TeacherRequest(task="solve", prompt=prompt, schema=schema, payload=payload, temperature=temperature,
                          sample_index=sample_index)


def parse_json_answer(text: str) -> Any:
    """Parses a teacher answer, tolerating a ```json fence around it (some models add one)."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        stripped = stripped.rsplit("```", 1)[0]
    return json.loads(stripped)
