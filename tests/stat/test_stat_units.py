"""Hand-built cases for the Missing-Skill-Profile, the STAT-Sel sampling rule and the STAT-Syn filter."""

from __future__ import annotations

import collections

import pytest

from stat_jax.data.records import MathProblem
from stat_jax.stat.hard import select_hard
from stat_jax.stat.profile import missing_skill_profile
from stat_jax.stat.sel import answer_slots, build_sel, missing_pairs, select_by_profile, subsample
from stat_jax.stat.syn import answers_equal, consistency_filter


def test_profile_counts_each_skill_once_per_question():
    diagnoses = [
        {"id": "a", "missing_skills": ["fractions", "algebra"]},
        {"id": "b", "missing_skills": ["fractions", "fractions"]},  # a repeat inside one diagnosis counts once
        {"id": "c", "missing_skills": ["geometry", "fractions", "algebra"]},
        {"id": "d", "missing_skills": []},
    ]
    p = missing_skill_profile(diagnoses)
    assert [(s["skill"], s["count"]) for s in p["skills"]] == [("fractions", 3), ("algebra", 2), ("geometry", 1)]
    assert p["total_mentions"] == 6 and p["num_questions"] == 4 and p["num_with_missing_skills"] == 3
    assert [s["frequency"] for s in p["skills"]] == [0.5, pytest.approx(1 / 3), pytest.approx(1 / 6)]
    assert p["skills"][0]["question_fraction"] == 0.75


def _pool(skill, n):
    return [MathProblem(id=f"{skill}{i}", problem=f"{skill} q{i}", answer=str(i), solution=f"\\boxed{{{i}}}")
            for i in range(n)]


def test_sel_takes_exactly_k_distinct_questions_per_pair_deterministically():
    by_skill = {"fractions": _pool("fractions", 12), "algebra": _pool("algebra", 3)}
    pairs = missing_pairs([{"id": "h1", "missing_skills": ["fractions", "algebra"]},
                           {"id": "h2", "missing_skills": ["fractions", "unknown_skill"]}])
    selected = select_by_profile(pairs, by_skill, per_pair=5, seed=7)
    per_pair = collections.Counter((s["hard_id"], s["skill"]) for s in selected)
    assert per_pair == {("h1", "fractions"): 5, ("h1", "algebra"): 3, ("h2", "fractions"): 5}
    for key in per_pair:
        ids = [s["problem"].id for s in selected if (s["hard_id"], s["skill"]) == key]
        assert len(set(ids)) == len(ids) and all(i.startswith(key[1]) for i in ids)
    assert [s["problem"].id for s in select_by_profile(pairs, by_skill, 5, seed=7)] == [
        s["problem"].id for s in selected]
    assert [s["problem"].id for s in select_by_profile(pairs, by_skill, 5, seed=8)] != [
        s["problem"].id for s in selected]
    # One pair's draw does not depend on the other pairs.
    alone = select_by_profile([("h2", "fractions")], by_skill, 5, seed=7)
    assert [s["problem"].id for s in alone] == [s["problem"].id for s in selected if s["hard_id"] == "h2"]


def test_sel_answer_slots_and_subsample():
    assert answer_slots("dataset+teacher", 3, True) == ["dataset", 0, 1]
    assert answer_slots("dataset+teacher", 3, False) == [0, 1, 2]
    assert answer_slots("teacher", 3, True) == [0, 1, 2]
    assert answer_slots("dataset", 3, True) == ["dataset"]
    with pytest.raises(ValueError, match="sel_answer_source"):
        answer_slots("web", 3, True)
    items = list(range(100))
    a = subsample(items, 30, seed=1)
    assert len(a) == 30 and a == sorted(a) and a == subsample(items, 30, seed=1) != subsample(items, 30, seed=2)
    assert subsample(items, 0, 1) == items and subsample(items, 500, 1) == items


def test_sel_dataset_answers_need_no_teacher():
    selected = select_by_profile([("h", "fractions")], {"fractions": _pool("fractions", 8)}, 5, seed=0)
    examples, stats = build_sel(None, selected, source="dataset", answers_per_question=3, target_size=4, seed=0,
                                instruction="Solve.")
    assert stats["answer_slots"] == 5 and len(examples) == 4 and stats["teacher_solutions"] == 0
    assert all(e.response.startswith("\\boxed") and e.messages[-1]["content"].endswith("Solve.") for e in examples)


