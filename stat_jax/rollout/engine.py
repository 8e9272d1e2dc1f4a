"""A JetStream 0.2.2 `Engine` over the stat-jax decoder (`DecoderLM.decode` / `init_cache`).

The life of a request, in JetStream's terms:
- `prefill`: the prompt, right-padded to a power-of-two length bucket (16 .. max_prefill_length), runs as a
  one-row batch of the in-process path's prefill into a fresh cache; the first token is sampled from the
  logits at `true_length - 1`.
- `insert`: writes that row into one slot of the decode cache with the in-process path's insert (with the
  slot's sampling settings, key and stop ids).
- `generate`: one step for every slot: emits each slot's pending token (marked invalid when it is a stop id,
  which ends the request without returning it), feeds it at the slot's next cache position and samples the
  next one.
Compilations are bounded: one prefill and one insert per bucket and row count, one generate per cache length.
Parameters are read from a `ParamHolder` on every call, so swapping `holder.state` updates every JetStream
thread without recompiling (0.2.2 binds params once per thread).

The in-process scheduler (stat_jax/rollout/scheduler.py) uses the batched extensions instead: `prefill_into`
(a bucket's prompts in one call, written straight into their slots), `step` (generate without waiting for
it) and `resize` (the decode cache grows through `cache_buckets` with the longest sequence in flight, so a
step's attention reads the positions in use rather than `max_target_length`).
Auto settings (`rollout.max_concurrent_decodes=0`, `max_target_length=0`) are resolved at construction by
`resolve_settings`; `memory_note` (also logged) states the cache's worst-case size against device memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import types
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stat_jax import sharding
from stat_jax.hardware import device_memory_bytes, host_memory_bytes
from stat_jax.lengths import PREFILL_BUCKETS, target_length
from stat_jax.models.build import as_dtype
from stat_jax.models.transformer import CACHE_AXES, LENGTH_AXIS, DecoderLM, KVCache
from stat_jax.rollout.base import SamplingParams
from stat_jax.rollout.jetstream_compat import load_jetstream
from stat_jax.rollout.protocol import RequestSampling
from stat_jax.rollout.sampling import request_key, sample_tokens, step_keys

logger = logging.getLogger(__name__)
_DEVICE_LOCK = threading.RLock()  # see StudentEngine.mesh_context


def _finish(outputs):
    """On CPU, waits for the program so no two multi-device programs overlap (see mesh_context)."""
    if jax.default_backend() == "cpu":
        jax.block_until_ready(outputs)
    return outputs

js = load_jetstream()

MAX_STOP_IDS = 16  # per request: EOS ids + SamplingParams.stop_token_ids, padded with -1
NO_STOP = -1


def prefill_buckets(max_prefill_length: int) -> list[int]:
    """JetStream 0.2.2's padding buckets (`token_utils.pad_tokens`): powers of two from 16 to the maximum."""
    buckets = list(PREFILL_BUCKETS)
    if max_prefill_length not in buckets:
        raise ValueError(
            f"rollout.max_prefill_length={max_prefill_length} must be one of JetStream's prefill buckets {buckets}"
        )
    return buckets[: buckets.index(max_prefill_length) + 1]


