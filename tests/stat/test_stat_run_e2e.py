"""`stat-jax run` through every stage, SFT -> eval -> GRPO -> eval included: the real google-genai client against
the fake Gemini server, and a real tiny student (random Llama + char tokenizer on disk) that the rollout, SFT,
eval and GRPO stages load from config.model.path exactly as the command does."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from stat_jax import cli
from stat_jax.config import build_config
from stat_jax.stat import io
from stat_jax.stat.pipeline import STAGE_NAMES
from tests.stat.test_stat_pipeline import fake, make_config, write_fixture  # noqa: F401  (fake: a fixture)
from tests.train.sft_fixtures import make_student

INSTRUCTION = "Answer in \\boxed{}."  # short prompts: the char tokenizer spends a token per character


def text_parity_reward(response: str, problem) -> float:
    """A reward that differs between samples of one prompt, so every GRPO group has a learning signal."""
    return float(hashlib.sha256(response.encode()).digest()[0] % 2)


def _write_math500(path):
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i), "subject": "Algebra", "level": 1,
             "unique_id": f"test/algebra/{i}.json"} for i in range(3)]
    bad = {"problem": "What is 1 + 1?", "subject": "Algebra", "level": 1, "unique_id": "test/algebra/bad.json"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps(bad) + "\n")  # no answer at all
    return path


def _overrides(tmp_path, paths, student, fake_server) -> dict[str, str]:
    """`--config.*` values for configs/base.py: the fixture's data and teacher, then tiny student settings."""
    base, defaults = make_config(tmp_path, paths, "run"), _base()
    teacher_and_stat = {f"{section}.{k}": base[section][k] for section in ("teacher", "stat")
                        for k in base[section].keys() if base[section][k] != defaults[section][k]}
    values = {
        "workdir": base.workdir, **teacher_and_stat, "teacher.base_url": fake_server.base_url,
        "stat.stages": ",".join(STAGE_NAMES), "stat.rollout_max_new_tokens": 16,
        "model.path": student, "model.dtype": "float32", "mesh.data": -1, "mesh.fsdp": 1,
        "rollout.max_concurrent_decodes": 8, "rollout.max_prefill_length": 128, "rollout.max_target_length": 160,
        "eval.instruction": INSTRUCTION, "eval.benchmarks": "math500",
        "eval.paths.math500": _write_math500(tmp_path / "math500.jsonl"), "eval.num_samples": 0,
        "eval.max_new_tokens": 16, "eval.grade_workers": 1,
        "data.max_length": 256, "train.steps": 3, "train.batch_size": 8, "train.learning_rate": 1e-2,
        "train.warmup_steps": 1, "train.async_checkpointing": False, "train.tensorboard": False,
        "grpo.steps": 2, "grpo.prompts_per_step": 2, "grpo.num_generations": 4, "grpo.max_new_tokens": 16,
        "grpo.max_length": 128, "grpo.learning_rate": 1e-2, "grpo.async_checkpointing": False,
        "grpo.reward": "tests.stat.test_stat_run_e2e:text_parity_reward",
    }
    return {k: ",".join(v) if isinstance(v, tuple) else str(v) for k, v in values.items()}


def _base():
    from stat_jax.config import load_config_file

    return load_config_file("configs/base.py")


def stat_run(overrides: dict[str, str], *flags: str) -> int:
    return cli.main(["run", "--config=configs/base.py", *flags, *(f"--config.{k}={v}" for k, v in overrides.items())])


def _results(out: str) -> dict[str, str]:
    """The {stage: status} JSON `stat-jax run` prints last."""
    return json.loads(out[out.rindex("{\n"):])


def _weights(hf_dir) -> dict[str, np.ndarray]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# Fields each stage must have read (a recorder that noted nothing would pass the matrix below vacuously).
MUST_READ = {"data": {"stat.train_source", "stat.heldout_source", "stat.heldout_size"},
             "skills": {"teacher.model", "stat.skills_sample_per_subject", "seed"},
             "label": {"teacher.model", "stat.label_max_skills"},
             "rollout": {"model.path", "stat.rollout_temperature", "stat.rollout_samples", "eval.instruction", "seed"},
             "hard": {"stat.scorer", "stat.num_hard"}, "diagnose": {"teacher.model", "stat.diagnose_max_skills"},
             "sel": {"stat.sel_questions_per_skill", "stat.sel_target_size"},
             "sft": {"stat.method", "train.learning_rate", "train.steps", "data.max_length", "model.dtype", "seed"},
             "eval": {"eval.benchmarks", "eval.max_new_tokens", "eval.paths.math500"},
             "grpo": {"grpo.learning_rate", "grpo.num_generations", "grpo.reward", "grpo.steps"}}


