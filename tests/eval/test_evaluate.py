"""`evaluate` with a scripted generator (metrics by hand, resume) and with a tiny random model end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stat_jax import cli
from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.data.grader import GraderPool
from stat_jax.data.records import MathProblem
from stat_jax.eval.evaluate import EvalSettings, evaluate
from stat_jax.models import export_hf_checkpoint, init_model
from stat_jax.models.llama import tiny_llama
from stat_jax.rollout.base import Completion

PROBLEMS = [
    MathProblem(id="t/0", problem="What is 1+1?", answer="2", subject="Algebra", level="Level 1"),
    MathProblem(id="t/1", problem="Half of one?", answer="\\frac12", subject="Geometry", level="Level 2"),
    MathProblem(id="t/2", problem="What is 2+3?", answer="5", subject="Algebra", level="Level 2"),
]
# problem text -> (greedy response, 4 sampled responses); correct samples: 2, 0, 1.
SCRIPT = {
    "What is 1+1?": ("so \\boxed{2}", ["\\boxed{2}", "\\boxed{3}", "no box", "\\boxed{\\frac{4}{2}}"]),
    "Half of one?": ("\\boxed{0.5}", ["\\boxed{2}", "\\boxed{1}", "\\boxed{0.25}", "\\boxed{-\\frac12}"]),
    "What is 2+3?": ("\\boxed{4}", ["\\boxed{6}", "\\boxed{5}", "\\boxed{4}", "\\boxed{"]),
}
SETTINGS = EvalSettings(num_samples=4, temperature=1.0, pass_k=(1, 2, 4, 8), max_new_tokens=16, chunk_size=2)


class ScriptedGenerator:
    """Answers from SCRIPT; greedy calls get strings, sampled calls Completions (one cut off by length)."""

    def __init__(self, fail_after_calls=None):
        self.calls = []
        self.fail_after_calls = fail_after_calls

    def __call__(self, prompts, sampling, n):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.calls.append((len(prompts), sampling.temperature, n))
        out = []
        for i, prompt in enumerate(prompts):
            (greedy, samples), = [v for k, v in SCRIPT.items() if k in prompt]
            if sampling.temperature == 0:
                out.append([greedy] * n)
            else:
                out.append([Completion(i, j, [], s, "length" if s.endswith("{") else "stop")
                            for j, s in enumerate(samples[:n])])
        return out


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def pool():
    with GraderPool(workers=2, timeout=10.0) as p:
        yield p


def test_metrics_records_and_files_match_hand_computation(tmp_path, tok, pool, capsys):
    gen = ScriptedGenerator()
    summary = evaluate(gen, {"toy": PROBLEMS}, tok, SETTINGS, out_dir=tmp_path, pool=pool, model_name="scripted")
    b = summary["benchmarks"]["toy"]
    assert b["n"] == 3
    assert b["pass@1"] == pytest.approx(2 / 3)  # greedy: right, right (0.5 = 1/2), wrong
    assert b["avg@4"] == pytest.approx((2 / 4 + 0 + 1 / 4) / 3)
    assert b["pass@2"] == pytest.approx(((1 - 1 / 6) + 0 + (1 - 3 / 6)) / 3)  # 1 - C(n-c,2)/C(4,2)
    assert b["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in b  # j > k is not reported
    strict = {g: {k: v for k, v in m.items() if not k.endswith("_flexible")} for g, m in b["by_subject"].items()}
    assert strict == {"Algebra": {"n": 2, "pass@1": 0.5, "avg@4": 0.375, "pass@2": pytest.approx(2 / 3),
                                  "pass@4": 1.0},
                      "Geometry": {"n": 1, "pass@1": 1.0, "avg@4": 0.0, "pass@2": 0.0, "pass@4": 0.0}}
    # every answer here is boxed, so math-verify's flexible reading agrees with the strict one on the greedy run
    assert b["pass@1_flexible"] == pytest.approx(2 / 3) and b["by_subject"]["Geometry"]["pass@1_flexible"] == 1.0
    assert b["headline"] == b["pass@1"] and b["grading"]["headline"] == "pass@1"
    assert b["grading"]["flexible_rule"] == "math" and "boxed" in b["grading"]["pass@1"]
    assert set(b["by_level"]) == {"Level 1", "Level 2"} and b["by_level"]["Level 2"]["n"] == 2
    assert b["no_boxed_rate"] == pytest.approx(2 / 15)  # "no box" and the unclosed "\boxed{"
    assert b["truncated_rate"] == pytest.approx(1 / 12)  # finish reasons known for the 12 Completions only
    # chunks of 2 questions: (greedy, sampled) x 2 chunks
    assert gen.calls == [(2, 0.0, 1), (2, 1.0, 4), (1, 0.0, 1), (1, 1.0, 4)]

    lines = (tmp_path / "toy.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert rec["id"] == "t/0" and rec["answer"] == "2" and rec["subject"] == "Algebra"
    assert rec["prompt"].startswith("<bos><|user|>\nWhat is 1+1?") and rec["prompt"].endswith("<|assistant|>\n")
    assert rec["greedy"] == {"response": "so \\boxed{2}", "extracted": "2", "correct": True, "reason": "exact",
                             "flexible_extracted": "2", "flexible_correct": True, "finish_reason": None}
    assert [s["correct"] for s in rec["samples"]] == [True, False, False, True]
    assert rec["samples"][3]["reason"] == "equivalent"
    assert json.loads((tmp_path / "toy.summary.json").read_text()) == json.loads(json.dumps(b))
    assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"]["toy"]["pass@1"] == b["pass@1"]
    table = capsys.readouterr().out
    assert "toy" in table and "66.7" in table and "Geometry" in table and "Level 2" in table


GSM8K_PROBLEMS = [MathProblem(id=f"g/{i}", problem=f"Question {i}?", answer=a) for i, a in enumerate(("12", "7", "30"))]
GSM8K_ANSWERS = {"Question 0?": "3 boxes of 4 make 12 eggs.",  # only lm-eval's last number credits it
                 "Question 1?": "so \\boxed{7}",  # both rules
                 "Question 2?": "I get 31."}  # neither


def test_gsm8k_is_graded_both_ways_and_its_headline_is_the_flexible_figure(tmp_path, tok, pool, capsys):
    def gen(prompts, sampling, n):
        return [[next(v for k, v in GSM8K_ANSWERS.items() if k in p)] * n for p in prompts]

    settings = EvalSettings(greedy=True, max_new_tokens=16, headline={"gsm8k": "flexible"})
    b = evaluate(gen, {"gsm8k": GSM8K_PROBLEMS}, tok, settings, out_dir=tmp_path, pool=pool)["benchmarks"]["gsm8k"]
    assert b["pass@1"] == pytest.approx(1 / 3) and b["pass@1_flexible"] == pytest.approx(2 / 3)
    assert b["headline"] == b["pass@1_flexible"] and b["grading"]["headline"] == "pass@1_flexible"
    assert b["grading"]["flexible_rule"] == "gsm8k" and "lm-eval" in b["grading"]["pass@1_flexible"]
    out = capsys.readouterr().out
    assert "gsm8k: pass@1_flexible = lm-eval" in out and "headline pass@1_flexible = 66.7" in out
    strict = EvalSettings(greedy=True, max_new_tokens=16)  # headline: strict unless the config says otherwise
    b = evaluate(gen, {"gsm8k": GSM8K_PROBLEMS}, tok, strict, out_dir=tmp_path / "s", pool=pool,
                 print_table=False)["benchmarks"]["gsm8k"]
    assert b["headline"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="eval.headline"):
        EvalSettings(headline={"gsm8k": "lenient"}).validate()


def test_resume_continues_after_a_crash_and_refuses_changed_settings(tmp_path, tok, pool):
    settings = EvalSettings(**{**SETTINGS.__dict__, "chunk_size": 1})
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(ScriptedGenerator(fail_after_calls=4), {"toy": PROBLEMS}, tok, settings, out_dir=tmp_path,
                 pool=pool, print_table=False)
    assert len((tmp_path / "toy.jsonl").read_text().splitlines()) == 2
    with open(tmp_path / "toy.jsonl", "a") as f:
        f.write('{"id": "t/2", "cut off mid-wri')  # as a kill during the append would leave it
    gen = ScriptedGenerator()
    summary = evaluate(gen, {"toy": PROBLEMS}, tok, settings, out_dir=tmp_path, pool=pool, resume=True,
                       print_table=False)
    assert gen.calls == [(1, 0.0, 1), (1, 1.0, 4)]  # only the third question is generated
    assert summary["benchmarks"]["toy"]["pass@1"] == pytest.approx(2 / 3)
    assert [json.loads(l)["id"] for l in (tmp_path / "toy.jsonl").read_text().splitlines()] == ["t/0", "t/1", "t/2"]
    changed = EvalSettings(**{**settings.__dict__, "temperature": 0.7})
    with pytest.raises(ValueError, match="cannot resume, the settings changed \\(temperature\\)"):
        evaluate(gen, {"toy": PROBLEMS}, tok, changed, out_dir=tmp_path, pool=pool, resume=True)


def test_bad_generator_output_and_settings(tmp_path, tok, pool):
    with pytest.raises(RuntimeError, match="returned 1 samples for prompt 0, expected n=4"):
        evaluate(lambda p, s, n: [["\\boxed{1}"]] * len(p), {"toy": PROBLEMS}, tok, SETTINGS, out_dir=tmp_path,
                 pool=pool)
    with pytest.raises(ValueError, match="needs eval.temperature > 0"):
        EvalSettings(num_samples=4, temperature=0.0).validate()


# --- a tiny random student decoding for real ------------------------------------------------------------


def decode_generator(model, tok):
    """(prompts, SamplingParams, n) -> Completions, by greedy/temperature decoding through a jitted model.decode."""

    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, tokens, positions, cache, starts):
        return nnx.merge(graphdef, params).decode(tokens, positions, cache, starts)

    def generate(prompts, sampling, n):
        rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(n)]
        b, lengths = len(rows), np.array([len(r) for r in rows], np.int32)
        width, new = int(lengths.max()), sampling.max_new_tokens
        tokens = np.full((b, width), tok.pad_token_id, np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        cache = model.init_cache(b, width + new)
        positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
        logits, cache = step(params, jnp.asarray(tokens), positions, cache, jnp.zeros(b, jnp.int32))
        last, pos = logits[jnp.arange(b), lengths - 1], jnp.asarray(lengths)
        key, generated = jax.random.key(sampling.seed), []
        for t in range(new):
            if sampling.temperature == 0:
                nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
            else:
                nxt = jax.random.categorical(jax.random.fold_in(key, t), last / sampling.temperature).astype(jnp.int32)
            generated.append(np.asarray(nxt))
            logits, cache = step(params, nxt[:, None], pos[:, None], cache, pos)
            last, pos = logits[:, 0], pos + 1
        generated = np.stack(generated, axis=1).tolist()
        out = []
        for i in range(len(prompts)):
            row = []
            for j in range(n):
                ids = generated[i * n + j]
                finish = "stop" if tok.eos_token_id in ids else "length"
                ids = ids[: ids.index(tok.eos_token_id)] if finish == "stop" else ids
                row.append(Completion(i, j, ids, tok.decode(ids, skip_special_tokens=True), finish))
            out.append(row)
        return out

    return generate


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("student")
    model = init_model(tiny_llama(vocab_size=len(tok)), seed=0)
    export_hf_checkpoint(model, path)
    tok.save_pretrained(str(path))
    return path


def _write_math500(path, n=3):
    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i), "solution": f"$\\boxed{{{2 * i}}}$",
             "subject": "Algebra", "level": 1 + i % 2, "unique_id": f"test/algebra/{i}.json"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_eval_with_tiny_student(tmp_path, student_dir, capsys):
    # The whole command: config -> local benchmark file -> checkpoint + tokenizer from disk -> the JetStream
    # rollout backend -> grading -> files.
    _write_math500(tmp_path / "math500.jsonl")
    out = tmp_path / "eval"
    argv = ["eval", "--config=configs/eval_tiny.py", f"--config.model.path={student_dir}",
            f"--config.eval.paths.math500={tmp_path / 'math500.jsonl'}", f"--config.eval.out_dir={out}",
            "--config.eval.limit=2", "--config.mesh.fsdp=1", "--config.mesh.data=-1"]
    assert cli.main(argv + ["--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["benchmarks"] == {"math500": 2}
    assert not out.exists()
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["math500"]["n"] == 2 and summary["model"] == str(student_dir)
    assert set(summary["benchmarks"]["math500"]) >= {"pass@1", "avg@2", "pass@2", "by_subject", "by_level"}
    records = [json.loads(l) for l in (out / "math500.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["math500/test/algebra/0.json", "math500/test/algebra/1.json"]
    assert all(len(r["samples"]) == 2 and r["greedy"]["finish_reason"] in ("stop", "length") for r in records)
    assert any(r["greedy"]["response"] for r in records)  # the random student really produced text
    assert "math500" in capsys.readouterr().out


def test_cli_eval_offline_without_paths_says_what_to_pass(tmp_path, monkeypatch, capsys):
    from stat_jax.data.math_datasets import DatasetError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # stat_jax.cli ends the command with the error's one line and its exit status (no traceback).
    assert cli.main(["eval", "--config=configs/eval_tiny.py", "--config.eval.benchmarks=aime24",
                     "--dry-run"]) == DatasetError.exit_code
    assert "--config.eval.paths.aime24=" in capsys.readouterr().err


def test_out_dir_defaults_from_config(tmp_path, tok, pool):
    from stat_jax.config import load_config_file

    config = load_config_file("configs/eval_tiny.py")
    config.workdir = str(tmp_path / "run")
    config.eval.update(dict(num_samples=0, chunk_size=8))
    evaluate(ScriptedGenerator(), {"toy": PROBLEMS}, tok, config, pool=pool, print_table=False)
    assert json.loads((tmp_path / "run/eval/toy.summary.json").read_text())["pass@1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="pass out_dir="):
        evaluate(ScriptedGenerator(), {"toy": PROBLEMS}, tok, SETTINGS, pool=pool)
