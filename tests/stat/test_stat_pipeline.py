"""The STAT pipeline from skills to the STAT-Sel and STAT-Syn files, with the real google-genai client talking
to a fake Gemini server (scripted teacher) and a scripted student, on a small MATH-like fixture."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from stat_jax.config import load_config_file
from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.rollout.base import Completion, RolloutBackend
from stat_jax.stat import io
from stat_jax.stat.pipeline import STAGE_NAMES, run_pipeline
from stat_jax.teacher.base import BudgetExceeded
from tests.teacher.fake_gemini import FakeGemini, prompt_of, task_of

KEY = "fixture-key-42"
OPS = {"+": "integer_addition", "\\times": "multiplication", "-": "subtraction"}
EXPR = re.compile(r"Compute \$([^$]+)\$\.")


def _value(expr: str) -> int:
    clean = expr.replace("\\times", "*")
    assert re.fullmatch(r"[\d\s+\-*()]+", clean), expr
    return int(eval(clean))  # digits and + - * ( ) only, checked above


def _skills_of(expr: str) -> list[str]:
    return [name for op, name in OPS.items() if op in expr]


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _question(prompt: str) -> str:
    return EXPR.findall(prompt)[0]


# ----- fixture -------------------------------------------------------------------------------------------------
def _row(expr: str, subject: str) -> dict:
    return {"problem": f"Compute ${expr}$.", "solution": f"${expr} = {_value(expr)}$, so the answer is "
            f"$\\boxed{{{_value(expr)}}}$.", "type": subject, "level": "Level 1"}


def write_fixture(tmp_path):
    train = [_row(f"{a} + {a + 3}", "Prealgebra") for a in range(2, 9)]
    train += [_row(f"{a} - {a // 2}", "Prealgebra") for a in range(10, 17)]
    train += [_row(f"{a} \\times {a + 1}", "Algebra") for a in range(2, 8)]
    train += [_row(f"({a} + 1) \\times {a}", "Algebra") for a in range(3, 6)]
    heldout = [_row(f"{a} + {a}", "Prealgebra") for a in range(20, 23)]
    heldout += [_row(f"{a} - 7", "Prealgebra") for a in range(30, 33)]
    heldout += [_row(f"{a} \\times 3", "Algebra") for a in range(40, 42)]
    paths = {}
    for name, rows in (("train", train), ("heldout", heldout)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths, train, heldout


# ----- scripted teacher (answers from the request body, as an LLM would from the prompt) -------------------------
def syn_wrong_offsets(question: str) -> dict[int, int]:
    """Which teacher solution samples of a synthesized question are wrong, and by how much."""
    return {0: {1: 1, 2: 2}, 1: {2: 5}}.get(_h(question) % 3, {})


def teacher_answer(body: dict) -> dict:
    prompt, task = prompt_of(body), task_of(body)
    schema = body["generationConfig"]["responseJsonSchema"]
    if task == "propose_skills":
        expr = _question(prompt)
        skills = [{"name": n.replace("_", " ").title(), "description": f"apply {n}"} for n in _skills_of(expr)]
        if "+" in expr and _h(expr) % 2:
            skills.append({"name": "carrying", "description": "carry digits"})
        return {"skills": skills}
    if task == "merge_skills":
        names = re.findall(r"^- (\w+) \(x\d+\)", prompt, flags=re.M)
        merged = [{"name": n, "description": f"the skill {n}", "merged_from": [n]} for n in names if n != "carrying"]
        for m in merged:
            if m["name"] == "integer_addition" and "carrying" in names:
                m["merged_from"].append("carrying")
        return {"skills": merged}
    if task == "label_skills":
        allowed = {n.split(":")[1]: n for n in schema["properties"]["skills"]["items"]["enum"]}
        return {"skills": [allowed[s] for s in _skills_of(_question(prompt)) if s in allowed]}
    if task == "diagnose":
        named = schema["anyOf"][0]["properties"]["missing_skills"]
        allowed = {n.split(":")[1]: n for n in named["items"]["enum"]}
        skills = [allowed[s] for s in _skills_of(_question(prompt))]
        if "\\times" in _question(prompt):
            return {"missing_skills": [], "none_missing_reason": "every step of this answer is right"}
        if "previous answer was rejected" not in prompt:
            return {"missing_skills": skills, "explanation": "wrong step"}  # one name: the client must re-ask
        return {"missing_skills": skills + [n for n in allowed.values() if n not in skills][:1],
                "explanation": "wrong step, and the skill it needs"}
    if task == "synthesize":
        skill = re.search(r"^Skill: (\w+)", prompt, flags=re.M).group(1)
        op = {v: k for k, v in OPS.items()}[skill]
        base = _h(prompt) % 50 + 10
        return {"problems": [{"problem": f"Compute ${base + 7 * j} {op} {j + 2}$. (new)"} for j in range(2)]}
    if task == "solve":
        expr = _question(prompt)
        sample = body["generationConfig"].get("seed", 0)
        # Synthesized questions get scripted slips; dataset questions are always solved right.
        value = _value(expr) + (syn_wrong_offsets(expr).get(sample, 0) if "(new)" in prompt else 0)
        return {"solution": f"${expr} = {value}$. \\boxed{{{value}}}", "answer": str(value)}
    raise AssertionError(f"unexpected task {task!r}")


class ScriptedStudent(RolloutBackend):
    """Always right on addition, always wrong on subtraction, right on multiplication in sample 0 only."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, sampling, n=1, *, progress=True):
        self.calls += 1
        out = []
        for i, prompt in enumerate(prompts):
            expr = _question(prompt)
            samples = []
            for j in range(n):
                right = "+" in expr or ("\\times" in expr and j == 0)
                value = _value(expr) + (0 if right else 1)
                text = f"I think it is \\boxed{{{value}}}"
                samples.append(Completion(i, j, list(range(len(text))), text, "stop"))
            out.append(samples)
        return out


