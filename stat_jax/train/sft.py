"""`stat-jax sft`: supervised fine-tuning of a student on {prompt | messages, response} records.

The step is one jitted pure function `train_step(state, batch) -> (state, metrics)` with explicit shardings
over the (data, fsdp, tensor) mesh; the loop around it is data -> step -> log -> checkpoint. Programmatic use
(the STAT pipeline, the demo): `train_sft(config, examples_or_path, workdir, resume)`.

Training state: `{"step": int32, "params": pure dict of the model's parameters, "opt_state": optax state}`.
With adapters (train.lora.rank > 0) "params" holds only the adapters; the frozen base is a separate, never
donated argument of the step (`frozen`), so checkpoints hold the adapters plus the base's fingerprint.
The loss is the token-mean cross entropy over response tokens of the whole optimizer batch; with gradient
accumulation the micro-batch sums are added before dividing, so k micro-batches equal one k-times larger batch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from stat_jax import sharding
from stat_jax.config import ConfigError, config_hash, config_to_dict, write_resolved_config
from stat_jax.errors import CheckpointsExistError
from stat_jax.data import sft_data
from stat_jax.data.records import SFTExample
from stat_jax.models import lora
from stat_jax.train import chunked_loss
from stat_jax.train import memory as train_memory
from stat_jax.train.checkpointing import CheckpointManager, PreemptionGuard, abstract_state
from stat_jax.train.metrics import MetricsLogger
from stat_jax.train.optim import build_optimizer, optimizer_shardings

log = logging.getLogger(__name__)

# Exit status of `main` when SIGTERM stopped the run after a checkpoint (128 + SIGTERM, like a killed shell).
PREEMPTED_STATUS = 143
BATCH_AXES = (None, "batch", "length")  # [micro-batch index, rows, tokens]


# ----- the step --------------------------------------------------------------------------------------------
def loss_sums(params: dict, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], *,
              chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS, frozen: dict | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """(sum of masked cross entropy, number of loss tokens) of one micro-batch [rows, t].

    The logits are computed `chunk_tokens` at a time (`chunked_loss.token_stats`); 0 = all at once.
    `frozen`: the rest of the model's state when `params` are only adapters (not differentiated).
    """
    if frozen:
        model = nnx.merge(graphdef, nnx.State(params), nnx.State(frozen))
    else:
        model = nnx.merge(graphdef, nnx.State(params))
    hidden = model.hidden_states(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    logp = chunked_loss.token_stats(model, hidden, batch["targets"], chunk_tokens=chunk_tokens)["logp"]
    weights = batch["weights"]
    return -jnp.sum(logp * weights), jnp.sum(weights)


def accumulated_gradients(params: dict, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], *,
                          chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS, frozen: dict | None = None,
                          dropout_key: jax.Array | None = None):
    """(token-mean loss, its gradient, loss tokens) over micro-batches batch[k], summed before normalising.

    `dropout_key`: adapters' dropout masks are drawn from it (one fold per micro-batch); None = no dropout.
    """
    grad_fn = jax.value_and_grad(functools.partial(loss_sums, chunk_tokens=chunk_tokens, frozen=frozen),
                                 has_aux=True)

    def micro_grads(micro, index):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        with lora.dropout_key(key):
            return grad_fn(params, graphdef, micro)

    def one(carry, xs):
        grad_sum, loss_sum, token_sum = carry
        (ce_sum, tokens), grads = micro_grads(*xs)
        return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + ce_sum, token_sum + tokens), None

    k = batch["tokens"].shape[0]
    if k == 1:  # no accumulation: skip the scan (and its zero-initialised buffers)
        (ce_sum, tokens), grad_sum = micro_grads(jax.tree.map(lambda x: x[0], batch), 0)
    else:
        init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
        (grad_sum, ce_sum, tokens), _ = jax.lax.scan(one, init, (batch, jnp.arange(k)))
    denom = jnp.maximum(tokens, 1.0)
    return ce_sum / denom, jax.tree.map(lambda g: g / denom, grad_sum), tokens


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS, dropout_seed: int | None = None
                    ) -> Callable:
    """The pure step `(state, batch[, frozen]) -> (state, metrics)`; batch leaves are [micro_batches, rows, t].

    `frozen`: the frozen base when state["params"] are adapters. `dropout_seed`: adapters' dropout is on, its
    masks a function of (seed, step, micro-batch), so a resumed run draws the same ones.
    """

    def train_step(state: dict, batch: dict[str, jax.Array], frozen: dict | None = None
                   ) -> tuple[dict, dict[str, jax.Array]]:
        key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state["step"])
        loss, grads, tokens = accumulated_gradients(state["params"], graphdef, batch, chunk_tokens=chunk_tokens,
                                                    frozen=frozen, dropout_key=key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),  # before clipping
            "lr": schedule(state["step"]),
            "loss_tokens": tokens,
            "tokens": jnp.sum(batch["segment_ids"] > 0),
        }
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def state_shardings_for(params_shapes: dict, param_shardings: dict, tx, mesh: Mesh) -> dict:
    """NamedShardings of the whole training state (moments follow their parameter)."""
    repl = sharding.replicated(mesh)
    return {"step": repl, "params": param_shardings,
            "opt_state": optimizer_shardings(tx, params_shapes, param_shardings, repl)}


def batch_shardings(mesh: Mesh, shape: Sequence[int]) -> dict[str, NamedSharding]:
    named = sharding.named_sharding(mesh, BATCH_AXES, shape)
    return {k: named for k in sft_data.BATCH_KEYS}


def jit_train_step(graphdef, tx, schedule, state_sh: dict, batch_sh: dict, mesh: Mesh, *,
                   chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS, frozen_sh: dict | None = None,
                   dropout_seed: int | None = None):
    """`train_step` under `jax.jit` with explicit in/out shardings; the old state's buffers are donated.

    With `frozen_sh` (adapters) the step takes the frozen base as a third argument, never donated.
    """
    step = make_train_step(graphdef, tx, schedule, chunk_tokens=chunk_tokens, dropout_seed=dropout_seed)
    if frozen_sh is not None:
        return jax.jit(step, in_shardings=(state_sh, batch_sh, frozen_sh),
                       out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def run_on_mesh(step, mesh: Mesh, frozen: dict | None = None) -> Callable:
    """`(state, batch) -> (state, metrics)` calling a jitted or compiled step under the mesh (with `frozen`)."""
    extra = () if frozen is None else (frozen,)

    def run(state, batch):
        with jax.set_mesh(mesh):  # so the model's `constrain` hints see the mesh
            return step(state, batch, *extra)

    return run


def compile_train_step(graphdef, tx, schedule, state_sh: dict, batch_sh: dict, mesh: Mesh, *,
                       chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS) -> Callable:
    """The jitted step (compiled on its first call) as `(state, batch) -> (state, metrics)`."""
    return run_on_mesh(jit_train_step(graphdef, tx, schedule, state_sh, batch_sh, mesh, chunk_tokens=chunk_tokens),
                       mesh)


def abstract_batch(batch_sh: dict[str, NamedSharding], shape: Sequence[int]) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch as ShapeDtypeStructs [micro_batches, rows, t] (what `SFTBatches` yields, reshaped)."""
    dtypes = {"weights": jnp.float32}
    return {k: jax.ShapeDtypeStruct(tuple(shape), dtypes.get(k, jnp.int32), sharding=batch_sh[k])
            for k in sft_data.BATCH_KEYS}


