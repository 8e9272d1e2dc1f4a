"""`stat-jax grpo`: Group Relative Policy Optimisation of a (STAT-trained) student with a verifiable reward.

Each step: take `prompts_per_step` problems, sample G completions each through the rollout backend
(JetStream, with the current params swapped in without recompiling), reward them with the math grader,
normalise rewards within each group, recompute the old-policy (and, if beta > 0, reference) log-probs on
device -- JetStream returns none -- then run `num_iterations` jitted updates of the clipped objective.
Checkpointing, resume and metrics reuse the SFT machinery. Programmatic use: `train_grpo(config, ...)`.

Defaults (configs/base.py `grpo`): rewards scaled by the group std (GRPO as published; `scale_rewards=false`
gives Dr. GRPO), loss aggregated per token over the whole batch (long correct answers are not down-weighted
relative to short ones, unlike a per-sequence mean; `loss_aggregation=sequence` gives the original form).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from stat_jax import sharding
from stat_jax.config import config_hash, config_to_dict
from stat_jax.data.records import MathProblem
from stat_jax.rollout.base import Completion, RolloutBackend, SamplingParams
from stat_jax.train import grpo_loss
from stat_jax.train.checkpointing import CheckpointManager, PreemptionGuard, abstract_state
from stat_jax.train.metrics import MetricsLogger
from stat_jax.train.optim import build_optimizer, optimizer_shardings

log = logging.getLogger(__name__)

PREEMPTED_STATUS = 143
BATCH_KEYS = ("tokens", "targets", "positions", "attention_mask", "weights", "advantages")
RewardFn = Callable[[str, MathProblem], float]


# ----- rewards and batches (host side) ------------------------------------------------------------------
def math_reward(format_reward: float = 0.0) -> RewardFn:
    """1 for a correct final \\boxed{} answer (math-verify), else 0; plus `format_reward` for any boxed answer."""
    from stat_jax.data.grader import grade, last_boxed

    def reward(response: str, problem: MathProblem) -> float:
        result = grade(response, problem.answer)
        bonus = format_reward if format_reward and last_boxed(response) is not None else 0.0
        return float(result.correct) + bonus

    return reward


def load_prompts(path: str | Path) -> list[MathProblem]:
    """Problems with a reference answer from a JSONL file ({problem, answer, ...} per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grpo.train_files: {path} does not exist")
    problems = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
            if not isinstance(row, dict) or not row.get("problem") or row.get("answer") in (None, ""):
                raise ValueError(f"{path}:{line_no}: a GRPO prompt row needs non-empty 'problem' and 'answer'")
            row.setdefault("id", f"{path.stem}-{line_no}")
            problems.append(MathProblem.from_dict({**row, "answer": str(row["answer"])}))
    if not problems:
        raise ValueError(f"{path}: no prompts")
    return problems


def prompts_for_step(num_problems: int, per_step: int, step: int, seed: int) -> list[int]:
    """Problem indices of a (1-based) step: a fresh seeded permutation per epoch, so resume sees the same order."""
    start = (step - 1) * per_step
    out = []
    for position in range(start, start + per_step):
        epoch, offset = divmod(position, num_problems)
        order = np.random.default_rng([seed, epoch]).permutation(num_problems)
        out.append(int(order[offset]))
    return out


def build_batch(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[Completion]],
                advantages: np.ndarray, *, seq_len: int, eos_id: int, aggregation: str) -> dict[str, np.ndarray]:
    """Rows [prompt + completion (+ EOS if it stopped)], right-padded to seq_len; loss weights on completions."""
    rows = [(p, c) for p, group in zip(prompt_ids, completions) for c in group]
    n = len(rows)
    tokens = np.zeros((n, seq_len), np.int32)
    targets = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    attention = np.zeros((n, seq_len), np.int32)
    for i, (prompt, completion) in enumerate(rows):
        generated = list(completion.token_ids) + ([eos_id] if completion.finish_reason == "stop" else [])
        full = list(prompt) + generated
        if len(full) - 1 > seq_len:
            raise ValueError(f"prompt ({len(prompt)}) + completion ({len(generated)}) tokens exceed "
                             f"grpo.max_length={seq_len}; raise it or lower grpo.max_new_tokens")
        length = len(full) - 1
        tokens[i, :length] = full[:-1]
        targets[i, :length] = full[1:]
        attention[i, :length] = 1
        mask[i, len(prompt) - 1:length] = 1.0  # targets that are completion tokens
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    return {"tokens": tokens, "targets": targets, "positions": positions, "attention_mask": attention,
            "weights": np.asarray(token_weights(mask, aggregation)), "advantages": advantages.astype(np.float32)}