AUTO = 0  # rollout.max_concurrent_decodes / max_target_length = 0: sized by `resolve_settings`
MAX_AUTO_SLOTS = 256


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Static shapes of the engine: they decide what gets compiled (0 = auto, see `resolve_settings`)."""

    max_concurrent_decodes: int = 8  # decode slots (the generate batch); 0 = as many as fit the memory fraction
    max_prefill_length: int = 1024  # largest prompt bucket
    max_target_length: int = 3072  # cache length per slot (prompt + generated tokens stay below it); 0 = auto
    cache_dtype: str = ""  # "" = the model's compute dtype
    cache_memory_fraction: float = 0.3  # auto slots: the full-length cache of every slot fits this much memory
    prefill_batch_tokens: int = 2048  # in-process scheduler: prompts prefilled together, in padded tokens

    def __post_init__(self):
        prefill_buckets(self.max_prefill_length)
        if self.max_concurrent_decodes < 0:
            raise ValueError(f"rollout.max_concurrent_decodes must be >= 1 (or 0 = auto), "
                             f"got {self.max_concurrent_decodes}")
        if self.max_target_length != AUTO and self.max_target_length <= self.max_prefill_length:
            raise ValueError(
                f"rollout.max_target_length={self.max_target_length} must exceed rollout.max_prefill_length="
                f"{self.max_prefill_length} (the cache holds the prompt and the generated tokens), or be 0 = auto"
            )
        if not 0 < self.cache_memory_fraction <= 1:
            raise ValueError(f"rollout.cache_memory_fraction={self.cache_memory_fraction} must be in (0, 1]")
        if self.prefill_batch_tokens < self.max_prefill_length:
            raise ValueError(f"rollout.prefill_batch_tokens={self.prefill_batch_tokens} must be >= "
                             f"rollout.max_prefill_length={self.max_prefill_length} (one prompt per call at least)")


def kv_bytes_per_token(cfg, dtype) -> int:
    """KV-cache bytes one token occupies: K and V of every layer."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def engine_memory_bytes(mesh: jax.sharding.Mesh | None) -> int:
    """Memory the cache can spread over: the mesh's devices' allocator limits; on CPU the host's RAM (once:
    fake CPU devices share it)."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.local_devices()[:1]
    if devices[0].platform == "cpu":
        return host_memory_bytes()
    return sum(device_memory_bytes(d) for d in devices)


def auto_slots(settings: EngineSettings, length: int, per_token: int, memory_bytes: int) -> int:
    """Slots whose `length`-position caches fit `cache_memory_fraction` of `memory_bytes` (a multiple of 8 when
    there are at least 8, at most MAX_AUTO_SLOTS; 0 when not even one fits)."""
    fit = int(settings.cache_memory_fraction * memory_bytes) // (length * per_token)
    return min(fit if fit < 8 else fit // 8 * 8, MAX_AUTO_SLOTS)


def resolve_settings(settings: EngineSettings, cfg, cache_dtype, memory_bytes: int) -> tuple[EngineSettings, str]:
    """Settings with the auto (0) fields filled in, and the sentence logging the cache's worst-case size.

    Auto cache length: the largest prompt bucket + AUTO_NEW_TOKENS, capped by the model's context. Auto slots:
    as many as keep every slot's full-length cache within `cache_memory_fraction` of `memory_bytes` (a multiple
    of 8 when there are at least 8, at most MAX_AUTO_SLOTS). The in-process scheduler allocates the cache only
    up to the longest sequence in flight, so this is the bound, not what a short rollout uses.
    """
    length = target_length(settings, cfg.max_position_embeddings)
    if settings.max_target_length == AUTO and length <= settings.max_prefill_length:
        raise ValueError(f"rollout.max_target_length=0 (auto): the model's context of {cfg.max_position_embeddings}"
                         f" tokens leaves no room after rollout.max_prefill_length={settings.max_prefill_length}")
    per_token = kv_bytes_per_token(cfg, cache_dtype)
    slots = settings.max_concurrent_decodes
    if slots == AUTO:
        slots = auto_slots(settings, length, per_token, memory_bytes)
        if slots < 1:
            raise ValueError(
                f"rollout.max_concurrent_decodes=0 (auto): one slot of {length} positions needs "
                f"{length * per_token / 1e9:.2f} GB of KV cache, more than rollout.cache_memory_fraction="
                f"{settings.cache_memory_fraction} of {memory_bytes / 1e9:.1f} GB; lower rollout.max_target_length "
                f"or raise the fraction")
    resolved = dataclasses.replace(settings, max_concurrent_decodes=slots, max_target_length=length)
    total = slots * length * per_token
    note = (f"rollout KV cache: {slots} slots x {length} positions x {per_token / 1024:.1f} KiB/token "
            f"({jnp.dtype(cache_dtype).name}) = {total / 1e9:.2f} GB at most, "
            f"{100 * total / max(memory_bytes, 1):.0f}% of {memory_bytes / 1e9:.1f} GB"
            + (f" (auto: rollout.cache_memory_fraction={settings.cache_memory_fraction})"
               if settings.max_concurrent_decodes == AUTO else ""))
    return resolved, note


def cache_length_buckets(max_target_length: int, smallest: int = 64) -> list[int]:
    """Decode-cache lengths the in-process scheduler compiles generate for: powers of two and 1.5x each (64, 96,
    128, 192, ...), then the maximum.

    The cache is allocated at the smallest bucket holding every sequence in flight and grown when one outgrows
    it, so a decode step reads the tokens actually in use instead of `max_target_length` positions. Half-octave
    steps because a decode step's attention is a full read of the cache at the bucket's length: with doubling,
    64 GSM8K prompts x 256 tokens (real student) spent 60% of their steps at 512 positions while the longest
    sequence held 257-414; at most 1/3 of a read is padding here, for two compiled variants per octave.
    """
    buckets = []
    length = smallest
    while length < max_target_length:
        buckets.append(length)
        if length * 3 // 2 < max_target_length and length % 2 == 0:
            buckets.append(length * 3 // 2)
        length *= 2
    return buckets + [max_target_length]


class ParamHolder:
    """Mutable box the engine reads on every call; `state` is an nnx.State of the model's parameters."""

    def __init__(self, state: nnx.State):
        self.state = state

    def swap(self, state: nnx.State) -> None:
        self.state = state


