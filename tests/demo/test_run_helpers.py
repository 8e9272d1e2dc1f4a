"""The demo's pure pieces: equal token budgets, per-skill accuracy, flagged skills, the table; its cells."""

import shlex

import numpy as np

import pytest

from stat_jax.data import arith_task as task
from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.data.records import MathProblem, SFTExample
from stat_jax.data.sft_data import equal_budget, example_tokens
from stat_jax.demo import compare, run
from stat_jax.report import verdict as verdict_mod
from stat_jax.stat.sel import question_messages


def reference_example(p: MathProblem) -> SFTExample:
    return SFTExample(messages=question_messages(p.problem, ""), response=p.solution)


def test_equal_budget_fills_the_same_tokens_for_any_set():
    tok = build_char_tokenizer()
    problems = task.make_splits(0, {"train": 50})["train"]
    short = [reference_example(p) for p in problems if len(p.skills) == 1]
    long = [reference_example(p) for p in problems if len(p.skills) == 3]
    budget = 3000
    totals = []
    for examples in (short, long):
        tokens = [example_tokens(tok, e) for e in examples]
        chosen = equal_budget(examples, tokens, budget, seed=1)
        lengths = {id(e): t for e, t in zip(examples, tokens)}
        total = sum(lengths[id(e)] for e in chosen)
        assert budget <= total < budget + max(tokens)  # stops right after the budget is reached
        totals.append(total)
        assert chosen == equal_budget(examples, tokens, budget, seed=1)
        assert chosen != equal_budget(examples, tokens, budget, seed=2)
    assert len(equal_budget(short, [10] * len(short), 10 * len(short) * 2 + 5, 0)) == 2 * len(short) + 1
    with pytest.raises(ValueError, match="empty"):
        equal_budget([], [], 10, 0)


def test_example_tokens_counts_the_rendered_chat():
    tok = build_char_tokenizer()
    p = task.make_splits(0, {"train": 1})["train"][0]
    e = reference_example(p)
    rendered = tok.apply_chat_template(e.messages, tokenize=False, add_generation_prompt=True) + e.response
    assert example_tokens(tok, e) == len(rendered) - len("<bos><|user|><|end|><|assistant|>") + 4 + 1


def test_per_skill_accuracy_and_flags():
    problems = [MathProblem(id=str(i), problem="", answer="", skills=skills)
                for i, skills in enumerate([["percent"], ["percent", "halving"], ["halving"], ["rounding"]])]
    records = [{"id": str(i), "greedy": {"correct": ok}} for i, ok in enumerate([True, False, False, True])]
    acc = compare.per_skill_accuracy(records, problems)
    assert acc["overall"] == 0.5
    assert acc["per_skill"]["percent"] == 0.5 and acc["per_skill"]["halving"] == 0.0
    assert acc["per_skill"]["rounding"] == 1.0 and acc["per_skill"]["comparison"] is None
    with pytest.raises(ValueError, match="lack 1 test questions"):
        compare.per_skill_accuracy(records[:3], problems)
    profile = {"skills": [{"skill": "percent", "frequency": 0.5}, {"skill": "halving", "frequency": 0.3},
                          {"skill": "rounding", "frequency": 0.05}]}
    assert compare.flagged_skills(profile, 0.1) == ["percent", "halving"]


def test_table_shows_mean_and_spread():
    def row(values):
        return {"overall": compare._spread(values), "flagged": compare._spread(values),
                "per_skill": {s: compare._spread(values) for s in task.SKILL_NAMES}, "runs": len(values)}

    report = {"seeds": [0, 1], "token_budget": 100, "flagged_skills": ["percent"], "skills": task.SKILL_NAMES,
              "rows": {"base": row([0.25]), "stat_sel": row([0.5, 0.7]), "stat_sel+grpo": row([0.6, 0.6])}}
    table = verdict_mod.format_table(report)
    assert "STAT-Sel" in table and "STAT-Sel +GRPO" in table and "percent*" in table
    assert "60.0±14.1" in table and "25.0" in table



def test_round_two_rows_are_named_compared_with_round_one_and_checked():
    def row(values):
        return {"overall": compare._spread(values), "flagged": compare._spread(values),
                "per_skill": {s: compare._spread(values) for s in task.SKILL_NAMES}, "runs": len(values)}

    report = {"seeds": [0, 1], "token_budget": 100, "flagged_skills": ["percent"], "skills": task.SKILL_NAMES,
              "rows": {"stat_sel": row([0.5, 0.7]), "stat_sel+round2": row([0.56, 0.74])}}
    report["verdict"] = verdict_mod.verdict(report)
    table = verdict_mod.format_table(report)
    assert "STAT-Sel round 2" in table and "65.0±12.7" in table
    # seeds paired: +6 and +4 points
    assert any(line.startswith("STAT-Sel round 2") and "round 1 = +5.0 ± 1.4 overall, +5.0 on round 1's flagged"
               in line for line in report["verdict"]), report["verdict"]
    assert verdict_mod.row_label("sft+grpo") == "SFT (original mix) +GRPO" and verdict_mod.row_label("stat_syn+round2") == \
        "STAT-Syn round 2"



