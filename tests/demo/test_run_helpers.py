"""The demo runner's pure pieces: equal token budgets, per-skill accuracy, flagged skills, the table."""

import pytest

from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.data.records import MathProblem
from stat_jax.demo import run, task


def test_equal_budget_fills_the_same_tokens_for_any_set():
    tok = build_char_tokenizer()
    problems = task.make_splits(0, {"train": 50})["train"]
    short = [run.reference_example(p, "") for p in problems if len(p.skills) == 1]
    long = [run.reference_example(p, "") for p in problems if len(p.skills) == 3]
    budget = 3000
    totals = []
    for examples in (short, long):
        tokens = [run.example_tokens(tok, e) for e in examples]
        chosen = run.equal_budget(examples, tokens, budget, seed=1)
        lengths = {id(e): t for e, t in zip(examples, tokens)}
        total = sum(lengths[id(e)] for e in chosen)
        assert budget <= total < budget + max(tokens)  # stops right after the budget is reached
        totals.append(total)
        assert chosen == run.equal_budget(examples, tokens, budget, seed=1)
        assert chosen != run.equal_budget(examples, tokens, budget, seed=2)
    assert len(run.equal_budget(short, [10] * len(short), 10 * len(short) * 2 + 5, 0)) == 2 * len(short) + 1
    with pytest.raises(ValueError, match="empty"):
        run.equal_budget([], [], 10, 0)


def test_example_tokens_counts_the_rendered_chat():
    tok = build_char_tokenizer()
    p = task.make_splits(0, {"train": 1})["train"][0]
    e = run.reference_example(p, "")
    rendered = tok.apply_chat_template(e.messages, tokenize=False, add_generation_prompt=True) + e.response
    assert run.example_tokens(tok, e) == len(rendered) - len("<bos><|user|><|end|><|assistant|>") + 4 + 1


def test_per_skill_accuracy_and_flags():
    problems = [MathProblem(id=str(i), problem="", answer="", skills=skills)
                for i, skills in enumerate([["percent"], ["percent", "halving"], ["halving"], ["rounding"]])]
    records = [{"id": str(i), "greedy": {"correct": ok}} for i, ok in enumerate([True, False, False, True])]
    acc = run.per_skill_accuracy(records, problems)
    assert acc["overall"] == 0.5
    assert acc["per_skill"]["percent"] == 0.5 and acc["per_skill"]["halving"] == 0.0
    assert acc["per_skill"]["rounding"] == 1.0 and acc["per_skill"]["comparison"] is None
    with pytest.raises(ValueError, match="lack 1 test questions"):
        run.per_skill_accuracy(records[:3], problems)
    profile = {"skills": [{"skill": "percent", "frequency": 0.5}, {"skill": "halving", "frequency": 0.3},
                          {"skill": "rounding", "frequency": 0.05}]}
    assert run.flagged_skills(profile, 0.1) == ["percent", "halving"]


def test_table_shows_mean_and_spread():
    def row(values):
        return {"overall": run._spread(values), "flagged": run._spread(values),
                "per_skill": {s: run._spread(values) for s in task.SKILL_NAMES}, "runs": len(values)}

    report = {"seeds": [0, 1], "token_budget": 100, "flagged_skills": ["percent"],
              "rows": {"base": row([0.25]), "stat_sel": row([0.5, 0.7]), "stat_sel+grpo": row([0.6, 0.6])}}
    table = run.format_table(report)
    assert "STAT-Sel" in table and "STAT-Sel +GRPO" in table and "percent*" in table
    assert "60.0±14.1" in table and "25.0" in table



def test_round_two_rows_are_named_compared_with_round_one_and_checked():
    def row(values):
        return {"overall": run._spread(values), "flagged": run._spread(values),
                "per_skill": {s: run._spread(values) for s in task.SKILL_NAMES}, "runs": len(values)}

    report = {"seeds": [0, 1], "token_budget": 100, "flagged_skills": ["percent"],
              "rows": {"stat_sel": row([0.5, 0.7]), "stat_sel+round2": row([0.56, 0.74])}}
    report["verdict"] = run.verdict(report)
    table = run.format_table(report)
    assert "STAT-Sel round 2" in table and "65.0±12.7" in table
    # seeds paired: +6 and +4 points
    assert any(line.startswith("STAT-Sel round 2") and "round 1 = +5.0 ± 1.4 overall, +5.0 on round 1's flagged"
               in line for line in report["verdict"]), report["verdict"]
    assert run.row_label("sft+grpo") == "SFT (original mix) +GRPO" and run.row_label("stat_syn+round2") == \
        "STAT-Syn round 2"

    class D:
        methods = ("sft", "stat_sel")
        round2_methods = ("stat_sel",)

    run.check_round2_methods(D)
    D.round2_methods = ("sft",)
    with pytest.raises(ValueError, match=r"demo.round2_methods=\('sft',\): \['sft'\] cannot get a round 2"):
        run.check_round2_methods(D)
    D.round2_methods = ("stat_syn",)  # not among the methods the demo runs
    with pytest.raises(ValueError, match="stat_syn"):
        run.check_round2_methods(D)


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