def make_config(tmp_path, paths, run_name, **teacher):
    c = load_config_file("configs/base.py")
    c.workdir = str(tmp_path / run_name)
    c.stat.train_benchmark, c.stat.train_source = "math_train", str(paths["train"])
    c.stat.heldout_benchmark, c.stat.heldout_source = "math", str(paths["heldout"])
    c.stat.heldout_size = 0  # the fixture's 8 held-out questions are the whole profiling set (no split)
    c.stat.stages = ("data", "skills", "label", "rollout", "hard", "diagnose", "profile", "sel", "syn")
    c.stat.skills_sample_per_subject = 0
    c.stat.rollout_samples = 3
    c.stat.scorer = "accuracy"  # the hard questions below are the ones the fake student gets wrong
    c.stat.num_hard = 4
    c.stat.grade_workers = 0
    c.stat.sel_questions_per_skill = 2
    c.stat.sel_answers_per_question = 3
    c.stat.sel_target_size = 20
    c.teacher.model = "gemini-fake"
    c.teacher.max_workers = 4
    c.teacher.backoff_initial_s = 0.001
    c.teacher.backoff_max_s = 0.01
    for k, v in teacher.items():
        c.teacher[k] = v
    return c


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    with FakeGemini(teacher_answer, api_key=KEY) as server:
        yield server


def run(config, fake, **kw):
    config.teacher.base_url = fake.base_url
    return run_pipeline(config, teacher_backend=None, rollout_backend=ScriptedStudent(),
                        tokenizer=build_char_tokenizer(), **kw)


