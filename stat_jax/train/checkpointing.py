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

`stat_jax.train.loop.run_loop` is the loop that uses them (SFT and GRPO).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from stat_jax.errors import WorkdirError

log = logging.getLogger(__name__)

STATE_ITEM, META_ITEM = "state", "meta"


class CheckpointDamagedError(WorkdirError, ValueError):
    """A checkpoint to resume from is damaged, cut short, or written for another model/optimizer."""


def step_dir_problems(step_dir: Path) -> list[str]:
    """What a complete checkpoint step directory lacks (files only: the array data is checked when read)."""
    problems = []
    state = step_dir / STATE_ITEM
    if not state.is_dir():
        return [f"{step_dir}: no {STATE_ITEM}/ directory"]
    if not (state / "_METADATA").is_file():
        problems.append(f"{state}/_METADATA is missing")
    if not (state / "manifest.ocdbt").is_file() and not any(state.glob("ocdbt.process_*")):
        problems.append(f"{state}: no array data (manifest.ocdbt)")
    meta = step_dir / META_ITEM / "metadata"
    try:
        json.loads(meta.read_text())
    except OSError:
        problems.append(f"{meta} is missing")
    except ValueError:
        problems.append(f"{meta} is not valid JSON")
    return problems


def damaged_error(step_dir: Path, what: str, steps: list[int]) -> CheckpointDamagedError:
    """The one-line error for a checkpoint that cannot be resumed, with what to do about it."""
    earlier = [s for s in steps if s < int(step_dir.name)]
    fallback = (f"delete {step_dir} to resume from step {earlier[-1]}" if earlier else
                f"delete {step_dir}")
    return CheckpointDamagedError(f"checkpoint {step_dir} cannot be resumed: {what}",
                                  hint=f"{fallback}, or start over without --resume (another --config.workdir)")


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
        step_dir = self.directory / str(step)
        problems = step_dir_problems(step_dir)
        if problems:
            raise damaged_error(step_dir, "; ".join(problems), self.all_steps())
        previous_hook, asyncio_log = _quiet_closed_loop_callbacks(), logging.getLogger("asyncio")
        previous_level = asyncio_log.level
        # orbax reads the arrays in concurrent asyncio tasks: when one fails, its siblings would each log their own
        # traceback ("Task exception was never retrieved") around the command's one-line error.
        asyncio_log.setLevel(logging.CRITICAL)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{STATE_ITEM: ocp.args.StandardRestore(target), META_ITEM: ocp.args.JsonRestore()}
                ),
            )
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore report a damaged file in many ways)
            root = _root_cause(e)
            what = f"{type(root).__name__}: {_first_line(root)}"
            if isinstance(e, (ValueError, KeyError)) and not _is_storage_error(root):
                raise CheckpointDamagedError(
                    f"checkpoint {step_dir} does not match the current model/optimizer (was it written by another "
                    f"config?): {what}", hint="resume with the config that wrote it, or start over without --resume"
                ) from e
            raise damaged_error(step_dir, f"reading it failed ({what}); it is damaged or was cut short",
                                self.all_steps()) from e
        sys.unraisablehook = previous_hook
        asyncio_log.setLevel(previous_level)
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


def _quiet_closed_loop_callbacks():
    """Installs (and returns the previous) sys.unraisablehook that drops "Event loop is closed": when a restore
    fails, tensorstore's reads still in flight call back into orbax's closed event loop from C++ threads, and each
    such error would print a traceback after the command's one-line error."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (unraisable.exc_type is RuntimeError and "Event loop is closed" in str(unraisable.exc_value)):
            previous(unraisable)

    sys.unraisablehook = hook
    return previous


def _is_storage_error(e: BaseException) -> bool:
    """tensorstore's status codes for data it could not read (a missing or cut-short file)."""
    return any(code in str(e) for code in ("FAILED_PRECONDITION", "OUT_OF_RANGE", "NOT_FOUND", "DATA_LOSS"))


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


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