def token_weights(mask: np.ndarray, aggregation: str) -> np.ndarray:
    """Per-token weights whose weighted sum equals `grpo_loss.aggregate(x, mask, aggregation)`.

    Precomputed on the host so micro-batches can simply be summed (exact gradient accumulation).
    """
    mask = np.asarray(mask, np.float32)
    if aggregation == "token":
        return mask / max(float(mask.sum()), 1.0)
    if aggregation == "sequence":
        per_row = mask.sum(axis=1, keepdims=True)
        rows_with_tokens = max(int((per_row > 0).sum()), 1)
        return np.where(per_row > 0, mask / np.maximum(per_row, 1.0), 0.0) / rows_with_tokens
    raise ValueError(f"grpo.loss_aggregation={aggregation!r}: choose 'token' or 'sequence'")


# ----- device side ---------------------------------------------------------------------------------------
def _logits(params, graphdef, micro):
    model = nnx.merge(graphdef, nnx.State(params))
    return model(micro["tokens"], positions=micro["positions"], attention_mask=micro["attention_mask"])


def make_logprob_fn(graphdef) -> Callable:
    """(params, batch [k, rows, t]) -> per-token log-probs [k, rows, t]."""

    def logprobs(params, batch):
        return jax.lax.map(lambda micro: grpo_loss.token_logprobs(_logits(params, graphdef, micro), micro["targets"]),
                           batch)

    return logprobs


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, epsilon_low: float,
                    epsilon_high: float, beta: float) -> Callable:
    """`(state, batch) -> (state, metrics)`; batch leaves [k micro-batches, rows, t] incl. old/ref log-probs."""

    def micro_loss(params, micro):
        logits = _logits(params, graphdef, micro)
        logp = grpo_loss.token_logprobs(logits, micro["targets"])
        w = micro["weights"]
        ratio = jnp.exp(jnp.clip(logp - micro["old_logp"], -grpo_loss.LOG_RATIO_CLAMP, grpo_loss.LOG_RATIO_CLAMP))
        adv = micro["advantages"][:, None]
        unclipped, clipped = ratio * adv, jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
        per_token = -jnp.minimum(unclipped, clipped)
        kl = grpo_loss.k3_kl(logp, micro["ref_logp"]) if beta else jnp.zeros_like(logp)
        loss = jnp.sum((per_token + beta * kl) * w)
        aux = {"kl": jnp.sum(kl * w), "clip_fraction": jnp.sum((clipped < unclipped) * w),
               "entropy": jnp.sum(jax.lax.stop_gradient(grpo_loss.token_entropy(logits)) * w)}
        return loss, aux

    def train_step(state, batch):
        def one(carry, micro):
            grads_acc, loss_acc, aux_acc = carry
            (loss, aux), grads = jax.value_and_grad(micro_loss, has_aux=True)(state["params"], micro)
            return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss,
                    jax.tree.map(jnp.add, aux_acc, aux)), None

        zeros_aux = {"kl": jnp.float32(0), "clip_fraction": jnp.float32(0), "entropy": jnp.float32(0)}
        init = (jax.tree.map(jnp.zeros_like, state["params"]), jnp.float32(0), zeros_aux)
        (grads, loss, aux), _ = jax.lax.scan(one, init, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"]), **aux}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


# ----- the loop ------------------------------------------------------------------------------------------
def _validate(g) -> None:
    if g.num_generations < 2:
        raise ValueError(f"grpo.num_generations must be >= 2 (advantages are relative within a group), "
                         f"got {g.num_generations}")
    rows = g.prompts_per_step * g.num_generations
    if rows % g.micro_batches:
        raise ValueError(f"grpo.prompts_per_step * num_generations = {rows} must be a multiple of "
                         f"grpo.micro_batches={g.micro_batches}")
    if g.steps < 1:
        raise ValueError(f"grpo.steps must be >= 1, got {g.steps}")
    if g.beta < 0:
        raise ValueError(f"grpo.beta must be >= 0, got {g.beta}")


def _fingerprint(config) -> str:
    return config_hash({"model": config_to_dict(config.model), "grpo": config_to_dict(config.grpo),
                        "seed": config.seed})


def train_grpo(config, problems: Sequence[MathProblem] | None = None, workdir: str | Path | None = None,
               resume: bool = False, *, backend: RolloutBackend | None = None, reward_fn: RewardFn | None = None,
               mesh: Mesh | None = None) -> dict[str, Any]:
    """Runs GRPO from config.model.path; exports an HF dir to <workdir>/hf and returns paths and metrics."""
    import transformers

    from stat_jax.data.prompting import render_prompt
    from stat_jax.models import abstract_model, export_hf_checkpoint, load_hf_checkpoint
    from stat_jax.models.config import ModelConfig
    from stat_jax.models.hub import resolve_model_path

    g = config.grpo
    _validate(g)
    workdir = Path(workdir or config.workdir)
    is_writer = jax.process_index() == 0
    export_dir = workdir / "hf"
    result_path = workdir / "grpo_result.json"
    fingerprint = _fingerprint(config)
    if resume and result_path.exists() and (export_dir / "config.json").exists():
        done = json.loads(result_path.read_text())
        if done.get("fingerprint") == fingerprint:
            return done

    if problems is None:
        if not g.train_files:
            raise ValueError("grpo needs prompts: --config.grpo.train_files=problems.jsonl")
        problems = [p for f in g.train_files for p in load_prompts(f)]
    problems = list(problems)
    reward_fn = reward_fn or math_reward(float(g.format_reward))
    mesh = mesh or sharding.mesh_from_config(config.mesh)
    model_path = resolve_model_path(config.model.path)
    model_cfg = ModelConfig.from_hf_dir(model_path)
    tokenizer_path = config.model.tokenizer_path or model_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_path))
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model_cfg.eos_token_ids[0]

    prompt_texts = [render_prompt(tokenizer, p.problem, instruction=g.instruction or config.eval.instruction,
                                  use_chat_template=bool(config.eval.use_chat_template)) for p in problems]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]

    total_steps = int(g.steps)
    tx, schedule = build_optimizer(g, total_steps)
    model_kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat)
    graphdef, abstract_params = nnx.split(abstract_model(model_cfg, **model_kw))
    params_shapes = nnx.to_pure_dict(abstract_params)
    param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
    repl = sharding.replicated(mesh)
    state_sh = {"step": repl, "params": param_sh,
                "opt_state": optimizer_shardings(tx, params_shapes, param_sh, repl)}
    rows = g.prompts_per_step * g.num_generations
    k = int(g.micro_batches)
    batch_named = sharding.named_sharding(mesh, (None, "batch", "length"), (k, rows // k, int(g.max_length)))
    row_named = sharding.named_sharding(mesh, (None, "batch"), (k, rows // k))

    ckpt = CheckpointManager(workdir / "checkpoints", save_every=int(g.checkpoint_every), keep=int(g.keep_checkpoints),
                             async_save=bool(g.async_checkpointing))
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        ckpt.close()
        raise FileExistsError(f"{ckpt.directory} already holds checkpoints (latest step {latest}); pass --resume "
                              "to continue that run, or choose another workdir")
    model = load_hf_checkpoint(model_path, mesh, **model_kw)
    initial_params = nnx.to_pure_dict(nnx.split(model)[1])
    # beta == 0 turns the reference model off: no copy of the initial weights is kept at all.
    ref_params = jax.tree.map(jnp.copy, initial_params) if g.beta else None
    if latest is not None:
        shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shapes,
                  "opt_state": jax.eval_shape(tx.init, params_shapes)}
        del initial_params
        state, _ = ckpt.restore(abstract_state(shapes, state_sh))
        log.info("grpo: resumed from step %d", latest)
    else:
        opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(initial_params)
        state = {"step": jax.device_put(jnp.int32(0), repl), "params": initial_params, "opt_state": opt_state}
    del model
    start_step = int(jax.device_get(state["step"]))

    train_step = jax.jit(make_train_step(graphdef, tx, schedule, epsilon_low=float(g.epsilon_low),
                                         epsilon_high=float(g.epsilon_high), beta=float(g.beta)),
                         out_shardings=(state_sh, repl))  # no donation: the rollout engine shares these params
    logprob_fn = jax.jit(make_logprob_fn(graphdef), out_shardings=batch_named)

    own_backend = backend is None
    if own_backend:
        from stat_jax.rollout import make_rollout_backend

        backend = make_rollout_backend(config, nnx.merge(graphdef, nnx.State(state["params"])), tokenizer)
    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2, default=str))
    logger = MetricsLogger(workdir / "metrics.jsonl", total_steps=total_steps, start_step=start_step, desc="grpo",
                           is_writer=is_writer)

    def device_batch(host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        out = {}
        for key, x in host.items():
            x = x.reshape(k, rows // k, *x.shape[1:])
            out[key] = jax.device_put(x, batch_named if x.ndim == 3 else row_named)
        return out

    last = {}
    preempted = False
    try:
        with PreemptionGuard() as guard:
            for step in range(start_step + 1, total_steps + 1):
                chosen = prompts_for_step(len(problems), int(g.prompts_per_step), step, int(config.seed))
                sampling = SamplingParams(temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k),
                                          max_new_tokens=int(g.max_new_tokens),
                                          seed=int(config.seed) * 1_000_003 + step)
                t0 = time.perf_counter()
                backend.update_params(state["params"])
                completions = backend.generate([prompt_ids[i] for i in chosen], sampling, int(g.num_generations),
                                               progress=False)
                rollout_s = time.perf_counter() - t0
                rewards = np.array([[reward_fn(c.text, problems[i]) for c in group]
                                    for i, group in zip(chosen, completions)], np.float32)
                advantages = grpo_loss.group_advantages(rewards.reshape(-1), int(g.num_generations),
                                                        scale_by_std=bool(g.scale_rewards))
                host = build_batch([prompt_ids[i] for i in chosen], completions, advantages,
                                   seq_len=int(g.max_length), eos_id=eos_id, aggregation=str(g.loss_aggregation))
                t1 = time.perf_counter()
                with jax.set_mesh(mesh):
                    batch = device_batch(host)
                    batch["old_logp"] = logprob_fn(state["params"], batch)
                    batch["ref_logp"] = logprob_fn(ref_params, batch) if g.beta else batch["old_logp"]
                    for _ in range(int(g.num_iterations)):
                        state, metrics = train_step(state, batch)
                    metrics = {key: float(v) for key, v in jax.device_get(metrics).items()}
                train_s = time.perf_counter() - t1
                generated = sum(len(c.token_ids) for group in completions for c in group)
                trained = float(host["attention_mask"].sum()) * int(g.num_iterations)
                last = {**metrics, "reward_mean": float(rewards.mean()),
                        "accuracy": float((rewards >= 1.0).mean()),
                        "response_length": generated / rewards.size,
                        "rollout_tokens_per_s": generated / max(rollout_s, 1e-9),
                        "train_tokens_per_s": trained / max(train_s, 1e-9),
                        "rollout_s": rollout_s, "train_s": train_s}
                logger.log(step, last)
                meta = {"fingerprint": fingerprint, "total_steps": total_steps}
                if step < total_steps:
                    ckpt.maybe_save(step, state, meta)
                if guard.should_stop(ckpt, step) and step < total_steps:
                    ckpt.save(step, state, meta, force=True)
                    ckpt.wait()
                    log.warning("grpo: stopped by SIGTERM at step %d after checkpointing; resume with --resume", step)
                    preempted = True
                    break
            if not preempted:
                ckpt.save(total_steps, state, {"fingerprint": fingerprint, "total_steps": total_steps}, force=True)
    finally:
        logger.close()
        ckpt.close()
        if own_backend:
            backend.close()

    result = {"export_dir": str(export_dir), "metrics_path": str(workdir / "metrics.jsonl"),
              "steps": int(jax.device_get(state["step"])), "total_steps": total_steps, "preempted": preempted,
              "fingerprint": fingerprint, "last_metrics": last}
    if preempted:
        return result
    model = nnx.merge(graphdef, nnx.State(state["params"]))
    export_hf_checkpoint(model, export_dir, tokenizer_source=tokenizer_path, dtype=str(g.export_dtype))
    if is_writer:
        result_path.write_text(json.dumps(result, indent=2))
    return result


def main(config, args) -> int:
    """`stat-jax grpo --config=configs/grpo_*.py [--resume]`."""
    result = train_grpo(config, workdir=config.workdir, resume=bool(getattr(args, "resume", False)))
    if result["preempted"]:
        return PREEMPTED_STATUS
    print(json.dumps({k: result[k] for k in ("export_dir", "metrics_path", "steps", "last_metrics")}))
    return 0