@flax.struct.dataclass
class DecodeState:
    """All slots: the shared cache, the pending (sampled, not yet emitted) token and per-slot settings."""

    cache: KVCache
    tokens: jax.Array  # int32 [slots]: emitted by the next generate step, then fed to the model
    logprobs: jax.Array  # float32 [slots]: the pending token's log-probability under its sampling distribution
    positions: jax.Array  # int32 [slots]: cache position the pending token is written at
    generated: jax.Array  # int32 [slots]: 1-based index of the pending token among the generated ones
    keys: jax.Array  # uint32 [slots, 2]
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    stop_ids: jax.Array  # int32 [slots, MAX_STOP_IDS]


class HFTokenizer(js.tokenizer_api.Tokenizer):
    """JetStream tokenizer backed by a Hugging Face tokenizer.

    Text is taken as already rendered (chat template included), so it is encoded with
    `add_special_tokens=False`; requests normally arrive as token ids.
    """

    def __init__(self, hf_tokenizer, extra_eos_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        eos = hf_tokenizer.eos_token_id
        eos_ids = ([eos] if isinstance(eos, int) else list(eos or [])) + list(extra_eos_ids)
        if not eos_ids:
            raise ValueError(f"tokenizer {hf_tokenizer.name_or_path!r} has no eos_token_id; rollouts cannot stop")
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        pad = hf_tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else self.eos_ids[0]
        bos = hf_tokenizer.bos_token_id
        self._bos_id = int(bos) if bos is not None else self._pad_id

    def encode(self, s: str, **kwargs):
        ids = np.asarray(self.hf(s, add_special_tokens=False)["input_ids"], np.int32)
        return js.token_utils.pad_tokens(
            ids, self._bos_id, self._pad_id, is_bos=False,
            max_prefill_length=kwargs.get("max_prefill_length"), jax_padding=kwargs.get("jax_padding", False),
        )

    def decode(self, token_ids: list[int], **kwargs) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=kwargs.get("skip_special_tokens", True))

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int:
        return self.eos_ids[0]

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def stop_tokens(self) -> set[int]:
        # Not the pad id (JetStream's default): a model may legitimately emit it, and HF generate does not stop.
        return set(self.eos_ids)


