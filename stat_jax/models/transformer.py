"""The decoder-only transformer shared by Llama and Qwen (Qwen adds q/k/v bias; Qwen3 adds q/k norm).

Two entry points:
- `__call__(tokens, positions, attention_mask)`: full-sequence forward for training and scoring.
- `decode(tokens, positions, cache, cache_starts)`: writes the new keys/values into a KV cache and attends
  over it; used for prefill (many tokens) and incremental decoding (one token) by the rollout engine.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from stat_jax.models.config import ModelConfig
from stat_jax.models.layers import (MATMUL_NAME, MLP, Attention, RMSNorm, cached_attention, causal_attention,
                                    dot_product_attention, matmul)
from stat_jax.sharding import constrain


@flax.struct.dataclass
class KVCache:
    """Per-layer keys [batch, kv_heads, head_dim, max_length] and values [batch, kv_heads, max_length, head_dim].

    Row b holds its tokens in slots 0..length_b-1 with no padding inside; the caller tracks lengths.
    Laid out the way decode attention reads them, so no step copies the cache: scores q.K^T contract
    head_dim, which is K's row axis here (XLA CPU ran that product ~5x slower with head_dim minor, and a
    [length, kv_heads] layout made every step transpose the whole cache of every layer).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.values[0].shape[LENGTH_AXIS["values"]]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.float32) -> KVCache:
        key_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_length)
        value_shape = (batch, cfg.num_kv_heads, max_length, cfg.head_dim)
        # Separate buffers per field: donated buffers must never alias (JetStream's insert donates).
        return cls(
            keys=tuple(jnp.zeros(key_shape, dtype) for _ in range(cfg.num_layers)),
            values=tuple(jnp.zeros(value_shape, dtype) for _ in range(cfg.num_layers)),
        )


# Rematerialisation of the training forward (`model.remat`): what each layer keeps for the backward pass.
#   none  every intermediate is saved: fastest, most memory (~100 KB per token per layer at SmolLM2's shape)
#   full  only each layer's input is saved and the layer is recomputed in the backward pass ("per layer")
#   dots  each layer saves its matmul outputs (layers.MATMUL_NAME) and recomputes only the cheap elementwise
#         ops and the attention scores/softmax: less recompute than `full`, ~1/4 of `none`'s memory
REMAT_POLICIES = ("none", "full", "dots")
_REMAT_ALIASES = {"false": "none", "off": "none", "": "none", "true": "full", "per_layer": "full", "layer": "full",
                  "matmuls": "dots", "dots_with_no_batch_dims": "dots"}


def resolve_remat(value) -> str:
    """`model.remat` -> a name in REMAT_POLICIES; True/False (and "true"/"false") stay accepted as full/none."""
    if isinstance(value, bool):
        return "full" if value else "none"
    name = str(value).strip().lower()
    name = _REMAT_ALIASES.get(name, name)
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat={value!r}: choose one of {', '.join(REMAT_POLICIES)} "
                         f"(or true = full, false = none)")
    return name


def _remat_layer_call(policy: str):
    """`(layer, x, positions, mask) -> x` of the training forward, rematerialised per `policy`."""
    if policy == "none":
        return _layer_call
    saveable = _remat_saveable(policy)

    def call(layer, x, positions, mask):
        graphdef, state = nnx.split(layer)
        return _cotangent_tied_remat(graphdef, saveable)(state, x, positions, mask)

    return call


def _remat_saveable(policy: str):
    return None if policy == "full" else jax.checkpoint_policies.save_only_these_names(MATMUL_NAME)


