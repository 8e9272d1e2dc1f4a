"""Continual STAT (issue 16, item 6; PAPER.md §3.3): round 2 starts from the student round 1 trained, profiles a
new validation file given by path, trains further and keeps its own manifests. Two rounds of the demo task (its
shipped student, the offline teacher, the real rollout engine and SFT trainer) at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stat_jax.config import load_config_file
from stat_jax.data import arith_task as task
from stat_jax.teacher.offline import OfflineTeacher
from stat_jax.errors import ConfigError, RunStateMissingError
from stat_jax.stat import io
from stat_jax.stat.pipeline import continual_round, run_pipeline

STUDENT = Path(__file__).resolve().parents[2] / "stat_jax/demo/student"
STAGES = ("skills", "label", "rollout", "hard", "diagnose", "profile", "sel", "sft")


def _write(path: Path, problems) -> Path:
    io.write_jsonl(path, (p.to_dict() for p in problems))
    return path


def _config(tmp_path: Path, name: str, heldout: Path, **stat):
    c = load_config_file("configs/demo.py:quick")
    c.workdir = str(tmp_path / name)
    c.model.path = str(STUDENT)
    c.stat.run_dir = str(tmp_path / name / "stat")
    c.stat.stages = STAGES
    c.stat.heldout_source = str(heldout)
    c.stat.skills_sample_per_subject = 0
    c.stat.rollout_samples = 2
    c.stat.rollout_max_new_tokens = 32
    c.stat.num_hard = 4
    c.stat.sel_questions_per_skill = 2
    c.stat.sel_answers_per_question = 1
    c.stat.sel_target_size = 16
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 2, 4, 0
    c.train.learning_rate = 3e-3
    for k, v in stat.items():
        c.stat[k] = v
    return c


def _round(config, train, heldout_rows):
    # The data stage reads benchmark files; the demo writes its splits straight into the run directory.
    run_dir = Path(config.stat.run_dir)
    _write(run_dir / "data/train.jsonl", train)
    io.write_jsonl(run_dir / "data/heldout.jsonl", io.read_jsonl(Path(config.stat.heldout_source)))
    return run_pipeline(config, teacher_backend=OfflineTeacher(seed=0, solution_slip_rate=0.0)), run_dir


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.slow  # two rollouts and two SFT runs of the demo student: 742 s on the shared 2 cores under load
def test_round_two_starts_from_round_one_and_profiles_the_new_file(tmp_path):
    splits = task.make_splits(0, {"train": 40, "heldout": 6})
    perturbed = [type(p).from_dict({**p.to_dict(), "id": f"perturb/{i}"})
                 for i, p in enumerate(task.make_splits(7, {"heldout": 6})["heldout"])]
    round1_file = _write(tmp_path / "validation.jsonl", splits["heldout"])
    round2_file = _write(tmp_path / "validation_perturbed.jsonl", perturbed)

    results, rd1 = _round(_config(tmp_path, "round1", round1_file), splits["train"], round1_file)
    assert set(results.values()) == {"done"}
    first = io.read_json(rd1 / "sft/done.json")["model"]

    # Round 2 trains at learning rate 0: its exported student must be round 1's, weight for weight.
    config2 = _config(tmp_path, "round2", round2_file, round=2, previous_run=str(rd1))
    config2.train.learning_rate = 0.0
    results, rd2 = _round(config2, splits["train"], round2_file)
    assert set(results.values()) == {"done"}
    record = io.read_json(rd2 / "round.json")
    assert record["round"] == 2 and record["student"] == first and record["previous_run"] == str(rd1)
    # The rollout stage sampled round 1's trained student (its manifest names it) ...
    assert io.read_json(rd2 / "rollout/manifest.json")["reads"]["model.path"] == first
    # ... on the new validation file, whose questions the hard and diagnose stages then profiled.
    new_ids = {p.id for p in perturbed}
    assert {r["id"] for r in io.read_jsonl(rd2 / "rollout/responses.jsonl")} == new_ids
    assert {r["id"] for r in io.read_jsonl(rd2 / "diagnose/diagnoses.jsonl")} <= new_ids
    assert io.read_jsonl(rd2 / "diagnose/diagnoses.jsonl")
    # The catalog and Skill-Map are round 1's (same training set): copied, not asked for again.
    assert io.read_json(rd2 / "skills/manifest.json")["stats"]["reused_from"] == str(rd1)
    assert (rd2 / "label/skill_map.jsonl").read_bytes() == (rd1 / "label/skill_map.jsonl").read_bytes()
    base, after1 = _weights(STUDENT), _weights(Path(first))
    after2 = _weights(Path(io.read_json(rd2 / "sft/done.json")["model"]))
    assert after1.keys() == after2.keys() == base.keys()
    assert any(not np.array_equal(base[k], after1[k]) for k in base)  # round 1 trained
    assert all(np.array_equal(after1[k], after2[k]) for k in after1)  # round 2 started from exactly that


def test_round_settings_fail_before_any_stage(tmp_path):
    c = load_config_file("configs/base.py")
    c.stat.round = 2
    with pytest.raises(ConfigError, match="stat.round=2 needs the previous round's run directory"):
        continual_round(c, tmp_path / "run")
    c.stat.previous_run = str(tmp_path / "round1")
    with pytest.raises(RunStateMissingError, match="sft/done.json is missing"):
        continual_round(c, tmp_path / "run")
    io.write_json(tmp_path / "round1/sft/done.json", {"model": "/models/round1", "stage_key": "k"})
    with pytest.raises(ConfigError, match="this run's own directory"):
        continual_round(c, tmp_path / "round1")
    c.stat.round = 3
    with pytest.raises(ConfigError, match="stat.round=3, but .* is round 1"):
        continual_round(c, tmp_path / "run")
    c.stat.round = 2
    resolved, record = continual_round(c, tmp_path / "run")
    assert resolved.model.path == "/models/round1" and record["previous_sft_stage_key"] == "k"
    c.stat.round = 1
    with pytest.raises(ConfigError, match="stat.previous_run=.* is set but stat.round=1"):
        continual_round(c, tmp_path / "run")
    # A student round 1 trained outside its sft stage (the demo fine-tunes per seed) is named instead.
    c.stat.round, c.stat.previous_run = 2, str(tmp_path / "elsewhere")
    c.stat.previous_student = str(tmp_path / "seed0-model")
    with pytest.raises(ConfigError, match="stat.previous_student=.*seed0-model.*: no config.json"):
        continual_round(c, tmp_path / "run")
    io.write_json(tmp_path / "seed0-model/config.json", {})
    resolved, record = continual_round(c, tmp_path / "run")
    assert resolved.model.path == str(tmp_path / "seed0-model") and record["student"] == resolved.model.path
    assert record["previous_sft_stage_key"] is None