def test_round2_methods_must_be_stat_methods_the_demo_runs(tmp_path):
    from stat_jax.config import load_config_file

    for bad, match in ((("sft",), r"demo.round2_methods=\('sft',\): \['sft'\] cannot get a round 2"),
                       (("stat_syn",), "stat_syn")):
        c = load_config_file("configs/demo.py:quick")
        c.workdir = str(tmp_path / "demo")
        c.demo.methods, c.demo.round2_methods = ("sft", "stat_sel"), bad
        with pytest.raises(ValueError, match=match):
            run.Demo(c).run()
        assert not (tmp_path / "demo/data").exists()


def test_the_demo_compiles_into_a_cache_under_its_workdir_unless_jax_is_given_one(tmp_path):
    import os
    import subprocess
    import sys

    program = ("import sys; from pathlib import Path; from stat_jax.demo.run import use_compilation_cache; "
               "use_compilation_cache(Path(sys.argv[1])); import jax; jax.jit(lambda x: x * 3 + 1)(2.0)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_PLATFORMS"] = "cpu"
    subprocess.run([sys.executable, "-c", program, str(tmp_path / "a")], env=env, check=True, timeout=120)
    assert any((tmp_path / "a/jax_cache").iterdir())  # the tiny program was cached (no 1 s minimum)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "mine")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    subprocess.run([sys.executable, "-c", program, str(tmp_path / "b")], env=env, check=True, timeout=120)
    assert not (tmp_path / "b/jax_cache").exists() and any((tmp_path / "mine").iterdir())


def test_a_skill_map_larger_than_the_train_split_is_refused_before_any_work(tmp_path):
    from stat_jax.config import load_config_file

    c = load_config_file("configs/demo.py:quick")
    c.workdir = str(tmp_path / "demo")
    c.demo.skill_map_size = c.demo.train_size + 1
    with pytest.raises(ValueError, match="skill_map_size=2001 is larger than demo.train_size=2000"):
        run.Demo(c).data()
    assert not (tmp_path / "demo" / "data").exists()


def test_fresh_grpo_prompts_are_new_balanced_questions_and_change_no_other_split():
    sizes = {"train": 300, "heldout": 40, "test": 50, run.ROUND2_SPLIT: 30}
    without = task.make_splits(0, sizes)
    with_grpo = task.make_splits(0, {**sizes, run.GRPO_SPLIT: 60})
    for name in sizes:
        assert [p.problem for p in with_grpo[name]] == [p.problem for p in without[name]], name
    fresh = with_grpo[run.GRPO_SPLIT]
    seen = {p.problem for name in sizes for p in with_grpo[name]}
    assert len(fresh) == 60 and not {p.problem for p in fresh} & seen
    for i, p in enumerate(fresh):  # balanced like the test split: question i exercises skill i mod 10
        assert task.SKILL_NAMES[i % len(task.SKILL_NAMES)] in p.skills


def _demo_with_student(tmp_path, overrides=()):
    """A quick demo whose base student is recorded (the shipped one): what its cells' configs start from."""
    from stat_jax import cli
    from stat_jax.stat.io import write_json

    c = cli.build_config("configs/demo.py:quick", [*overrides, ("workdir", str(tmp_path / "demo"))])
    demo = run.Demo(c, "configs/demo.py:quick")
    write_json(tmp_path / "demo/student/base.json", {"model": str(run.SHIPPED_STUDENT)})
    return demo


def test_grpo_rows_are_sized_to_the_longest_prompt_not_the_prefill_bucket(tmp_path):
    from stat_jax.stat.io import write_jsonl
    from stat_jax.train.grpo import grpo_prompt_ids

    demo = _demo_with_student(tmp_path)
    problems = task.make_splits(0, {"test": 40})["test"]
    write_jsonl(tmp_path / "prompts.jsonl", (p.to_dict() for p in problems))
    row = demo.grpo_row_length(tmp_path / "prompts.jsonl")
    c = demo.config
    need = max(len(ids) for ids in grpo_prompt_ids(c, build_char_tokenizer(), problems)) + c.grpo.max_new_tokens
    assert row % 16 == 0 and need <= row < need + 16
    assert row < c.rollout.max_prefill_length + c.grpo.max_new_tokens  # shorter than the old bucket-sized rows