def _perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, (list, tuple)):
        return [*value, "changed"]
    return "changed"  # None


def assert_each_stage_reruns_exactly_on_what_it_read(config, rd) -> None:
    """Issue 40's rule, for every field of the config and every stage that ran: changing the field alone re-runs
    the stage exactly when the stage read it (its manifest's reads), and leaves it reused otherwise."""
    from stat_jax import validity
    from stat_jax.stat.pipeline import StageContext, _inputs_for, stages_to_run

    stages = stages_to_run(config, None)
    reads = {st.name: io.read_json(rd / st.name / "manifest.json")["reads"] for st in stages}
    for name, fields in MUST_READ.items():
        assert fields <= set(reads[name]), (name, fields - set(reads[name]))
    inputs = {st.name: _inputs_for(st, StageContext(config, rd)) for st in stages}

    def done(cfg, st) -> bool:
        return io.stage_is_done(rd, st.name, cfg, inputs[st.name], StageContext(cfg, rd).context_values())

    assert all(done(config, st) for st in stages)
    fields = validity.leaves(config)
    assert len(fields) > 200
    for key, value in fields:
        changed = config.copy_and_resolve_references()
        *parents, leaf = key.split(".")
        node = changed
        for part in parents:
            node = node[part]
        with node.ignore_type():
            node[leaf] = _perturbed(value)
        rerun = [st.name for st in stages if not done(changed, st)]
        assert rerun == [st.name for st in stages if key in reads[st.name]], key


