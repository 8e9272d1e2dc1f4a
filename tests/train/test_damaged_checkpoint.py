"""An orbax checkpoint directory cut short or damaged (issue 41): `stat-jax sft --resume` ends in one line with the
workdir status (9) and says what to do, without a traceback (orbax's concurrent reads would print one per array)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stat_jax import cli, errors


def _sft(student: Path, data: Path, workdir: Path, steps: int, *extra: str) -> int:
    return cli.main(["sft", "--config=configs/sft_tiny.py", f"--config.model.path={student}",
                     f"--config.data.train_files={data}", f"--config.workdir={workdir}",
                     f"--config.train.steps={steps}", "--config.train.checkpoint_every=2", *extra])


@pytest.fixture(scope="module")
def trained(student, tmp_path_factory) -> tuple[Path, Path]:
    """A 4-step run with checkpoints at steps 2 and 4, and its data."""
    root = tmp_path_factory.mktemp("damaged")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": f"\\boxed{{{i + 1}}}"}) + "\n"
                            for i in range(16)))
    assert _sft(student, data, root / "run", 4) == 0
    return root / "run", data


def _files(pattern: str):
    return lambda step: sorted(step.glob(pattern))


def _truncate_all(pattern: str):
    def apply(step: Path):
        files = [f for f in step.glob(pattern) if f.is_file()]
        assert files, pattern
        for f in files:
            f.write_bytes(f.read_bytes()[:10])
    return apply


def _delete(pattern: str):
    def apply(step: Path):
        paths = list(step.glob(pattern))
        assert paths, pattern
        for p in paths:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return apply


CASES = {
    "array-data-deleted": (_delete("state/ocdbt.process_0/d/*"), "damaged or was cut short"),
    "array-data-cut-short": (_truncate_all("state/ocdbt.process_0/d/*"), "damaged or was cut short"),
    "step-data-cut-short": (_truncate_all("state/d/*"), "damaged or was cut short"),
    "manifest-deleted": (_delete("state/manifest.ocdbt"), "damaged or was cut short"),
    "manifest-cut-short": (_truncate_all("state/manifest.ocdbt"), "damaged or was cut short"),
    "state-metadata-deleted": (_delete("state/_METADATA"), "_METADATA is missing"),
    "state-deleted": (_delete("state"), "no state/ directory"),
    "meta-deleted": (_delete("meta/metadata"), "meta/metadata is missing"),
    "meta-not-json": (lambda step: (step / "meta/metadata").write_text("{cut"), "not valid JSON"),
}


@pytest.mark.parametrize("case", CASES)
def test_resume_from_a_damaged_checkpoint_is_one_line(case, trained, student, tmp_path, capfd):
    run, data = trained
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    damage, fragment = CASES[case]
    damage(workdir / "checkpoints" / "4")
    capfd.readouterr()
    code = _sft(student, data, workdir, 6, "--resume")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    assert code == errors.EXIT_WORKDIR, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stat-jax sft: checkpoint ") and fragment in last, last
    assert f"delete {workdir / 'checkpoints' / '4'} to resume from step 2" in last, last
    assert not (workdir / "checkpoints" / "6").exists()  # nothing trained on top of a damaged state


def test_following_the_hint_resumes_from_the_step_before(trained, student, tmp_path, capfd):
    run, data = trained
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    _truncate_all("state/ocdbt.process_0/d/*")(workdir / "checkpoints" / "4")
    assert _sft(student, data, workdir, 6, "--resume") == errors.EXIT_WORKDIR
    shutil.rmtree(workdir / "checkpoints" / "4")
    assert _sft(student, data, workdir, 6, "--resume") == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("step", 0) > 2][-1] == 6
