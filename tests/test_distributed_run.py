"""`stat-jax run` on a multi-process mesh: 2 local CPU processes x 4 fake devices joined by jax.distributed on
127.0.0.1 go through every stage with the real google-genai client against the fake Gemini server. Process 0
alone asks the teacher and writes the stage files; they equal those of this single process on 8 devices."""

import numpy as np

from tests.stat.test_stat_pipeline import fake  # noqa: F401  (a fixture)
from tests.test_distributed_generation import PROCESSES, start_processes, tail, wait_all
from tests.train.sft_fixtures import make_student


# 34 s on the idle 2-core machine (190 s when it was shared and loaded), most of it two processes compiling
def test_two_process_rollout_stage_writes_the_single_process_responses_once(tmp_path, fake):
    """`stat-jax run` of the data and rollout stages on 2 processes: process 1 waits for the data stage, both
    generate the same chunks, and process 0 alone appends them to the partial file and writes the responses,
    equal to one 8-device process's."""
    from stat_jax.stat import io
    from tests.stat.test_stat_pipeline import write_fixture
    from tests.stat.test_stat_run_e2e import _overrides, stat_run

    paths, _, heldout = write_fixture(tmp_path)
    student = make_student(tmp_path / "student")
    # Two chunks of 4 questions: the partial file is appended to twice.
    overrides = dict(_overrides(tmp_path, paths, student, fake), **{"stat.stages": "data,rollout",
                                                                    "stat.rollout_chunk_size": "4"})
    multi = dict(overrides, workdir=str(tmp_path / "multi"))
    logs = [tmp_path / f"process-{i}.log" for i in range(PROCESSES)]
    procs = start_processes("run", lambda i: ["--config=configs/base.py", *(f"--config.{k}={v}" for k, v in
                                                                           multi.items())], logs)
    try:
        assert stat_run(dict(overrides, workdir=str(tmp_path / "single"))) == 0
    finally:
        codes = wait_all(procs, logs, timeout=400)
    assert codes == [0] * PROCESSES, tail(logs)
    assert '"data": "waited"' in logs[1].read_text() and '"rollout": "done"' in logs[1].read_text()
    rd, single_rd = tmp_path / "multi/stat", tmp_path / "single/stat"
    responses = io.read_jsonl(rd / "rollout/responses.jsonl")
    assert len(responses) == len(heldout) and all(len(r["responses"]) == 3 for r in responses)
    assert any(text for r in responses for text in r["responses"])  # the random student wrote something
    assert (rd / "rollout/responses.jsonl").read_text() == (single_rd / "rollout/responses.jsonl").read_text()
    partial = rd / "rollout/partial.jsonl"
    assert [r["id"] for r in io.read_jsonl(partial)] == [r["id"] for r in responses]  # each row once
    assert io.read_json(rd / "rollout/manifest.json")["stage"] == "rollout"
    assert fake.count() == 0  # neither stage asks the teacher


# 65 s on the idle 2-core machine (415 s when it was shared and loaded)
def test_two_process_stat_run_gives_the_single_process_stage_outputs_and_asks_the_teacher_once(tmp_path, fake):
    """`stat-jax run`, every stage, on 2 processes with the fake Gemini server: the teacher is asked by process 0
    only (each call once in the ledger), and the stage outputs equal those of one 8-device process."""
    from stat_jax.stat import io
    from stat_jax.stat.pipeline import STAGE_NAMES
    from tests.stat.test_stat_pipeline import write_fixture
    from tests.stat.test_stat_run_e2e import _overrides, stat_run

    paths, _, _ = write_fixture(tmp_path)
    student = make_student(tmp_path / "student")
    overrides = _overrides(tmp_path, paths, student, fake)
    multi = dict(overrides, workdir=str(tmp_path / "multi"))
    argv = [f"--config.{k}={v}" for k, v in multi.items()]
    logs = [tmp_path / f"process-{i}.log" for i in range(PROCESSES)]
    procs = start_processes("run", lambda i: ["--config=configs/base.py", *argv], logs)
    codes = wait_all(procs, logs, timeout=1500)
    assert codes == [0] * PROCESSES, tail(logs)
    multi_calls = fake.count()
    ledger = io.read_jsonl(tmp_path / "multi/stat/teacher/ledger.jsonl")
    assert multi_calls > 0 and len(ledger) == multi_calls  # every request the server saw, logged once
    assert "HTTP Request: POST" in logs[0].read_text() and "HTTP Request: POST" not in logs[1].read_text()

    single = dict(overrides, workdir=str(tmp_path / "single"))
    assert stat_run(single) == 0
    # The same calls as one process makes. Counted by key, not by request: the teacher client sends two identical
    # requests that are in flight at once both (6 or 7 of ~126 here, single-process too, as threads happen to run).
    single_ledger = io.read_jsonl(tmp_path / "single/stat/teacher/ledger.jsonl")
    assert {(r["task"], r["key"]) for r in ledger} == {(r["task"], r["key"]) for r in single_ledger}
    for process in (0, 1):
        assert '"eval_grpo": "' in logs[process].read_text()  # both went through every stage
    for rel in ("data/train.jsonl", "data/heldout.jsonl", "skills/catalog.json", "label/skill_map.jsonl",
                "rollout/responses.jsonl", "hard/hard.jsonl", "diagnose/diagnoses.jsonl", "profile/profile.json",
                "sel/stat_sel.jsonl", "eval/math500.jsonl", "eval_grpo/math500.jsonl"):
        assert (tmp_path / "multi/stat" / rel).read_text() == (tmp_path / "single/stat" / rel).read_text(), rel
    for name in STAGE_NAMES:
        assert io.read_json(tmp_path / "multi/stat" / name / "manifest.json")["stage"] == name
    for rel in ("sft/metrics.jsonl", "grpo/metrics.jsonl"):
        a, b = io.read_jsonl(tmp_path / "multi/stat" / rel), io.read_jsonl(tmp_path / "single/stat" / rel)
        assert [m["step"] for m in a] == [m["step"] for m in b]
        np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=1e-4, err_msg=rel)
