"""`stat-jax run` through EVERY stage with the REAL student (SmolLM2-135M-Instruct) on real MATH rows, the teacher
being the real google-genai client against the fake Gemini server; the rollout stage's greedy answers equal
`transformers.generate`'s.

The command runs as a user would start it, in a subprocess, on one CPU device (so small batches are legal).
Small limits: 4 training questions, 4 held-out questions, short generations, 2 SFT steps, 1 GRPO step. The
teacher answers like an LLM would, from the prompt text: skills from the subject, labels and diagnoses from the
catalog the request offers, the dataset's own solutions for real questions, and scripted sums it can solve
for the questions it synthesizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.real.helpers import REPO, data_file, real_rows
from tests.teacher.fake_gemini import FakeGemini, prompt_of, task_of

KEY = "real-student-key-7"
NEW_TOKENS = 48
SYNTH = re.compile(r"What is (\d+) \+ (\d+)\?")
pytestmark = pytest.mark.slow  # minutes: SFT, GRPO and four rollout engines of a 135M model on CPU


def _slug(subject: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", subject.lower()).strip("_")


class RealTeacher:
    """Answers each task from the request body; `solutions` maps real problem text -> (solution, answer)."""

    def __init__(self, solutions: dict[str, tuple[str, str]]):
        self.solutions = solutions

    def __call__(self, body: dict) -> dict:
        prompt, task = prompt_of(body), task_of(body)
        schema = body["generationConfig"]["responseJsonSchema"]
        props = schema.get("properties") or schema["anyOf"][0]["properties"]  # diagnose: named skills, or none
        subject = re.search(r"^Subject: (.+)$", prompt, flags=re.M)
        subject = subject.group(1) if subject else "math"
        if task == "propose_skills":
            return {"skills": [{"name": f"{_slug(subject)}_reasoning", "description": f"reason about {subject}"},
                               {"name": "careful_arithmetic", "description": "compute without slips"}]}
        if task == "merge_skills":
            names = re.findall(r"^- (\w+) \(x\d+\)", prompt, flags=re.M)
            return {"skills": [{"name": n, "description": f"the skill {n}", "merged_from": [n]} for n in names]}
        if task == "label_skills":
            return {"skills": props["skills"]["items"]["enum"][:2]}
        if task == "diagnose":
            return {"missing_skills": props["missing_skills"]["items"]["enum"][:2], "explanation": "two slips"}
        if task == "synthesize":
            n = props["problems"]["minItems"]
            base = int(hashlib.sha256(prompt.encode()).hexdigest()[:6], 16) % 50 + 2
            return {"problems": [{"problem": f"What is {base + j} + {j + 3}?"} for j in range(n)]}
        if task == "solve":
            question = prompt.split("Question:\n", 1)[1].split("\n\nSolve the question", 1)[0]
            if question in self.solutions:
                solution, answer = self.solutions[question]
                return {"solution": solution, "answer": answer}
            a, b = map(int, SYNTH.search(question).groups())
            return {"solution": f"{a} + {b} = {a + b}, so the answer is $\\boxed{{{a + b}}}$.", "answer": str(a + b)}
        raise AssertionError(f"unexpected teacher task {task!r}")


def _one_train_row_per_subject(path: Path) -> Path:
    """The first real MATH train row of each of the 7 subjects, written where a user's file would be: held-out
    questions of a subject without training questions are left out of the profile (no skill catalog)."""
    rows, seen = [], set()
    with open(data_file("math_train.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["type"] not in seen and "\\boxed{}" not in row["solution"]:
                seen.add(row["type"])
                rows.append(row)
    assert len(rows) == 7
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(tmp_path: Path, student: Path, base_url: str) -> dict[str, str]:
    values = {
        "workdir": tmp_path / "run", "model.path": student, "model.dtype": "float32",
        "mesh.data": 1, "mesh.fsdp": 1,
        "stat.stages": "data,skills,label,rollout,hard,diagnose,profile,sel,syn,sft,eval,grpo,eval_grpo",
        "stat.train_benchmark": "math_train",
        "stat.train_source": _one_train_row_per_subject(tmp_path / "math_train_7.jsonl"), "stat.train_limit": 0, "stat.heldout_benchmark": "math", "stat.heldout_source": data_file("math_test.jsonl"),
        "stat.heldout_size": 4, "stat.skills_sample_per_subject": 0, "stat.rollout_samples": 1,
        "stat.scorer": "accuracy",  # one sample per question: the consistency rule needs >= 2
        "stat.rollout_temperature": 0.0, "stat.rollout_max_new_tokens": NEW_TOKENS, "stat.num_hard": 4,
        "stat.grade_workers": 0, "stat.sel_questions_per_skill": 2, "stat.sel_answers_per_question": 1,
        "stat.sel_answer_source": "teacher", "stat.sel_target_size": 4, "stat.syn_reference_questions": 1,
        "stat.syn_new_questions": 1, "stat.syn_solutions": 1, "stat.syn_min_agree": 1,
        "teacher.model": "gemini-fake", "teacher.base_url": base_url, "teacher.max_workers": 4,
        "teacher.backoff_initial_s": 0.001, "teacher.backoff_max_s": 0.01,
        "rollout.max_concurrent_decodes": 4, "rollout.max_prefill_length": 512, "rollout.max_target_length": 640,
        "eval.benchmarks": "math500", "eval.paths.math500": data_file("math500_test.jsonl"), "eval.limit": 2,
        "eval.max_new_tokens": NEW_TOKENS, "eval.grade_workers": 1,
        "data.max_length": 640, "train.steps": 2, "train.batch_size": 2, "train.learning_rate": 1e-5,
        "train.warmup_steps": 1, "train.async_checkpointing": False, "train.tensorboard": False,
        "train.memory_budget_gb": 8.0, "grpo.memory_budget_gb": 8.0,  # one CPU device holds the whole model
        "grpo.steps": 1, "grpo.prompts_per_step": 1, "grpo.num_generations": 2, "grpo.max_new_tokens": 16,
        "grpo.max_length": 640, "grpo.async_checkpointing": False, "grpo.learning_rate": 1e-6,
    }
    return {k: str(v) for k, v in values.items()}


def test_stat_run_every_stage_with_the_real_student(tmp_path, student_dir, hf_tokenizer, hf_model):
    from stat_jax.data.prompting import render_prompts
    from stat_jax.data.records import MathProblem
    from stat_jax.data.stop_tokens import stop_token_ids
    from stat_jax.stat import io
    from stat_jax.stat.pipeline import STAGE_NAMES
    from tests.real.test_real_parity import _hf_greedy

    # the released MATH train has one row without an answer (line 5530, an empty \boxed{}); the data stage skips it
    train = real_rows("math_train", "math_train.jsonl", 7500, on_bad_row="skip")
    solutions = {p.problem: (p.solution, p.answer) for p in train}
    solutions.update({p.problem: (p.solution, p.answer) for p in real_rows("math", "math_test.jsonl", 5000)})
    env = {**os.environ, "GEMINI_API_KEY": KEY, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(REPO)}
    with FakeGemini(RealTeacher(solutions), api_key=KEY) as fake:
        args = [f"--config.{k}={v}" for k, v in _overrides(tmp_path, student_dir, fake.base_url).items()]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "stat_jax.cli", "run", "--config=configs/base.py", *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
        seconds = time.perf_counter() - start
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        assert fake.count() > 0
    results = json.loads(proc.stdout[proc.stdout.rindex("{\n"):])
    assert results == {name: "done" for name in STAGE_NAMES}
    rd = tmp_path / "run" / "stat"

    # The rollout stage's greedy answers are transformers.generate's, token for token (compared as text).
    heldout = [MathProblem.from_dict(r) for r in io.read_jsonl(rd / "data/heldout.jsonl")]
    assert len(heldout) == 4
    rows = {r["id"]: r for r in io.read_jsonl(rd / "rollout/responses.jsonl")}
    prompts = render_prompts(hf_tokenizer, heldout)
    assert [rows[p.id]["prompt"] for p in heldout] == prompts
    responses = {k: r["responses"] for k, r in rows.items()}
    reference = _hf_greedy(hf_model, hf_tokenizer, prompts, stop_token_ids(hf_tokenizer, (2,)), NEW_TOKENS)
    for problem, ids in zip(heldout, reference):
        assert responses[problem.id] == [hf_tokenizer.decode(ids, skip_special_tokens=True)], problem.id

    sft_metrics = io.read_jsonl(rd / "sft/metrics.jsonl")
    assert [m["step"] for m in sft_metrics] == [1, 2]
    for name in ("eval", "eval_grpo"):
        assert io.read_json(rd / name / "summary.json")["benchmarks"]["math500"]["n"] == 2
    assert len(io.read_jsonl(rd / "grpo/metrics.jsonl")) == 1
    print(f"\nreal-student stat-jax run, all {len(STAGE_NAMES)} stages: {seconds:.0f} s")


def test_baseline_stages_then_sft_with_the_real_student(tmp_path, student_dir):
    """The paper's baselines (issue 16, item 5) as `stat-jax run` stages on the real student and real MATH rows:
    MATH-Train, MATH-Hard, Embed-Sel and Embed-Syn each write exactly the budget; Embed-Sel's neighbours are the
    ones transformers' mean-pooled hidden states of the same checkpoint pick; stat.method=embed_sel trains on that
    set and no other."""
    import numpy as np
    from safetensors.numpy import load_file

    from stat_jax.data.records import MathProblem
    from stat_jax.stat import baselines, io

    train = real_rows("math_train", "math_train.jsonl", 7500, on_bad_row="skip")
    solutions = {p.problem: (p.solution, p.answer) for p in train}
    env = {**os.environ, "GEMINI_API_KEY": KEY, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(REPO)}
    stages = "data,skills,label,rollout,hard,math_train,math_hard,embed_sel,embed_syn,sft"
    with FakeGemini(RealTeacher(solutions), api_key=KEY) as fake:
        values = {**_overrides(tmp_path, student_dir, fake.base_url), "stat.stages": stages,
                  "stat.method": "embed_sel", "stat.baseline_size": "5", "stat.embed_per_question": "2",
                  "stat.embed_syn_requests_per_question": "1", "stat.sel_answer_source": "dataset",
                  "stat.math_hard_top_levels": "2"}
        args = [f"--config.{k}={v}" for k, v in values.items()]
        proc = subprocess.run([sys.executable, "-m", "stat_jax.cli", "run", "--config=configs/base.py", *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(proc.stdout[proc.stdout.rindex("{\n"):])
    assert results == {name: "done" for name in stages.split(",")}
    rd = tmp_path / "run" / "stat"
    pool = {r["id"]: MathProblem.from_dict(r) for r in io.read_jsonl(rd / "data/train.jsonl")}
    sets = {m: io.read_jsonl(rd / f) for m, f in baselines.METHOD_FILES.items()}
    assert {m: len(rows) for m, rows in sets.items()} == {m: 5 for m in sets}  # stat.baseline_size
    # MATH-Train and MATH-Hard train on the dataset's own solutions; MATH-Hard only on the two hardest levels.
    levels = sorted({baselines.level_number(p.level) for p in pool.values()})[-2:]
    for method in ("math_train", "math_hard"):
        assert all(e["response"] == pool[e["meta"]["question_id"]].solution for e in sets[method])
    assert {baselines.level_number(pool[e["meta"]["question_id"]].level) for e in sets["math_hard"]} <= set(levels)
    # Embed-Sel: each difficult question's 2 nearest training questions by transformers' pooled hidden states.
    hard = [MathProblem.from_dict(r) for r in io.read_jsonl(rd / "hard/hard.jsonl")]
    assert hard
    ids = list(pool)
    vecs = baselines.encoder_embeddings(str(student_dir), [p.problem for p in hard] + [pool[i].problem for i in ids],
                                        batch_size=4, max_tokens=1024)
    nearest = baselines.nearest(vecs[:len(hard)], vecs[len(hard):], 2)
    expected = {(h.id, ids[j]) for h, row in zip(hard, nearest) for j in row}
    assert {(e["meta"]["hard_id"], e["meta"]["question_id"]) for e in sets["embed_sel"]} <= expected
    # Embed-Syn: new questions the teacher wrote from those neighbours, kept by agreement, with its solutions.
    for e in sets["embed_syn"]:
        a, b = map(int, SYNTH.search(e["messages"][-1]["content"]).groups())
        assert e["meta"]["method"] == "embed-syn" and f"$\\boxed{{{a + b}}}$" in e["response"], e
    # stat.method=embed_sel: the sft stage read Embed-Sel's set, and trained the real student.
    assert io.read_json(rd / "sft/manifest.json")["inputs"].keys() == {baselines.METHOD_FILES["embed_sel"]}
    base = load_file(str(next(Path(student_dir).glob("*.safetensors"))))
    trained_dir = Path(io.read_json(rd / "sft/done.json")["model"])
    trained = {k: v for f in trained_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert any(not np.array_equal(base[k], trained[k]) for k in base if k in trained)