def test_consistency_filter_hand_built_cases():
    exact = lambda a, b: a == b  # noqa: E731
    assert consistency_filter(["4", "4", "5"], 2, exact) == ([0, 1], "4")
    assert consistency_filter(["4", "5", "6"], 2, exact) == ([], None)
    assert consistency_filter(["7", "7", "7"], 2, exact) == ([0, 1, 2], "7")
    assert consistency_filter(["3", None, "3"], 2, exact) == ([0, 2], "3")
    assert consistency_filter([None, None, "3"], 2, exact) == ([], None)
    assert consistency_filter(["1", "2", "2", "1"], 2, exact) == ([0, 3], "1")  # tie: the group formed first
    assert consistency_filter(["4", "4", "5"], 3, exact) == ([], None)
    # math-verify equivalence, not string equality.
    assert consistency_filter(["\\frac{1}{2}", "0.5", "\\dfrac12"], 3) == ([0, 1, 2], "\\frac{1}{2}")
    assert consistency_filter(["\\frac{1}{2}", "1/3", "2"], 2) == ([], None)
    assert answers_equal("2\\sqrt{2}", "\\sqrt{8}") and not answers_equal("3", "4")


def test_select_hard_orders_by_score_and_keeps_worst_response():
    problems = [MathProblem(id=str(i), problem=f"q{i}", answer="1") for i in range(4)]
    responses = [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]]
    scores = [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    rows = select_hard(problems, responses, scores, num_hard=2, seed=0)
    assert rows[0]["id"] == "2" and rows[1]["id"] in {"1", "3"} and rows[1]["score"] == 0.5
    assert {r["response"] for r in select_hard(problems, responses, scores, 5, seed=0)} == {"e", "c", "h"}


# ----- the teacher's diagnosis answer and STAT-Sel's teacher answers ----------------------------------------------
CATALOG = [{"name": f"algebra:{n}", "description": n} for n in ("fractions", "equations", "factoring")]


@pytest.mark.parametrize("answer, error", [
    ({"missing_skills": ["algebra:fractions", "algebra:equations"], "explanation": "slipped twice"}, None),
    ({"missing_skills": ["algebra:fractions", "algebra:equations", "algebra:factoring"], "explanation": "x"}, None),
    ({"missing_skills": [], "none_missing_reason": "every step is right"}, None),
    ({"missing_skills": ["algebra:fractions"], "explanation": "one only"}, "schema"),  # the prompt asks for 2-3
    ({"missing_skills": [], "explanation": "nothing"}, "schema"),  # empty without the explicit none-missing reason
    ({"missing_skills": [], "none_missing_reason": ""}, "schema"),
    ({"missing_skills": ["fractions", "algebra:equations"], "explanation": "x"}, "schema"),  # unqualified name
    ({"missing_skills": ["algebra:fractions"] * 2 + ["algebra:equations"] * 2, "explanation": "x"}, "schema"),
])
def test_diagnosis_schema_is_the_prompt(answer, error):
    import json

    from stat_jax.teacher import prompts
    from stat_jax.teacher.client import validate_answer

    request = prompts.diagnose("1/2 + x = 1?", None, "1/2", "x = 3", "Algebra", CATALOG, max_skills=3)
    assert "2 to 3 skills" in request.prompt and "none_missing_reason" in request.prompt
    parsed, why = validate_answer(json.dumps(answer), request.schema)
    assert (why is None) == (error is None), why
    if error:
        assert error in why and parsed is None


def test_diagnosis_of_a_one_skill_catalog_asks_for_that_skill():
    from stat_jax.teacher import prompts

    schema = prompts.diagnose("q", None, "1", "2", "Algebra", CATALOG[:1]).schema
    assert schema["anyOf"][0]["properties"]["missing_skills"]["minItems"] == 1
    # stat.diagnose_min_skills=1 (not the paper's 2) admits a single name, and the prompt says so.
    one = prompts.diagnose("q", None, "1", "2", "Algebra", CATALOG, min_skills=1)
    assert one.schema["anyOf"][0]["properties"]["missing_skills"]["minItems"] == 1 and "the 1 to 3" in one.prompt


class _Teacher:
    """Writes solutions whose answer is 7: right for half the questions below, wrong for the others."""

    def __init__(self):
        self.asked = 0

    def ask_many(self, requests, desc=""):
        self.asked += len(requests)
        return [{"solution": "so \\boxed{7}", "answer": "7"} for _ in requests]


def test_sel_keeps_every_teacher_answer_unless_the_reference_filter_is_asked_for():
    pool = [MathProblem(id=f"q{i}", problem=f"q{i}?", answer="7" if i % 2 else "8", solution="\\boxed{7}",
                        skills=["algebra:fractions"]) for i in range(4)]
    selected = select_by_profile([("h", "algebra:fractions")], {"algebra:fractions": pool}, 4, seed=0)
    kept, stats = build_sel(_Teacher(), selected, source="teacher", answers_per_question=3, target_size=0, seed=0,
                            instruction="Solve.")
    assert len(kept) == 12 and stats["answer_filter"] == "none" and not stats["uses_reference_labels"]
    assert {e.meta["answer_source"] for e in kept} == {"teacher:0", "teacher:1", "teacher:2"}
    filtered, stats = build_sel(_Teacher(), selected, source="teacher", answers_per_question=3, target_size=0,
                                seed=0, instruction="Solve.", answer_filter="reference")
    # The two questions whose reference answer is 8 lose their three answers; the stats say labels were used.
    assert len(filtered) == 6 and {e.meta["question_id"] for e in filtered} == {"q1", "q3"}
    assert stats["teacher_solutions_rejected"] == 6 and stats["uses_reference_labels"]
    with pytest.raises(ValueError, match="sel_answer_filter"):
        build_sel(_Teacher(), selected, source="teacher", answers_per_question=3, target_size=0, seed=0,
                  instruction="Solve.", answer_filter="labels")


def test_run_recorded_writes_the_manifest_that_marks_a_stage_done(tmp_path):
    """The manifest keeps the config fields the stage read; it is done while they (and its files) are unchanged."""
    from ml_collections import ConfigDict

    from stat_jax import validity
    from stat_jax.stat import io

    config = validity.watch(ConfigDict({"k": 1, "unread": 5, "s": {"x": 2}}))

    def stage():
        io.write_json(tmp_path / "s/out.json", {"x": config.k + config.s.x})
        return {"rows": 3}

    assert not io.stage_is_done(tmp_path, "s", config, [])
    assert io.run_recorded(tmp_path, "s", [], ["s/out.json"], stage) == {"rows": 3}
    manifest = io.read_json(tmp_path / "s" / io.MANIFEST)
    assert manifest["stats"] == {"rows": 3} and manifest["seconds"] >= 0 and "s/out.json" in manifest["outputs"]
    assert manifest["reads"] == {"k": 1, "s.x": 2}
    assert io.stage_is_done(tmp_path, "s", ConfigDict({"k": 1, "unread": 6, "s": {"x": 2}}), [])
    assert not io.stage_is_done(tmp_path, "s", ConfigDict({"k": 2, "unread": 5, "s": {"x": 2}}), [])
    assert not io.stage_is_done(tmp_path, "s", ConfigDict({"k": 1, "unread": 5, "s": {"x": 3}}), [])
    # The stage writes more files now than when the manifest was made (its code or its outputs' list changed).
    assert not io.stage_is_done(tmp_path, "s", config, [], outputs=["s/out.json", "s/new.json"])
    io.write_json(tmp_path / "s/out.json", {"x": 0})  # an output changed since: not done
    assert not io.stage_is_done(tmp_path, "s", config, [])
    # A process other than process 0 runs its share and leaves the manifest alone.
    (tmp_path / "s" / io.MANIFEST).unlink()
    assert io.run_recorded(tmp_path, "s", [], ["s/out.json"], stage, write=False) == {"rows": 3}
    assert not (tmp_path / "s" / io.MANIFEST).exists()
    # A stage that did not write what it promised is an error, not a manifest.
    with pytest.raises(RuntimeError, match=r"without writing \['s/missing.json'\]"):
        io.run_recorded(tmp_path, "s", [], ["s/missing.json"], stage)
