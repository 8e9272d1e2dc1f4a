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
from stat_jax.rollout.engine import EngineSettings

# Large enough init that greedy choices are decided by clear logit margins, not float noise.
INIT_RANGE = 0.3
SETTINGS = EngineSettings(max_concurrent_decodes=3, max_prefill_length=64, max_target_length=96)


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


def chat_prompts(tokenizer, questions) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


# Ragged lengths crossing the 16/32/64 buckets; more prompts than the 3 slots.
QUESTIONS = ["1+1?", "what is 12 * 7", "x", "solve 3x + 4 = 19 for x, please", "hello there",
             "a much longer question that needs the largest bucket", "7"]
