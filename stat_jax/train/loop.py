"""The trainer core shared by SFT and GRPO: one accumulating jitted step, one path for the training state
(shardings, checkpoints, resume, SIGTERM, export) and one rule for placing host rows on the mesh.

A trainer supplies its per-micro-batch loss `loss_fn(params, micro, frozen) -> (loss_sum, aux_sums)`, where
every value is a sum over the micro-batch's tokens, so that the sums over k micro-batches ARE the optimizer
batch's values (SFT divides by its token count afterwards through `normalize`; GRPO's token weights are
normalised on the host already). The rest is the trainer's data and metrics.

What is trained (`Policy`): the model's full parameters, or with `train.lora.rank > 0` only the low-rank
adapters (models/lora.py), the frozen base then being a separate, never donated argument of the step.
Training state: `{"step": int32 (optimizer updates), "params": pure dict of what is trained, "opt_state"}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from stat_jax import sharding, validity
from stat_jax.errors import CheckpointsExistError, WorkdirError
from stat_jax.models import lora, transformer
from stat_jax.train import memory as train_memory
from stat_jax.train.checkpointing import CheckpointManager, PreemptionGuard, abstract_state
from stat_jax.train.optim import optimizer_shardings

log = logging.getLogger(__name__)

# Exit status of a trainer's `main` when SIGTERM stopped the run after a checkpoint (128 + SIGTERM).
PREEMPTED_STATUS = 143
LossFn = Callable[[dict, dict, "dict | None"], tuple[jax.Array, dict[str, jax.Array]]]


# ----- the step --------------------------------------------------------------------------------------------
def accumulate(loss_fn: LossFn, params: dict, batch: dict, *, frozen: dict | None = None,
               dropout_key: jax.Array | None = None) -> tuple[dict, jax.Array, dict]:
    """(gradient sum, loss sum, aux sums) of `loss_fn` over the micro-batches batch[i] (leaves [k, ...]); an aux
    key ending in `_max` is the maximum over micro-batches instead (its values must be >= 0).

    `dropout_key`: adapters' dropout masks are drawn from it, one fold per micro-batch; None = no dropout.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_grads(micro, index):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        with lora.dropout_key(key):
            (loss, aux), grads = grad_fn(params, micro, frozen)
        return grads, loss, aux

    k = jax.tree.leaves(batch)[0].shape[0]
    first = jax.tree.map(lambda x: x[0], batch)
    if k == 1:  # no accumulation: skip the scan (and its zero-initialised buffers)
        return micro_grads(first, 0)

    def one(carry, xs):
        grads, loss, aux = micro_grads(*xs)
        aux = {key: (jnp.maximum if key.endswith("_max") else jnp.add)(carry[2][key], v) for key, v in aux.items()}
        return (jax.tree.map(jnp.add, carry[0], grads), carry[1] + loss, aux), None

    shapes = jax.eval_shape(micro_grads, first, 0)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(one, init, (batch, jnp.arange(k)))[0]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    normalize: Callable | None = None, dropout_seed: int | None = None) -> Callable:
    """The pure step `(state, batch[, frozen]) -> (state, metrics)`; batch leaves are [micro_batches, ...].

    `normalize(loss, aux, grads) -> (loss, aux, grads)` turns the summed values into the batch's (SFT: divide
    by the loss tokens). `dropout_seed`: adapters' dropout is on, its masks a function of (seed, step,
    micro-batch), so a resumed run draws the same ones. Metrics: loss, grad_norm (before clipping), lr, aux.
    """

    def train_step(state: dict, batch: dict, frozen: dict | None = None) -> tuple[dict, dict]:
        key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state["step"])
        grads, loss, aux = accumulate(loss_fn, state["params"], batch, frozen=frozen, dropout_key=key)
        if normalize is not None:
            loss, aux, grads = normalize(loss, aux, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"]), **aux}
        return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state}, metrics

    return train_step


def jit_train_step(train_step: Callable, state_sh: dict, batch_sh: dict, mesh: Mesh, *,
                   frozen_sh: dict | None = None, donate_params: bool = True):
    """`train_step` jitted as `(params, opt_state, step, batch[, frozen])` with explicit shardings.

    The optimizer state is always donated; the params only with `donate_params` (GRPO's rollout engine may
    serve the very buffers the step reads). The frozen base is never donated: every step reads it.
    """

    def split_step(params, opt_state, step, batch, *frozen):
        return train_step({"step": step, "params": params, "opt_state": opt_state}, batch, *frozen)

    in_sh = (state_sh["params"], state_sh["opt_state"], state_sh["step"], batch_sh)
    return jax.jit(split_step, in_shardings=in_sh + (() if frozen_sh is None else (frozen_sh,)),
                   out_shardings=(state_sh, sharding.replicated(mesh)),
                   donate_argnums=(0, 1, 2) if donate_params else (1,))


