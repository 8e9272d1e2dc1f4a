"""Tiny students and a small real SFT task (reverse a string) for the trainer tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from stat_jax.data.char_tokenizer import save_char_tokenizer
from stat_jax.models import export_hf_checkpoint, init_model
from stat_jax.models.llama import tiny_llama


def make_student(out_dir: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random tiny Llama + the character tokenizer saved as a local HF checkpoint directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(out_dir)
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                     num_heads=4, num_kv_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                     bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                     pad_token_id=tok.pad_token_id)
    export_hf_checkpoint(init_model(cfg, seed=seed), out_dir, tokenizer_source=out_dir)
    return out_dir


def reverse_examples(n: int, seed: int = 0, min_len: int = 3, max_len: int = 6) -> list[dict]:
    """{"prompt": "rev abc", "response": "cba"} records over a 4-letter alphabet."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice("abcd") for _ in range(rng.randint(min_len, max_len)))
        out.append({"prompt": f"rev {word}", "response": word[::-1]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
