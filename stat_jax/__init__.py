"""stat-jax: Skill-Targeted Adaptive Training (He, Panigrahi, Lin, Arora, 2025) in JAX."""

import os as _os

__version__ = "0.1.0"

# XLA CPU (jaxlib 0.10-0.12) sends float32 dots to YNNPACK by default. On the real student its down projection
# (K = 1,536) came out ~5x further from a float64 reference than torch's or numpy's float32 product, which put
# stat-jax's logits 3.2e-4 from transformers' (1.2e-4 without it); XLA's own dot emitter is as fast for the
# training step and faster for decode steps (0.84-0.95 s vs 1.03-1.06 s at 48 slots, same run). XLA reads
# XLA_FLAGS when its backends start, so this must happen before any computation; a user's own
# --xla_cpu_experimental_ynn_fusion_type wins.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}=".strip()