def run_on_mesh(step, mesh: Mesh, frozen: dict | None = None) -> Callable:
    """`(state, batch) -> (state, metrics)` calling a jitted or compiled split step under the mesh."""
    extra = () if frozen is None else (frozen,)

    def run(state, batch):
        with jax.set_mesh(mesh):  # so the model's `constrain` hints see the mesh
            return step(state["params"], state["opt_state"], state["step"], batch, *extra)

    return run


# ----- batches ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """The step's batch: per-token keys [k, rows // k, length], per-row keys [k, rows // k] (global rows)."""

    rows: int
    length: int
    token_keys: Mapping[str, Any]  # key -> dtype
    row_keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def shape(self, key: str, k: int) -> tuple[int, ...]:
        return (k, self.rows // k) if key in self.row_keys else (k, self.rows // k, self.length)

    def shardings(self, mesh: Mesh, k: int) -> dict[str, NamedSharding]:
        token = sharding.named_sharding(mesh, (None, "batch", "length"), self.shape("", k))
        row = sharding.named_sharding(mesh, (None, "batch"), (k, self.rows // k))
        return {key: token for key in self.token_keys} | {key: row for key in self.row_keys}

    def abstract(self, batch_sh: dict[str, NamedSharding], k: int) -> dict[str, jax.ShapeDtypeStruct]:
        dtypes = {**self.token_keys, **self.row_keys}
        return {key: jax.ShapeDtypeStruct(self.shape(key, k), dtypes[key], sharding=batch_sh[key])
                for key in dtypes}


def to_device_batch(host: dict[str, np.ndarray], micro_batches: int, batch_sh: dict[str, NamedSharding],
                    global_rows: int | None = None) -> dict[str, jax.Array]:
    """Host rows [n, ...] -> global arrays [micro_batches, global_rows // micro_batches, ...] on the mesh.

    The one rule on any number of hosts: a process holding all `global_rows` rows (n == global_rows: every
    process has the same batch, GRPO's seeded rollouts) places the shards its devices hold; a process holding
    its share (n * process_count == global_rows: SFT's per-process data) must own a distinct slice of the
    batch axis, which is checked, because replicas fed different rows would silently disagree.
    """
    rows = next(iter(host.values())).shape[0]
    global_rows = rows * jax.process_count() if global_rows is None else int(global_rows)
    if rows not in (global_rows, global_rows // max(jax.process_count(), 1)):
        raise ValueError(f"to_device_batch: this process holds {rows} rows, neither the batch's {global_rows} "
                         f"rows nor its 1/{jax.process_count()} share")
    out = {}
    for key, x in host.items():
        local = x.reshape(micro_batches, rows // micro_batches, *x.shape[1:])
        global_shape = (micro_batches, global_rows // micro_batches, *x.shape[1:])
        if rows != global_rows:
            _check_process_share(batch_sh[key], global_shape, local.shape[1], key)
        out[key] = jax.make_array_from_process_local_data(batch_sh[key], local, global_shape)
    return out


def _check_process_share(named: NamedSharding, global_shape, local_rows: int, key: str) -> None:
    held = {(idx[1].start or 0, idx[1].stop if idx[1].stop is not None else global_shape[1])
            for idx in named.addressable_devices_indices_map(global_shape).values()}
    if sum(stop - start for start, stop in held) != local_rows:
        raise ValueError(f"batch[{key!r}]: each process feeds its own {local_rows} rows, but its devices hold "
                         f"{sorted(held)} of the {global_shape[1]} rows of a micro-batch (the batch axis is not "
                         f"split over the processes); make the micro-batch rows a multiple of mesh.data * "
                         f"mesh.fsdp, with those axes spanning the hosts")


# ----- what is trained -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Policy:
    """The trained model's layout on the mesh: full parameters, or adapters over a frozen base."""

    graphdef: nnx.GraphDef
    shapes: dict  # abstract trained params (pure dict of ShapeDtypeStructs)
    shardings: dict  # their NamedShardings
    lcfg: lora.LoraConfig
    model_path: Path
    model_kw: dict
    abstract_frozen: dict | None = None  # the frozen base (with shardings) when training adapters
    base_hash: str | None = None

    @property
    def adapters(self) -> bool:
        return self.lcfg.enabled

    def checkpoint_meta(self) -> dict[str, str]:
        """What a checkpoint records of the policy: the base the adapters belong to."""
        return {"base_fingerprint": self.base_hash} if self.adapters else {}


def policy_for(model_cfg, model_path: str | Path, lcfg: lora.LoraConfig, mesh: Mesh, model_kw: dict) -> Policy:
    """The policy's abstract layout (nothing is allocated); adapters when `lcfg.enabled`."""
    from stat_jax.models import abstract_model

    model_path = Path(model_path)
    if not lcfg.enabled:
        graphdef, abstract_params = nnx.split(abstract_model(model_cfg, **model_kw))
        return Policy(graphdef, nnx.to_pure_dict(abstract_params),
                      nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh)), lcfg, model_path, model_kw)
    graphdef, abstract_params, abstract_base = lora.adapter_shapes(model_cfg, lcfg, **model_kw)
    frozen = abstract_state(nnx.to_pure_dict(abstract_base),
                            nnx.to_pure_dict(sharding.state_shardings(abstract_base, mesh)))
    return Policy(graphdef, nnx.to_pure_dict(abstract_params),
                  nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh)), lcfg, model_path, model_kw,
                  abstract_frozen=frozen, base_hash=lora.base_fingerprint(model_path))


def load_policy(policy: Policy, mesh: Mesh, seed: int) -> tuple[dict, dict | None]:
    """(trained params, frozen base or None) from the HF checkpoint, placed on the mesh."""
    from stat_jax.models import load_hf_checkpoint

    model = load_hf_checkpoint(policy.model_path, mesh, **policy.model_kw)
    if not policy.adapters:
        return nnx.to_pure_dict(nnx.split(model)[1]), None
    _, adapters, base = lora.split_adapters(lora.add_adapters(model, policy.lcfg, seed=seed))
    return jax.device_put(nnx.to_pure_dict(adapters), policy.shardings), nnx.to_pure_dict(base)


def policy_from_config(config, model_cfg, model_path: str | Path, mesh: Mesh, tx, checkpoint_dir: Path,
                       resume: bool) -> tuple[Policy, dict, dict, int | None]:
    """(policy, state shardings, abstract state, adapters' dropout seed or None) for config.model with
    config.train.lora; a resume with adapters first checks the checkpoints' base (a named error)."""
    model_kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat,
                    attention_block=int(config.model.get("attention_block", transformer.CAUSAL_ATTENTION_BLOCK)))
    policy = policy_for(model_cfg, model_path, lora.LoraConfig.from_config(config.train.get("lora")), mesh, model_kw)
    if resume and policy.adapters:  # before compiling: adapters of another base can have the same shapes
        lora.check_base(latest_checkpoint_meta(checkpoint_dir).get("base_fingerprint"), policy.base_hash,
                        str(checkpoint_dir))
    state_sh, abstract_train_state = state_layout(policy, tx, mesh)
    dropout_seed = int(config.seed) if policy.adapters and policy.lcfg.dropout > 0 else None
    return policy, state_sh, abstract_train_state, dropout_seed


def model_of(policy: Policy, params: dict, frozen: dict | None = None):
    """The NNX model of (params[, frozen])."""
    if frozen is None:
        return nnx.merge(policy.graphdef, nnx.State(params))
    return nnx.merge(policy.graphdef, nnx.State(params), nnx.State(frozen))


# ----- the training state ----------------------------------------------------------------------------------
def state_shardings_for(params_shapes: dict, param_shardings: dict, tx, mesh: Mesh) -> dict:
    """NamedShardings of the whole training state (moments follow their parameter)."""
    repl = sharding.replicated(mesh)
    return {"step": repl, "params": param_shardings,
            "opt_state": optimizer_shardings(tx, params_shapes, param_shardings, repl)}


def state_layout(policy: Policy, tx, mesh: Mesh) -> tuple[dict, dict]:
    """(state shardings, abstract state with those shardings) of the policy under optimizer `tx`."""
    state_sh = state_shardings_for(policy.shapes, policy.shardings, tx, mesh)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": policy.shapes,
              "opt_state": jax.eval_shape(tx.init, policy.shapes)}
    return state_sh, abstract_state(shapes, state_sh)


