"""`stat-jax grpo`: Group Relative Policy Optimisation of a (STAT-trained) student with a verifiable reward.

Each step: take `prompts_per_step` problems, sample G completions each through the rollout backend
(JetStream in-process, with the current params swapped in without recompiling), reward them with the math
grader, normalise rewards within each group, recompute the old-policy (and, if beta > 0, reference) log-probs
on device -- JetStream returns none -- then run `num_iterations` (mu) jitted updates of the clipped objective.
With mu = 1 the old policy IS the current one, so the step uses stop_gradient(log p) and skips that forward pass.
Checkpointing, resume and metrics reuse the SFT machinery. Programmatic use: `train_grpo(config, ...)`.

Defaults (configs/base.py `grpo`), and why:
- rewards scaled by the group std (`scale_rewards=true`): GRPO as published (DeepSeekMath), Tunix's default,
  so a run after STAT compares with published GRPO numbers; `false` gives Dr. GRPO, which drops the std because it up-weights groups that are nearly all right or
  all wrong (a question-difficulty bias).
- loss aggregated per token over the whole batch (`loss_aggregation=token`): every generated token weighs the
  same, so long answers are not down-weighted relative to short ones as with a per-sequence mean
  (`sequence`, the original form), which also biases towards long wrong answers (DAPO, Dr. GRPO).
- beta = 0: no KL penalty and no reference model in memory (DAPO / Dr. GRPO practice for verifiable rewards);
  beta > 0 keeps a frozen copy of the start weights and adds beta * k3 KL to the loss.
- log-probs are of the temperature-scaled policy (logits / grpo.temperature), the distribution rollouts sample.

Metrics per step (tqdm bar + <workdir>/metrics.jsonl): reward_mean/std, accuracy, zero_std_groups,
response_length, truncated; from the last of the mu updates: loss, clip_fraction, entropy, grad_norm, lr, and
kl (only when beta > 0: without a reference there is no KL to report); rollout_tokens_per_s (weight swap
included, weight_sync_s alone) and train_tokens_per_s (old/reference log-probs and the mu updates) separately.
"""

from __future__ import annotations

import importlib
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
from stat_jax.config import config_hash, config_to_dict, write_resolved_config
from stat_jax.errors import CheckpointsExistError
from stat_jax.data.records import MathProblem
from stat_jax.lengths import PromptLimit, check_config_lengths, drop_long_prompts
from stat_jax.rollout.base import Completion, RolloutBackend, RolloutError, SamplingParams
from stat_jax.train import chunked_loss, grpo_loss
from stat_jax.train import memory as train_memory
from stat_jax.train.checkpointing import CheckpointManager, PreemptionGuard, abstract_state
from stat_jax.train.metrics import MetricsLogger
from stat_jax.train.optim import build_optimizer, optimizer_shardings

log = logging.getLogger(__name__)

PREEMPTED_STATUS = 143
ROW_KEYS = ("tokens", "targets", "positions", "attention_mask", "weights")  # [rows, t]
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


def resolve_reward(spec: str, format_reward: float = 0.0) -> RewardFn:
    """`grpo.reward`: "math" (the grader), or "package.module:function" taking (response, MathProblem) -> float."""
    if spec == "math":
        return math_reward(format_reward)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"grpo.reward={spec!r}: use 'math' or 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"grpo.reward={spec!r}: cannot import it ({e})") from e
    if not callable(fn):
        raise ValueError(f"grpo.reward={spec!r} is not callable")
    return fn


def load_prompts(path: str | Path) -> list[MathProblem]:
    """Problems with a reference answer ({problem, answer, ...} rows; JSON, JSONL or parquet)."""
    from stat_jax.data.math_datasets import load_answer_file

    if not Path(path).exists():
        raise FileNotFoundError(f"grpo.train_files: {path} does not exist")
    return load_answer_file(path)


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
        # The stop token was sampled too, so it is trained on: that is how the policy learns to stop.
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