def test_stat_run_every_stage_with_a_real_student_then_skip_and_only_eval(tmp_path, fake, capsys):
    paths, _, _ = write_fixture(tmp_path)
    with paths["train"].open("a") as f:  # one malformed row in the training data: counted and skipped
        f.write('{"problem": "What is 2 + 2?", "solution": "It is four, no boxed answer."}\n')
    student = make_student(tmp_path / "student")
    overrides = _overrides(tmp_path, paths, student, fake)
    rd = tmp_path / "run" / "stat"

    assert stat_run(overrides) == 0
    assert _results(capsys.readouterr().out) == {name: "done" for name in STAGE_NAMES}
    for name in STAGE_NAMES:
        assert io.read_json(rd / name / "manifest.json")["stage"] == name
    assert_each_stage_reruns_exactly_on_what_it_read(build_config("configs/base.py", list(overrides.items())), rd)
    bad = io.read_json(rd / "data/manifest.json")["stats"]["bad_rows"]
    assert bad["train"]["bad_rows"] == 1 and bad["heldout"]["bad_rows"] == 0, bad
    assert "no complete \\boxed" in bad["train"]["bad_row_examples"][0], bad

    # The rollout stage built the JetStream backend from config.model.path: 8 held-out questions x 3 samples.
    responses = io.read_jsonl(rd / "rollout/responses.jsonl")
    assert len(responses) == 8 and all(len(r["responses"]) == 3 for r in responses)
    assert any(text for r in responses for text in r["responses"])

    # SFT on STAT-Sel: train.steps rows of finite loss, an HF export that transformers loads, new weights.
    sft_done = io.read_json(rd / "sft/done.json")
    assert sft_done["model"] == str(rd / "sft/hf") and sft_done["steps"] == 3
    metrics = io.read_jsonl(rd / "sft/metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in metrics)
    start, sft_weights = _weights(student), _weights(sft_done["model"])
    assert start.keys() == sft_weights.keys()
    assert all(np.isfinite(w).all() for w in sft_weights.values())
    assert any(not np.allclose(start[k], sft_weights[k]) for k in start)

    # GRPO from the SFT export on the run's own training questions (data/train.jsonl), exported to grpo/hf.
    grpo_done = io.read_json(rd / "grpo/done.json")
    assert grpo_done["model"] == str(rd / "grpo/hf") and grpo_done["steps"] == 2
    grpo_config = json.loads((rd / "grpo/config.json").read_text())
    assert grpo_config["grpo"]["train_files"] == [str(rd / "data/train.jsonl")]
    assert grpo_config["model"]["path"] == sft_done["model"] and grpo_config["grpo"]["instruction"] == INSTRUCTION
    grpo_metrics = io.read_jsonl(rd / "grpo/metrics.jsonl")
    assert len(grpo_metrics) == 2 and any(m["reward_std"] > 0 for m in grpo_metrics)
    grpo_weights = _weights(grpo_done["model"])
    assert any(not np.allclose(sft_weights[k], grpo_weights[k]) for k in sft_weights)

    for name, model in (("eval", sft_done["model"]), ("eval_grpo", grpo_done["model"])):
        summary = io.read_json(rd / name / "summary.json")
        assert summary["model"] == model
        math500 = summary["benchmarks"]["math500"]
        assert math500["n"] == 3 and 0.0 <= math500["pass@1"] <= 1.0
        assert math500["not_evaluated"]["bad_rows"] == 1  # the eval file's row without an answer
        assert len(io.read_jsonl(rd / name / "math500.jsonl")) == 3

    # The run's report: every stage's section, one entry per hard question, the ledger against the dry run's plan.
    report = (tmp_path / "run" / "report.html").read_text()
    for section in ("verdict", "profile", "shares", "hard", "grpo", "ledger", "config"):
        assert f'id="{section}"' in report, section
    assert report.count('class="hard"') == len(io.read_jsonl(rd / "hard/hard.jsonl"))
    assert io.read_json(rd / "teacher/plan.json")["total"]["calls"] > 0 and "dry-run plan" in report
    assert "stat-jax run --config=configs/base.py" in report

    # A second run: every stage up to date, not one teacher request, no model loaded.
    paid = fake.count()
    assert paid > 0
    assert stat_run(overrides) == 0
    assert _results(capsys.readouterr().out) == {name: "skipped" for name in STAGE_NAMES}
    assert fake.count() == paid

    # --only=eval re-runs just that stage.
    before = {p: p.stat().st_mtime_ns for p in (rd / "eval/summary.json", rd / "sft/done.json",
                                                   rd / "eval_grpo/summary.json")}
    assert stat_run(overrides, "--only=eval") == 0
    assert _results(capsys.readouterr().out) == {"eval": "done"}
    after = {p: p.stat().st_mtime_ns for p in before}
    assert [before[p] != after[p] for p in before] == [True, False, False]
    assert io.read_json(rd / "eval/summary.json")["benchmarks"]["math500"]["n"] == 3
    assert fake.count() == paid

    # A training setting changed: SFT retrains from the start (its old checkpoints would otherwise be resumed),
    # and everything downstream of it re-runs; the teacher and rollout stages stay done.
    overrides["train.learning_rate"] = "3e-3"
    assert stat_run(overrides, "--resume") == 0
    results = _results(capsys.readouterr().out)
    assert [n for n in STAGE_NAMES if results[n] == "done"] == ["sft", "eval", "grpo", "eval_grpo"]
    assert io.read_json(rd / "sft/done.json")["stage_key"] != sft_done["stage_key"]
    again = io.read_jsonl(rd / "sft/metrics.jsonl")
    assert [m["step"] for m in again] == [1, 2, 3] and again[1]["lr"] == pytest.approx(3e-3)
    retrained = _weights(rd / "sft/hf")
    assert any(not np.allclose(retrained[k], sft_weights[k]) for k in start)
    assert fake.count() == paid


@pytest.mark.parametrize("config", ["configs/stat_sel_llama3_2_1b.py", "configs/stat_syn_llama3_2_1b.py"])
def test_paper_configs_dry_run_and_carry_the_training_recipes(config, capsys):
    from stat_jax.config import load_config_file

    assert cli.main(["run", f"--config={config}", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"][-2:] == ["sft", "eval"] and plan["run_dir"] == f"{load_config_file(config).workdir}/stat"
    assert cli.main(["run", f"--config={config}", "--dry-run", f"--config.stat.stages={','.join(STAGE_NAMES)}"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"] == list(STAGE_NAMES)
    # The sft and grpo stages train with the 1B recipes, not the generic defaults of configs/base.py.
    c, sft, grpo = (load_config_file(f) for f in (config, "configs/sft_llama3_2_1b.py", "configs/grpo_llama3_2_1b.py"))
    assert c.train.to_dict() == sft.train.to_dict() and c.model.remat == sft.model.remat
    assert c.grpo.to_dict() == grpo.grpo.to_dict()


def test_eval_failure_names_the_model_and_the_stage_files(tmp_path):
    from stat_jax.stat.pipeline import run_pipeline

    config = _base()
    config.workdir = str(tmp_path / "run")
    config.eval.paths.math500 = str(_write_math500(tmp_path / "math500.jsonl"))
    io.write_json(tmp_path / "run/stat/sft/done.json", {"model": str(tmp_path / "no_such_export")})
    with pytest.raises(Exception) as failure:
        run_pipeline(config, only="eval", force=True)
    message = str(failure.value) + "\n".join(getattr(failure.value, "__notes__", []))
    assert str(tmp_path / "no_such_export") in message
    assert f"stage 'eval' failed; its files are under {tmp_path / 'run/stat/eval'}" in message
    assert not (tmp_path / "run/stat/eval/manifest.json").exists()
