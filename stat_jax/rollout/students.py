"""One rollout backend for every student a process serves (the demo's ~30, a pipeline's rollout and evaluations).

The backend is built and compiled for the first student; each later checkpoint's weights are swapped in with
`update_params` (same shapes: nothing recompiles). Handed to the pipeline through its stage context, it serves
the rollout stage's student, the SFT and GRPO exports the eval stages score, and the policy GRPO samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stat_jax import validity


class StudentServer:
    """`serve(model_dir)` -> the backend holding that checkpoint's weights."""

    def __init__(self, config: Any):
        self.config = config
        self.backend = None
        self.tokenizer = None
        self.serving: Path | None = None
        self._built_reads: dict[str, Any] = {}  # the config fields read to build the backend

    def serve(self, model_dir: str | Path):
        from stat_jax.models.student import load_model, load_tokenizer
        from stat_jax.rollout.factory import make_rollout_backend

        model_dir = Path(model_dir)
        validity.replay(self._built_reads)  # what uses the backend depends on how it was built
        if self.serving == model_dir:
            return self.backend
        model = load_model(self.config, model_dir)
        if self.backend is None:
            with validity.reads() as built:
                self.tokenizer = load_tokenizer(self.config, model_dir)
                self.backend = make_rollout_backend(self.config, model, self.tokenizer)
            self._built_reads = built.values
        else:
            self.backend.update_params(model)
        self.serving = model_dir
        return self.backend

    def forget(self) -> None:
        """The backend's weights were changed by its user (GRPO swaps the policy in): the next serve() loads."""
        self.serving = None

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
            self.serving = None