def stop_id_row(eos_ids: Sequence[int], extra: Sequence[int]) -> np.ndarray:
    """EOS ids then the request's stop ids, padded with NO_STOP to MAX_STOP_IDS."""
    ids = list(dict.fromkeys([*eos_ids, *extra]))
    if len(ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop ids (EOS included) per request, got {len(ids)}: {ids}")
    return np.asarray(ids + [NO_STOP] * (MAX_STOP_IDS - len(ids)), np.int32)


# ----- jitted kernels (module level: one compilation cache for every engine; `graphdef` is static) --------


@flax.struct.dataclass
class PrefillBatch:
    """Prompts of one bucket prefilled together straight into decode slots (the in-process scheduler).

    Rows whose slot is out of range (>= the slot count) are padding: they run, and their writes are dropped.
    """

    tokens: jax.Array  # int32 [p, bucket], right-padded
    lengths: jax.Array  # int32 [p]
    slots: jax.Array  # int32 [p]
    seeds: jax.Array  # uint32 [p]; with the indices: each row's request_key
    prompt_index: jax.Array  # int32 [p]
    sample_index: jax.Array  # int32 [p]
    temperature: jax.Array  # float32 [p]
    top_p: jax.Array
    top_k: jax.Array  # int32 [p]
    stop_ids: jax.Array  # int32 [p, MAX_STOP_IDS]


def make_prefill_batch(requests: Sequence[Any], slots: Sequence[int], bucket: int, rows: int,
                       eos_ids: Sequence[int], num_slots: int) -> PrefillBatch:
    """Host arrays of one prefill call for `requests` (each with .ids, .sampling, .prompt_index, .sample_index:
    the scheduler's `Request`s, or JetStream's one request in `prefill`); rows past the requests are padding aimed
    at slot `num_slots` (dropped)."""
    tokens = np.zeros((rows, bucket), np.int32)
    lengths = np.ones((rows,), np.int32)
    slot_ids = np.full((rows,), num_slots, np.int32)
    seeds = np.zeros((rows,), np.uint32)
    prompt_index, sample_index = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
    temperature, top_p = np.zeros((rows,), np.float32), np.ones((rows,), np.float32)
    top_k = np.zeros((rows,), np.int32)
    stop_ids = np.tile(stop_id_row(eos_ids, ()), (rows, 1))
    for r, (req, slot) in enumerate(zip(requests, slots)):
        s = req.sampling
        tokens[r, : req.ids.size] = req.ids
        lengths[r], slot_ids[r], seeds[r] = req.ids.size, slot, s.seed
        prompt_index[r], sample_index[r] = req.prompt_index, req.sample_index
        temperature[r], top_p[r], top_k[r] = s.temperature, s.top_p, s.top_k
        stop_ids[r] = stop_id_row(eos_ids, s.stop_token_ids)
    return PrefillBatch(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths), slots=jnp.asarray(slot_ids),
                        seeds=jnp.asarray(seeds), prompt_index=jnp.asarray(prompt_index),
                        sample_index=jnp.asarray(sample_index), temperature=jnp.asarray(temperature),
                        top_p=jnp.asarray(top_p), top_k=jnp.asarray(top_k), stop_ids=jnp.asarray(stop_ids))


@flax.struct.dataclass
class Prefix:
    """A request JetStream's prefill thread prefilled: its one-row batch (slot not yet chosen), cache and first
    token, written into a slot by `insert` with the batched path's kernel."""

    batch: PrefillBatch
    cache: KVCache
    first: jax.Array  # int32 [1]
    first_logprob: jax.Array  # float32 [1]
    wants_logprobs: bool = flax.struct.field(pytree_node=False, default=False)  # the request's sampling.logprobs


def _prefill_rows(graphdef, params, batch: PrefillBatch, cache_dtype) -> tuple[KVCache, jax.Array, jax.Array]:
    """The prompts' caches [p, kv, bucket, d], first tokens [p] and their log-probabilities [p] (compiled per
    bucket and row count only)."""
    model: DecoderLM = nnx.merge(graphdef, params)
    rows, bucket = batch.tokens.shape
    cache = model.init_cache(rows, bucket, cache_dtype)
    positions = jnp.broadcast_to(jnp.arange(bucket, dtype=jnp.int32), (rows, bucket))
    logits, cache = model.decode(batch.tokens, positions, cache, jnp.zeros((rows,), jnp.int32),
                                 logits_at=batch.lengths - 1)
    first, logprob = sample_tokens(logits[:, 0], step_keys(_batch_keys(batch), jnp.zeros((rows,), jnp.int32)),
                                   batch.temperature, batch.top_p, batch.top_k)
    return cache, first, logprob


def _batch_keys(batch: PrefillBatch) -> jax.Array:
    return jax.vmap(request_key)(batch.seeds, batch.prompt_index, batch.sample_index)


