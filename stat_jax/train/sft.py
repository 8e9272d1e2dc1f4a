"""`stat-jax sft`: supervised fine-tuning of a student on {prompt | messages, response} records.

SFT is its loss, its data and its metrics on the shared trainer core (train/loop.py: the accumulating jitted
step, shardings, checkpoints, resume, SIGTERM, export); the loop is data -> step -> log -> checkpoint. Programmatic use
(the STAT pipeline, the demo): `train_sft(config, examples_or_path, workdir, resume)`.

Training state: `{"step": int32, "params": pure dict of the model's parameters, "opt_state": optax state}`.
With adapters (train.lora.rank > 0) "params" holds only the adapters; the frozen base is a separate, never
donated argument of the step (`frozen`), so checkpoints hold the adapters plus the base's fingerprint.
The loss is the token-mean cross entropy over response tokens of the whole optimizer batch; with gradient
accumulation the micro-batch sums are added before dividing, so k micro-batches equal one k-times larger batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from stat_jax import sharding
from stat_jax import validity
from stat_jax.config import ConfigError, write_resolved_config
from stat_jax.data import sft_data
from stat_jax.data.records import SFTExample
from stat_jax.train import chunked_loss, loop
from stat_jax.train import memory as train_memory
from stat_jax.train.metrics import MetricsLogger
from stat_jax.train.optim import build_optimizer

log = logging.getLogger(__name__)



# ----- the step: SFT's loss on the shared core (train/loop.py) ------------------------------------------------
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


def sft_loss(graphdef: nnx.GraphDef, chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS) -> loop.LossFn:
    """The core's per-micro-batch loss: summed cross entropy, with the loss and input token counts as aux."""

    def loss_fn(params, micro, frozen):
        ce_sum, tokens = loss_sums(params, graphdef, micro, chunk_tokens=chunk_tokens, frozen=frozen)
        return ce_sum, {"loss_tokens": tokens, "tokens": jnp.sum(micro["segment_ids"] > 0).astype(jnp.float32)}

    return loss_fn


def per_token(loss, aux, grads):
    """Sums over the optimizer batch -> its token mean (micro-batch sums are added before dividing)."""
    denom = jnp.maximum(aux["loss_tokens"], 1.0)
    return loss / denom, aux, jax.tree.map(lambda g: g / denom, grads)


def accumulated_gradients(params: dict, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], *,
                          chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS, frozen: dict | None = None,
                          dropout_key: jax.Array | None = None):
    """(token-mean loss, its gradient, loss tokens) over micro-batches batch[k], summed before normalising."""
    grads, loss, aux = loop.accumulate(sft_loss(graphdef, chunk_tokens), params, batch, frozen=frozen,
                                       dropout_key=dropout_key)
    loss, aux, grads = per_token(loss, aux, grads)
    return loss, grads, aux["loss_tokens"]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS, dropout_seed: int | None = None
                    ) -> Callable:
    """The pure step `(state, batch[, frozen]) -> (state, metrics)`; batch leaves are [micro_batches, rows, t].

    Metrics: loss, grad_norm, lr, loss_tokens, tokens (non-padding input tokens).
    """
    return loop.make_train_step(sft_loss(graphdef, chunk_tokens), tx, schedule, normalize=per_token,
                                dropout_seed=dropout_seed)


def batch_layout(rows: int, length: int) -> loop.BatchLayout:
    return loop.BatchLayout(rows, length, {k: jnp.float32 if k == "weights" else jnp.int32
                                           for k in sft_data.BATCH_KEYS})


def fit_train_step(config, graphdef, tx, schedule, state_sh: dict, abstract_train_state: dict, mesh: Mesh, *,
                   abstract_frozen: dict | None = None, dropout_seed: int | None = None):
    """(micro-batches k, batch shardings, compiled step, StepMemory): the step compiled for the fewest
    micro-batches that fit `train.memory_budget_gb` (train.grad_accum_steps = 0), or checked at the user's k.

    `abstract_frozen`: the frozen base (ShapeDtypeStructs with shardings) when training adapters.
    """
    t = config.train
    step = make_train_step(graphdef, tx, schedule, chunk_tokens=int(t.loss_chunk_tokens), dropout_seed=dropout_seed)
    advice = ("Lower train.batch_size or data.max_length, set model.remat=full (recompute each layer), spread "
              "the batch over more devices (mesh.fsdp), or raise train.memory_budget_gb / train.memory_fraction.")
    return loop.fit_train_step(step, state_sh, abstract_train_state, mesh,
                               batch_layout(int(t.batch_size), int(config.data.max_length)), section=t,
                               prefix="train", fixed=int(t.grad_accum_steps) or None, key="train.grad_accum_steps",
                               advice=advice, abstract_frozen=abstract_frozen, process_count=jax.process_count())


