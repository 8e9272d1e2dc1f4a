"""The paper's baselines as pipeline stages (issue 16, item 5): MATH-Train, MATH-Hard and Embed-Sel each write a
set of exactly STAT-Sel's budget, chosen with stat.method; Embed-Sel's embeddings by the student (JAX) equal
transformers' mean-pooled hidden states of the same checkpoint; the real student embeds real MATH rows (slow)."""

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


class SolvingTeacher(TeacherBackend):
    """Answers `solve` requests correctly from the question text (what the pipeline asks the baselines for)."""

    backend_id = "baselines-test-teacher"

    def __init__(self):
        self.calls = 0

    def complete(self, request, *, reask_error=None):
        assert request.task == "solve", request.task
        self.calls += 1
        a, b = (int(w.rstrip("?")) for w in request.payload["problem"].split()[2::2])
        return TeacherResponse(json.dumps({"solution": f"Sample {request.sample_index}: {a}+{b} is "
                                                       f"$\\boxed{{{a + b}}}$.", "answer": str(a + b)}))


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A tiny random Llama as a Hugging Face directory, with the offline char tokenizer."""
    from stat_jax.data.char_tokenizer import build_char_tokenizer
    from stat_jax.models import export_hf_checkpoint, init_model
    from stat_jax.models.llama import tiny_llama

    path = tmp_path_factory.mktemp("student")
    tok = build_char_tokenizer()
    export_hf_checkpoint(init_model(tiny_llama(vocab_size=len(tok)), seed=0), path)
    tok.save_pretrained(str(path))
    return path


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
                     embed_per_question=2, stages=("math_train", "math_hard", "embed_sel"))
    results = run_pipeline(config, teacher_backend=teacher)
    assert results == {"math_train": "done", "math_hard": "done", "embed_sel": "done"}
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
    # Only the answers that were kept were paid for (the teacher cache answers a repeated one).
    used = {(e["meta"]["question_id"], e["meta"]["answer_source"]) for m in ("math_hard", "embed_sel")
            for e in sets[m]}
    assert teacher.calls == len(used)
    # stat.method chooses the set the sft stage trains on.
    for method, path in baselines.METHOD_FILES.items():
        config.stat.method = method
        assert _sft_files(StageContext(config, run_dir)) == [path]


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