def _insert_rows(state: DecodeState, batch: PrefillBatch, cache: KVCache, first: jax.Array,
                 first_logprob: jax.Array) -> DecodeState:
    """Writes prefilled rows into their slots of `state` in place (the state is donated)."""
    bucket = batch.tokens.shape[1]
    rows = first.shape[0]

    def put(field):  # buffer [slots, ..., length, ...] <- rows [p, ..., bucket, ...] at batch.slots
        index = (batch.slots,) + (slice(None),) * (LENGTH_AXIS[field] - 1) + (slice(0, bucket),)
        return lambda buffer, rows_kv: buffer.at[index].set(rows_kv.astype(buffer.dtype), mode="drop")

    def set_rows(field, values):
        return field.at[batch.slots].set(values.astype(field.dtype), mode="drop")

    return DecodeState(
        cache=KVCache(keys=tuple(map(put("keys"), state.cache.keys, cache.keys)),
                      values=tuple(map(put("values"), state.cache.values, cache.values))),
        tokens=set_rows(state.tokens, first), logprobs=set_rows(state.logprobs, first_logprob),
        positions=set_rows(state.positions, batch.lengths),
        generated=set_rows(state.generated, jnp.ones((rows,), jnp.int32)),
        keys=set_rows(state.keys, _batch_keys(batch)), temperature=set_rows(state.temperature, batch.temperature),
        top_p=set_rows(state.top_p, batch.top_p), top_k=set_rows(state.top_k, batch.top_k),
        stop_ids=set_rows(state.stop_ids, batch.stop_ids),
    )


def _resize_cache(state: DecodeState, length: int) -> DecodeState:
    """The decode state with every cache `length` positions long (zero-padded or cut at the end)."""
    def fit(field):
        axis = LENGTH_AXIS[field]

        def one(buffer):
            if length <= buffer.shape[axis]:
                return jax.lax.slice_in_dim(buffer, 0, length, axis=axis)
            pad = [(0, 0)] * buffer.ndim
            pad[axis] = (0, length - buffer.shape[axis])
            return jnp.pad(buffer, pad)

        return one

    return state.replace(cache=KVCache(keys=tuple(map(fit("keys"), state.cache.keys)),
                                       values=tuple(map(fit("values"), state.cache.values))))


def _generate(graphdef, params, state: DecodeState):
    model: DecoderLM = nnx.merge(graphdef, params)
    # Finished slots keep stepping until JetStream reuses them; clamping keeps their writes in their own row.
    positions = jnp.minimum(state.positions, state.cache.max_length - 1)
    logits, cache = model.decode(state.tokens[:, None], positions[:, None], state.cache, positions)
    next_tokens, logprobs = sample_tokens(logits[:, 0], step_keys(state.keys, state.generated), state.temperature,
                                          state.top_p, state.top_k)
    emitted_is_stop = jnp.any(state.tokens[:, None] == state.stop_ids, axis=-1)
    # The emitted token's log-probability rides in column 3 as its float32 bits (JetStream reads columns 0-2).
    result = jnp.stack([state.tokens, (~emitted_is_stop).astype(jnp.int32), state.generated,
                        jax.lax.bitcast_convert_type(state.logprobs, jnp.int32)], axis=-1)
    new_state = state.replace(cache=cache, tokens=next_tokens, logprobs=logprobs, positions=state.positions + 1,
                              generated=state.generated + 1)
    return new_state, result


@flax.struct.dataclass
class LogprobResultTokens(js.engine_api.ResultTokens):
    """A generate step's results for JetStream's orchestrator (`stat-jax serve`). A slot whose request asked for
    log-probabilities (`SamplingParams.logprobs`) returns two "speculative" tokens per step: the token, then its
    log-probability's float32 bits with the sign bit set (a negative id: never a stop token, and the value is
    unchanged since log-probabilities are <= 0). JetStream streams both; `JetStreamClient` splits them."""

    logprob_slots: tuple[bool, ...] = flax.struct.field(pytree_node=False, default=())

    def convert_to_numpy(self) -> "LogprobResultTokens":
        return self.replace(data=np.array(self.data))

    def get_result_at_slot(self, slot: int):
        got = super().get_result_at_slot(slot)
        if not self.logprob_slots[slot]:
            return got
        bits = np.asarray(self.data[slot: slot + 1, 3:4]) | np.int32(-(2**31))
        return type(got)(tokens=np.concatenate([np.asarray(got.tokens), bits], axis=1),
                         valid=np.concatenate([np.asarray(got.valid)] * 2, axis=1), lengths=got.lengths)


