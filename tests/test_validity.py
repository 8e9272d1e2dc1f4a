"""Whether a stored result is still valid, decided from the config fields its producer read (stat_jax/validity.py)."""

from __future__ import annotations

import threading
from pathlib import Path

from ml_collections import ConfigDict

from stat_jax import validity
from stat_jax.config import config_to_dict, sub_config


def _config() -> ConfigDict:
    return ConfigDict({"seed": 0, "workdir": "/w", "train": {"learning_rate": 1e-3, "steps": 10, "log_every": 5},
                       "model": {"path": "/m", "remat": "none"}, "grpo": {"beta": 0.0}, "maybe": None})


def test_a_log_notes_each_field_read_once_with_its_value():
    c = validity.watch(_config())
    with validity.reads() as log:
        assert c.train.learning_rate == 1e-3 and c["train"]["steps"] == 10 and c.get("train").steps == 10
        assert c.train.get("absent", 7) == 7
        _ = c.model  # a section alone is not a field
    assert log.values == {"train.learning_rate": 1e-3, "train.steps": 10, "train.absent": validity.ABSENT}
    _ = c.seed  # no log open: nothing noted anywhere
    assert "seed" not in log.values


def test_fields_that_change_how_not_what_are_never_dependencies():
    c = validity.watch(_config())
    with validity.reads() as log:
        _ = (c.train.log_every, c.model.remat, c.workdir, c.model.path)
    assert log.values == {"model.path": "/m"}


def test_a_copy_is_watched_and_what_the_copier_wrote_is_not_its_dependency():
    c = validity.watch(_config())
    with validity.reads() as stage:
        sub = sub_config(c, "/elsewhere", **{"model.path": "/trained"})  # the stage decides model.path
        sub.train.steps = 3
        with validity.reads() as trainer:  # the trainer it hands the copy to reads everything it uses
            _ = (sub.model.path, sub.train.steps, sub.train.learning_rate)
        copy2 = sub.copy_and_resolve_references()
        _ = copy2.train.steps  # still written, in a copy of the copy
    assert trainer.values == {"model.path": "/trained", "train.steps": 3, "train.learning_rate": 1e-3}
    assert stage.values == {"train.learning_rate": 1e-3}


def test_changed_compares_recorded_reads_with_the_config_now():
    c = validity.watch(_config())
    with validity.reads() as log:
        _ = (c.train.learning_rate, c.maybe, c.train.get("gone"))
        validity.replay({"@backend": "offline-1"})
    now = _config()
    assert validity.changed(log.values, now, {"@backend": "offline-1"}) == {}
    now.train.steps = 99  # not read
    now.model.remat = "full"  # how, not what
    assert validity.changed(log.values, now, {"@backend": "offline-1"}) == {}
    now.train.learning_rate = 2e-3
    diff = validity.changed(log.values, now, {"@backend": "offline-2"})
    assert diff == {"train.learning_rate": (1e-3, 2e-3), "@backend": ("offline-1", "offline-2")}
    assert validity.describe(diff) == 'train.learning_rate 0.001 -> 0.002, @backend "offline-1" -> "offline-2"'
    del now.train["learning_rate"]  # a field that no longer exists has changed
    assert "train.learning_rate" in validity.changed(log.values, now, {"@backend": "offline-1"})


def test_writing_the_whole_config_down_reads_nothing_but_a_section_to_dict_reads_all_of_it():
    c = validity.watch(_config())
    with validity.reads() as log:
        config_to_dict(c)  # the resolved config.json every command writes
        assert log.values == {}
        c.train.to_dict()
    assert set(log.values) == {"train.learning_rate", "train.steps"}  # log_every: how, not what


def test_reads_in_other_threads_are_noted():
    c = validity.watch(_config())
    with validity.reads() as log:
        t = threading.Thread(target=lambda: c.grpo.beta)
        t.start()
        t.join()
    assert log.values == {"grpo.beta": 0.0}


def test_on_new_sees_every_new_read_as_it_happens(tmp_path: Path):
    seen = []
    c = validity.watch(_config())
    with validity.reads(on_new=seen.append):
        _ = (c.seed, c.seed, c.train.steps)
    assert seen == [{"seed": 0}, {"seed": 0, "train.steps": 10}]
