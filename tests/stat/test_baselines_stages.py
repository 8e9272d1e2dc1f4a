"""The paper's baselines as pipeline stages (issue 16, item 5): MATH-Train, MATH-Hard (by level, teacher rating or
PRM), Embed-Sel and Embed-Syn each write a set of exactly STAT-Sel's budget, chosen with stat.method; Embed-Sel's
embeddings by the student (JAX) equal transformers' mean-pooled hidden states of the same checkpoint; the real
student embeds real MATH rows (slow). `student` is tests/conftest.py's tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stat_jax.config import ConfigError, load_config_file
from stat_jax.data.records import MathProblem
from stat_jax.stat import baselines, io
from stat_jax.stat.pipeline import StageContext, _sft_files, run_pipeline
from stat_jax.teacher.base import TeacherBackend, TeacherResponse

REAL_STUDENT = Path("/work/main/.cache/smollm2-135m-instruct")
SHARED_DATA = Path("/work/shared/data")


def _row(i: int, level: str) -> dict:
    return {"id": f"train/{i}", "problem": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1),
            "solution": f"{i} + {i + 1} = {2 * i + 1}, so the answer is $\\boxed{{{2 * i + 1}}}$.",
            "subject": "Algebra" if i % 2 else "Prealgebra", "level": level}


def _numbers(problem: str) -> tuple[int, int]:
    a, b = (int(w.rstrip("?")) for w in problem.split()[2::2])
    return a, b


class SolvingTeacher(TeacherBackend):
    """Solves "What is A plus B?" from the text: right, except on a new (synthesized) question with an odd A, where
    samples 1 and 2 are off by 1 and 2 (so STAT-Syn's >= 2-agree filter drops it). Writes new questions from the
    first example (A + 100 + j plus B); rates a question A % 5 + 1."""

    backend_id = "baselines-test-teacher"

    def __init__(self):
        self.calls = 0
        self.tasks: list[str] = []

    def complete(self, request, *, reask_error=None):
        self.calls += 1
        self.tasks.append(request.task)
        if request.task == "synthesize":
            assert request.payload["skill"] == "" and "Skill:" not in request.prompt  # Embed-Syn names no skill
            a, b = _numbers(request.payload["examples"][0]["problem"])
            n = request.payload["n"]
            return TeacherResponse(json.dumps({"problems": [{"problem": f"What is {a + 100 + j} plus {b}?"}
                                                            for j in range(n)]}))
        if request.task == "rate_difficulty":
            a, _ = _numbers(request.payload["problem"])
            return TeacherResponse(json.dumps({"difficulty": a % 5 + 1, "reason": "by A"}))
        assert request.task == "solve", request.task
        a, b = _numbers(request.payload["problem"])
        value = a + b + (request.sample_index if a >= 100 and a % 2 else 0)
        return TeacherResponse(json.dumps({"solution": f"Sample {request.sample_index}: {a}+{b} is "
                                                       f"$\\boxed{{{value}}}$.", "answer": str(value)}))


def _run_dir(tmp_path: Path, train: list[dict], hard: list[dict]) -> Path:
    run_dir = tmp_path / "run" / "stat"
    io.write_jsonl(run_dir / "data/train.jsonl", train)
    io.write_jsonl(run_dir / "hard/hard.jsonl", hard)
    return run_dir


def _config(tmp_path: Path, student: Path | str = "", **stat):
    c = load_config_file("configs/base.py")
    c.workdir = str(tmp_path / "run")
    c.model.path = str(student)
    c.model.dtype = "float32"
    c.stat.grade_workers = 0
    c.stat.sel_target_size = 12
    for key, value in stat.items():
        c.stat[key] = value
    return c


LEVELS = ["Level 1", "Level 2", "Level 3", "Level 4", "Level 5", "Level ?"]


def test_levels_and_the_budget_rules():
    assert [baselines.level_number(x) for x in ("Level 5", "5", 3, "Level ?", None)] == [5, 5, 3, None, None]
    problems = [MathProblem.from_dict(_row(i, LEVELS[i % 6])) for i in range(24)]
    hard = baselines.hardest_levels(problems, top_levels=2)
    assert {p.level for p in hard} == {"Level 4", "Level 5"} and len(hard) == 8
    with pytest.raises(ValueError, match="none of the 2 training questions has a level"):
        baselines.hardest_levels([MathProblem.from_dict(_row(i, "Level ?")) for i in range(2)])
    items = list(range(5))
    filled, repeats = baselines.fill_budget(items, 12, seed=0)
    assert len(filled) == 12 and repeats == 7 and all(filled.count(i) in (2, 3) for i in items)
    assert baselines.fill_budget(items, 3, seed=0)[0] == baselines.fill_budget(items, 3, seed=0)[0]
    assert len(set(baselines.fill_budget(items, 3, seed=0)[0])) == 3
    c = load_config_file("configs/base.py")
    assert baselines.budget(c) == 9500  # STAT-Sel's, the paper's standard
    c.stat.baseline_size = 40
    assert baselines.budget(c) == 40
    c.stat.baseline_size, c.stat.sel_target_size = 0, 0
    with pytest.raises(ConfigError, match="stat.baseline_size=0 and stat.sel_target_size=0"):
        baselines.budget(c)


def test_each_baseline_stage_writes_a_budget_matched_set(tmp_path, student):
    train = [_row(i, LEVELS[i % 6]) for i in range(30)]
    # Each difficult question has the text of one training question (another id): its nearest neighbour.
    twins = [3, 16, 27]
    hard = [{**_row(i, "Level 5"), "id": f"test/{i}", "scores": [0.0]} for i in twins]
    run_dir = _run_dir(tmp_path, train, hard)
    teacher = SolvingTeacher()
    config = _config(tmp_path, student, sel_answer_source="teacher", sel_answers_per_question=3,
                     embed_per_question=2, embed_syn_requests_per_question=2, syn_reference_questions=1,
                     stages=("math_train", "math_hard", "embed_sel", "embed_syn"))
    results = run_pipeline(config, teacher_backend=teacher)
    assert results == {"math_train": "done", "math_hard": "done", "embed_sel": "done", "embed_syn": "done"}
    sets = {m: io.read_jsonl(run_dir / f) for m, f in baselines.METHOD_FILES.items()}
    assert {m: len(rows) for m, rows in sets.items()} == {m: 12 for m in sets}  # stat.sel_target_size
    by_id = {r["id"]: r for r in train}

    def question(example):
        return by_id[example["meta"]["question_id"]]

    # MATH-Train: dataset solutions of 12 of the 30 questions, no teacher.
    assert all(e["meta"]["answer_source"] == "dataset" and e["response"] == question(e)["solution"]
               for e in sets["math_train"])
    assert len({question(e)["id"] for e in sets["math_train"]}) == 12
    # MATH-Hard: only Level 4-5 questions (10 of them x 3 teacher answers = 30 slots, 12 sampled).
    assert {question(e)["level"] for e in sets["math_hard"]} <= {"Level 4", "Level 5"}
    assert all(e["meta"]["answer_source"].startswith("teacher:") for e in sets["math_hard"])
    stats = io.read_json(run_dir / "math_hard/stats.json")
    assert (stats["chosen"], stats["answer_slots"], stats["repeated_examples"]) == (10, 30, 0)
    # Embed-Sel: 3 hard x 2 neighbours x 3 answers = 18 slots -> 12; each hard question's twin is its nearest.
    stats = io.read_json(run_dir / "embed_sel/stats.json")
    assert (stats["picked"], stats["answer_slots"], stats["embedding_dim"], stats["budget"]) == (6, 18, 64, 12)
    hard_p = [MathProblem.from_dict(h) for h in hard]
    train_p = [MathProblem.from_dict(r) for r in train]
    vecs = baselines.student_embeddings(StageContext(config, run_dir), [p.problem for p in hard_p + train_p])
    picks = baselines.embed_sel(hard_p, vecs[:3], train_p, vecs[3:], 2)
    assert [p["problem"].id for p in picks[0::2]] == [f"train/{t}" for t in twins]
    assert {(e["meta"]["hard_id"], question(e)["id"]) for e in sets["embed_sel"]} <= {
        (p["hard_id"], p["problem"].id) for p in picks}
    assert all(e["meta"]["method"] == "embed-sel" and "skill" not in e["meta"] for e in sets["embed_sel"])
    # Embed-Syn: 3 hard x 2 requests, request j shown the (j+1)-th nearest training question (the twin first); 2 new
    # questions each, 3 solutions each; the odd-A questions' solutions disagree, so those questions are dropped.
    questions = io.read_jsonl(run_dir / "embed_syn/questions.jsonl")
    assert [q["references"] for q in questions[0::4]] == [[p["problem"].id] for p in picks[0::2]]
    assert [q["references"] for q in questions[2::4]] == [[p["problem"].id] for p in picks[1::2]]
    assert len(questions) == 3 * 2 * 2
    assert all(q["kept"] == (_numbers(q["problem"])[0] % 2 == 0) for q in questions)
    kept = [q for q in questions if q["kept"]]
    stats = io.read_json(run_dir / "embed_syn/stats.json")
    assert (stats["synthesis_requests"], stats["kept_questions"], stats["distinct_examples"]) == (6, len(kept),
                                                                                                  3 * len(kept))
    assert stats["examples"] == 12 and stats["repeated_examples"] == max(0, 12 - 3 * len(kept))
    assert all(e["meta"]["method"] == "embed-syn" and "skill" not in e["meta"] for e in sets["embed_syn"])
    # Only the answers that were kept were paid for (the teacher cache answers a repeated one).
    used = {(e["meta"]["question_id"], e["meta"]["answer_source"]) for m in ("math_hard", "embed_sel")
            for e in sets[m]}
    assert teacher.tasks.count("solve") == len(used) + 3 * len(questions)
    # stat.method chooses the set the sft stage trains on.
    for method, path in baselines.METHOD_FILES.items():
        config.stat.method = method
        assert _sft_files(StageContext(config, run_dir)) == [path]


class _PRM:
    """A PRM stand-in whose every step score is 1 - A/100: the larger A, the harder the question."""

    name = "prm"

    class step_scorer:  # noqa: N801 (what PRMScorer holds)
        @staticmethod
        def score_many(items):
            return [[1 - _numbers(problem)[0] / 100] * len(steps) for problem, steps in items]


@pytest.mark.parametrize("rating", ["level", "teacher", "prm"])
def test_math_hard_by_level_teacher_or_prm_rating(tmp_path, rating):
    train = [_row(i, LEVELS[i % 6]) for i in range(20)]
    run_dir = _run_dir(tmp_path, train, [])
    teacher = SolvingTeacher()
    config = _config(tmp_path, stages=("math_hard",), math_hard_rating=rating, math_hard_share=0.25,
                     baseline_size=9)
    assert run_pipeline(config, teacher_backend=teacher, scorer=_PRM()) == {"math_hard": "done"}
    rows = io.read_jsonl(run_dir / "math_hard/math_hard.jsonl")
    stats = io.read_json(run_dir / "math_hard/stats.json")
    expected = {"level": {i for i in range(20) if i % 6 in (3, 4)},  # Level 4-5
                "teacher": {i for i in range(20) if i % 5 + 1 in (4, 5)},  # the top two ratings given
                "prm": set(range(15, 20))}[rating]  # the lowest-scored quarter: the largest A
    assert stats["chosen"] == len(expected) and stats["rating"] == rating and len(rows) == 9
    assert {e["meta"]["question_id"] for e in rows} <= {f"train/{i}" for i in expected}
    assert teacher.tasks.count("rate_difficulty") == (20 if rating == "teacher" else 0)
    ratings = io.read_jsonl(run_dir / "math_hard/ratings.jsonl")
    assert len(ratings) == 20 and (rating != "teacher" or ratings[3] == {"id": "train/3", "difficulty": 4,
                                                                         "reason": "by A"})
    with pytest.raises(ConfigError, match="stat.math_hard_rating='web'"):
        run_pipeline(_config(tmp_path, stages=("math_hard",), math_hard_rating="web"), force=True,
                     only="math_hard")


def test_a_small_pool_is_repeated_up_to_the_budget_and_counted(tmp_path):
    train = [_row(i, "Level 1") for i in range(5)]
    run_dir = _run_dir(tmp_path, train, [])
    config = _config(tmp_path, stages=("math_train",))
    assert run_pipeline(config) == {"math_train": "done"}
    rows = io.read_jsonl(run_dir / "math_train/math_train.jsonl")
    stats = io.read_json(run_dir / "math_train/stats.json")
    assert len(rows) == 12 and stats["repeated_examples"] == 7 and stats["pool"] == 5
    assert len({r["meta"]["question_id"] for r in rows}) == 5


def test_embed_sel_without_difficult_questions_names_the_file(tmp_path, student):
    run_dir = _run_dir(tmp_path, [_row(i, "Level 1") for i in range(5)], [])
    with pytest.raises(ValueError, match="hard/hard.jsonl holds no difficult question"):
        run_pipeline(_config(tmp_path, student, stages=("embed_sel",), sel_answer_source="dataset"))
    assert not (run_dir / "embed_sel/manifest.json").exists()
    io.write_jsonl(run_dir / "hard/hard.jsonl", [_row(99, "Level 5")])
    with pytest.raises(ValueError, match="stage embed_sel embeds with the student: set --config.model.path"):
        run_pipeline(_config(tmp_path, "", stages=("embed_sel",), sel_answer_source="dataset"))


def test_student_embeddings_match_transformers_and_ignore_batching(tmp_path, student):
    """The student path (JAX, length buckets) and the encoder path (transformers) pool the same hidden states."""
    texts = ["What is 1 plus 2?", "A longer question about a triangle with sides 3, 4 and 5: its area?", "x"] * 3
    config = _config(tmp_path, student, embed_batch_size=4)
    ours = baselines.student_embeddings(StageContext(config, tmp_path), texts)
    theirs = baselines.encoder_embeddings(str(student), texts, batch_size=2)
    assert ours.shape == theirs.shape == (9, 64)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours[0], ours[3], rtol=1e-5, atol=1e-6)  # the same text in another batch
    assert not np.allclose(ours[0], ours[1])
    with pytest.raises(FileNotFoundError, match="stat.embed_model='/nonexistent': no config.json"):
        baselines.encoder_embeddings("/nonexistent", texts)


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_STUDENT / "config.json").is_file() or not (SHARED_DATA / "math_train.jsonl").is_file(),
                    reason="needs the real student (make test builds it) and shared/data's MATH files")
def test_embed_sel_on_real_math_rows_with_the_real_student(tmp_path):
    from stat_jax.data.math_datasets import read_benchmark

    train = read_benchmark("math_train", str(SHARED_DATA / "math_train.jsonl"), limit=24).problems
    test = read_benchmark("math", str(SHARED_DATA / "math_test.jsonl"), limit=3).problems
    # A difficult question that repeats a training question's text must find it first.
    hard = [*test, MathProblem.from_dict({**train[17].to_dict(), "id": "copy-of-train-17"})]
    run_dir = _run_dir(tmp_path, [p.to_dict() for p in train], [{**p.to_dict(), "scores": [0.0]} for p in hard])
    config = _config(tmp_path, REAL_STUDENT, stages=("embed_sel",), sel_answer_source="dataset",
                     embed_per_question=3, baseline_size=10)
    assert run_pipeline(config) == {"embed_sel": "done"}
    rows = io.read_jsonl(run_dir / "embed_sel/embed_sel.jsonl")
    stats = io.read_json(run_dir / "embed_sel/stats.json")
    assert len(rows) == 10 and stats["picked"] == 12 and stats["embedding_dim"] == 576  # SmolLM2-135M's width
    texts = [p.problem for p in hard + train]
    vecs = baselines.student_embeddings(StageContext(config, run_dir), texts)
    assert baselines.nearest(vecs[3:4], vecs[len(hard):], 1)[0, 0] == 17
    # The student's own pooled states equal transformers' on the real checkpoint and tokenizer (measured: 1.0e-5
    # at most on 12 MATH train questions, values up to 48).
    reference = baselines.encoder_embeddings(str(REAL_STUDENT), texts[:6], batch_size=3, max_tokens=1024)
    np.testing.assert_allclose(vecs[:6], reference, rtol=1e-4, atol=1e-4)