def test_pipeline_end_to_end_then_cached_rerun(tmp_path, fake):
    paths, train, heldout = write_fixture(tmp_path)
    config = make_config(tmp_path, paths, "run")
    assert set(run(config, fake).values()) == {"done"}
    rd = tmp_path / "run" / "stat"

    catalog = io.read_json(rd / "skills/catalog.json")
    # Names qualified by subject: both subjects have an integer_addition, and they stay two skills.
    assert {s["name"] for s in catalog["Prealgebra"]} == {"prealgebra:integer_addition", "prealgebra:subtraction"}
    assert {s["name"] for s in catalog["Algebra"]} == {"algebra:integer_addition", "algebra:multiplication"}
    assert fake.count("propose_skills") == len(train)  # skills named for every training question (sample 0 = all)
    labelled = io.read_jsonl(rd / "label/skill_map.jsonl")
    assert [r["skills"] for r in labelled] == [[f"{r['subject'].lower()}:{n}" for n in
                                                _skills_of(_question(r["problem"]))] for r in labelled]

    hard = io.read_jsonl(rd / "hard/hard.jsonl")
    # 3 subtraction questions (accuracy 0) first, then one of the multiplication ones (1/3); no addition.
    assert [round(r["score"], 3) for r in hard] == [0, 0, 0, 0.333]
    assert all("-" in r["problem"] for r in hard[:3]) and "\\times" in hard[3]["problem"]
    assert "\\boxed" in hard[3]["response"] and hard[3]["response_index"] != 0  # a wrong sample is diagnosed

    # Each subtraction question's first answer names one skill (malformed: the schema wants 2-3) and is re-asked;
    # the multiplication one is an explicit "none missing" with its reason, not an empty list.
    diagnoses = io.read_jsonl(rd / "diagnose/diagnoses.jsonl")
    assert [d["missing_skills"] for d in diagnoses[:3]] == [["prealgebra:subtraction", "prealgebra:integer_addition"]] * 3
    assert diagnoses[3]["none_missing"] and diagnoses[3]["missing_skills"] == [] and diagnoses[3]["explanation"]
    profile = io.read_json(rd / "profile/profile.json")
    assert [(s["skill"], s["count"]) for s in profile["skills"]] == [("prealgebra:integer_addition", 3),
                                                                   ("prealgebra:subtraction", 3)]
    assert profile["num_none_missing"] == 1
    assert (rd / "profile/profile.png").read_bytes()[:4] == b"\x89PNG"

    sel = io.read_jsonl(rd / "sel/stat_sel.jsonl")
    stats = io.read_json(rd / "sel/stats.json")
    # 6 (hard, skill) pairs x 2 questions x 3 teacher answers (the paper's default) = 36 slots, subsampled to 20.
    assert stats["answer_slots"] == 36 and stats["after_subsample"] == 20 and len(sel) == 20
    assert {e["meta"]["answer_source"] for e in sel} <= {"teacher:0", "teacher:1", "teacher:2"}
    assert stats["answer_filter"] == "none" and not stats["uses_reference_labels"]
    assert {e["meta"]["skill"] for e in sel} == {"prealgebra:subtraction", "prealgebra:integer_addition"}
    # Prealgebra's integer_addition pools Prealgebra questions only (Algebra's "(a + 1) \times a" has one too).
    assert not any("\\times" in e["messages"][-1]["content"] for e in sel)
    assert all(e["messages"][-1]["role"] == "user" and "\\boxed" in e["response"] for e in sel)

    questions = io.read_jsonl(rd / "syn/questions.jsonl")
    assert len(questions) == 6 * 2
    for q in questions:
        wrong = syn_wrong_offsets(_question(q["problem"]))
        assert q["kept"] == (len(wrong) < 2)
        assert q["kept_solutions"] == ([k for k in range(3) if k not in wrong] if q["kept"] else [])
    syn = io.read_jsonl(rd / "syn/stat_syn.jsonl")
    assert len(syn) == sum(len(q["kept_solutions"]) for q in questions)
    assert all(str(_value(_question(e["messages"][-1]["content"]))) == e["meta"]["answer"] for e in syn)

    paid = fake.count()
    assert fake.count("diagnose") == 3 * 2 + 1 and fake.count("merge_skills") == 2
    # A second run: every stage up to date, not a single request.
    assert set(run(make_config(tmp_path, paths, "run"), fake).values()) == {"skipped"}
    assert fake.count() == paid
    # A forced re-run of teacher stages is served by the cache.
    assert run(make_config(tmp_path, paths, "run"), fake, only="skills,diagnose,syn", force=True) == {
        "skills": "done", "diagnose": "done", "syn": "done"}
    assert fake.count() == paid
    assert io.read_jsonl(rd / "syn/stat_syn.jsonl") == syn
    ledger = (rd / "teacher/ledger.jsonl").read_text()
    assert KEY not in ledger and KEY not in "".join(p.read_text() for p in rd.rglob("*.json"))


