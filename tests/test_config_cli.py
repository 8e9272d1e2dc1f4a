"""Config files with `--config.a.b=v` overrides, and the `stat-jax` command line."""

import json

import pytest
from ml_collections import ConfigDict

from stat_jax import cli
from stat_jax.config import (
    ConfigError,
    apply_overrides,
    build_config,
    config_to_dict,
    split_override_args,
)

CONFIG_FILE = '''
from ml_collections import ConfigDict

def get_config(size="small"):
    c = ConfigDict()
    c.seed = 0
    c.train = ConfigDict(dict(lr=1e-3, steps=10, shuffle=True, name="run", betas=(0.9, 0.95),
                              opt=ConfigDict(dict(eps=1e-8, kind="adamw"))))
    c.size = size
    return c
'''


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(CONFIG_FILE)
    return path


def test_overrides_parse_to_field_types(config_file):
    c = build_config(str(config_file), [
        ("seed", "7"), ("train.lr", "3e-4"), ("train.steps", "200"), ("train.shuffle", "false"),
        ("train.name", "sft-1"), ("train.betas", "(0.8, 0.99)"), ("train.opt.eps", "1e-6"),
        ("train.opt.kind", "sgd"),
    ])
    assert c.seed == 7 and isinstance(c.seed, int)
    assert c.train.lr == 3e-4 and isinstance(c.train.lr, float)
    assert c.train.steps == 200 and c.train.shuffle is False and c.train.name == "sft-1"
    assert c.train.betas == (0.8, 0.99) and isinstance(c.train.betas, tuple)
    assert c.train.opt.eps == 1e-6 and c.train.opt.kind == "sgd"
    # an integer literal is fine for a float field; comma lists work for tuples
    c = build_config(str(config_file), [("train.lr", "1"), ("train.betas", "0.5,0.6")])
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert c.train.betas == (0.5, 0.6)


def test_config_file_argument_and_lock(config_file):
    c = build_config(f"{config_file}:large")
    assert c.size == "large"
    with pytest.raises(AttributeError):  # locked: a typo in code cannot add a new field silently
        c.train.stepz = 3


@pytest.mark.parametrize(
    "override, fragments",
    [
        (("train.stepz", "3"), ["train.stepz", "'stepz'", "valid keys", "'steps'", "'lr'"]),
        (("trian.lr", "3"), ["trian.lr", "'trian'", "'train'", "'seed'"]),
        (("train.opt.epz", "1"), ["'epz'", "'eps'", "'kind'"]),
    ],
)
def test_unknown_keys_list_valid_keys(config_file, override, fragments):
    with pytest.raises(ConfigError) as e:
        build_config(str(config_file), [override])
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize(
    "override, fragments",
    [
        (("train.steps", "many"), ["train.steps", "'many'", "integer"]),
        (("train.steps", "1.5"), ["train.steps", "integer"]),
        (("train.lr", "fast"), ["train.lr", "'fast'", "number"]),
        (("train.shuffle", "maybe"), ["train.shuffle", "'maybe'", "boolean"]),
        (("train", "1"), ["train", "section", "'steps'"]),
    ],
)
def test_wrong_types_are_rejected(config_file, override, fragments):
    with pytest.raises(ConfigError) as e:
        build_config(str(config_file), [override])
    for fragment in fragments:
        assert fragment in str(e.value)


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no_such_config.py"):
        build_config(str(tmp_path / "no_such_config.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="broken.py.*SyntaxError"):
        build_config(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        build_config(str(empty))


def test_split_override_args():
    overrides, rest = split_override_args(["smoke", "--config.a.b=1", "--config.c", "x y", "--resume"])
    assert overrides == [("a.b", "1"), ("c", "x y")] and rest == ["smoke", "--resume"]
    with pytest.raises(ConfigError, match="--config.a.b=VALUE"):
        split_override_args(["--config.a.b"])


def test_an_override_reaches_the_config_dict(config_file):
    assert config_to_dict(build_config(str(config_file), [("train.lr", "0.5")]))["train"]["lr"] == 0.5


def test_apply_overrides_on_plain_configdict():
    c = apply_overrides(ConfigDict({"mesh": {"data": 1, "fsdp": -1}}), [("mesh.fsdp", "4")])
    assert c.mesh.fsdp == 4


# ----- the command line --------------------------------------------------------------------------------------
def test_smoke_command_runs(capsys):
    assert cli.main(["smoke", "--config.mesh.tensor=4", "--config.seq_len=8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 4}
    assert report["logits_shape"] == [2, 8, 128] and report["logits_finite"] is True
    assert report["params"] > 0 and len(report["devices"]) == 8


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["smoke", "--config.mesh.tensor=four"], ["mesh.tensor", "'four'", "integer"]),
        (["smoke", "--config.mesh.pipeline=2"], ["mesh.pipeline", "valid keys", "'tensor'"]),
        (["smoke", "--config=configs/does_not_exist.py"], ["does_not_exist.py", "not found"]),
        (["smoke", "--config.seed"], ["--config.seed=VALUE"]),
    ],
)
def test_bad_command_lines_exit_2_with_a_message(capsys, argv, fragments):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err


def test_sub_config_copies_with_overrides_and_refuses_fields_that_do_not_exist(config_file, tmp_path):
    from stat_jax.config import sub_config

    base = build_config(str(config_file))
    sub = sub_config(base, tmp_path / "stage", **{"train.lr": 5e-4, "train.opt.kind": "sgd"})
    assert sub.workdir == str(tmp_path / "stage") and sub.train.lr == 5e-4 and sub.train.opt.kind == "sgd"
    assert base.train.lr == 1e-3 and base.train.opt.kind == "adamw" and "workdir" not in base  # a copy
    with pytest.raises(ConfigError, match=r"'train.lrr' is not a config field .*'lr'"):
        sub_config(base, tmp_path, **{"train.lrr": 1.0})
    with pytest.raises(ConfigError,
                       match=r"sub_config: trian.lr: unknown section 'trian'; known keys here: .*'train'"):
        sub_config(base, tmp_path, **{"trian.lr": 1.0})


def test_quick_is_the_config_files_quick_variant_and_overrides_apply_on_top(config_file, capsys):
    from stat_jax.config import with_variant

    assert with_variant("configs/demo.py", "quick") == with_variant("configs/demo.py:quick", "quick") \
        == "configs/demo.py:quick"
    with pytest.raises(ConfigError, match="names the variant 'default'"):
        with_variant("configs/demo.py:default", "quick")
    assert cli.main(["demo", "--quick", "--print-config", "--config.demo.seeds=(5,)",
                     "--config.demo.train_size=777"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # quick's own values, the command line's on top of them
    assert printed["workdir"] == "runs/demo-quick" and printed["demo"]["test_size"] == 100
    assert printed["demo"]["seeds"] == [5] and printed["demo"]["train_size"] == 777