def test_grpo_rows_are_sized_to_the_longest_prompt_not_the_prefill_bucket(tmp_path):
    from stat_jax.config import load_config_file
    from stat_jax.stat.io import write_jsonl
    from stat_jax.train.grpo import grpo_prompt_ids

    c = load_config_file("configs/demo.py")
    tok = build_char_tokenizer()
    problems = task.make_splits(0, {"test": 40})["test"]
    write_jsonl(tmp_path / "prompts.jsonl", (p.to_dict() for p in problems))
    row = run.grpo_row_length(c, tok, tmp_path / "prompts.jsonl")
    need = max(len(ids) for ids in grpo_prompt_ids(c, tok, problems)) + c.grpo.max_new_tokens
    assert row % 16 == 0 and need <= row < need + 16
    assert row < c.rollout.max_prefill_length + c.grpo.max_new_tokens  # shorter than the old bucket-sized rows


def test_an_unknown_grpo_prompt_source_is_refused_before_any_work(tmp_path):
    from stat_jax.config import load_config_file

    c = load_config_file("configs/demo.py:quick")
    c.workdir = str(tmp_path / "demo")
    c.demo.grpo_prompt_source = "test"
    with pytest.raises(ValueError, match="grpo_prompt_source='test': use 'fresh'"):
        run.Demo(c).run()
    assert not (tmp_path / "demo" / "data").exists()


def test_demo_steps_run_as_pipeline_stages_a_lost_input_is_named_before_any_work(tmp_path):
    from stat_jax import errors
    from stat_jax.config import load_config_file

    c = load_config_file("configs/demo.py:quick")
    c.workdir = str(tmp_path / "demo")
    demo = run.Demo(c)
    assert demo.data() == "done" and demo.data() == "skipped"
    (tmp_path / "demo/data/original_mix.jsonl").unlink()
    # The pipeline's stage runner checks a step's inputs before running it (the sets step would otherwise fail
    # later, on the missing base student, without naming what is gone).
    with pytest.raises(errors.RunStateMissingError, match=r"stage 'finetune/sets' needs \['data/original_mix.jsonl', "):
        demo.finetune_sets()
    assert not (tmp_path / "demo/finetune").exists()
    assert demo.data() == "done" and (tmp_path / "demo/data/original_mix.jsonl").exists()


def test_a_users_grpo_and_train_overrides_reach_the_demos_trainers(tmp_path, monkeypatch):
    """No demo.* copies of grpo.* or train.*: `stat-jax demo --config.grpo.X / --config.train.X` take effect."""
    from stat_jax import cli
    from stat_jax.data.char_tokenizer import save_char_tokenizer
    from stat_jax.stat.io import write_jsonl

    c = cli.build_config("configs/demo.py:quick", [("grpo.learning_rate", "2e-5"), ("grpo.num_generations", "4"),
                                                   ("train.learning_rate", "7e-4"), ("train.batch_size", "4"),
                                                   ("workdir", str(tmp_path / "demo"))])
    student = tmp_path / "student"
    save_char_tokenizer(student)
    write_jsonl(tmp_path / "prompts.jsonl", (p.to_dict() for p in task.make_splits(0, {"test": 8})["test"]))
    sub = run.grpo_run_config(c, tmp_path / "grpo", student, 1, tmp_path / "prompts.jsonl")
    assert (sub.grpo.learning_rate, sub.grpo.num_generations, sub.seed) == (2e-5, 4, 1)
    assert sub.grpo.train_files == (str(tmp_path / "prompts.jsonl"),) and sub.model.path == str(student)

    seen = {}

    def fake_train(config, workdir, init_model, files, *, steps, batch_size, lr, seed, resume=True):
        seen.update(lr=lr, batch_size=batch_size)
        (workdir / "hf").mkdir(parents=True)
        return workdir / "hf"

    monkeypatch.setattr(run, "train", fake_train)
    demo = run.Demo(c)
    (tmp_path / "demo/ft").mkdir(parents=True)
    (tmp_path / "demo/ft/train.jsonl").write_text("")
    (tmp_path / "demo/start.json").write_text('{"model": "%s"}' % student)
    demo._finetune("ft", "start.json", seed=0)
    assert seen == {"lr": 7e-4, "batch_size": 4}