def test_budget_stop_then_resume_pays_each_call_once(tmp_path, fake):
    paths, _, _ = write_fixture(tmp_path)
    with pytest.raises(BudgetExceeded):
        run(make_config(tmp_path, paths, "budget", max_calls=30), fake)
    assert fake.count() == 30
    manifests = {p.parent.name for p in (tmp_path / "budget" / "stat").glob("*/manifest.json")}
    assert manifests < set(STAGE_NAMES) and "syn" not in manifests
    results = run(make_config(tmp_path, paths, "budget", max_calls=0), fake)
    assert results["syn"] == "done"
    sent = [(prompt_of(r["body"]), r["body"]["generationConfig"].get("seed")) for r in fake.requests]
    assert len(sent) == len(set(sent))  # no request was paid twice
    # Same data as an uninterrupted run.
    clean = make_config(tmp_path, paths, "clean")
    run(clean, fake)
    for name in ("sel/stat_sel.jsonl", "syn/stat_syn.jsonl", "profile/profile.json"):
        assert (tmp_path / "budget/stat" / name).read_text() == (tmp_path / "clean/stat" / name).read_text()


def test_only_runs_one_stage_and_needs_its_inputs(tmp_path, fake):
    paths, _, _ = write_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="diagnose/diagnoses.jsonl"):
        run(make_config(tmp_path, paths, "only"), fake, only="profile")
    assert fake.count() == 0


def test_run_command_only_profile_and_budget_exit_code(tmp_path, fake, capsys):
    import argparse

    from stat_jax.errors import EXIT_BUDGET
    from stat_jax.stat.pipeline import main

    paths, _, _ = write_fixture(tmp_path)
    config = make_config(tmp_path, paths, "cli", max_calls=5)
    config.teacher.base_url = fake.base_url
    config.stat.stages = ("data", "skills")
    # The command cannot inject a student, so run only teacher stages through it.
    # The command raises it; stat_jax.cli turns it into one line and exit status EXIT_BUDGET (tests/test_cli_errors.py).
    with pytest.raises(BudgetExceeded, match="raise it and re-run with --resume"):
        main(config, argparse.Namespace(only=None, resume=True, dry_run=False))
    assert BudgetExceeded.exit_code == EXIT_BUDGET
    run(make_config(tmp_path, paths, "cli"), fake)
    profile = tmp_path / "cli/stat/profile/profile.json"
    before = profile.stat().st_mtime_ns
    config = make_config(tmp_path, paths, "cli")
    config.teacher.base_url = fake.base_url
    assert main(config, argparse.Namespace(only="profile", resume=True, dry_run=False)) == 0
    assert profile.stat().st_mtime_ns != before  # --only re-runs the named stage
    assert '"profile": "done"' in capsys.readouterr().out


def test_a_missing_input_names_the_pipeline_order_for_its_own_stages_only(tmp_path):
    from stat_jax import errors
    from stat_jax.stat import pipeline

    ctx = pipeline.StageContext(None, tmp_path)
    math_hard = next(s for s in pipeline.STAGES if s.name == "math_hard")
    with pytest.raises(errors.RunStateMissingError, match=r"needs \['data/train.jsonl'\] .*\(order: data, skills"):
        pipeline.run_stage(math_hard, ctx)
    # A demo step that shares a stage's name is not that stage: no pipeline order to follow.
    step = pipeline.Stage("data", lambda _ctx: None, ("data/original_mix.jsonl",), (), ())
    with pytest.raises(errors.RunStateMissingError) as e:
        pipeline.run_stage(step, ctx)
    assert "order:" not in str(e.value)