def fit_train_step(train_step: Callable, state_sh: dict, abstract_train_state: dict, mesh: Mesh,
                   layout: BatchLayout, *, section, prefix: str, fixed: int | None, key: str, advice: str,
                   abstract_frozen: dict | None = None, donate_params: bool = True, process_count: int = 1):
    """(micro-batches k, batch shardings, compiled split step, StepMemory): the step compiled for the fewest
    micro-batches that fit `<prefix>.memory_budget_gb` (train/memory.py), or checked at the user's `fixed` k."""
    frozen_sh = None if abstract_frozen is None else jax.tree.map(lambda x: x.sharding, abstract_frozen)
    frozen_args = () if abstract_frozen is None else (abstract_frozen,)
    state_args = (abstract_train_state["params"], abstract_train_state["opt_state"], abstract_train_state["step"])
    budget, source = train_memory.budget_bytes(section, prefix)

    def compile_for(k: int):
        batch_sh = layout.shardings(mesh, k)
        jitted = jit_train_step(train_step, state_sh, batch_sh, mesh, frozen_sh=frozen_sh,
                                donate_params=donate_params)
        with jax.set_mesh(mesh):
            return jitted.lower(*state_args, layout.abstract(batch_sh, k), *frozen_args).compile()

    k, compiled, mem = train_memory.fit_micro_batches(
        compile_for, layout.rows, train_memory.sharded_batch_ways(mesh), budget, budget_source=source,
        fixed=fixed, key=key, advice=advice, process_count=process_count)
    if abstract_frozen is not None and any(_sub_byte(x.dtype) for x in jax.tree.leaves(abstract_frozen)):
        # A 4-bit base (NF4): JAX's CPU client places committed 4-bit arrays in a layout that executables compiled
        # ahead of time refuse ("compiled for input layouts that disagree"); the jitted step compiles for the
        # arrays' own layout at its first call (one more compile; the memory check above stands).
        compiled = jit_train_step(train_step, state_sh, layout.shardings(mesh, k), mesh, frozen_sh=frozen_sh,
                                  donate_params=donate_params)
    return k, layout.shardings(mesh, k), compiled, mem


