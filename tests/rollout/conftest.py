"""A tiny random Llama student exported to an HF directory (char tokenizer), loaded sharded on a 2x2 mesh."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import pytest

from stat_jax import sharding
from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.models import export_hf_checkpoint, init_model, load_hf_checkpoint
from stat_jax.models.llama import tiny_llama
from tests.rollout.fixtures import INIT_RANGE


@dataclasses.dataclass
class Student:
    dir: Path
    model: object
    tokenizer: object
    mesh: object


@pytest.fixture(scope="package")
def student(tmp_path_factory) -> Student:
    tok = build_char_tokenizer()
    cfg = tiny_llama(vocab_size=len(tok), initializer_range=INIT_RANGE)
    out = tmp_path_factory.mktemp("student")
    export_hf_checkpoint(init_model(cfg, seed=0), out)
    tok.save_pretrained(out)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    return Student(dir=out, model=load_hf_checkpoint(out, mesh), tokenizer=tok, mesh=mesh)