def result_logprobs(rows: np.ndarray) -> np.ndarray:
    """The float32 log-probabilities of a generate result's emitted tokens (host rows [slots, 4])."""
    return np.ascontiguousarray(rows[:, 3]).view(np.float32)


def _zeros_decode_state(cfg, slots: int, length: int, dtype) -> DecodeState:
    cache = KVCache.zeros(cfg, slots, length, dtype)
    cache = KVCache(keys=tuple(sharding.constrain(k, CACHE_AXES["keys"]) for k in cache.keys),
                    values=tuple(sharding.constrain(v, CACHE_AXES["values"]) for v in cache.values))
    zeros = jnp.zeros((slots,), jnp.int32)
    return DecodeState(cache=cache, tokens=zeros, logprobs=jnp.zeros((slots,), jnp.float32), positions=zeros,
                       generated=zeros,
                       keys=jnp.zeros((slots, 2), jnp.uint32), temperature=jnp.zeros((slots,), jnp.float32),
                       top_p=jnp.ones((slots,), jnp.float32), top_k=zeros,
                       stop_ids=jnp.full((slots, MAX_STOP_IDS), NO_STOP, jnp.int32))


def _batch_split(shardings: DecodeState | None) -> int:
    """How many ways the decode cache's slot axis is split over the mesh: a smaller decode state (fewer slots)
    must keep a multiple of it, since it is laid out with the full state's shardings."""
    if shardings is None:
        return 1
    first = shardings.cache.keys[0]
    axes = first.spec[0] if len(first.spec) else None
    if axes is None:
        return 1
    sizes = sharding._axis_sizes(first.mesh)
    return int(np.prod([sizes[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def mesh_of(state: nnx.State) -> jax.sharding.Mesh | None:
    """The mesh the parameters live on (even a 1-device one), or None for plain single-device arrays."""
    for leaf in jax.tree.leaves(state):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, jax.sharding.NamedSharding):
            return s.mesh
    return None


class StudentEngine(js.engine_api.Engine):
    """JetStream 0.2.2 engine for a stat-jax `DecoderLM` (Llama / Qwen2 / Qwen3)."""

    def __init__(self, model: DecoderLM, tokenizer: HFTokenizer, settings: EngineSettings,
                 default_sampling: SamplingParams = SamplingParams()):
        graphdef, state = nnx.split(model)
        self.graphdef = graphdef
        self.model_config = model.config
        self.params = ParamHolder(state)
        self.tokenizer = tokenizer
        self.settings = settings
        self.default_sampling = default_sampling  # for requests that carry none (gRPC)
        self.cache_dtype = as_dtype(settings.cache_dtype) if settings.cache_dtype else model.dtype
        self._mesh = mesh_of(state)
        self._memory_bytes = engine_memory_bytes(self._mesh)
        self._auto_slots = settings.max_concurrent_decodes == AUTO
        self.settings, self.memory_note = resolve_settings(settings, model.config, self.cache_dtype,
                                                           self._memory_bytes)
        logger.info(self.memory_note)
        self.buckets = prefill_buckets(self.settings.max_prefill_length)
        self.cache_buckets = cache_length_buckets(self.settings.max_target_length)
        # Per-engine jits with pinned output shardings: GSPMD may otherwise hand back pass-through fields
        # with a different sharding after a step, which would compile a second variant of every kernel.
        # The shardings do not depend on the cache length (that axis is never split), so one set serves
        # every length bucket.
        shardings = self._decode_state_shardings()
        self.slot_multiple = _batch_split(shardings)
        self._init_fn = jax.jit(_zeros_decode_state, static_argnums=(0, 1, 2, 3), out_shardings=shardings)
        self._generate_fn = jax.jit(_generate, static_argnames=("graphdef",), donate_argnums=(2,),
                                    out_shardings=None if shardings is None else (shardings, self._replicated()))
        self._prefill_rows_fn = jax.jit(_prefill_rows, static_argnames=("graphdef", "cache_dtype"))
        self._insert_rows_fn = jax.jit(_insert_rows, donate_argnums=(0,), out_shardings=shardings)
        # Not donated: the grown cache cannot reuse the old buffers, and donating them only warns.
        self._resize_fn = jax.jit(_resize_cache, static_argnums=(1,), out_shardings=shardings)
        self._pending = threading.local()
        self._slot_logprobs = [False] * self.settings.max_concurrent_decodes  # JetStream's slots that asked
        self._request_counter = itertools.count()

    # ----- stat-jax extensions ------------------------------------------------------------------------
    @contextlib.contextmanager
    def mesh_context(self):
        """Mesh for the `constrain` hints, and one device program at a time.

        JetStream's prefill and generate threads launch sharded programs concurrently. On the CPU backend,
        two multi-device programs with collectives in flight at once can interleave their rendezvous and abort
        the process, so device work is serialised under a process-wide lock (and, on CPU, completed before the
        lock is released). Accelerators order launches on their streams; there only the launch is serialised.
        """
        with _DEVICE_LOCK:
            with jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext():
                yield

    def set_pending_request(self, request_sampling: RequestSampling | None) -> None:
        """Called by the prefill thread just before `prefill`: the request's sampling and identity."""
        self._pending.value = request_sampling

    def _replicated(self):
        return sharding.replicated(self._mesh)

    # ----- the in-process scheduler's batched path (stat_jax.rollout.inprocess) --------------------------
    def prefill_into(self, decode_state: DecodeState, batch: PrefillBatch) -> DecodeState:
        """Prefills a bucket's prompts straight into their slots; asynchronous (returns before it runs)."""
        with self.mesh_context():
            rows = self._prefill_rows_fn(self.graphdef, self.params.state, batch, cache_dtype=self.cache_dtype)
            return self._insert_rows_fn(decode_state, batch, *rows)

    def step(self, decode_state: DecodeState) -> tuple[DecodeState, jax.Array]:
        """One generate step; asynchronous. result [slots, 4]: emitted token, valid (not a stop id), its index,
        its log-probability's float32 bits (`result_logprobs`).

        Only one thread drives this path, so nothing needs completing before the lock is released.
        """
        with self.mesh_context():
            return self._generate_fn(self.graphdef, self.params.state, decode_state)

    def resize(self, decode_state: DecodeState, length: int) -> DecodeState:
        """The decode state with caches `length` long (one of `cache_buckets`); rows keep their tokens."""
        with self.mesh_context():
            return self._resize_fn(decode_state, length)

    def slots_for(self, length: int) -> int:
        """Decode slots for a run whose sequences never need more than `length` cache positions.

        Auto slots are sized for the full `max_target_length` (what `stat-jax serve` must assume). A run of
        known requests (the in-process scheduler) knows its longest prompt + max_new_tokens, so with auto slots
        it gets as many as fit the same memory at that length: 64 prompts x 256 new tokens run in one wave
        instead of two at the shipped 3,072-position bound. Set slots are kept as set.
        """
        if not self._auto_slots:
            return self.settings.max_concurrent_decodes
        per_token = kv_bytes_per_token(self.model_config, self.cache_dtype)
        return max(auto_slots(self.settings, length, per_token, self._memory_bytes),
                   self.settings.max_concurrent_decodes)

    def cache_bucket(self, needed: int) -> int:
        """The smallest cache length bucket holding `needed` positions."""
        for length in self.cache_buckets:
            if needed <= length:
                return length
        raise ValueError(f"{needed} cache positions exceed rollout.max_target_length={self.settings.max_target_length}")

    def _decode_state_shardings(self) -> DecodeState | None:
        if self._mesh is None:
            return None
        s = self.settings
        shapes = jax.eval_shape(lambda: _zeros_decode_state(self.model_config, s.max_concurrent_decodes,
                                                            s.max_target_length, self.cache_dtype))
        def field(name, leaves):
            return tuple(sharding.named_sharding(self._mesh, CACHE_AXES[name], x.shape) for x in leaves)

        cache = KVCache(keys=field("keys", shapes.cache.keys), values=field("values", shapes.cache.values))
        rest = jax.tree.map(lambda x: self._replicated(), shapes.replace(cache=None))
        return rest.replace(cache=cache)

    def compilation_counts(self) -> dict[str, int]:
        """Compiled variants held by each kernel."""
        return {"generate": self._generate_fn._cache_size(), "prefill_rows": self._prefill_rows_fn._cache_size(),
                "insert_rows": self._insert_rows_fn._cache_size(),
                "resize": self._resize_fn._cache_size()}

    def _request_sampling(self) -> RequestSampling:
        pending = getattr(self._pending, "value", None)
        self._pending.value = None
        if pending is not None:
            return pending
        # A gRPC request: engine-wide sampling, keyed by arrival order (the proto has no seed field).
        return RequestSampling(self.default_sampling, next(self._request_counter), 0)

    # ----- JetStream Engine API -----------------------------------------------------------------------
    def prefill(self, *, params, existing_prefix=None, padded_tokens, true_length: int) -> Prefix:
        if existing_prefix is not None:
            raise ValueError("StudentEngine.prefill: continuing an existing prefix (session cache) is not offered")
        state = params.state if isinstance(params, ParamHolder) else params
        req = self._request_sampling()
        s = req.sampling
        padded = np.asarray(padded_tokens, np.int32)
        request = types.SimpleNamespace(ids=padded[:true_length], sampling=s, prompt_index=req.prompt_index,
                                        sample_index=req.sample_index)
        # One row, aimed at slot 0 for now: `insert` names the slot.
        batch = make_prefill_batch([request], [0], padded.size, 1, self.tokenizer.eos_ids, num_slots=1)
        with self.mesh_context():
            cache, first, logprob = _finish(self._prefill_rows_fn(self.graphdef, state, batch,
                                                                  cache_dtype=self.cache_dtype))
        return Prefix(batch=batch, cache=cache, first=first, first_logprob=logprob, wants_logprobs=s.logprobs)

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        batch = prefix.batch.replace(slots=jnp.full((1,), slot, jnp.int32))
        self._slot_logprobs[slot] = prefix.wants_logprobs  # insert and generate run on JetStream's generate thread
        with self.mesh_context():
            return _finish(self._insert_rows_fn(decode_state, batch, prefix.cache, prefix.first, prefix.first_logprob))

    def generate(self, params, decode_state: DecodeState):
        state = params.state if isinstance(params, ParamHolder) else params
        with self.mesh_context():
            decode_state, result = _finish(self._generate_fn(self.graphdef, state, decode_state))
        tokens = LogprobResultTokens(data=result, tokens_idx=(0, 1), valid_idx=(1, 2), length_idx=(2, 3),
                                     samples_per_slot=1, logprob_slots=tuple(self._slot_logprobs))
        return decode_state, tokens

    def load_params(self, *args, **kwargs) -> ParamHolder:
        return self.params

    def get_prefix_destination_sharding(self) -> Any:
        return None  # interleaved mode: prefill and generate share devices, nothing is transferred

    def get_tokenizer(self):
        return js.tokenizer_pb2.TokenizerParameters(path=str(getattr(self.tokenizer.hf, "name_or_path", "")))

    def build_tokenizer(self, metadata) -> HFTokenizer:
        return self.tokenizer

    def init_decode_state(self, *args, length: int | None = None, slots: int | None = None, **kwargs) -> DecodeState:
        """Empty slots (default: all of them); caches `length` positions long (default: max_target_length, what
        JetStream expects)."""
        s = self.settings
        with self.mesh_context():
            return _finish(self._init_fn(self.model_config, slots or s.max_concurrent_decodes,
                                         length or s.max_target_length, self.cache_dtype))

    @property
    def max_concurrent_decodes(self) -> int:
        return self.settings.max_concurrent_decodes

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self.settings.max_prefill_length

    @property
    def mesh(self):
        return self._mesh

    @property
    def colocated_cpus(self):
        return None
