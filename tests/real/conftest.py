"""Cheap session fixtures for the real-student tests: the student directory (built once, cached under .cache/),
its HF tokenizer and the HF torch model in float32 (helpers: tests/real/helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.*` imports under --import-mode=importlib
    sys.path.insert(0, str(REPO))

from tests.real_student import ensure_real_student  # noqa: E402


@pytest.fixture(scope="session")
def student_dir() -> Path:
    return ensure_real_student()


@pytest.fixture(scope="session")
def hf_tokenizer(student_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(student_dir))


@pytest.fixture(scope="session")
def hf_model(student_dir):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    return model.eval()