def _scanned_layers(layers, x, positions, mask, policy: str, dtype):
    """x through every layer as one `lax.scan` over the layers' stacked weights; None when the layers differ.

    Why a scan (measured: XLA CPU buffer assignment of the Qwen2.5-3B step, fsdp=8, 8 x 2,048 tokens): in an
    unrolled stack XLA made each layer's weight gradient full-size on every device, all-reduced it and sliced
    out the device's shard only inside the optimizer update at the end, so the unsharded float32 gradients of
    all layers were alive at once (~0.29 GB per layer). In a scan each iteration's gradient is written into
    the stacked, sharded gradient before the next begins, and the program (and compile) is one layer long.
    The weights are stacked in the compute dtype (every use casts to it anyway: layers.matmul, RMSNorm,
    biases), so the stacked copy is half the float32 masters, and gradients get the same values.
    Layers whose graphdefs differ (adapters with per-layer dropout streams) fall back to the unrolled loop.
    """
    splits = [nnx.split(layer) for layer in layers]
    graphdef = splits[0][0]
    if len(splits) < 2 or any(g != graphdef for g, _ in splits[1:]):
        return None

    def stack(*variables):
        values = [v.get_value() for v in variables]
        if jnp.issubdtype(values[0].dtype, jnp.floating):
            values = [value.astype(dtype) for value in values]
        stacked = jnp.stack(values)
        axes = variables[0].get_metadata().get("logical_axes")
        if axes is not None:  # each layer's slice sharded as its own parameter is
            stacked = constrain(stacked, (None, *axes))
        return variables[0].replace(stacked)

    stacked = jax.tree.map(stack, *[state for _, state in splits], is_leaf=lambda v: isinstance(v, nnx.Variable))

    def apply(state, x):
        return nnx.merge(graphdef, state)(x, positions, mask)[0]

    if policy == "full":
        return _full_remat_scan(apply, stacked, x)

    def body(state, carry):
        return apply(state, carry.astype(dtype)).astype(carry.dtype)

    if policy != "none":
        # prevent_cse=False: inside scan the recomputation cannot be merged away anyway (jax.checkpoint docs).
        body = jax.checkpoint(body, policy=_remat_saveable(policy), prevent_cse=False)
    # A float32 carry (each layer's saved input); the layer still sees the compute-dtype values (bf16 -> f32 ->
    # bf16 is exact). See _full_remat_scan for what a bf16 carry cost on XLA CPU.
    x, _ = jax.lax.scan(lambda carry, state: (body(state, carry), None), x.astype(jnp.float32), stacked)
    return x.astype(dtype)


# Saved 16-bit floats are stored as these integers (see _full_remat_scan).
_STORAGE = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float16): jnp.uint16}


def _stored(x: jax.Array) -> jax.Array:
    storage = _STORAGE.get(jnp.dtype(x.dtype))
    return x if storage is None else jax.lax.bitcast_convert_type(x, storage)


def _restored(x: jax.Array, dtype) -> jax.Array:
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def _full_remat_scan(apply, stacked, x: jax.Array) -> jax.Array:
    """`apply(state, x)` scanned over the stacked layer states, rematerialised per layer (policy full), by hand.

    The forward saves only each layer's input; the backward is a reverse scan that recomputes layer i from it
    and pulls the cotangent through. Why not jax.checkpoint inside lax.scan (the dots path): XLA CPU's float
    normalization upcasts a bfloat16 dynamic slice, so the backward loop's slice of the saved [layers, b, t, e]
    bf16 stack became convert-to-float32 of the whole stack, hoisted out of the loop: a float32 copy of every layer's input beside the bf16
    one (Qwen2.5-3B at 8 x 2,048 per device: 134 + 67 MB per layer, 7.2 GB at 36 layers). Here the saved
    inputs and the stacked weights are kept as 16-bit integers (a bitcast: same bits), which it slices as is.
    """
    dtypes = jax.tree.map(lambda a: a.dtype, stacked)
    # Which state leaves the caller differentiates (symbolic_zeros: the forward sees it), so training adapters
    # computes no weight gradient of the frozen base. Set while tracing the forward, read by the backward.
    perturbed: list[list[bool]] = []

    @jax.custom_vjp
    def run(stacked, x):
        return jax.lax.scan(lambda carry, state: (apply(state, carry), None), x, stacked)[0]

    def forward(stacked, x):
        perturbed.append([leaf.perturbed for leaf in jax.tree.leaves(stacked)])
        stacked, x = jax.tree.map(lambda leaf: leaf.value, (stacked, x))
        y, inputs = jax.lax.scan(lambda carry, state: (apply(state, carry), _stored(carry)), x, stacked)
        return y, (jax.tree.map(_stored, stacked), inputs)

    def backward(residuals, g):
        stored_states, inputs = residuals
        trained = perturbed[-1]
        if isinstance(g, SymbolicZero):
            g = jnp.zeros(g.shape, g.dtype)

        def step(dy, layer):
            stored_state, stored_x = layer
            leaves, tree = jax.tree.flatten(jax.tree.map(_restored, stored_state, dtypes))

            def layer_of(trained_leaves, x):
                it = iter(trained_leaves)
                state = jax.tree.unflatten(tree, [next(it) if t else leaf for leaf, t in zip(leaves, trained)])
                return apply(state, x)

            trained_leaves = [leaf for leaf, t in zip(leaves, trained) if t]
            _, pull = jax.vjp(layer_of, trained_leaves, _restored(stored_x, x.dtype))
            dleaves, dx = pull(dy)
            return dx, dleaves

        dx, dleaves = jax.lax.scan(step, g, (stored_states, inputs), reverse=True)
        it = iter(dleaves)
        dstacked = jax.tree.unflatten(jax.tree.structure(stored_states),
                                      [next(it) if t else None for t in trained])
        return dstacked, dx

    run.defvjp(forward, backward, symbolic_zeros=True)
    return run(stacked, x)


