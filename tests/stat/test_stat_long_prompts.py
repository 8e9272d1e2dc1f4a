"""The rollout stage checks every held-out prompt against the rollout limits (real student tokenizer, real MATH
rows) before the student generates: long ones are skipped and counted in the manifest, or stop the stage first."""

from __future__ import annotations

import json

import pytest

from stat_jax.config import load_config_file
from stat_jax.data.prompting import render_prompts
from stat_jax.data.math_datasets import load_benchmark
from stat_jax.lengths import PromptTooLongError
from stat_jax.rollout.base import Completion, RolloutBackend
from stat_jax.stat import io
from stat_jax.stat.pipeline import run_pipeline
from tests.data.test_real_data import DATA, _rows
from tests.real_student import ensure_real_student

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real benchmark files not found at {DATA}")
PREFILL = 256


class RightAnswers(RolloutBackend):
    """Answers each prompt with its question's reference answer; records the prompts it was asked."""

    def __init__(self, problems):
        self.answers = {p.problem: p.answer for p in problems}
        self.prompts: list[str] = []

    def generate(self, prompts, sampling, n=1, *, progress=True):
        self.prompts += list(prompts)
        out = []
        for i, prompt in enumerate(prompts):
            (answer,) = [a for q, a in self.answers.items() if q in prompt]
            out.append([Completion(i, j, [1], f"\\boxed{{{answer}}}", "stop") for j in range(n)])
        return out


@pytest.fixture(scope="module")
def tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(ensure_real_student()))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, policy="skip"):
    rows = sorted(_rows("math_test.jsonl"), key=lambda r: len(r["problem"]))
    heldout = rows[:4] + rows[-2:]  # the shortest MATH test questions and the two longest
    c = load_config_file("configs/base.py")
    c.workdir = str(tmp_path / "run")
    c.stat.train_benchmark, c.stat.train_source = "math_train", _write(tmp_path / "train.jsonl",
                                                                       _rows("math_train.jsonl")[:20])
    c.stat.heldout_benchmark, c.stat.heldout_source = "math", _write(tmp_path / "heldout.jsonl", heldout)
    c.stat.heldout_size = 0
    c.stat.stages = ("data", "rollout", "hard")
    c.stat.rollout_samples, c.stat.rollout_max_new_tokens, c.stat.grade_workers = 2, 64, 0
    c.stat.num_hard = 2
    c.rollout.max_prefill_length, c.rollout.max_target_length = PREFILL, 512
    c.rollout.on_long_prompt = policy
    return c


def test_rollout_stage_skips_and_counts_long_prompts_before_generating(tmp_path, tokenizer):
    config = _config(tmp_path)
    heldout = load_benchmark("math", config.stat.heldout_source)
    prompts = render_prompts(tokenizer, heldout, instruction=config.eval.instruction,
                             date_string=config.eval.date_string)
    sizes = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    long = [i for i, n in enumerate(sizes) if n > PREFILL]
    assert len(long) == 2 and max(sizes[i] for i in range(4)) <= PREFILL  # the real prompts straddle the limit

    backend = RightAnswers(heldout)
    assert run_pipeline(config, rollout_backend=backend, tokenizer=tokenizer) == {
        "data": "done", "rollout": "done", "hard": "done"}
    rd = tmp_path / "run" / "stat"
    stats = io.read_json(rd / "rollout/manifest.json")["stats"]
    assert stats["questions"] == 4 and stats["skipped_long_prompts"] == 2
    assert [e["tokens"] for e in stats["skipped_long_prompt_examples"]] == [sizes[i] for i in long]
    assert "rollout.max_prefill_length=256" in stats["skipped_long_prompt_examples"][0]["reason"]
    assert len(backend.prompts) == 4 and all(
        len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= PREFILL for p in backend.prompts)
    rows = io.read_jsonl(rd / "rollout/responses.jsonl")
    assert [bool(r.get("skipped")) for r in rows] == [False] * 4 + [True] * 2
    # The hard stage scores the questions that were answered, and only those.
    assert [r["id"] for r in io.read_jsonl(rd / "hard/scores.jsonl")] == [r["id"] for r in rows[:4]]


def test_rollout_stage_with_error_policy_stops_before_the_student_runs(tmp_path, tokenizer):
    config = _config(tmp_path, policy="error")
    backend = RightAnswers([])
    with pytest.raises(PromptTooLongError, match=r"stage rollout .*: 2 prompts do not fit.*max_prefill_length=256"):
        run_pipeline(config, rollout_backend=backend, tokenizer=tokenizer)
    assert backend.prompts == []
    assert not (tmp_path / "run/stat/rollout/responses.jsonl").exists()
