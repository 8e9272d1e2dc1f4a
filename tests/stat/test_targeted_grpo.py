"""Skill-targeted GRPO (issue 44, goal 4): `grpo.prompt_weighting=profile` draws the prompts through the Skill-Map
in proportion to the Missing-Skill-Profile."""

from __future__ import annotations

import collections

import pytest

from stat_jax.config import load_config_file
from stat_jax.data.records import MathProblem
from stat_jax.errors import ConfigError
from stat_jax.stat import sel
from stat_jax.stat.pipeline import check_stage_config, stages_to_run


def _labelled(skill: str, n: int) -> list[MathProblem]:
    return [MathProblem(f"{skill}{i}", f"q {skill} {i}", "1", skills=[skill]) for i in range(n)]


def test_prompts_follow_the_profile():
    by_skill = {"carry": _labelled("carry", 20), "borrow": _labelled("borrow", 20), "percent": _labelled("percent", 20)}
    # The diagnoses blame borrow four times, carry twice, percent never: the profile is 2/3 borrow, 1/3 carry.
    pairs = [("h1", "borrow"), ("h2", "borrow"), ("h3", "carry"), ("h4", "borrow"), ("h5", "borrow"), ("h6", "carry")]
    prompts = sel.profile_prompts(pairs, by_skill, per_pair=5, seed=0)
    shares = collections.Counter(p.skills[0] for p in prompts)
    assert shares == {"borrow": 20, "carry": 10}
    assert prompts == sel.profile_prompts(pairs, by_skill, per_pair=5, seed=0)  # seeded
    assert all(p.answer for p in prompts)  # GRPO's reward reads the reference answer
    # A skill the Skill-Map holds few questions of keeps its share: its questions repeat.
    scarce = {**by_skill, "borrow": _labelled("borrow", 2)}
    prompts = sel.profile_prompts(pairs, scarce, per_pair=5, seed=0)
    assert collections.Counter(p.skills[0] for p in prompts) == {"borrow": 20, "carry": 10}
    assert {p.id for p in prompts if p.skills[0] == "borrow"} == {"borrow0", "borrow1"}


def test_profile_weighting_with_prompt_files_or_an_unknown_weighting_is_a_config_error():
    c = load_config_file("configs/base.py")
    c.grpo.prompt_weighting, c.grpo.train_files = "profile", ("prompts.jsonl",)
    with pytest.raises(ConfigError, match="grpo.prompt_weighting=profile draws GRPO's prompts from the Skill-Map"):
        check_stage_config(c, stages_to_run(c, "grpo"))
    c.grpo.prompt_weighting = "by_skill"
    with pytest.raises(ConfigError, match="grpo.prompt_weighting='by_skill'"):
        check_stage_config(c, stages_to_run(c, "grpo"))
    c.grpo.prompt_weighting, c.grpo.train_files = "profile", ()
    check_stage_config(c, stages_to_run(c, "grpo"))