def _cotangent_tied_remat(graphdef, saveable):
    """One layer under `jax.checkpoint(policy=saveable)` whose backward recomputation waits for the cotangent.

    A plain jax.checkpoint of each layer of an unrolled stack saved nothing on XLA CPU: its recomputations
    depend only on the saved layer inputs, so the scheduler is free to run all of them as soon as the forward
    ends, and every layer's activations were alive at once again (measured: the compiled step's temporaries
    at 30 layers x 1,024 tokens were the same for none and full). Making the residuals depend on the incoming
    cotangent makes layer i's recomputation start only when the backward pass reaches layer i.
    """

    def apply(state, x, positions, mask):
        return nnx.merge(graphdef, state)(x, positions, mask)[0]

    checkpointed = jax.checkpoint(apply, policy=saveable)

    @jax.custom_vjp
    def layer(state, x, positions, mask):
        return apply(state, x, positions, mask)

    def forward(state, x, positions, mask):
        return jax.vjp(checkpointed, state, x, positions, mask)  # (output, vjp closure holding the residuals)

    def backward(vjp_fn, g):
        # A data dependence XLA cannot drop (an optimization_barrier is expanded away before XLA CPU schedules):
        # every saved residual + 0 * (one element of g). Not constant-folded, since 0 * x is NaN for x = inf.
        zero = jnp.zeros((), jnp.float32) * g.reshape(-1)[0].astype(jnp.float32)
        tied = jax.tree.map(lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.floating) else r,
                            vjp_fn)
        return tied(g)

    layer.defvjp(forward, backward)
    return layer


CAUSAL_ATTENTION_BLOCK = 128  # query block size of the full-sequence attention (see dot_product_attention)
# Logical axes and the length axis of each cache field (see KVCache).
CACHE_AXES = {"keys": ("cache_batch", "act_kv_heads", "head_dim", "cache_length"),
              "values": ("cache_batch", "act_kv_heads", "cache_length", "head_dim")}
LENGTH_AXIS = {"keys": 3, "values": 2}


def _write_rows(buffer: jax.Array, new: jax.Array, starts: jax.Array, field: str) -> jax.Array:
    """Writes new [b, t, kv, d] at cache positions starts[b]..starts[b]+t-1 of every row b, in place."""
    order = (0, 2, 3, 1) if field == "keys" else (0, 2, 1, 3)  # only the new tokens are transposed
    new = new.transpose(order).astype(buffer.dtype)

    def one(buf, upd, start):
        return jax.lax.dynamic_update_slice_in_dim(buf, upd, start, axis=LENGTH_AXIS[field] - 1)

    return constrain(jax.vmap(one)(buffer, new, starts), CACHE_AXES[field])


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention_block: int | None = None):
        # Query positions per block of the full-sequence attention (a static int: part of the graphdef); 0 = the
        # autodiff blocks of dot_product_attention, which keep every block's probabilities for the backward.
        self.attention_block = CAUSAL_ATTENTION_BLOCK if attention_block is None else int(attention_block)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attention = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, mask, cache_kv=None, cache_starts=None):
        q, k, v = self.attention.qkv(self.input_norm(x), positions)
        if cache_kv is not None:
            cache_k, cache_v = cache_kv
            cache_k = _write_rows(cache_k, k, cache_starts, "keys")
            cache_v = _write_rows(cache_v, v, cache_starts, "values")
            cache_kv = (cache_k, cache_v)
            attn = cached_attention(q, cache_k, cache_v, mask)
        else:
            # Full sequences are causal and aligned, so attention can skip the masked upper triangle.
            if self.attention_block > 0:
                attn = causal_attention(q, k, v, mask, block=self.attention_block)
            else:
                attn = dot_product_attention(q, k, v, mask, causal_block=CAUSAL_ATTENTION_BLOCK)
        x = x + self.attention.output(attn)
        x = x + self.mlp(self.post_attention_norm(x))
        return x, cache_kv