def check_groups(completions: Sequence[Sequence[Completion]], prompts: int, group_size: int) -> None:
    """Advantages compare the G samples of one prompt, so a backend must return exactly G for each prompt."""
    sizes = [len(group) for group in completions]
    if len(sizes) != prompts or any(n != group_size for n in sizes):
        raise RolloutError(f"the rollout backend returned groups of sizes {sizes} for {prompts} prompts; "
                           f"expected {group_size} (grpo.num_generations) completions for each")


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
def policy_token_stats(params, graphdef, micro, temperature: float = 1.0, *,
                       chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS, entropy: bool = False) -> dict:
    """Per-token {"logp"[, "entropy"]} [rows, t] of the temperature-scaled policy the rollouts sample from.

    The logits are computed `chunk_tokens` (rows x positions) at a time and never exist whole (0 = at once).
    """
    model = nnx.merge(graphdef, nnx.State(params))
    hidden = model.hidden_states(micro["tokens"], positions=micro["positions"], attention_mask=micro["attention_mask"])
    return chunked_loss.token_stats(model, hidden, micro["targets"], chunk_tokens=chunk_tokens,
                                    temperature=temperature, entropy=entropy)


def make_logprob_fn(graphdef, temperature: float = 1.0, *,
                    chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS) -> Callable:
    """(params, batch [k, rows, t]) -> per-token log-probs [k, rows, t] (no gradient; old or reference policy)."""

    def logprobs(params, batch):
        return jax.lax.map(lambda micro: policy_token_stats(params, graphdef, micro, temperature,
                                                            chunk_tokens=chunk_tokens)["logp"], batch)

    return logprobs


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, epsilon_low: float,
                    epsilon_high: float, beta: float, temperature: float = 1.0,
                    chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS) -> Callable:
    """`(state, batch) -> (state, metrics)`; batch leaves [k micro-batches, rows, t].

    batch["old_logp"] is the rollout policy's log-probs; without it (mu = 1) the current params ARE the old
    policy, so stop_gradient(log p) stands in: the same value and gradient without a second forward pass.
    batch["ref_logp"] is needed when beta > 0. Loss and metrics are sums of batch["weights"]-weighted
    per-token terms, so k micro-batches add up exactly to the full-batch value.
    """

    def micro_loss(params, micro):
        stats = policy_token_stats(params, graphdef, micro, temperature, chunk_tokens=chunk_tokens, entropy=True)
        logp = stats["logp"]
        old_logp = micro["old_logp"] if "old_logp" in micro else jax.lax.stop_gradient(logp)
        per_token, terms = grpo_loss.per_token_terms(
            logp, old_logp, micro["advantages"], epsilon_low=epsilon_low, epsilon_high=epsilon_high,
            ref_logp=micro.get("ref_logp"), beta=beta)
        w = micro["weights"]
        aux = {"clip_fraction": jnp.sum(terms["clipped"] * w),
               "entropy": jnp.sum(stats["entropy"] * w)}
        if "kl" in terms:
            aux["kl"] = jnp.sum(jax.lax.stop_gradient(terms["kl"]) * w)
        return jnp.sum(per_token * w), aux

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch):
        params = state["params"]
        if batch["tokens"].shape[0] == 1:  # no accumulation: skip the scan and its zero-initialised buffers
            (loss, aux), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
        else:
            def one(carry, micro):
                (loss, aux), grads = grad_fn(params, micro)
                return jax.tree.map(jnp.add, carry, (grads, loss, aux)), None

            aux_keys = ("clip_fraction", "entropy") + (("kl",) if beta else ())
            init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), {k: jnp.float32(0) for k in aux_keys})
            (grads, loss, aux), _ = jax.lax.scan(one, init, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"]), **aux}
        return {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                "opt_state": opt_state}, metrics

    return train_step


def jit_train_step(train_step: Callable, state_sh: dict, batch_sh: dict, mesh: Mesh):
    """`train_step` as jitted `(params, opt_state, step, batch)` with explicit shardings; only the optimizer
    state is donated, because the rollout engine serves the very param buffers the step reads (no copy in
    update_params) until the next swap."""

    def split_step(params, opt_state, step, batch):
        return train_step({"step": step, "params": params, "opt_state": opt_state}, batch)

    return jax.jit(split_step, in_shardings=(state_sh["params"], state_sh["opt_state"], state_sh["step"], batch_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(1,))


def run_on_mesh(step, mesh: Mesh) -> Callable:
    """`(state, batch) -> (state, metrics)` calling a jitted or compiled `(params, opt_state, step, batch)`."""

    def run(state, batch):
        with jax.set_mesh(mesh):
            return step(state["params"], state["opt_state"], state["step"], batch)

    return run


def compile_train_step(train_step: Callable, state_sh: dict, batch_sh: dict, mesh: Mesh) -> Callable:
    """The jitted step (compiled on its first call) as `(state, batch) -> (state, metrics)`."""
    return run_on_mesh(jit_train_step(train_step, state_sh, batch_sh, mesh), mesh)


def batch_shardings(mesh: Mesh, k: int, rows: int, length: int, *, old_logp: bool, ref_logp: bool) -> dict:
    """NamedShardings of the update's batch: [k, rows // k, length] per row key, [k, rows // k] advantages."""
    batch_named = sharding.named_sharding(mesh, (None, "batch", "length"), (k, rows // k, length))
    row_named = sharding.named_sharding(mesh, (None, "batch"), (k, rows // k))
    batch_sh = {key: batch_named for key in ROW_KEYS} | {"advantages": row_named}
    if old_logp:
        batch_sh["old_logp"] = batch_named
    if ref_logp:
        batch_sh["ref_logp"] = batch_named
    return batch_sh


def abstract_batch(batch_sh: dict, k: int, rows: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The update's batch as ShapeDtypeStructs (what `build_batch` returns, reshaped to micro-batches)."""
    floats = {"weights", "advantages", "old_logp", "ref_logp"}
    return {key: jax.ShapeDtypeStruct((k, rows // k) if key == "advantages" else (k, rows // k, length),
                                      jnp.float32 if key in floats else jnp.int32, sharding=named)
            for key, named in batch_sh.items()}


def fit_train_step(g, train_step: Callable, state_sh: dict, abstract_train_state: dict, mesh: Mesh, *,
                   old_logp: bool, ref_logp: bool):
    """(k, batch shardings, compiled `(params, opt_state, step, batch)`, StepMemory): the update compiled for
    the fewest micro-batches that fit `grpo.memory_budget_gb` (grpo.micro_batches = 0), or checked at the user's."""
    rows, length = int(g.prompts_per_step) * int(g.num_generations), int(g.max_length)
    budget, source = train_memory.budget_bytes(g, "grpo")
    state_args = (abstract_train_state["params"], abstract_train_state["opt_state"], abstract_train_state["step"])

    def compile_for(k: int):
        batch_sh = batch_shardings(mesh, k, rows, length, old_logp=old_logp, ref_logp=ref_logp)
        with jax.set_mesh(mesh):
            return jit_train_step(train_step, state_sh, batch_sh, mesh).lower(
                *state_args, abstract_batch(batch_sh, k, rows, length)).compile()

    advice = ("Lower grpo.prompts_per_step, grpo.num_generations or grpo.max_length, set model.remat=full "
              "(recompute each layer), spread the batch over more devices (mesh.fsdp), or raise "
              "grpo.memory_budget_gb / grpo.memory_fraction.")
    k, compiled, mem = train_memory.fit_micro_batches(
        compile_for, rows, train_memory.sharded_batch_ways(mesh), budget, budget_source=source,
        fixed=int(g.micro_batches) or None, key="grpo.micro_batches", advice=advice)
    return k, batch_shardings(mesh, k, rows, length, old_logp=old_logp, ref_logp=ref_logp), compiled, mem


# ----- the loop ------------------------------------------------------------------------------------------
def rollout_metrics(rewards: np.ndarray, completions: Sequence[Sequence[Completion]]) -> dict[str, float]:
    """Reward statistics of one step's rollouts; rewards [prompts, G]. Accuracy = share of full rewards (>= 1)."""
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "accuracy": float((rewards >= 1.0).mean()),
            # groups whose G rewards are all equal: zero advantage, no learning signal
            "zero_std_groups": float((rewards.std(axis=1) == 0).mean()),
            "response_length": sum(len(c.token_ids) for group in completions for c in group) / rewards.size,
            "truncated": sum(c.finish_reason == "length" for group in completions for c in group) / rewards.size}


def throughput(completions, host: dict[str, np.ndarray], mu: int, *, rollout_s: float, sync_s: float,
               train_s: float) -> dict[str, float]:
    """Rollout tokens/s (generated tokens, weight swap included) and training tokens/s (rows' tokens x mu)."""
    generated = sum(len(c.token_ids) for group in completions for c in group)
    trained = float(host["attention_mask"].sum()) * mu
    return {"rollout_tokens_per_s": generated / max(rollout_s, 1e-9),
            "train_tokens_per_s": trained / max(train_s, 1e-9),
            "rollout_s": rollout_s, "weight_sync_s": sync_s, "train_s": train_s}


def reference_params(params: dict, compute_dtype: str) -> dict:
    """The frozen reference: float params cast to the compute dtype (a no-op, no copy, when they already are)."""
    from stat_jax.models.build import as_dtype

    dtype = as_dtype(compute_dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _validate(g) -> None:
    """Fails fast, naming the grpo.* key, before any model is loaded."""
    checks = [
        (g.num_generations >= 2, f"grpo.num_generations must be >= 2 (advantages are relative within a group), "
                                 f"got {g.num_generations}"),
        (g.prompts_per_step >= 1, f"grpo.prompts_per_step must be >= 1, got {g.prompts_per_step}"),
        ((g.prompts_per_step * g.num_generations) % max(g.micro_batches, 1) == 0 and g.micro_batches >= 0,
         f"grpo.prompts_per_step * num_generations = {g.prompts_per_step * g.num_generations} must be a multiple "
         f"of grpo.micro_batches={g.micro_batches} (0 = derived from grpo.memory_budget_gb)"),
        (g.steps >= 1, f"grpo.steps must be >= 1, got {g.steps}"),
        (g.num_iterations >= 1, f"grpo.num_iterations must be >= 1, got {g.num_iterations}"),
        (g.beta >= 0, f"grpo.beta must be >= 0, got {g.beta}"),
        (g.temperature > 0, f"grpo.temperature must be > 0 (greedy samples of a group are identical and carry "
                            f"no advantage), got {g.temperature}"),
        (0 < g.epsilon_low < 1 and g.epsilon_high > 0,
         f"grpo.epsilon_low must be in (0, 1) and grpo.epsilon_high > 0, got {g.epsilon_low}, {g.epsilon_high}"),
        (0 <= g.format_reward < 1, f"grpo.format_reward must be in [0, 1) so that accuracy (reward >= 1) still "
                                   f"means a correct answer, got {g.format_reward}"),
        (g.loss_aggregation in ("token", "sequence"),
         f"grpo.loss_aggregation={g.loss_aggregation!r}: choose 'token' or 'sequence'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _fingerprint(config) -> str:
    """Hash of what must not change across a resume (model, GRPO settings, seed; not mesh or logging)."""
    # Memory settings (micro-batches, budget, loss chunks, remat) change how the update is computed, not what.
    memory_keys = ("micro_batches", "memory_budget_gb", "memory_fraction", "loss_chunk_tokens")
    grpo = {k: v for k, v in config_to_dict(config.grpo).items() if k not in memory_keys}
    model = {k: v for k, v in config_to_dict(config.model).items() if k != "remat"}
    return config_hash({"model": model, "grpo": grpo, "seed": config.seed})


def grpo_prompt_ids(config, tokenizer, problems: Sequence[MathProblem]) -> list[list[int]]:
    """Token ids of each problem's GRPO prompt: eval's chat rendering with `grpo.instruction` (or eval's)."""
    from stat_jax.data.prompting import render_prompt

    texts = [render_prompt(tokenizer, p.problem, instruction=config.grpo.instruction or config.eval.instruction,
                           system_prompt=config.eval.system_prompt,
                           use_chat_template=bool(config.eval.use_chat_template),
                           date_string=str(config.eval.date_string)) for p in problems]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def train_grpo(config, problems: Sequence[MathProblem] | None = None, workdir: str | Path | None = None,
               resume: bool = False, *, backend: RolloutBackend | None = None, reward_fn: RewardFn | None = None,
               mesh: Mesh | None = None) -> dict[str, Any]:
    """Runs GRPO from config.model.path; exports an HF dir to <workdir>/hf and returns paths and metrics.

    problems: default `grpo.train_files`; backend: default JetStream in-process on the training mesh (params
    swapped in each step); reward_fn: default `grpo.reward` (the math grader).
    """
    import transformers

    from stat_jax.data.stop_tokens import end_token_id
    from stat_jax.models import abstract_model, export_hf_checkpoint, load_hf_checkpoint
    from stat_jax.models.config import ModelConfig
    from stat_jax.models.hub import resolve_model_path

    g = config.grpo
    _validate(g)
    if backend is None and config.rollout.backend != "jetstream":
        raise ValueError(f"grpo samples with the policy being trained, so it needs rollout.backend=jetstream "
                         f"(in-process, params swapped each step), not {config.rollout.backend!r}")
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
    if not problems:
        raise ValueError("grpo: the problem list is empty")
    reward_fn = reward_fn or resolve_reward(str(g.reward), float(g.format_reward))
    mesh = mesh or sharding.mesh_from_config(config.mesh)
    model_path = resolve_model_path(config.model.path)
    model_cfg = ModelConfig.from_hf_dir(model_path)
    tokenizer_path = config.model.tokenizer_path or model_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_path))
    # The end-of-turn token a finished completion is scored on: the same one rollouts stop at and SFT teaches.
    eos_id = end_token_id(tokenizer, model_cfg.eos_token_ids)

    prompt_ids = grpo_prompt_ids(config, tokenizer, problems)
    # Prompts that cannot run (rollout limits, or prompt + max_new_tokens over a grpo.max_length row) are left
    # out and counted, or stop here (rollout.on_long_prompt=error): before any device work, never mid-run.
    limit = PromptLimit.from_config(config, int(g.max_new_tokens), max_row_length=int(g.max_length))
    problems, prompt_ids, long_prompts = drop_long_prompts(
        problems, prompt_ids, limit, str(config.rollout.get("on_long_prompt", "skip")), "grpo prompts",
        [p.id for p in problems])
    if long_prompts["skipped_long_prompts"]:
        log.warning("grpo: %d prompts do not fit the limits and are left out (first: %s)",
                    long_prompts["skipped_long_prompts"], long_prompts["skipped_long_prompt_examples"][0])

    total_steps = int(g.steps)
    mu = int(g.num_iterations)
    beta = float(g.beta)
    temperature = float(g.temperature)
    # The optimizer (and its learning-rate schedule) counts updates: mu of them per GRPO step.
    tx, schedule = build_optimizer(g, total_steps * mu)
    model_kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat)
    graphdef, abstract_params = nnx.split(abstract_model(model_cfg, **model_kw))
    params_shapes = nnx.to_pure_dict(abstract_params)
    param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
    repl = sharding.replicated(mesh)
    state_sh = {"step": repl, "params": param_sh,
                "opt_state": optimizer_shardings(tx, params_shapes, param_sh, repl)}
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shapes,
              "opt_state": jax.eval_shape(tx.init, params_shapes)}
    rows = g.prompts_per_step * g.num_generations
    chunk_tokens = int(g.loss_chunk_tokens)
    step_impl = make_train_step(graphdef, tx, schedule, epsilon_low=float(g.epsilon_low),
                                epsilon_high=float(g.epsilon_high), beta=beta, temperature=temperature,
                                chunk_tokens=chunk_tokens)
    # Compiled from abstract arrays before any weight is loaded, so an update that cannot fit stops here.
    k, batch_sh, compiled_step, step_memory = fit_train_step(g, step_impl, state_sh, abstract_state(shapes, state_sh),
                                                             mesh, old_logp=mu > 1, ref_logp=bool(beta))
    batch_named = batch_sh["tokens"]
    log.info("grpo: %d rows x %d tokens per update in %d micro-batches, step memory %s per device",
             rows, int(g.max_length), k, step_memory.describe())

    ckpt = CheckpointManager(workdir / "checkpoints", save_every=int(g.checkpoint_every), keep=int(g.keep_checkpoints),
                             async_save=bool(g.async_checkpointing))
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        ckpt.close()
        raise CheckpointsExistError(f"{ckpt.directory} already holds checkpoints (latest step {latest}); pass "
                                    "--resume to continue that run, or choose another workdir")
    model = load_hf_checkpoint(model_path, mesh, **model_kw)
    initial_params = nnx.to_pure_dict(nnx.split(model)[1])
    del model
    # The reference is the start model, frozen, kept in the compute dtype: the model casts every weight to it
    # anyway, so its logits are unchanged and a bf16 run holds half the bytes. beta == 0 turns it off: nothing
    # is kept, and the start weights are dropped once the state exists.
    ref_params = reference_params(initial_params, config.model.dtype) if beta else None
    if latest is not None:
        del initial_params
        state, meta = ckpt.restore(abstract_state(shapes, state_sh))
        if meta.get("fingerprint") != fingerprint:
            log.warning("grpo: resuming %s with a changed model/grpo config (hash %s -> %s)",
                        workdir, meta.get("fingerprint"), fingerprint)
        if int(jax.device_get(state["step"])) != latest * mu:
            raise ValueError(f"{ckpt.directory}/{latest}: the checkpoint holds {int(jax.device_get(state['step']))} "
                             f"optimizer updates, not {latest} steps x grpo.num_iterations={mu}; resume with the "
                             f"num_iterations it was written with")
        log.info("grpo: resumed from step %d", latest)
    else:
        opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(initial_params)
        state = {"step": jax.device_put(jnp.int32(0), repl), "params": initial_params, "opt_state": opt_state}
        del initial_params
    start_step = latest or 0  # GRPO steps done (state["step"] counts optimizer updates)

    train_step = run_on_mesh(compiled_step, mesh)
    logprob_fn = jax.jit(make_logprob_fn(graphdef, temperature, chunk_tokens=chunk_tokens), out_shardings=batch_named)

    own_backend = backend is None
    if own_backend:
        from stat_jax.rollout import make_rollout_backend

        backend = make_rollout_backend(config, nnx.merge(graphdef, nnx.State(state["params"])), tokenizer)
    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(config, workdir)
    logger = MetricsLogger(workdir / "metrics.jsonl", total_steps=total_steps, start_step=start_step, desc="grpo",
                           is_writer=is_writer)

    def device_batch(host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        # Every process holds the whole (identically seeded) rollout batch; each places only its own shards.
        out = {}
        for key, x in host.items():
            x = x.reshape(k, rows // k, *x.shape[1:])
            out[key] = jax.make_array_from_callback(x.shape, batch_sh[key], lambda index, x=x: x[index])
        return out

    last = {}
    preempted = False
    try:
        with PreemptionGuard() as guard:
            for step in range(start_step + 1, total_steps + 1):
                chosen = prompts_for_step(len(problems), int(g.prompts_per_step), step, int(config.seed))
                # Seeded by step, so a resumed run samples exactly what the uninterrupted one did.
                sampling = SamplingParams(temperature=temperature, top_p=float(g.top_p), top_k=int(g.top_k),
                                          max_new_tokens=int(g.max_new_tokens),
                                          seed=int(config.seed) * 1_000_003 + step)
                t0 = time.perf_counter()
                backend.update_params(state["params"])
                sync_s = time.perf_counter() - t0
                completions = backend.generate([prompt_ids[i] for i in chosen], sampling, int(g.num_generations),
                                               progress=False)
                rollout_s = time.perf_counter() - t0
                check_groups(completions, len(chosen), int(g.num_generations))
                rewards = np.array([[reward_fn(c.text, problems[i]) for c in group]
                                    for i, group in zip(chosen, completions)], np.float32)
                advantages = grpo_loss.group_advantages(rewards.reshape(-1), int(g.num_generations),
                                                        scale_by_std=bool(g.scale_rewards))
                host = build_batch([prompt_ids[i] for i in chosen], completions, advantages,
                                   seq_len=int(g.max_length), eos_id=eos_id, aggregation=str(g.loss_aggregation))
                t1 = time.perf_counter()
                with jax.set_mesh(mesh):
                    batch = device_batch(host)
                    if mu > 1:  # computed once, before the first of the mu updates moves the params
                        batch["old_logp"] = logprob_fn(state["params"], batch)
                    if beta:
                        batch["ref_logp"] = logprob_fn(ref_params, batch)
                for _ in range(mu):
                    state, metrics = train_step(state, batch)
                metrics = {key: float(v) for key, v in jax.device_get(metrics).items()}  # the last update's
                train_s = time.perf_counter() - t1
                last = {**metrics, **rollout_metrics(rewards, completions),
                        **throughput(completions, host, mu, rollout_s=rollout_s, sync_s=sync_s, train_s=train_s)}
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
              "checkpoint_dir": str(workdir / "checkpoints"), "steps": int(jax.device_get(state["step"])) // mu,
              "total_steps": total_steps, "preempted": preempted, "fingerprint": fingerprint, "last_metrics": last,
              "prompts": len(problems), **long_prompts}
    if preempted:
        return result
    model = nnx.merge(graphdef, nnx.State(state["params"]))
    export_hf_checkpoint(model, export_dir, tokenizer_source=tokenizer_path, dtype=str(g.export_dtype))
    if is_writer:
        result_path.write_text(json.dumps(result, indent=2))
    return result


def main(config, args) -> int:
    """`stat-jax grpo --config=configs/grpo_*.py [--resume]`."""
    check_config_lengths(config, "grpo")
    result = train_grpo(config, workdir=config.workdir, resume=bool(getattr(args, "resume", False)))
    if result["preempted"]:
        return PREEMPTED_STATUS
    print(json.dumps({k: result[k] for k in ("export_dir", "metrics_path", "steps", "last_metrics")}))
    return 0