def _sub_byte(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.integer) and jnp.iinfo(dtype).bits < 8


def open_checkpoints(directory: Path, section, resume: bool) -> CheckpointManager:
    """The run's checkpoints (`<section>.checkpoint_every/keep_checkpoints/async_checkpointing`); refuses to
    start over existing ones without `resume`."""
    ckpt = CheckpointManager(directory, save_every=int(section.checkpoint_every), keep=int(section.keep_checkpoints),
                             async_save=bool(section.async_checkpointing))
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        ckpt.close()
        raise CheckpointsExistError(f"{ckpt.directory} already holds checkpoints (latest step {latest}); pass "
                                    "--resume to continue that run, or choose another workdir")
    return ckpt


class ChangedDataError(WorkdirError, ValueError):
    """A work directory's checkpoints were trained on other rows than the ones this run loaded."""

    hint = ("restore the data the run started with, or train in a new workdir (--config.workdir=...); the "
            "checkpoints there would continue over different rows, at positions that no longer mean the same")


def rows_hash(rows: Iterable[Any], leave_out: tuple[str, ...] = ()) -> str:
    """Hash of the rows a run trains on, whatever the files holding them are called (resume and reuse check it);
    `leave_out`: fields that name where a row came from, not what it is."""
    h = hashlib.sha256()
    for row in rows:
        d = row.to_dict() if hasattr(row, "to_dict") else dict(row)
        d = {k: v for k, v in d.items() if k not in leave_out}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def check_resume_rows(checkpoint_dir: Path, data_hash: str, name: str) -> None:
    """Raises ChangedDataError when the newest checkpoint in `checkpoint_dir` was saved over other rows.

    Called before any model is loaded or compiled, from the checkpoint's JSON meta alone; checkpoints from before
    the hash was recorded name none and pass."""
    saved = latest_checkpoint_meta(checkpoint_dir).get("data_hash")  # {} without checkpoints
    if saved is not None and saved != data_hash:
        raise ChangedDataError(f"{name}: the checkpoints in {checkpoint_dir} were trained on other rows than the "
                               f"data now loaded (rows hash {saved} -> {data_hash}): the data files changed since")


