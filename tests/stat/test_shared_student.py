"""The pipeline's stages on one shared student backend (stat_jax/rollout/students.py) and at a token budget."""

from __future__ import annotations

import json

from stat_jax.config import build_config
from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.data.sft_data import example_tokens, load_sft_examples
from stat_jax.rollout import factory
from stat_jax.rollout.students import StudentServer
from stat_jax.stat import io
from stat_jax.stat.pipeline import run_pipeline
from tests.stat.test_stat_pipeline import fake, write_fixture  # noqa: F401  (fake: a fixture)
from tests.stat.test_stat_run_e2e import _overrides
from tests.train.sft_fixtures import make_student

STAGES = "data,skills,label,rollout,hard,diagnose,profile,sel,sft,eval"


def _config(tmp_path, paths, student, fake_server, name, **more):
    overrides = {**_overrides(tmp_path, paths, student, fake_server), "stat.stages": STAGES,
                 "workdir": str(tmp_path / name), "train.steps": "0", "train.epochs": "1.0", **more}
    return build_config("configs/base.py", list(overrides.items()))


def test_one_backend_serves_every_stage_and_gives_what_each_stage_builds_alone(tmp_path, fake, monkeypatch):
    paths, _, _ = write_fixture(tmp_path)
    student = make_student(tmp_path / "student")
    built = []
    make = factory.make_rollout_backend
    monkeypatch.setattr(factory, "make_rollout_backend", lambda *a, **k: built.append(1) or make(*a, **k))

    alone = _config(tmp_path, paths, student, fake, "alone", **{"stat.token_budget": "600"})
    run_pipeline(alone)
    assert len(built) == 2  # the rollout stage's backend, then the eval stage's own

    built.clear()
    shared = _config(tmp_path, paths, student, fake, "shared", **{"stat.token_budget": "600"})
    server = StudentServer(shared)
    try:
        run_pipeline(shared, server=server)
    finally:
        server.close()
    assert len(built) == 1  # compiled once: the SFT export's weights were swapped in for eval
    for f in ("rollout/responses.jsonl", "sft/train.jsonl", "eval/math500.jsonl"):
        a, b = (tmp_path / run / "stat" / f for run in ("alone", "shared"))
        assert a.read_text() == b.read_text(), f
    summaries = [json.loads((tmp_path / run / "stat/eval/summary.json").read_text())["benchmarks"]
                 for run in ("alone", "shared")]
    assert summaries[0]["math500"]["pass@1"] == summaries[1]["math500"]["pass@1"]

    # The token budget: STAT-Sel's pairs drawn in seeded passes until 600 training tokens.
    tokenizer = build_char_tokenizer()
    chosen = load_sft_examples([tmp_path / "alone/stat/sft/train.jsonl"])
    tokens = [example_tokens(tokenizer, e) for e in chosen]
    assert sum(tokens[:-1]) < 600 <= sum(tokens)
    assert io.read_json(tmp_path / "alone/stat/sft/manifest.json")["reads"]["stat.token_budget"] == 600
