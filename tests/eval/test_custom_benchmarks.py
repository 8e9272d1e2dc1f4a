"""A benchmark of the user's own (any name, any field names) and prompts over the rollout limits, on real data:
rows from shared/data, the real student's tokenizer for lengths, and `stat-jax eval` through the real engine."""

from __future__ import annotations

import json

import pytest

from stat_jax import cli
from stat_jax.config import ConfigError, build_config
from stat_jax.data import math_datasets as md
from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.data.grader import GraderPool
from stat_jax.eval.evaluate import EvalSettings, evaluate, format_table, load_eval_data
from stat_jax.lengths import PromptLimit, PromptTooLongError, drop_long_prompts, prompt_token_counts
from stat_jax.models import export_hf_checkpoint, init_model
from stat_jax.models.llama import tiny_llama
from tests.data.test_real_data import DATA, _rows
from tests.real_student import ensure_real_student

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real benchmark files not found at {DATA}")


def _gsm8k_custom_file(path, *, short=3, long=1, malformed=1):
    """Real GSM8K test rows under other field names: the shortest questions, the longest ones, a row without answer."""
    rows = sorted(_rows("gsm8k_test.jsonl"), key=lambda r: len(r["question"]))
    chosen = rows[:short] + rows[-long:]
    out = [{"q": r["question"], "final": r["answer"], "tag": i} for i, r in enumerate(chosen)]
    out += [{"q": "A question whose answer field is missing", "tag": 100 + i} for i in range(malformed)]
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return chosen


def test_open_config_sections_take_new_benchmark_names():
    c = build_config("configs/eval_tiny.py", [("eval.benchmarks", "mine"), ("eval.paths.mine", "/data/q.jsonl"),
                                              ("eval.fields.mine", "problem:q,answer:a")])
    assert (c.eval.paths.mine, c.eval.fields.mine, list(c.eval.benchmarks)) == ("/data/q.jsonl", "problem:q,answer:a",
                                                                                 ["mine"])
    assert c.eval.paths.math500 == ""  # the built-in names are still there
    with pytest.raises(ConfigError, match="unknown key 'mine'"):  # only the name -> string sections are open
        build_config("configs/eval_tiny.py", [("eval.mine", "x")])
    with pytest.raises(ConfigError, match="lower-case letters"):
        build_config("configs/eval_tiny.py", [("eval.paths.My-Set", "x")])


def test_field_specs_are_validated():
    assert md.parse_fields("question:q, answer:a,id:tag") == {"problem": "q", "answer": "a", "id": "tag"}
    for bad in ("problem", "prompt:q", "answer:"):
        with pytest.raises(md.DatasetError, match="ROLE:FIELD"):
            md.parse_fields(bad)
    with pytest.raises(md.DatasetError, match=r"unknown benchmark 'mine'.*--config\.eval\.paths\.mine=FILE"):
        md.read_benchmark("mine")


def test_own_benchmark_from_real_rows_with_its_own_field_names(tmp_path):
    chosen = _gsm8k_custom_file(tmp_path / "mine.jsonl")
    loaded = md.read_benchmark("mine", str(tmp_path / "mine.jsonl"), fields="problem:q,answer:final,id:tag",
                               on_bad_row="skip")
    assert [p.id for p in loaded.problems] == ["mine/0", "mine/1", "mine/2", "mine/3"]
    # a GSM8K-style answer ('... #### 18') gives its final number
    assert [p.answer for p in loaded.problems] == [r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
                                                   for r in chosen]
    assert len(loaded.bad_rows) == 1 and "mine.jsonl:5: no answer: field 'final'" in loaded.bad_rows[0]
    # A file with only solutions: the answer is the solution's last \boxed{} (real MATH test rows, renamed).
    math_rows = _rows("math_test.jsonl")[:4]
    (tmp_path / "sol.jsonl").write_text("".join(json.dumps({"question": r["problem"], "worked": r["solution"]}) + "\n"
                                                for r in math_rows))
    problems = md.load_benchmark("sol", str(tmp_path / "sol.jsonl"), fields="solution:worked")
    assert [p.answer for p in problems] == [md.last_boxed(r["solution"]) for r in math_rows]


@pytest.fixture(scope="module")
def real_tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(ensure_real_student()))


class EchoAnswers:
    """Answers every prompt with the right \\boxed{} answer and records which prompts it was given."""

    def __init__(self, problems):
        self.by_text = {p.problem: p.answer for p in problems}
        self.prompts: list[str] = []

    def __call__(self, prompts, sampling, n):
        self.prompts += prompts
        out = []
        for prompt in prompts:
            (answer,) = [a for q, a in self.by_text.items() if q in prompt]
            out.append([f"so the answer is \\boxed{{{answer}}}"] * n)
        return out


