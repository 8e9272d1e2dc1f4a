"""Training logs shared by the SFT and GRPO trainers: a tqdm bar, a metrics JSONL file, optional TensorBoard.

    logger = MetricsLogger(workdir / "metrics.jsonl", total_steps=1000, start_step=restored_step)
    logger.log(step, {"loss": 1.23, "grad_norm": 0.4, "tokens_per_s": 5e4})
    logger.close()

Each JSONL row is `{"step": int, "time": unix seconds, **metrics}` and is flushed as it is written, so a
killed run keeps every logged step. On resume (`start_step` > 0) rows after `start_step` are dropped first:
those steps are about to be recomputed from the checkpoint, and the file then reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stat_jax.progress import progress_bar, progress_mode

log = logging.getLogger(__name__)

# Shown in the progress bar, in this order, when present.
BAR_KEYS = ("loss", "grad_norm", "lr", "tokens_per_s")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics JSONL file (a torn last line from a kill is ignored)."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _truncate_after(path: Path, step: int) -> None:
    """Rewrites `path` atomically keeping only rows with row['step'] <= step."""
    kept = [row for row in read_metrics(path) if int(row.get("step", 0)) <= step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / jax scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than crash the writer
    return value


def _format(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "tokens_per_s":
            return f"{value:,.0f}"
        return f"{value:.3g}" if key == "lr" else f"{value:.4f}"
    return str(value)


class MetricsLogger:
    """Progress bar with step/loss/tokens per second/ETA, a JSONL row per logged step, TensorBoard if present."""

    def __init__(
        self,
        path: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        desc: str = "train",
        tensorboard_dir: str | Path | None = None,
        show_bar: bool | None = None,
        is_writer: bool = True,
    ):
        self.path = Path(path)
        self.is_writer = is_writer  # only process 0 writes files on multi-host runs
        if is_writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                _truncate_after(self.path, start_step)
        self._file = open(self.path, "a") if is_writer else None
        if show_bar is None:
            show_bar = is_writer and progress_mode() == "bars"  # else the log lines below
        self._bar = progress_bar(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                         disable=not show_bar)
        self._tb = self._open_tensorboard(tensorboard_dir) if is_writer and tensorboard_dir else None
        self._last_step = start_step
        self._quiet_every = max(1, total_steps // 20)  # log lines when there is no bar (files, CI)
        self._show_bar = show_bar

    @staticmethod
    def _open_tensorboard(logdir: str | Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.info("tensorboardX is not installed: no TensorBoard event files (metrics JSONL is written)")
            return None
        return SummaryWriter(str(logdir))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records the metrics of `step` (the number of optimizer updates done)."""
        row = {"step": int(step), "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, int(step))
        self._bar.update(max(0, int(step) - self._last_step))
        self._last_step = int(step)
        shown = {k: _format(k, row[k]) for k in BAR_KEYS if k in row}
        self._bar.set_postfix(shown, refresh=False)
        if not self._show_bar and self.is_writer and (step % self._quiet_every == 0 or step == self._bar.total):
            log.info("step %d/%s %s", step, self._bar.total, " ".join(f"{k}={v}" for k, v in shown.items()))

    def close(self) -> None:
        self._bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