def _layer_call(layer, x, positions, mask):
    return layer(x, positions, mask)[0]


class DecoderLM(nnx.Module):
    """Llama / Qwen2 / Qwen3 causal language model."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: bool | str = False,
        attention_block: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.config = cfg
        self.dtype = dtype
        self.remat = resolve_remat(remat)  # a policy name in REMAT_POLICIES (static: part of the graphdef)
        std = cfg.initializer_range
        self.embed = nnx.Param(
            std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype),
            logical_axes=("vocab", "embed"),
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention_block=attention_block)
             for _ in range(cfg.num_layers)]
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Param(
                std * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype),
                logical_axes=("embed", "vocab"),
            )

    # ----- pieces ---------------------------------------------------------------------------------------
    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        # The lookup reads the table where it lies (embed split over fsdp) for the tokens of the whole fsdp group,
        # then hands each device its rows: the lookup's gradient is then a scatter into the local table shard,
        # not into a full [vocab, embed] float32 buffer on every device.
        tokens = constrain(tokens, ("head_batch", "length"))
        x = constrain(jnp.take(self.embed[...], tokens, axis=0), ("head_batch", "length", "embed"))
        return constrain(x.astype(self.dtype), ("batch", "length", "act_embed"))

    def logits_from_hidden(self, hidden: jax.Array, *, vocab_parallel: bool = False) -> jax.Array:
        """Logits [b, t, vocab] in the compute dtype.

        vocab_parallel (the training loss): the rows are gathered and the head split over the vocabulary, so the
        head's weight and gradient stay 1/fsdp per device (same values: each logit is the same full dot product).
        """
        tied = self.lm_head is None
        w = self.embed[...] if tied else self.lm_head[...]
        if vocab_parallel:
            w = constrain(w.astype(self.dtype), ("head_vocab", None) if tied else (None, "head_vocab"))
            hidden = constrain(hidden.astype(self.dtype), ("head_batch", "length", "act_embed"))
        logits = matmul("bte,ve->btv" if tied else "bte,ev->btv", hidden.astype(self.dtype), w)
        if vocab_parallel:
            return constrain(logits, ("head_batch", "length", "head_vocab"))
        return constrain(logits, ("batch", "length", "act_vocab"))

    # ----- full sequence --------------------------------------------------------------------------------
    def hidden_states(self, tokens, positions=None, attention_mask=None, segment_ids=None) -> jax.Array:
        """Final-norm hidden states [b, t, e] for a full sequence (causal + padding mask).

        `segment_ids` [b, t] (packed sequences): a token attends only to tokens with the same segment id.
        """
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        mask = jnp.broadcast_to(causal, (b, t, t))
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        x = self.embed_tokens(tokens)
        scanned = _scanned_layers(self.layers, x, positions, mask, self.remat, self.dtype)
        if scanned is not None:
            return self.final_norm(scanned)
        call = _remat_layer_call(self.remat)
        for layer in self.layers:
            x = call(layer, x, positions, mask)
        return self.final_norm(x)

    def __call__(self, tokens, positions=None, attention_mask=None, segment_ids=None) -> jax.Array:
        """Logits [b, t, vocab] in the compute dtype."""
        return self.logits_from_hidden(self.hidden_states(tokens, positions, attention_mask, segment_ids))

    # ----- incremental decoding ---------------------------------------------------------------------------
    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        return KVCache.zeros(self.config, batch, max_length, dtype or self.dtype)

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        cache_starts: jax.Array,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Runs `tokens` [b, t] written at cache slots cache_starts[b] + arange(t); returns logits, cache.

        Query i of row b attends every cache slot <= cache_starts[b] + i, so right-padded prefills and
        one-token steps share one code path; slots past a row's length are never read.
        `logits_at` [b] (token indices into t): logits [b, 1, V] of only those tokens. A prefill needs just
        its last prompt token's, and the vocabulary product over every padded position was ~1/5 of its work.
        """
        b, t = tokens.shape
        slots = jnp.arange(cache.max_length, dtype=jnp.int32)
        query_slots = cache_starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        mask = slots[None, None, :] <= query_slots[:, :, None]
        x = self.embed_tokens(tokens)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, positions, mask, (cache.keys[i], cache.values[i]), cache_starts)
            keys.append(k)
            values.append(v)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)
        logits = self.logits_from_hidden(self.final_norm(x))
        return logits, KVCache(keys=tuple(keys), values=tuple(values))