def test_long_prompts_are_counted_and_skipped_before_generation_with_the_real_tokenizer(tmp_path, real_tokenizer):
    problems = md.load_benchmark("aime24", str(DATA / "aime24.jsonl"))
    settings = EvalSettings(max_new_tokens=64, grade_workers=1)
    limit = PromptLimit(max_prefill_length=256, max_target_length=512, max_new_tokens=64)
    gen = EchoAnswers(problems)
    with GraderPool(workers=1) as pool:
        summary = evaluate(gen, {"aime24": problems}, real_tokenizer, settings, out_dir=tmp_path, pool=pool,
                           prompt_limit=limit, print_table=False, dropped={"aime24": {"bad_rows": 2}})
    from stat_jax.data.prompting import render_prompts

    prompts = render_prompts(real_tokenizer, problems, instruction=settings.instruction,
                             date_string=settings.date_string)
    sizes = [len(real_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    too_long = [p.id for p, n in zip(problems, sizes) if n > 256]
    assert 0 < len(too_long) < len(problems)  # the real AIME prompts straddle the limit
    b = summary["benchmarks"]["aime24"]
    assert b["n"] == len(problems) - len(too_long) and b["pass@1"] == 1.0
    assert b["not_evaluated"] == {"bad_rows": 2, "long_prompts": len(too_long)}
    assert [e["id"] for e in b["not_evaluated_examples"]] == too_long[:5]
    assert len(gen.prompts) == b["n"] and all(n <= 256 for n in prompt_token_counts(real_tokenizer, gen.prompts))
    assert f"aime24: {2 + len(too_long)} questions not evaluated" in format_table(summary)

    # 'error': nothing is generated, and the message names the questions and the key to raise.
    gen = EchoAnswers(problems)
    with pytest.raises(PromptTooLongError, match=rf"{len(too_long)} prompts do not fit.*{too_long[0]}.*"
                                                 r"rollout.max_prefill_length=256"):
        evaluate(gen, {"aime24": problems}, real_tokenizer, settings, out_dir=tmp_path / "e", prompt_limit=limit,
                 on_long_prompt="error", print_table=False)
    assert gen.prompts == []


def test_grpo_prompt_filter_counts_row_and_cache_limits(real_tokenizer):
    problems = md.load_benchmark("math500", str(DATA / "math500_test.jsonl"))[:64]
    ids = [real_tokenizer(p.problem, add_special_tokens=False)["input_ids"] for p in problems]
    sizes = sorted(len(i) for i in ids)
    cut = sizes[len(sizes) // 2]  # half the prompts fit a row of cut + 32 tokens
    limit = PromptLimit(1024, 4096, 32, max_row_length=cut + 32)
    kept, kept_ids, report = drop_long_prompts(problems, ids, limit, "skip", "grpo prompts", [p.id for p in problems])
    assert len(kept) == sum(n <= cut for n in sizes) and all(len(i) <= cut for i in kept_ids)
    assert report["skipped_long_prompts"] == len(problems) - len(kept)
    assert "grpo.max_length" in report["skipped_long_prompt_examples"][0]["reason"]
    with pytest.raises(PromptTooLongError, match="grpo prompts: .* prompts do not fit"):
        drop_long_prompts(problems, ids, limit, "error", "grpo prompts", [p.id for p in problems])


@pytest.fixture(scope="module")
def char_student(tmp_path_factory):
    tok = build_char_tokenizer()
    path = tmp_path_factory.mktemp("student")
    export_hf_checkpoint(init_model(tiny_llama(vocab_size=len(tok)), seed=0), path)
    tok.save_pretrained(str(path))
    return path


def test_cli_evaluates_an_own_benchmark_counting_bad_rows_and_long_prompts(tmp_path, char_student, capsys):
    chosen = _gsm8k_custom_file(tmp_path / "mine.jsonl")
    out = tmp_path / "eval"
    argv = ["eval", "--config=configs/eval_tiny.py", f"--config.model.path={char_student}",
            "--config.eval.benchmarks=mine", f"--config.eval.paths.mine={tmp_path / 'mine.jsonl'}",
            "--config.eval.fields.mine=problem:q,answer:final", "--config.eval.num_samples=0",
            f"--config.eval.out_dir={out}", "--config.mesh.fsdp=1", "--config.mesh.data=-1"]
    assert cli.main(argv + ["--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["benchmarks"] == {"mine": 4} and dry["not_evaluated"]["mine"]["bad_rows"] == 1
    assert cli.main(argv) == 0
    b = json.loads((out / "summary.json").read_text())["benchmarks"]["mine"]
    # The char tokenizer spends a token per character: the longest GSM8K question exceeds the 256-token prefill.
    assert b["n"] == 3 and b["not_evaluated"] == {"bad_rows": 1, "long_prompts": 1}
    records = [json.loads(line) for line in (out / "mine.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in records] == [r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
                                              for r in chosen[:3]]
    assert all(r["greedy"]["finish_reason"] in ("stop", "length") for r in records)

    # Strict: the same command stops before generating, with one line naming the long question.
    status = cli.main(argv + ["--config.rollout.on_long_prompt=error", f"--config.eval.out_dir={tmp_path / 'strict'}"])
    assert status == PromptTooLongError.exit_code
    err = capsys.readouterr().err
    assert "mine/" in err and "rollout.max_prefill_length=256" in err and "Traceback" not in err
    assert not (tmp_path / "strict" / "mine.jsonl").exists()


def test_strict_bad_rows_stop_the_eval(tmp_path):
    _gsm8k_custom_file(tmp_path / "mine.jsonl")
    config = build_config("configs/eval_tiny.py", [("eval.benchmarks", "mine"),
                                                   ("eval.paths.mine", str(tmp_path / "mine.jsonl")),
                                                   ("eval.fields.mine", "problem:q,answer:final"),
                                                   ("eval.on_bad_row", "error")])
    with pytest.raises(md.DatasetError, match=r"mine\.jsonl:5: no answer"):
        load_eval_data(config)
