"""The offline teacher: the Gemini teacher's jobs for the demo task, through the shared client."""

import collections
import json

import pytest

from stat_jax.data import arith_task as task
from stat_jax.teacher.offline import OfflineTeacher, diagnose_steps
from stat_jax.teacher import prompts
from stat_jax.teacher.base import TeacherError
from stat_jax.teacher.client import TeacherClient

PROBLEM = "Ann has 87. She loses 9. Then 2 times that. Split in 5: each?"  # 87-9=78, 78*2=156, 156/5=31 r1
CATALOG = task.skill_catalog()


def _client(tmp_path, **kw):
    return TeacherClient(OfflineTeacher(**kw), cache_dir=tmp_path / "cache", ledger_path=tmp_path / "ledger.jsonl")


def test_reference_is_what_the_task_computes():
    assert [s.text for s in task.reference_steps(PROBLEM)] == ["87-9=78", "78*2=156", "156/5=31 r1"]


@pytest.mark.parametrize("response, missing", [
    ("87-9=78\n78*2=156\n156/5=31 r1\n\\boxed{31}", []),
    ("87-9=88\n88*2=176\n176/5=35 r1\n\\boxed{35}", ["borrow_subtraction"]),  # later steps right on its own value
    ("87-9=78\n78*2=146\n146/5=29 r1\n\\boxed{29}", ["multiply_by_digit"]),
    ("87-9=78\n78*2=156\n156/5=30 r6\n\\boxed{30}", ["division_remainder"]),
    ("87-9=78\n78*2=156\n\\boxed{156}", ["division_remainder"]),  # skipped the last step
    ("87-9=78\n78+2=80\n80/5=15 r5\n\\boxed{15}", ["multiply_by_digit", "division_remainder"]),
    ("87-9=78\n78*2=156\n156/5=31 r1\n\\boxed{7}", ["division_remainder"]),  # boxed the wrong number
])
def test_diagnosis_finds_the_injected_skill_error(response, missing):
    assert diagnose_steps(PROBLEM, response) == missing


def test_jobs_through_the_client_follow_the_schemas(tmp_path):
    client = _client(tmp_path, solution_slip_rate=0.0)
    problems = task.make_splits(0, {"train": 30})["train"]
    proposed = client.ask_many([prompts.propose_skills(p.problem, p.solution, p.subject) for p in problems])
    for p, answer in zip(problems, proposed):
        assert [s["name"] for s in answer["skills"]] == list(dict.fromkeys(p.skills))
    listed = [{"name": n, "description": "", "count": 1} for n in task.SKILL_NAMES]
    merged = client.ask(prompts.merge_skills(task.SUBJECT, listed))
    assert [s["name"] for s in merged["skills"]] == list(task.SKILL_NAMES)
    labels = client.ask(prompts.label_skills(PROBLEM, None, task.SUBJECT, CATALOG))
    assert labels["skills"] == ["borrow_subtraction", "multiply_by_digit", "division_remainder"]
    diag = client.ask(prompts.diagnose(PROBLEM, None, "31", "87-9=78\n78*2=146\n146/5=29 r1\n\\boxed{29}",
                                       task.SUBJECT, CATALOG))
    # The wrong step's skill first, then the next step's: the diagnosis schema asks for 2-3 skills (PAPER.md).
    assert diag["missing_skills"] == ["multiply_by_digit", "division_remainder"]
    right = client.ask(prompts.diagnose(PROBLEM, None, "31", "87-9=78\n78*2=156\n156/5=31 r1\n\\boxed{31}",
                                        task.SUBJECT, CATALOG))
    assert right["missing_skills"] == [] and right["none_missing_reason"]  # said explicitly, with a reason
    only = client.ask(prompts.diagnose(PROBLEM, None, "31", "87-9=78\n78*2=146\n146/5=29 r1\n\\boxed{29}",
                                       task.SUBJECT, CATALOG, min_skills=1))
    assert only["missing_skills"] == ["multiply_by_digit"]  # stat.diagnose_min_skills=1: the wrong step alone
    new = client.ask(prompts.synthesize("percent", "", [{"problem": PROBLEM}], task.SUBJECT, n=2))
    assert len(new["problems"]) == 2
    assert all("percent" in task.problem_skills(q["problem"]) for q in new["problems"])
    solved = client.ask(prompts.solve(PROBLEM, task.SUBJECT))
    assert solved["answer"] == "31" and solved["solution"].endswith("\\boxed{31}")
    # Everything went through the shared cache and ledger: a second client answers from the cache for free.
    ledger_rows = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert len(ledger_rows) == len(problems) + 7
    again = _client(tmp_path, solution_slip_rate=0.0)
    assert again.ask(prompts.solve(PROBLEM, task.SUBJECT)) == solved and again.cache_hits == 1
    assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == len(ledger_rows)


def test_solution_noise_trips_the_consistency_filter_at_the_configured_rate(tmp_path):
    rate = 0.3
    client = _client(tmp_path, solution_slip_rate=rate)
    problems = task.make_splits(1, {"train": 120})["train"]
    requests = [prompts.solve(p.problem, task.SUBJECT, sample_index=k) for p in problems for k in range(3)]
    answers = client.ask_many(requests)
    wrong = sum(a["answer"] != p.answer for a, p in zip(answers, [p for p in problems for _ in range(3)]))
    assert abs(wrong / len(answers) - rate) < 0.08
    rejected = kept_wrong = 0
    for i, p in enumerate(problems):
        votes = collections.Counter(a["answer"] for a in answers[3 * i: 3 * i + 3])
        top, count = votes.most_common(1)[0]
        rejected += count < 2
        kept_wrong += count >= 2 and top != p.answer  # two slips can agree on a small answer (e.g. a remainder)
    assert rejected > 0  # noise gives the >=2-agree filter real work ...
    assert kept_wrong / (len(problems) - rejected) < rate / 3  # ... and it removes most of the noise
    clean = _client(tmp_path / "clean", solution_slip_rate=0.0)
    assert all(a["answer"] == p.answer for a, p in zip(
        clean.ask_many([prompts.solve(p.problem) for p in problems]), problems))  # ... and none without it


def test_slipped_solution_is_consistent_with_its_own_slip(tmp_path):
    teacher = OfflineTeacher(solution_slip_rate=1.0)
    answer = json.loads(teacher.complete(prompts.solve(PROBLEM, sample_index=2)).text)
    # A slip can leave the final answer as it was (157/5 and 156/5 both give 31), never the solution.
    assert answer["solution"] != "87-9=78\n78*2=156\n156/5=31 r1\n\\boxed{31}"
    assert answer["solution"].endswith(f"\\boxed{{{answer['answer']}}}")
    assert diagnose_steps(PROBLEM, answer["solution"])  # a slip is a detectable step error


def test_bad_requests_fail_clearly():
    teacher = OfflineTeacher()
    with pytest.raises(TeacherError, match="unknown task 'poem'"):
        teacher.complete(prompts.solve(PROBLEM).__class__("poem", "", {}, {}))
    with pytest.raises(TeacherError, match="cannot read"):
        teacher.complete(prompts.solve("Ann has 3. She sings."))
    with pytest.raises(TeacherError, match="no payload key 'response'"):
        teacher.complete(prompts.solve(PROBLEM).__class__("diagnose", "", {}, {"problem": PROBLEM}))