def test_demo_steps_run_as_pipeline_stages_a_lost_input_is_named_before_any_work(tmp_path):
    from stat_jax import errors
    from stat_jax.config import load_config_file

    c = load_config_file("configs/demo.py:quick")
    c.workdir = str(tmp_path / "demo")
    demo = run.Demo(c)
    assert demo.data() == "done" and demo.data() == "skipped"
    (tmp_path / "demo/data/test.jsonl").unlink()
    (tmp_path / "demo/student").mkdir(parents=True)
    (tmp_path / "demo/student/base.json").write_text('{"model": "%s"}' % run.SHIPPED_STUDENT)
    # The pipeline's stage runner checks a step's inputs before running it.
    with pytest.raises(errors.RunStateMissingError, match=r"stage 'student/eval' needs \['data/test.jsonl'\]"):
        demo.base_eval()
    assert not (tmp_path / "demo/student/eval").exists()
    assert demo.data() == "done" and (tmp_path / "demo/data/test.jsonl").exists()


def test_a_cell_is_the_users_config_plus_its_own_settings_and_its_command_rebuilds_it(tmp_path):
    """No demo.* copies of grpo.* or train.*: `stat-jax demo --config.grpo.X / --config.train.X` reach every cell,
    and the command a cell records builds exactly the config it ran with."""
    from stat_jax import cli, validity
    from stat_jax.config import split_override_args

    demo = _demo_with_student(tmp_path, [("grpo.learning_rate", "2e-5"), ("train.learning_rate", "7e-4")])
    demo.data()
    overrides = demo.overrides("stat_sel-seed1", "stat_sel", 1)
    c = demo.cell_config(overrides)
    assert (c.grpo.learning_rate, c.train.learning_rate, c.seed, c.stat.method) == (2e-5, 7e-4, 1, "sel")
    assert c.stat.seed == 0 and c.model.path == str(run.SHIPPED_STUDENT)
    assert c.grpo.train_files == (str(tmp_path / f"demo/data/{run.GRPO_SPLIT}.jsonl"),)
    command = demo.command(c, run.PROFILE + ("sel", "sft", "eval"))
    assert command.startswith("stat-jax run --config=configs/demo.py:quick --only=data,skills,")
    assert "--config.grpo.learning_rate=2e-05" in command and "--config.seed=1" in command
    argv = shlex.split(command)[2:]
    config_overrides, rest = split_override_args([a for a in argv if not a.startswith("--only")])
    rebuilt = cli.build_config(rest[0].split("=", 1)[1], config_overrides)
    assert validity.leaves(rebuilt) == validity.leaves(c)


def test_paired_interval_covers_the_difference_at_its_sampling_error():
    rng = np.random.default_rng(0)
    n = 2000
    b = rng.random((3, n)) < 0.5
    a = b | (rng.random((3, n)) < 0.1)  # a adds ~5 points, on the same questions as b
    runs = lambda x: ["".join("1" if v else "0" for v in row) for row in x]  # noqa: E731
    mean, low, high = verdict_mod.paired_interval(runs(a), runs(b))
    assert mean == pytest.approx(100 * (a.mean() - b.mean()))
    # The paired difference's standard error over questions: sd(a - b) / sqrt(n) (the seeds add a little)
    half = 1.96 * 100 * (a.astype(int) - b.astype(int)).mean(axis=0).std() / np.sqrt(n)
    assert low < mean < high and 0.8 * half < (high - low) / 2 < 1.5 * half
    assert verdict_mod.paired_interval(runs(b), runs(b)) == (0.0, 0.0, 0.0)
    one_run = verdict_mod.paired_interval(runs(a), runs(b[:1]))  # the base student: one run against each seed
    assert one_run[0] == pytest.approx(100 * (a.mean() - b[0].mean()))
    with pytest.raises(ValueError, match="do not pair"):
        verdict_mod.paired_interval(runs(a[:2]), runs(b))


def test_verdict_lines_give_the_paired_interval_when_rows_kept_their_questions():
    def row(values, correct):
        return {"overall": compare._spread(values), "flagged": compare._spread(values), "per_skill": {},
                "runs": len(values), "correct": correct}

    report = {"seeds": [0, 1], "questions": 4,
              "rows": {"base": row([0.5], ["1100"]), "sft": row([0.5, 0.5], ["1100", "1010"]),
                       "stat_sel": row([1.0, 0.75], ["1111", "1110"])}}
    lines = verdict_mod.verdict(report)
    assert any(line.startswith("STAT-Sel - SFT = +37.5 [95% CI ") for line in lines), lines
    assert "(4 questions)" in verdict_mod.format_table({**report, "token_budget": 1, "flagged_skills": [],
                                                         "skills": []})