def restore_or_init(ckpt: CheckpointManager, abstract_train_state: dict, state_sh: dict, tx,
                    init_params: Callable[[], dict], config: Any, name: str) -> tuple[dict, dict, int | None]:
    """(state, meta, latest step or None): the latest checkpoint, or a fresh state from `init_params()`."""
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(abstract_train_state)
        diff = validity.changed(meta.get("reads", {}), config)
        if diff or "reads" not in meta:
            log.warning("%s: resuming %s with a changed config (%s)", name, ckpt.directory,
                        validity.describe(diff) if diff else "the checkpoint does not record what it read")
        return state, meta, latest
    params = init_params()
    opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params)
    return {"step": jax.device_put(jnp.int32(0), state_sh["step"]), "params": params, "opt_state": opt_state}, {}, None


def latest_checkpoint_meta(directory: Path) -> dict:
    """The newest complete checkpoint's JSON meta read on its own (no arrays, no orbax), or {} when none."""
    steps = sorted((int(p.name) for p in Path(directory).glob("*") if p.name.isdigit()), reverse=True)
    for path in sorted((Path(directory) / str(steps[0]) / "meta").glob("*")) if steps else ():
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
    return {}


def previous_result(workdir: Path, result_path: Path, export_dir: Path, config: Any, data_hash: str, resume: bool,
                    name: str) -> dict | None:
    """With `resume`: the result of a run that already finished here as this one would (returned again), else
    None after checking that the checkpoints were trained on these rows."""
    if not resume:
        return None
    done = finished_result(result_path, export_dir, config, data_hash)
    if done is not None:
        log.info("%s: %s already finished (step %s); nothing to do", name, workdir, done.get("steps"))
        return done
    check_resume_rows(workdir / "checkpoints", data_hash, name)
    return None


def finished_result(result_path: Path, export_dir: Path, config: Any, data_hash: str) -> dict | None:
    """The result of a run that already finished on these rows and read the same values of every config field
    it read (stat_jax/validity.py): resume is then a no-op. Else None."""
    if result_path.exists() and (export_dir / "config.json").exists():
        done = json.loads(result_path.read_text())
        if done.get("data_hash") == data_hash and "reads" in done and not validity.changed(done["reads"], config):
            return done
    return None


# ----- the loop --------------------------------------------------------------------------------------------
def run_loop(name: str, state: dict, start_step: int, total_steps: int, step_fn: Callable[[int, dict], tuple],
             report: Callable[[int, dict[str, float]], None], ckpt: CheckpointManager,
             meta: Callable[[], dict]) -> tuple[dict, bool, dict[str, float]]:
    """Runs steps start_step+1..total_steps of `step_fn(step, state) -> (state, metrics)`; checkpoints every
    `save_every` steps, and on SIGTERM saves the step it stopped at and returns. Returns (state, preempted,
    the last step's metrics as floats).

    Metrics are read one step late, so the host never stalls the device waiting for them.
    """
    pending: tuple[int, dict] | None = None
    last: dict[str, float] = {}
    preempted = False

    def flush() -> None:
        nonlocal pending, last
        if pending is not None:
            step, metrics = pending
            last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            report(step, last)
            pending = None

    with PreemptionGuard() as guard:
        for step in range(start_step + 1, total_steps + 1):
            state, metrics = step_fn(step, state)
            flush()
            pending = (step, metrics)
            if step == total_steps:
                break
            ckpt.maybe_save(step, state, meta)
            if guard.should_stop(ckpt, step):
                flush()
                ckpt.save(step, state, meta(), force=True)
                ckpt.wait()
                log.warning("%s: stopped by SIGTERM at step %d after checkpointing; resume with --resume", name, step)
                preempted = True
                break
        flush()
        if not preempted:
            ckpt.save(total_steps, state, meta(), force=True)
    return state, preempted, last


def finish(result: dict, policy: Policy, params: dict, frozen: dict | None, *, export_dir: Path, workdir: Path,
           result_path: Path, tokenizer_source, dtype: str) -> dict:
    """Unless the run was preempted: exports the HF directory (adapters merged into the base) and, with
    adapters, the PEFT files in workdir/adapter; writes the result file (process 0). Returns the result."""
    from stat_jax.models import export_hf_checkpoint

    if result["preempted"]:
        return result
    model = model_of(policy, params, frozen)
    if policy.adapters:
        adapter_dir = workdir / "adapter"
        lora.export_peft_adapter(model, adapter_dir, policy.lcfg, base_model_name_or_path=str(policy.model_path),
                                 base_hash=policy.base_hash, dtype=dtype)
        result["adapter_dir"] = str(adapter_dir)
    export_hf_checkpoint(model, export_dir, tokenizer_source=tokenizer_source, dtype=dtype)
    if jax.process_index() == 0:
        result_path.write_text(json.dumps(result, indent=2))
    return result
