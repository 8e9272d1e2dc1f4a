"""A deterministic continuous-batching loop over `StudentEngine`'s batched methods (the in-process backend).

JetStream's orchestrator (still what `stat-jax serve` runs) moves every request through prefill, transfer,
generate and detokenize threads, prefills one prompt per call and completes every call before the next. Here
one loop on the calling thread does the same work with fewer, larger device programs:
  1. admit: free slots take the next queued requests in order; queued requests of one prefill bucket are
     prefilled together straight into their slots (`engine.prefill_into`, up to
     `rollout.prefill_batch_tokens` padded tokens a call, the row count rounded up to a power of two);
  2. grow: the decode cache is kept at the smallest of `engine.cache_buckets` holding every sequence in
     flight (`engine.resize` when one outgrows it), so a step reads the positions in use, not
     `max_target_length` of them;
  3. step: one generate over every slot, dispatched before the previous step's tokens are read back, so the
     host's bookkeeping overlaps the device's work (a finished slot runs one step more, which is dropped).
Outputs do not depend on slot, batch or timing: a request's key depends on (seed, prompt, sample) only.

On a multi-process mesh every process runs this loop over the same request list: every decision above is
made from the requests and the tokens read back (replicated, so each process reads them from its own
devices), never from clocks or threads, so every process launches the same programs in the same order, as
their collectives require. Each iteration runs under `collective_deadline`: a peer that died or stalls ends
the run with an error naming it after `distributed.collective_timeout_s` instead of a hang.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from stat_jax.distributed import collective_deadline
from stat_jax.rollout.base import SamplingParams
from stat_jax.rollout.engine import DecodeState, StudentEngine, make_prefill_batch, result_logprobs


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate; `token_ids` and their sampling log-probabilities fill in (stop token excluded)."""

    ids: np.ndarray  # prompt token ids, already checked by `fit_prompt`
    sampling: SamplingParams
    prompt_index: int
    sample_index: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    stop: tuple[int, float] | None = None  # the stop token sampled and its log-probability
    position: int = 0  # cache position of the pending token (host copy of the device's)


def prefill_bucket(length: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"prompt of {length} tokens exceeds the largest prefill bucket {buckets[-1]}")


def padded_rows(count: int, limit: int) -> int:
    """Rows of a prefill call for `count` prompts: the next power of two, at most `limit` (bounds compiles)."""
    rows = 1
    while rows < count:
        rows *= 2
    return max(min(rows, limit), count)


class Scheduler:
    """Runs requests to completion on one engine; `run` is the whole loop (see the module docstring)."""

    def __init__(self, engine: StudentEngine):
        self.engine = engine
        self.slots_in_use = engine.settings.max_concurrent_decodes
        # Of the last run: steps, prefill_calls, resizes, max_cache_length, first_token_s (run start until the
        # first generated token reached the host).
        self.stats: dict[str, float] = collections.Counter()

    def run(self, requests: Sequence[Request], on_done: Callable[[Request], None] = lambda r: None) -> None:
        self.stats.clear()
        self._start = time.perf_counter()
        # A step computes every slot of the decode state: fewer requests than slots get a smaller state (a
        # power of two, so the few shapes compile once) instead of stepping empty slots.
        longest = min(max((r.ids.size + r.sampling.max_new_tokens for r in requests), default=1),
                      self.engine.settings.max_target_length)
        full = self.engine.slots_for(self.engine.cache_bucket(longest))
        multiple = getattr(self.engine, "slot_multiple", 1)  # the slot axis stays divisible over the mesh
        rows = padded_rows(len(requests), full)
        self.slots_in_use = min(-(-rows // multiple) * multiple, full)
        self.stats["slots"] = self.slots_in_use
        queue = collections.deque(requests)
        live: dict[int, Request] = {}
        free = list(range(self.slots_in_use))
        state: DecodeState | None = None
        inflight = None  # (result array, [(slot, request)] stepped by it)
        while queue or live or inflight:
            with collective_deadline(f"rollout step {int(self.stats['steps'])} ({len(live)} sequences in "
                                     f"flight, {len(queue)} queued)"):
                if queue and free:
                    state = self._admit(state, queue, free, live)
                stepped = None
                if live:
                    state = self._fit_cache(state, max(r.position for r in live.values()) + 1)
                    state, result = self.engine.step(state)
                    stepped = (result, list(live.items()))
                    for req in live.values():
                        req.position += 1
                    self.stats["steps"] += 1
                if inflight is not None:
                    self._collect(*inflight, live, free, on_done)
                inflight = stepped

    def _admit(self, state, queue, free, live) -> DecodeState:
        taken = [queue.popleft() for _ in range(min(len(free), len(queue)))]
        slots = [free.pop(0) for _ in taken]
        by_bucket: dict[int, list[tuple[Request, int]]] = collections.defaultdict(list)
        for req, slot in zip(taken, slots):
            by_bucket[prefill_bucket(req.ids.size, self.engine.buckets)].append((req, slot))
        needed = max([r.position + 1 for r in live.values()] + [b for b in by_bucket])
        state = self._fit_cache(state, needed)
        for bucket, group in sorted(by_bucket.items()):
            per_call = max(self.engine.settings.prefill_batch_tokens // bucket, 1)
            for start in range(0, len(group), per_call):
                chunk = group[start: start + per_call]
                batch = make_prefill_batch([r for r, _ in chunk], [s for _, s in chunk], bucket,
                                           padded_rows(len(chunk), per_call), self.engine.tokenizer.eos_ids,
                                           self.slots_in_use)
                state = self.engine.prefill_into(state, batch)
                self.stats["prefill_calls"] += 1
        for req, slot in zip(taken, slots):
            req.position = req.ids.size
            live[slot] = req
        return state

    def _fit_cache(self, state, needed: int) -> DecodeState:
        """`state` with the smallest cache bucket holding `needed` positions, never shrinking within a run."""
        length = self.engine.cache_bucket(needed)
        self.stats["max_cache_length"] = max(self.stats["max_cache_length"], length)
        if state is None:
            return self.engine.init_decode_state(length=length, slots=self.slots_in_use)
        if length > state.cache.max_length:
            self.stats["resizes"] += 1
            return self.engine.resize(state, length)
        return state

    def _collect(self, result, stepped, live, free, on_done) -> None:
        rows = np.asarray(result)  # waits for that step only; the next one is already queued
        logprobs = result_logprobs(rows)
        if "first_token_s" not in self.stats:
            self.stats["first_token_s"] = time.perf_counter() - self._start
        for slot, req in stepped:
            if live.get(slot) is not req:
                continue  # finished at an earlier step; this step's token for it is dropped
            token, valid = rows[slot, :2]
            if valid:
                req.token_ids.append(int(token))
                req.logprobs.append(float(logprobs[slot]))
            else:
                req.stop = (int(token), float(logprobs[slot]))
            if not valid or len(req.token_ids) >= req.sampling.max_new_tokens:
                del live[slot]
                free.append(slot)
                free.sort()
                on_done(req)
