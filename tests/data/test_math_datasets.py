"""Loaders read small files written here in each dataset's public schema; bad rows fail with file and line."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stat_jax.data import math_datasets as md
from stat_jax.data.math_datasets import DatasetError

MATH_ROWS = [  # EleutherAI/hendrycks_math schema
    {"problem": "What is $1+1$?", "level": "Level 1", "type": "Algebra",
     "solution": "We add: $1+1=\\boxed{2}$."},
    {"problem": "Simplify $\\frac{2}{4}$.", "level": "Level 2", "type": "Prealgebra",
     "solution": "First $\\boxed{3}$ is wrong; the answer is $\\boxed{\\frac{\\sqrt{1}}{2}}$."},
    {"problem": "How many ways?", "level": "Level 5", "type": "Counting & Probability",
     "solution": "There are $\\boxed 6$ ways."},
    {"problem": "Area?", "level": "Level ?", "type": "Geometry", "solution": "The area is \\fbox{\\{1,2\\}}."},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_math_jsonl_extracts_last_boxed_answer(tmp_path):
    problems = md.load_benchmark("math", _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS))
    assert [p.answer for p in problems] == ["2", "\\frac{\\sqrt{1}}{2}", "6", "\\{1,2\\}"]
    assert [p.level for p in problems] == ["Level 1", "Level 2", "Level 5", "Level ?"]
    assert problems[2].subject == "Counting & Probability"
    assert problems[0].solution == MATH_ROWS[0]["solution"]
    assert problems[0].id == "math/math.jsonl:0"
    assert len({p.id for p in problems}) == 4


def test_math_train_split_ids(tmp_path):
    problems = md.load_benchmark("math_train", _write_jsonl(tmp_path / "train.jsonl", MATH_ROWS), split="train")
    assert problems[0].id.startswith("math_train/") and problems[2].subject == "Counting & Probability"


def test_math_original_release_tree(tmp_path):
    for rel, row in [("test/algebra/1.json", MATH_ROWS[0]), ("test/geometry/7.json", MATH_ROWS[3])]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(row))
    problems = md.load_benchmark("math", str(tmp_path))
    assert [p.id for p in problems] == ["math/test/algebra/1.json", "math/test/geometry/7.json"]
    assert [p.answer for p in problems] == ["2", "\\{1,2\\}"]


def test_math500_jsonl(tmp_path):
    rows = [{"problem": "Convert $(0,3)$ to polar.", "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
             "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
             "unique_id": "test/precalculus/807.json"}]
    (p,) = md.load_benchmark("math500", _write_jsonl(tmp_path / "math500.jsonl", rows))
    assert (p.id, p.answer, p.subject, p.level) == (
        "math500/test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)", "Precalculus", "Level 2")
    assert p.source.endswith("math500.jsonl")


def test_gsm8k_parquet_strips_commas(tmp_path):
    rows = [{"question": "Natalia sold clips ...", "answer": "She sold 48/2 = <<48/2=24>>24 ...\n#### 1,072"},
            {"question": "Weng earns ...", "answer": "12/60 = 0.2\n#### -10"}]
    problems = md.load_benchmark("gsm8k", _write_parquet(tmp_path / "gsm8k.parquet", rows))
    assert [p.answer for p in problems] == ["1072", "-10"]
    assert problems[0].solution.endswith("#### 1,072")
    assert problems[1].id == "gsm8k/gsm8k.parquet:1"


def test_aime_and_amc_schemas(tmp_path):
    aime24 = [{"id": 60, "problem": "Every morning Aya ...", "solution": "...", "answer": "204",
               "url": "https://artofproblemsolving.com/...", "year": "2024"}]
    (tmp_path / "aime24.json").write_text(json.dumps(aime24))
    (p24,) = md.load_benchmark("aime24", str(tmp_path / "aime24.json"))
    assert (p24.id, p24.answer) == ("aime24/60", "204")

    aime25 = [{"id": "I-1", "problem": "Find the sum ...", "answer": 70}]
    (p25,) = md.load_benchmark("aime25", _write_jsonl(tmp_path / "aime25.jsonl", aime25))
    assert (p25.id, p25.answer) == ("aime25/I-1", "70")

    amc23 = [{"id": 0, "question": "Cities A and B ...", "answer": 27.0, "url": "..."},
             {"id": 1, "question": "Positive reals ...", "answer": 36.5, "url": "..."}]
    problems = md.load_benchmark("amc23", _write_parquet(tmp_path / "amc23.parquet", amc23))
    assert [(p.id, p.problem[:6], p.answer) for p in problems] == [
        ("amc23/0", "Cities", "27"), ("amc23/1", "Positi", "36.5")]


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MATH_ROWS[0]) + "\n\n" + '{"problem": "x", "solution": \n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:3: invalid JSON"):
        md.load_benchmark("math", str(path))


def test_missing_field_and_missing_box_name_the_line(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [MATH_ROWS[0], {"problem": "p", "solution": "no box"}])
    with pytest.raises(DatasetError, match=r"m\.jsonl:2: no complete \\boxed"):
        md.load_benchmark("math", path)
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "12"}])
    with pytest.raises(DatasetError, match=r"g\.jsonl:1: field 'answer' has no '#### <number>'"):
        md.load_benchmark("gsm8k", path)
    path = _write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "problem": "p"}])
    with pytest.raises(DatasetError, match=r"a\.jsonl:1: missing or empty field 'answer'.*keys \['id', 'problem'\]"):
        md.load_benchmark("aime24", path)


def test_bad_rows_skipped_with_a_count(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(MATH_ROWS[0]), "not json", json.dumps({"problem": "p", "solution": "s"}),
                               json.dumps(MATH_ROWS[1]), "[1, 2]"]) + "\n")
    with caplog.at_level(logging.WARNING):
        problems = md.load_benchmark("math", str(path), on_bad_row="skip")
    assert [p.answer for p in problems] == ["2", "\\frac{\\sqrt{1}}{2}"]
    assert "skipped 3 malformed rows" in caplog.text and "mixed.jsonl:2" in caplog.text


def test_json_list_item_error_and_duplicate_ids(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps([{"problem": "p", "answer": "1", "id": 1}, 7]))
    with pytest.raises(DatasetError, match=r"l\.json: item 1: expected a JSON object"):
        md.load_benchmark("amc23", str(tmp_path / "l.json"))
    (tmp_path / "d.json").write_text(json.dumps([{"problem": "p", "answer": "1", "id": 1}] * 2))
    with pytest.raises(DatasetError, match="duplicate problem id 'amc23/1'"):
        md.load_benchmark("amc23", str(tmp_path / "d.json"))


def test_offline_hub_error_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError) as e:
        md.load_benchmark("math500")
    msg = str(e.value)
    assert "HuggingFaceH4/MATH-500" in msg and "--config.eval.paths.math500=" in msg and "offline" in msg
    assert "problem, answer" in msg


def test_unknown_benchmark_and_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="unknown benchmark 'mathqa'.*math500"):
        md.load_benchmark("mathqa")
    with pytest.raises(DatasetError, match="nope.jsonl: no such file"):
        md.load_benchmark("aime24", str(tmp_path / "nope.jsonl"))


def test_limit(tmp_path):
    assert len(md.load_benchmark("math", _write_jsonl(tmp_path / "m.jsonl", MATH_ROWS), limit=2)) == 2