def fit_train_step(config, graphdef, tx, schedule, state_sh: dict, abstract_train_state: dict, mesh: Mesh, *,
                   abstract_frozen: dict | None = None, dropout_seed: int | None = None):
    """(micro-batches k, batch shardings, compiled step, StepMemory): the step compiled for the fewest
    micro-batches that fit `train.memory_budget_gb` (train.grad_accum_steps = 0), or checked at the user's k.

    `abstract_frozen`: the frozen base (ShapeDtypeStructs with shardings) when training adapters.
    """
    t = config.train
    frozen_sh = None if abstract_frozen is None else jax.tree.map(lambda x: x.sharding, abstract_frozen)
    frozen_args = () if abstract_frozen is None else (abstract_frozen,)
    rows, length = int(t.batch_size), int(config.data.max_length)
    budget, source = train_memory.budget_bytes(t, "train")

    def compile_for(k: int):
        batch_sh = batch_shardings(mesh, (k, rows // k, length))
        jitted = jit_train_step(graphdef, tx, schedule, state_sh, batch_sh, mesh,
                                chunk_tokens=int(t.loss_chunk_tokens), frozen_sh=frozen_sh, dropout_seed=dropout_seed)
        with jax.set_mesh(mesh):
            return jitted.lower(abstract_train_state, abstract_batch(batch_sh, (k, rows // k, length)),
                                *frozen_args).compile()

    advice = ("Lower train.batch_size or data.max_length, set model.remat=full (recompute each layer), spread "
              "the batch over more devices (mesh.fsdp), or raise train.memory_budget_gb / train.memory_fraction.")
    k, compiled, mem = train_memory.fit_micro_batches(
        compile_for, rows, train_memory.sharded_batch_ways(mesh), budget, budget_source=source,
        fixed=int(t.grad_accum_steps) or None, key="train.grad_accum_steps", advice=advice,
        process_count=jax.process_count())
    return k, batch_shardings(mesh, (k, rows // k, length)), compiled, mem


def to_device_batch(host: dict[str, np.ndarray], micro_batches: int, batch_sh: dict[str, NamedSharding]) -> dict:
    """Host rows [local_rows, t] -> global arrays [micro_batches, rows, t] on the mesh."""
    out = {}
    for key, x in host.items():
        local = x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])
        named = batch_sh[key]
        if jax.process_count() == 1:
            out[key] = jax.device_put(local, named)
        else:
            global_shape = (local.shape[0], local.shape[1] * jax.process_count(), *local.shape[2:])
            out[key] = jax.make_array_from_process_local_data(named, local, global_shape)
    return out


# ----- setup -----------------------------------------------------------------------------------------------
def _load_tokenizer(config):
    import transformers

    from stat_jax.models.hub import resolve_model_path

    path = resolve_model_path(config.model.tokenizer_path or config.model.path)
    return transformers.AutoTokenizer.from_pretrained(str(path)), path


def _examples(config, examples_or_path) -> list[SFTExample]:
    if examples_or_path is None:
        return sft_data.load_sft_examples(tuple(config.data.train_files), config.data.dataset,
                                          config.data.dataset_split)
    if isinstance(examples_or_path, (str, Path)):
        return sft_data.load_sft_examples([examples_or_path], split=config.data.dataset_split)
    items = list(examples_or_path)
    if items and isinstance(items[0], (str, Path)):
        return sft_data.load_sft_examples(items, split=config.data.dataset_split)
    return [sft_data.parse_record(ex.to_dict() if isinstance(ex, SFTExample) else ex, f"examples[{i}]")
            for i, ex in enumerate(items)]


def total_steps_for(train_cfg, batches: sft_data.SFTBatches) -> int:
    if train_cfg.steps > 0:
        return int(train_cfg.steps)
    if train_cfg.epochs <= 0:
        raise ConfigError("set train.steps > 0 or train.epochs > 0")
    return max(1, math.ceil(train_cfg.epochs * batches.batches_in_epoch(0)))


def _validate(config) -> None:
    t = config.train
    if t.batch_size <= 0 or t.grad_accum_steps < 0:
        raise ConfigError(f"train.batch_size={t.batch_size} must be positive and train.grad_accum_steps="
                         f"{t.grad_accum_steps} positive (or 0: derived from train.memory_budget_gb)")
    if t.grad_accum_steps and t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of "
                         f"train.grad_accum_steps={t.grad_accum_steps}")
    if config.data.max_length < 2:
        raise ConfigError(f"data.max_length={config.data.max_length} is too small")


def _check_batch_divides_mesh(micro_rows: int, mesh: Mesh) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro_rows % ways:
        # sharding.logical_to_spec then replicates the batch: correct, but every device computes every row.
        log.warning("sft: each micro-batch has %d rows (train.batch_size / train.grad_accum_steps), not a multiple "
                    "of the %d-way batch split (mesh.data * mesh.fsdp): the batch is replicated, not split",
                    micro_rows, ways)


def _run_fingerprint(config) -> str:
    """Hash of what must not change across a resume (model, data, optimizer; not mesh or logging)."""
    d = config_to_dict(config)
    keep = {k: d.get(k) for k in ("seed", "model", "data")}
    keep["train"] = {k: v for k, v in d.get("train", {}).items()
                     if k not in ("checkpoint_every", "keep_checkpoints", "async_checkpointing", "log_every",
                                  "export_dir", "export_dtype", "tensorboard", "grad_accum_steps",
                                  "memory_budget_gb", "memory_fraction", "loss_chunk_tokens")}
    keep["model"] = {k: v for k, v in (keep["model"] or {}).items() if k != "remat"}
    if not int((keep["train"].get("lora") or {}).get("rank", 0)):
        keep["train"].pop("lora", None)  # full fine-tuning keeps the hash it had before adapters existed
    return config_hash(keep)


def latest_checkpoint_meta(directory: Path) -> dict:
    """The newest complete checkpoint's JSON meta read on its own (no arrays, no orbax), or {} when none."""
    steps = sorted((int(p.name) for p in directory.glob("*") if p.name.isdigit()), reverse=True)
    for path in sorted((directory / str(steps[0]) / "meta").glob("*")) if steps else ():
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
    return {}


# ----- the loop --------------------------------------------------------------------------------------------
def train_sft(config, examples_or_path=None, workdir: str | Path | None = None, resume: bool = False,
              mesh: Mesh | None = None) -> dict[str, Any]:
    """Fine-tunes config.model.path on the examples and exports an HF directory; returns paths and metrics.

    `examples_or_path`: SFTExample/dict records, a JSON/JSONL path (or list of them), or None for
    config.data.train_files / config.data.dataset. Result keys: export_dir, metrics_path, checkpoint_dir,
    steps, final_loss, preempted.
    """
    from stat_jax.models import abstract_model, export_hf_checkpoint, load_hf_checkpoint
    from stat_jax.models.config import ModelConfig
    from stat_jax.models.hub import resolve_model_path

    _validate(config)
    workdir = Path(workdir or config.workdir)
    is_writer = jax.process_index() == 0
    export_dir = Path(config.train.export_dir) if config.train.export_dir else workdir / "hf"
    result_path = workdir / "sft_result.json"
    fingerprint = _run_fingerprint(config)
    if resume and result_path.exists() and (export_dir / "config.json").exists():
        done = json.loads(result_path.read_text())
        if done.get("fingerprint") == fingerprint:
            log.info("sft: %s already finished (step %s); nothing to do", workdir, done.get("steps"))
            return done

    mesh = mesh or sharding.mesh_from_config(config.mesh)
    model_path = resolve_model_path(config.model.path)
    model_cfg = ModelConfig.from_hf_dir(model_path)
    tokenizer, tokenizer_path = _load_tokenizer(config)

    examples = _examples(config, examples_or_path)
    tokenized = sft_data.tokenize_examples(tokenizer, examples, model_cfg.eos_token_ids,
                                           date_string=str(config.eval.date_string))
    tokenized, dropped = sft_data.drop_too_long(tokenized, config.data.max_length)
    if dropped:
        log.warning("sft: dropped %d of %d examples longer than data.max_length=%d tokens",
                    dropped, len(examples), config.data.max_length)
    batches = sft_data.SFTBatches(
        tokenized, batch_size=config.train.batch_size, seq_len=config.data.max_length, seed=config.seed,
        packing=config.data.packing, process_index=jax.process_index(), process_count=jax.process_count())
    total_steps = total_steps_for(config.train, batches)
    tx, schedule = build_optimizer(config.train, total_steps)

    model_kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat)
    lcfg = lora.LoraConfig.from_config(config.train.get("lora"))
    abstract_frozen = base_hash = None
    if lcfg.enabled:  # only the adapters are trained; the base is the step's frozen argument
        graphdef, abstract_params, abstract_base = lora.adapter_shapes(model_cfg, lcfg, **model_kw)
        base_hash = lora.base_fingerprint(model_path)
        if resume:  # before compiling: adapters of another base can have the same shapes and load silently
            lora.check_base(latest_checkpoint_meta(workdir / "checkpoints").get("base_fingerprint"), base_hash,
                            str(workdir / "checkpoints"))
        abstract_frozen = abstract_state(nnx.to_pure_dict(abstract_base),
                                         nnx.to_pure_dict(sharding.state_shardings(abstract_base, mesh)))
    else:
        graphdef, abstract_params = nnx.split(abstract_model(model_cfg, **model_kw))
    params_shapes = nnx.to_pure_dict(abstract_params)
    param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
    state_sh = state_shardings_for(params_shapes, param_sh, tx, mesh)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shapes,
              "opt_state": jax.eval_shape(tx.init, params_shapes)}
    dropout_seed = int(config.seed) if lcfg.enabled and lcfg.dropout > 0 else None
    # Compiled from abstract arrays before any weight is loaded, so a step that cannot fit stops here.
    micro, batch_sh, compiled_step, step_memory = fit_train_step(
        config, graphdef, tx, schedule, state_sh, abstract_state(shapes, state_sh), mesh,
        abstract_frozen=abstract_frozen, dropout_seed=dropout_seed)
    _check_batch_divides_mesh(config.train.batch_size // micro, mesh)

    ckpt = CheckpointManager(workdir / "checkpoints", save_every=config.train.checkpoint_every,
                             keep=config.train.keep_checkpoints, async_save=config.train.async_checkpointing)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        ckpt.close()
        raise CheckpointsExistError(f"{ckpt.directory} already holds checkpoints (latest step {latest}); pass "
                                    "--resume to continue that run, or choose another workdir")
    frozen = None
    if lcfg.enabled:
        base_model = lora.add_adapters(load_hf_checkpoint(model_path, mesh, **model_kw), lcfg, seed=config.seed)
        _, adapters, base = lora.split_adapters(base_model)
        frozen = nnx.to_pure_dict(base)
        del base_model, base
    if latest is not None:
        state, meta = ckpt.restore(abstract_state(shapes, state_sh))
        if meta.get("fingerprint") != fingerprint:
            log.warning("sft: resuming %s with a changed model/data/optimizer config (hash %s -> %s)",
                        workdir, meta.get("fingerprint"), fingerprint)
        batches.restore(meta["data"])
        log.info("sft: resumed from step %d (epoch %d, batch %d)", latest, batches.epoch, batches.batch)
    else:
        if lcfg.enabled:
            params = jax.device_put(nnx.to_pure_dict(adapters), param_sh)
        else:
            params = nnx.to_pure_dict(nnx.split(load_hf_checkpoint(model_path, mesh, **model_kw))[1])
        opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params)
        state = {"step": jax.device_put(jnp.int32(0), state_sh["step"]), "params": params, "opt_state": opt_state}
    start_step = int(jax.device_get(state["step"]))

    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(config, workdir)
    step_fn = run_on_mesh(compiled_step, mesh, frozen)
    metrics_path = workdir / "metrics.jsonl"
    logger = MetricsLogger(metrics_path, total_steps=total_steps, start_step=start_step, desc="sft",
                           tensorboard_dir=workdir / "tensorboard" if config.train.tensorboard else None,
                           is_writer=is_writer)
    log.info("sft: %d examples (%d dropped), %d rows/step x %d tokens in %d micro-batches, %d steps "
             "(%d batches/epoch), mesh %s, step memory %s per device", len(tokenized), dropped,
             config.train.batch_size, config.data.max_length, micro, total_steps, batches.batches_in_epoch(0),
             dict(mesh.shape), step_memory.describe())

    def meta() -> dict[str, Any]:
        return {"data": batches.state(), "fingerprint": fingerprint, "total_steps": total_steps,
                **({"base_fingerprint": base_hash} if base_hash else {})}

    pending: tuple[int, dict, int] | None = None  # metrics are read one step late so the host never stalls the device
    last_time = time.perf_counter()
    final_loss = None
    preempted = False

    def flush(pending_step: int, metrics: dict, epoch: int) -> float:
        nonlocal last_time
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        values["tokens_per_s"] = values["tokens"] / max(now - last_time, 1e-9)
        values["epoch"] = epoch
        last_time = now
        if pending_step % config.train.log_every == 0 or pending_step == total_steps:
            logger.log(pending_step, values)
        return values["loss"]

    try:
        with PreemptionGuard() as guard:
            for step in range(start_step + 1, total_steps + 1):
                batch = to_device_batch(next(batches), micro, batch_sh)
                epoch = batches.epoch
                state, metrics = step_fn(state, batch)
                if pending is not None:
                    final_loss = flush(*pending)
                pending = (step, metrics, epoch)
                if step == total_steps:
                    break
                ckpt.maybe_save(step, state, meta)
                if guard.should_stop(ckpt, step):
                    final_loss = flush(*pending)
                    pending = None
                    ckpt.save(step, state, meta(), force=True)
                    ckpt.wait()
                    log.warning("sft: stopped by SIGTERM at step %d after checkpointing; resume with --resume", step)
                    preempted = True
                    break
            if pending is not None:
                final_loss = flush(*pending)
            if not preempted:
                ckpt.save(total_steps, state, meta(), force=True)
    finally:
        logger.close()
        ckpt.close()

    end_step = int(jax.device_get(state["step"]))
    result = {"export_dir": str(export_dir), "metrics_path": str(metrics_path), "checkpoint_dir": str(ckpt.directory),
              "steps": end_step, "total_steps": total_steps, "final_loss": final_loss, "preempted": preempted,
              "fingerprint": fingerprint, "examples": len(tokenized), "dropped_examples": dropped,
              "micro_batches": micro, "step_memory_gb": step_memory.peak / train_memory.GB}
    if preempted:
        return result
    if lcfg.enabled:
        model = nnx.merge(graphdef, nnx.State(state["params"]), nnx.State(frozen))
        adapter_dir = workdir / "adapter"
        lora.export_peft_adapter(model, adapter_dir, lcfg, base_model_name_or_path=str(model_path),
                                 base_hash=base_hash, dtype=config.train.export_dtype)
        result["adapter_dir"] = str(adapter_dir)  # the HF export below holds base + adapters merged
    else:
        model = nnx.merge(graphdef, nnx.State(state["params"]))
    export_hf_checkpoint(model, export_dir, tokenizer_source=tokenizer_path, dtype=config.train.export_dtype)
    if is_writer:
        result_path.write_text(json.dumps(result, indent=2))
    return result


def main(config, args) -> int:
    """`stat-jax sft --config=configs/sft_*.py [--resume]`."""
    result = train_sft(config, workdir=config.workdir, resume=bool(getattr(args, "resume", False)))
    if result["preempted"]:
        return PREEMPTED_STATUS
    print(json.dumps({k: result[k] for k in ("export_dir", "metrics_path", "steps", "final_loss")}))
    return 0