# ----- setup -----------------------------------------------------------------------------------------------
def _load_tokenizer(config):
    from stat_jax.models.hub import resolve_model_path
    from stat_jax.models.student import load_tokenizer

    return load_tokenizer(config), resolve_model_path(config.model.tokenizer_path or config.model.path)


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




# ----- the loop --------------------------------------------------------------------------------------------
def train_sft(config, examples_or_path=None, workdir: str | Path | None = None, resume: bool = False,
              mesh: Mesh | None = None) -> dict[str, Any]:
    """Fine-tunes config.model.path on the examples and exports an HF directory; returns paths and metrics.

    `examples_or_path`: SFTExample/dict records, a JSON/JSONL path (or list of them), or None for
    config.data.train_files / config.data.dataset. Result keys: export_dir, metrics_path, checkpoint_dir,
    steps, final_loss, preempted (and adapter_dir with train.lora.rank > 0).

    A finished run is returned again and a checkpoint resumed (resume=True) while the rows and every config field
    the run read are unchanged (stat_jax/validity.py: the checkpoints and the result keep those reads).
    """
    config = validity.watch(config)
    with validity.reads() as reads:
        return _train_sft(config, examples_or_path, workdir, resume, mesh, reads)


def _train_sft(config, examples_or_path, workdir: str | Path | None, resume: bool, mesh: Mesh | None,
               reads: validity.Reads) -> dict[str, Any]:
    from stat_jax.models.config import ModelConfig
    from stat_jax.models.hub import resolve_model_path

    _validate(config)
    workdir = Path(workdir or config.workdir)
    is_writer = jax.process_index() == 0
    export_dir = Path(config.train.export_dir) if config.train.export_dir else workdir / "hf"
    result_path = workdir / "sft_result.json"
    examples = _examples(config, examples_or_path)
    data_hash = loop.rows_hash(examples)
    if (done := loop.previous_result(workdir, result_path, export_dir, config, data_hash, resume, "sft")) is not None:
        return done

    mesh = mesh or sharding.mesh_from_config(config.mesh)
    model_cfg = ModelConfig.from_hf_dir(model_path := resolve_model_path(config.model.path))
    tokenizer, tokenizer_path = _load_tokenizer(config)

    tokenized, dropped, batches = _batches(config, tokenizer, examples, model_cfg.eos_token_ids)
    total_steps = total_steps_for(config.train, batches)
    tx, schedule = build_optimizer(config.train, total_steps)

    policy, state_sh, abstract_train_state, dropout_seed = loop.policy_from_config(
        config, model_cfg, model_path, mesh, tx, workdir / "checkpoints", resume)
    # Compiled from abstract arrays before any weight is loaded, so a step that cannot fit stops here.
    micro, batch_sh, compiled_step, step_memory = fit_train_step(
        config, policy.graphdef, tx, schedule, state_sh, abstract_train_state, mesh,
        abstract_frozen=policy.abstract_frozen, dropout_seed=dropout_seed)
    _check_batch_divides_mesh(config.train.batch_size // micro, mesh)

    ckpt = loop.open_checkpoints(workdir / "checkpoints", config.train, resume)
    # Full fine-tuning resumes from the checkpoint alone; adapters always need their frozen base.
    loaded = loop.load_policy(policy, mesh, int(config.seed)) if policy.adapters or ckpt.latest_step() is None \
        else (None, None)
    frozen = loaded[1]
    state, restored_meta, latest = loop.restore_or_init(ckpt, abstract_train_state, state_sh, tx, lambda: loaded[0],
                                                        config, "sft")
    del loaded
    if latest is not None:
        batches.restore(restored_meta["data"])
        log.info("sft: resumed from step %d (epoch %d, batch %d)", latest, batches.epoch, batches.batch)
    start_step = int(jax.device_get(state["step"]))

    if is_writer:
        write_resolved_config(config, workdir)
    train_step = loop.run_on_mesh(compiled_step, mesh, frozen)
    metrics_path = workdir / "metrics.jsonl"
    logger = MetricsLogger(metrics_path, total_steps=total_steps, start_step=start_step, desc="sft",
                           tensorboard_dir=workdir / "tensorboard" if config.train.tensorboard else None,
                           is_writer=is_writer)
    log.info("sft: %d examples (%d dropped), %d rows/step x %d tokens in %d micro-batches, %d steps "
             "(%d batches/epoch), mesh %s, step memory %s per device", len(tokenized), dropped,
             config.train.batch_size, config.data.max_length, micro, total_steps, batches.batches_in_epoch(0),
             dict(mesh.shape), step_memory.describe())

    def meta() -> dict[str, Any]:
        return {"data": batches.state(), "data_hash": data_hash, "reads": dict(reads.values),
                "total_steps": total_steps, **policy.checkpoint_meta()}

    def step_fn(step: int, state: dict):
        batch = loop.to_device_batch(next(batches), micro, batch_sh)
        epoch = batches.epoch  # the epoch this batch came from
        state, metrics = train_step(state, batch)
        return state, {**metrics, "epoch": epoch}

    report = _reporter(logger, int(config.train.log_every), total_steps)
    try:
        state, preempted, last = loop.run_loop("sft", state, start_step, total_steps, step_fn, report, ckpt, meta)
    finally:
        logger.close()
        ckpt.close()

    result = {"export_dir": str(export_dir), "metrics_path": str(metrics_path), "checkpoint_dir": str(ckpt.directory),
              "steps": int(jax.device_get(state["step"])), "total_steps": total_steps, "final_loss": last.get("loss"), "preempted": preempted,
              "data_hash": data_hash, "reads": dict(reads.values), "examples": len(tokenized),
              "dropped_examples": dropped,
              "micro_batches": micro, "step_memory_gb": step_memory.peak / train_memory.GB}
    return loop.finish(result, policy, state["params"], frozen, export_dir=export_dir, workdir=workdir,
                       result_path=result_path, tokenizer_source=tokenizer_path, dtype=config.train.export_dtype)


def _batches(config, tokenizer, examples: Sequence[SFTExample], eos_ids) -> tuple[Any, int, Any]:
    """(tokenized examples, how many were dropped as too long, the packed SFTBatches of this process)."""
    tokenized = sft_data.tokenize_examples(tokenizer, examples, eos_ids, date_string=str(config.eval.date_string))
    tokenized, dropped = sft_data.drop_too_long(tokenized, config.data.max_length)
    if dropped:
        log.warning("sft: dropped %d of %d examples longer than data.max_length=%d tokens",
                    dropped, len(examples), config.data.max_length)
    batches = sft_data.SFTBatches(
        tokenized, batch_size=config.train.batch_size, seq_len=config.data.max_length, seed=config.seed,
        packing=config.data.packing, process_index=jax.process_index(), process_count=jax.process_count())
    return tokenized, dropped, batches


def _reporter(logger: MetricsLogger, log_every: int, total_steps: int) -> Callable[[int, dict[str, float]], None]:
    """The loop's report(step, metrics): tokens/s since the last step, a row every `log_every` steps and the last."""
    last_time = time.perf_counter()

    def report(step: int, values: dict[str, float]) -> None:
        nonlocal last_time
        now = time.perf_counter()
        values["tokens_per_s"] = values["tokens"] / max(now - last_time, 1e-9)
        values["epoch"] = int(values["epoch"])
        last_time = now
        if step % log_every == 0 or step == total_steps:
            logger.log(step, values)

    return report


def main(config, args) -> int:
    """`stat-jax sft --config=configs/sft_*.py [--resume]`."""
    result = train_sft(config, workdir=config.workdir, resume=bool(getattr(args, "resume", False)))
    if result["preempted"]:
        return loop.PREEMPTED_STATUS
    print(json.dumps({k: result[k] for k in ("export_dir", "metrics_path", "steps", "final_loss")}))
    return 0
