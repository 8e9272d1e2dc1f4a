"""Training checkpoints (orbax) that survive preemption, shared by the SFT and GRPO trainers.

A checkpoint is one step directory holding the training-state pytree (any mix of arrays: params,
optimizer state, step) and a small JSON `meta` dict (data-iterator position, RNG seeds, config hash).

- Saves are asynchronous (training continues while orbax writes) and atomic: orbax writes into a temporary
  directory and renames it when complete, so a crash mid-save leaves the previous checkpoint as the latest.
- Only the last `keep` checkpoints are kept.
- `restore(abstract_state)` places every array on the shardings given by `abstract_state` (a tree of
  `jax.ShapeDtypeStruct(..., sharding=NamedSharding)`), so a checkpoint written on one mesh restores onto
  another mesh shape.
- `PreemptionGuard` turns SIGTERM (TPU preemption, `kill`) into a flag the loop checks after each step: it
  saves, waits for the write to finish, and exits.

Typical loop:

    ckpt = CheckpointManager(workdir / "checkpoints", save_every=500, keep=3)
    if resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_state(state_shapes, state_shardings))
    with PreemptionGuard() as guard:
        for step in ...:
            state, metrics = train_step(state, batch)
            ckpt.maybe_save(step, state, meta_fn)              # every save_every steps
            if guard.should_stop(ckpt, step):
                ckpt.save(step, state, meta_fn(), force=True)
                break
    ckpt.close()                                               # waits for pending writes
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE_ITEM, META_ITEM = "state", "meta"


def abstract_state(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: the restore target for `CheckpointManager.restore`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


class CheckpointManager:
    """orbax `CheckpointManager` for (state pytree, JSON meta) with async, keep-last-K, atomic saves."""

    def __init__(self, directory: str | Path, *, save_every: int, keep: int = 3, async_save: bool = True):
        # orbax logs several INFO lines per save through absl; keep them unless the user configured absl.
        if logging.getLogger("absl").level == logging.NOTSET:
            logging.getLogger("absl").setLevel(logging.WARNING)
        if save_every <= 0:
            raise ValueError(f"checkpoint save_every must be positive, got {save_every}")
        self.directory = Path(directory).absolute()
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            save_interval_steps=1,  # the interval is decided in maybe_save, so forced saves stay simple
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # removes half-written step dirs left by a crash
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=(STATE_ITEM, META_ITEM), options=options)
        self._last_saved: int | None = self._manager.latest_step()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts an (async) save of `state` and `meta` at `step`; returns False if that step is already saved."""
        if self._last_saved == step:
            return False
        saved = self._manager.save(
            int(step),
            args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}),
            force=force,
        )
        if saved:
            self._last_saved = step
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return bool(saved)

    def maybe_save(self, step: int, state: Any, meta: dict[str, Any] | Callable[[], dict[str, Any]]) -> bool:
        """Saves when `step` is a multiple of save_every; `meta` may be a callable to build it only then."""
        if step % self.save_every:
            return False
        return self.save(step, state, meta() if callable(meta) else meta)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step` (default: latest), arrays placed as described by `target`'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{STATE_ITEM: ocp.args.StandardRestore(target), META_ITEM: ocp.args.JsonRestore()}
                ),
            )
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"checkpoint {self.directory}/{step} does not match the current model/optimizer "
                f"(was it written by another config?): {e}"
            ) from e
        return restored[STATE_ITEM], dict(restored[META_ITEM] or {})

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self._manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True on every host once jax's distributed preemption notice has reached this step (multi-host)."""
        return bool(self._manager.reached_preemption(step))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionGuard:
    """Context manager turning SIGTERM into `should_stop()`; the previous handler is restored on exit.

    On one host the signal itself is the notice. On several hosts each host may receive SIGTERM at a
    different step, so the decision comes from jax's preemption sync point (all hosts agree on the step).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self._requested = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        log.warning("received signal %d: will checkpoint and stop after the current step", signum)
        self._requested.set()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def should_stop(self, manager: CheckpointManager | None = None, step: int | None = None) -> bool:
        if jax.process_count() > 1 and manager is not None and step is not None:
            return manager.reached_preemption(step)
        return self.requested

    def __enter__(self) -> PreemptionGuard:
        # Several processes: jax.distributed's preemption notifier owns SIGTERM and turns it into a step every
        # process agrees on (`reached_preemption`); a Python handler here would replace it and no host would stop.
        if jax.process_count() > 1:
            return self
        if threading.current_thread() is threading.main_thread():  # signal handlers only install there
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
