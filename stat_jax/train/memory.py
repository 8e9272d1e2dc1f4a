"""Fitting a training step into a memory budget: micro-batches from the compiled step's memory analysis.

The estimate is XLA's own (`compiled.memory_analysis()` of the jitted step, per device): arguments (params,
optimizer state, batch) + outputs - the donated (aliased) part + temporaries. It is exact about what the
program allocates, costs one compile per tried micro-batch count, and the compile of the chosen count IS the
step that runs, so a run that fits at once pays nothing extra. What it does not see: the Python process, the
host copies of the data, and other live device arrays (GRPO's rollout KV cache), so the default budget is a
fraction of the device's memory (`memory_fraction`), not all of it. Shared by SFT (train.*) and GRPO (grpo.*).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import jax

from stat_jax.errors import ConfigError
from stat_jax.hardware import device_memory_bytes

log = logging.getLogger(__name__)
GB = 1e9


class MemoryBudgetError(ConfigError):  # a ValueError too
    """The step does not fit the memory budget even with the most micro-batches; the message says what to change."""

    hint = "lower the batch size or sequence length, turn on model.remat, or raise the memory budget"


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one compiled step (from `Compiled.memory_analysis()`)."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int

    @property
    def peak(self) -> int:
        """Arguments and outputs live together, except the donated buffers the outputs reuse, plus temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @classmethod
    def of(cls, compiled) -> StepMemory:
        m = compiled.memory_analysis()
        if m is None:
            raise MemoryBudgetError("this jax backend gives no memory analysis of a compiled step; set the "
                                    "micro-batch count by hand (train.grad_accum_steps / grpo.micro_batches)")
        return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                   int(m.temp_size_in_bytes))

    def describe(self) -> str:
        return (f"{self.peak / GB:.2f} GB (arguments {self.arguments / GB:.2f} + outputs {self.outputs / GB:.2f} "
                f"- donated {self.aliased / GB:.2f} + temporaries {self.temporaries / GB:.2f})")


def budget_bytes(section, prefix: str) -> tuple[int, str]:
    """(per-device budget in bytes, where it came from) from `<prefix>.memory_budget_gb` / `memory_fraction`."""
    if float(section.memory_budget_gb) > 0:
        return int(float(section.memory_budget_gb) * GB), f"{prefix}.memory_budget_gb={section.memory_budget_gb}"
    fraction = float(section.memory_fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"{prefix}.memory_fraction={fraction} must be in (0, 1]")
    device = device_memory_bytes()
    return int(fraction * device), (f"{prefix}.memory_fraction={fraction} of {device / GB:.2f} GB per device; "
                                    f"set {prefix}.memory_budget_gb to choose")


def micro_batch_candidates(rows: int, batch_ways: int, process_count: int = 1) -> list[int]:
    """Micro-batch counts k to try, fewest first: divisors of each process's rows whose micro-batches still
    split over the batch-sharded devices (rows // k a multiple of batch_ways). Fewer rows than that would be
    replicated, which saves no memory per device."""
    local = max(rows // max(process_count, 1), 1)
    divisors = [k for k in range(1, local + 1) if local % k == 0]
    split = [k for k in divisors if (rows // k) % batch_ways == 0]
    return split or divisors


def fit_micro_batches(compile_for: Callable[[int], object], rows: int, batch_ways: int, budget: int, *,
                      budget_source: str, fixed: int | None, key: str, advice: str,
                      process_count: int = 1) -> tuple[int, object, StepMemory]:
    """(k, compiled step, its memory) for the fewest micro-batches k whose step fits `budget` bytes per device.

    `compile_for(k)` compiles the step with k micro-batches. `fixed` (the user's k, or None = search) is only
    checked. The search jumps: the temporaries scale about as 1/k, so after a miss it tries the first
    candidate that the measured numbers say could fit, then the next ones. Raises MemoryBudgetError, naming
    the budget, the estimate and what to change, when even the last candidate does not fit.
    """
    candidates = [fixed] if fixed else micro_batch_candidates(rows, batch_ways, process_count)
    i = 0
    while True:
        k = candidates[i]
        compiled = compile_for(k)
        memory = StepMemory.of(compiled)
        if memory.peak <= budget:
            agreed = _coordinator_choice(k)
            if agreed != k:  # every process must run the same program; process 0's budget decides
                k, compiled = agreed, compile_for(agreed)
                memory = StepMemory.of(compiled)
            log.info("%s=%d: estimated %s per device, budget %.2f GB", key, k, memory.describe(), budget / GB)
            return k, compiled, memory
        if i + 1 >= len(candidates):
            break
        room = budget - (memory.peak - memory.temporaries)  # what the activations may use
        needed = k * memory.temporaries / room if room > 0 else math.inf
        i = next((j for j in range(i + 1, len(candidates)) if candidates[j] >= needed), len(candidates) - 1)
    micro_rows = rows // k
    what = (f"{key}={k} (set by you)" if fixed else f"the most micro-batches possible, {key}={k}")
    raise MemoryBudgetError(
        f"the training step does not fit the memory budget: {what} ({micro_rows} rows each) needs an estimated "
        f"{memory.describe()} per device (XLA's memory analysis of the compiled step), over the budget of "
        f"{budget / GB:.2f} GB ({budget_source}). {advice}")


def _coordinator_choice(k: int) -> int:
    from stat_jax.distributed import broadcast_from_coordinator

    return int(broadcast_from_coordinator(k)) if jax.process_count() > 1 else k


def sharded_batch_ways(mesh) -> int:
    """How many ways the batch axis is split (data x fsdp in stat_jax.sharding's rules)."""
    return int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))

