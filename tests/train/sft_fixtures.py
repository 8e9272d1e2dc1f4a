"""Tiny students and a small real SFT task (reverse a string) for the trainer tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from stat_jax.data.char_tokenizer import save_char_tokenizer
from stat_jax.models import export_hf_checkpoint, init_model
from stat_jax.models.llama import tiny_llama


def make_student(out_dir: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0,
                 initializer_range: float = 0.02) -> Path:
    """A random tiny Llama + the character tokenizer saved as a local HF checkpoint directory.

    Adapter tests want `initializer_range=0.2`: with the usual 0.02 a frozen lm_head bounds every logit near
    +-0.6 (|final_norm(x)| = sqrt(hidden)), so no adapter could make a confident prediction; 0.2 allows ~+-6.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(out_dir)
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                     num_heads=4, num_kv_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                     bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                     pad_token_id=tok.pad_token_id, initializer_range=initializer_range)
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


# ----- whole SFT runs (tests/train/test_sft.py, test_lora.py) -------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
SFT_CONFIG = REPO / "configs/sft_tiny.py"


def sft_run_setup(root: Path, examples: int, **student_kw) -> tuple[Path, Path, Path]:
    """(root, student dir, training JSONL) for whole-run tests: a tiny student and `examples` reverse records."""
    return root, make_student(root / "student", **student_kw), write_jsonl(root / "train.jsonl",
                                                                           reverse_examples(examples, seed=0))


def sft_overrides(student, data, workdir, *, steps: int, every: int, **extra) -> list[tuple[str, str]]:
    """Config overrides of a short checkpointing SFT run: 8 rows/step in 2 micro-batches of 48 tokens."""
    values = {"model.path": student, "data.train_files": data, "workdir": workdir, "train.steps": steps,
              "train.checkpoint_every": every, "train.keep_checkpoints": 3, "train.batch_size": 8,
              "train.grad_accum_steps": 2, "data.max_length": 48, **extra}
    return [(k, str(v)) for k, v in values.items()]


def sft_cli(overrides: list[tuple[str, str]], *flags: str) -> list[str]:
    """The `stat-jax sft` command line of those overrides, as a separate process (for kill -9 and SIGTERM)."""
    return [sys.executable, "-m", "stat_jax.cli", "sft", f"--config={SFT_CONFIG}",
            *(f"--config.{k}={v}" for k, v in overrides), *flags]


def start_and_wait(cmd: list[str], workdir: Path, min_step: int, need_checkpoint: int | None = None,
                   devices: int = 8) -> subprocess.Popen:
    """Starts a trainer process and returns it once it has logged `min_step` (and written that checkpoint)."""
    from stat_jax.train.metrics import read_metrics

    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline:
        rows = read_metrics(workdir / "metrics.jsonl")
        ready = need_checkpoint is None or (workdir / "checkpoints" / str(need_checkpoint)).is_dir()
        if rows and rows[-1]["step"] >= min_step and ready:
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("trainer did not reach the step in time")
