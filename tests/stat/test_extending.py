"""Extension points (issue 40, point 6): a new SFT-set method is one stage function and one `register_method`
line, a new hard-question rule one `register_scorer` line, a new teacher API one `register_backend` line, and
`stat-jax run` uses them by name. `student` is tests/conftest.py's tiny random Llama."""

from __future__ import annotations

import json

import pytest

from stat_jax.config import load_config_file
from stat_jax.data.records import MathProblem, SFTExample
from stat_jax.errors import ConfigError
from stat_jax.stat import hard, io, pipeline
from stat_jax.teacher import build as teacher_build
from stat_jax.teacher.base import TeacherBackend, TeacherResponse


# ----- a toy method: the shortest training questions, with their dataset solutions -------------------------------
def stage_shortest(ctx: pipeline.StageContext) -> dict:
    rows = sorted(io.read_jsonl(ctx.path("data/train.jsonl")), key=lambda r: len(r["problem"]))[:4]
    io.write_jsonl(ctx.path("shortest/shortest.jsonl"),
                   (SFTExample(prompt=r["problem"], response=r["solution"]).to_dict() for r in rows))
    return {"questions": len(rows)}


SHORTEST = pipeline.Stage("shortest", stage_shortest, ("data/train.jsonl",), ("shortest/shortest.jsonl",))


@pytest.fixture
def shortest_method():
    pipeline.register_method("shortest", SHORTEST)
    yield
    pipeline.METHODS.pop("shortest")
    pipeline._REGISTERED_STAGES.remove(SHORTEST)


def _config(tmp_path, student, stages, method="shortest"):
    train = tmp_path / "train.jsonl"
    rows = [{"problem": "What is " + "1 + " * i + "1?", "answer": str(i + 1), "solution": f"\\boxed{{{i + 1}}}",
             "unique_id": f"q{i}"} for i in range(8)]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    heldout = tmp_path / "heldout.jsonl"  # the data stage keeps held-out questions out of training
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
    c = load_config_file("configs/sft_tiny.py")
    c.workdir = str(tmp_path / "run")
    c.model.path = str(student)
    c.train.steps = 2
    c.stat.train_source, c.stat.heldout_source = str(train), str(heldout)
    c.stat.train_benchmark = c.stat.heldout_benchmark = "math500"
    c.stat.heldout_size = 0
    c.stat.heldout_exclude = ()
    c.stat.method = method
    c.stat.stages = stages
    return c


def test_a_registered_method_trains_through_the_pipeline(shortest_method, student, tmp_path):
    config = _config(tmp_path, student, ("data", "shortest", "sft"))
    assert pipeline.run_pipeline(config) == {"data": "done", "shortest": "done", "sft": "done"}
    run_dir = tmp_path / "run" / "stat"
    assert list(io.read_json(run_dir / "sft/manifest.json")["inputs"]) == ["shortest/shortest.jsonl"]
    assert (run_dir / "sft/hf/config.json").exists()
    assert "shortest" in pipeline.METHODS and [s.name for s in pipeline.pipeline_stages()].index("shortest") < \
        [s.name for s in pipeline.pipeline_stages()].index("sft")


def test_a_method_whose_stage_is_not_run_is_a_config_error_before_any_work(shortest_method, student, tmp_path):
    config = _config(tmp_path, student, ("data", "sft"))
    with pytest.raises(ConfigError, match="stat.method='shortest' trains on shortest/shortest.jsonl, which stage "
                                          "'shortest' writes"):
        pipeline.run_pipeline(config)
    assert not (tmp_path / "run" / "stat" / "data").exists()  # nothing ran
    with pytest.raises(ConfigError, match="stat.method='nope': choose one of"):
        pipeline.run_pipeline(_config(tmp_path, student, ("data", "sft"), method="nope"))


# ----- a toy scorer: a response is right when it is short -------------------------------------------------------
class ShortIsRight(hard.Scorer):
    name = "short"

    def score(self, problems, responses):
        return [[1.0 if len(r) < 10 else 0.0 for r in rs] for rs in responses]


def test_a_registered_scorer_picks_the_hard_questions(tmp_path):
    hard.register_scorer("short", lambda config: ShortIsRight())
    try:
        run_dir = tmp_path / "stat"
        problems = [MathProblem(id=f"q{i}", problem=f"question {i}", answer="1") for i in range(3)]
        io.write_jsonl(run_dir / "data/heldout.jsonl", [p.to_dict() for p in problems])
        io.write_jsonl(run_dir / "rollout/responses.jsonl",
                       [{"id": "q0", "responses": ["a long answer here"] * 2}, {"id": "q1", "responses": ["1"] * 2},
                        {"id": "q2", "responses": ["1", "an answer too long"]}])
        c = load_config_file("configs/base.py")
        c.stat.scorer = "short"
        stats = pipeline.stage_hard(pipeline.StageContext(c, run_dir))
        assert stats["scorer"] == "short" and stats["rule"].startswith("short: mean response score <")
        assert [r["id"] for r in io.read_jsonl(run_dir / "hard/hard.jsonl")] == ["q0", "q2"]
    finally:
        hard.SCORERS.pop("short")


# ----- a toy teacher backend ------------------------------------------------------------------------------------
class EchoTeacher(TeacherBackend):
    backend_id = "echo"

    def complete(self, request, *, reask_error=None):
        return TeacherResponse("{}")


def test_a_registered_teacher_backend_is_built_by_name():
    teacher_build.register_backend("echo", lambda tc: EchoTeacher())
    try:
        c = load_config_file("configs/base.py")
        c.teacher.backend = "echo"
        assert isinstance(teacher_build.build_backend(c.teacher), EchoTeacher)
        c.teacher.backend = "nope"
        with pytest.raises(Exception, match="use one of \\['echo', 'gemini', 'offline'\\]"):
            teacher_build.build_backend(c.teacher)
    finally:
        teacher_build.BACKENDS.pop("echo")
