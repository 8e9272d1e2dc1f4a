"""Record types that flow between stages (one schema per kind of row)."""

from __future__ import annotations

import dataclasses
from typing import Any


def bare_skill_name(name: str) -> str:
    """A catalog skill's name without its subject ("algebra:completing_the_square" -> "completing_the_square")."""
    return name.rsplit(":", 1)[-1]


@dataclasses.dataclass
class MathProblem:
    """One math question, whatever dataset it came from."""

    id: str
    problem: str
    answer: str  # reference final answer (LaTeX allowed), as in \\boxed{...}
    solution: str | None = None  # worked reference solution when the dataset has one
    subject: str | None = None  # MATH subject, or a demo-task skill family
    level: str | None = None
    source: str = ""  # dataset name / file
    skills: list[str] | None = None  # catalog skills, once labelled

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MathProblem:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass
class SFTExample:
    """One supervised pair. Either `prompt` or `messages` (chat turns before the response) is set."""

    response: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    meta: dict[str, Any] | None = None  # provenance: source question id, skill, generator ...

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
