"""Helpers of the real-student tests: the real benchmark files read in place, torch on one thread."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The real benchmark files (see ../shared/data/PROVENANCE.md), read in place, never copied into the repository.
DATA = Path(os.environ.get("STAT_JAX_SHARED_DATA", REPO.parent / "shared" / "data"))


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: real benchmark file missing; the real-student tests read "
                                f"../shared/data (or $STAT_JAX_SHARED_DATA), see its PROVENANCE.md")
    return path


def real_rows(benchmark: str, file: str, n: int, on_bad_row: str = "error"):
    """The first n MathProblems of a real file, through the package's benchmark loader."""
    from stat_jax.data.math_datasets import load_benchmark

    return load_benchmark(benchmark, str(data_file(file)), limit=n, on_bad_row=on_bad_row)


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread for the block: on a shared 2-core machine, two torch threads contending with XLA's
    pool measured 3-4x slower than one (a 4x100-token forward of the 135M student: 10-16 s vs 3 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
