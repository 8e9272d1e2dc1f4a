"""Every shipped config builds and its token lengths fit together for the commands it is made for, through the
same check the commands run at start (stat_jax.lengths.check_config_lengths) — so no shipped config can fail at
start or halfway through a stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from stat_jax import cli
from stat_jax.config import ConfigError, build_config, load_config_file
from stat_jax.lengths import GENERATES, PromptLimit, check_config_lengths, config_length_problems, target_length

CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
ALL_COMMANDS = tuple(GENERATES)


def commands_for(name: str) -> tuple[str, ...]:
    """The commands a config file is written for (by its name); a new kind of config must be added here."""
    if name == "base.py":
        return ALL_COMMANDS  # every command starts from it
    if name == "smoke.py":
        return ()  # `stat-jax smoke`: a forward pass, no lengths
    for prefix, commands in (("demo", ("demo",)), ("eval_", ("eval",)), ("grpo_", ("grpo",)),
                             ("serve_", ("serve",)), ("sft_", ("sft",)), ("stat_", ("run",))):
        if name.startswith(prefix):
            return commands
    raise AssertionError(f"configs/{name}: say in tests/test_configs.py which commands it is for")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_and_its_lengths_are_coherent(name):
    config = build_config(f"configs/{name}")
    for command in commands_for(name):
        assert config_length_problems(config, command) == [], (name, command)
        check_config_lengths(config, command)
        if "rollout" not in config:
            continue
        # The longest prompt the prefill admits fits the cache with every generating section's new tokens.
        prefill = int(config.rollout.max_prefill_length)
        for section, key in GENERATES[command]:
            row = int(config.grpo.max_length) if section == "grpo" else 0
            limit = PromptLimit.from_config(config, int(config[section][key]))
            assert limit.problem(prefill) is None, (name, command, section, limit)
            assert limit.problem(prefill + 1) is not None or limit.truncate  # and the prefill is the limit
            if row:  # a GRPO row holds some prompt besides the new tokens
                assert PromptLimit.from_config(config, int(config.grpo.max_new_tokens),
                                               max_row_length=row).problem(1) is None


def test_demo_variants_are_coherent_too():
    config = load_config_file("configs/demo.py:quick")
    assert config_length_problems(config, "demo") == []


def test_eval_paper_generates_4096_tokens_with_room_for_the_prompt():
    config = build_config("configs/eval_paper.py")
    assert int(config.eval.max_new_tokens) == 4096
    assert target_length(config.rollout) >= int(config.rollout.max_prefill_length) + 4096


@pytest.mark.parametrize("overrides, expected", [
    ((("eval.max_new_tokens", "8192"),), r"eval.max_new_tokens=8192 \+ rollout.max_prefill_length=1024 = 9216 exceeds "
                                        r"rollout.max_target_length=5120: .*set rollout.max_target_length >= 9216"),
    ((("rollout.max_prefill_length", "1000"),), r"rollout.max_prefill_length=1000 must be one of the prefill buckets"),
    ((("rollout.max_target_length", "512"),), r"rollout.max_target_length=512 must exceed rollout.max_prefill_length"),
    ((("rollout.on_long_prompt", "truncate"),), r"rollout.on_long_prompt='truncate' must be one of"),
])
def test_incoherent_lengths_are_named(overrides, expected):
    config = build_config("configs/eval_paper.py", overrides)
    with pytest.raises(ConfigError, match=expected):
        check_config_lengths(config, "eval")


def test_every_problem_is_listed_at_once():
    config = build_config("configs/base.py", [("rollout.max_target_length", "1536")])
    problems = config_length_problems(config, "run")
    assert [p.split("=", 1)[0] for p in problems] == ["stat.rollout_max_new_tokens", "eval.max_new_tokens",
                                                      "grpo.max_new_tokens"]
    assert config_length_problems(config, "sft") == []  # SFT never generates
    grpo = build_config("configs/grpo_tiny.py", [("grpo.max_length", "8")])
    assert config_length_problems(grpo, "grpo") == ["grpo.max_length=8 must exceed grpo.max_new_tokens=8 (a training "
                                                    "row holds the prompt and the completion)"]


def test_eval_command_refuses_incoherent_lengths_before_any_work(tmp_path, capsys):
    status = cli.main(["eval", "--config=configs/eval_paper.py", "--config.eval.max_new_tokens=8192",
                       f"--config.workdir={tmp_path}", "--config.model.path=/nonexistent/student", "--dry-run"])
    assert status == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "eval.max_new_tokens=8192" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was loaded or written
