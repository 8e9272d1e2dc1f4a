"""`stat-jax grpo`: Group Relative Policy Optimisation of a (STAT-trained) student with a verifiable reward.

Each step: take `prompts_per_step` problems, sample G completions each through the rollout backend
(JetStream in-process, with the current params swapped in without recompiling), reward them with the math
grader, normalise rewards within each group, compute the trainer's log-probs at the rollout params (and, if
beta > 0, the reference's) on device, then run `num_iterations` (mu) jitted updates of the clipped objective.
With mu = 1 the old policy IS the current one, so the step uses stop_gradient(log p) and skips that forward pass.
The engine also returns the log-probability it sampled each token with: the trainer's and the engine's differ
(a bfloat16 engine over float32 masters, adapters merged into a quantized base, other kernels), and
`grpo.rollout_correction` reweights the update by their ratio (grpo_loss.ROLLOUT_CORRECTIONS).
GRPO is its loss, its data (rollouts) and its metrics on the shared trainer core (train/loop.py). With
train.lora.rank > 0 only adapters train, and the engine samples from base + adapters merged by one jitted
program per run (no recompiling per step). Programmatic use: `train_grpo(config, ...)`.

Defaults (configs/base.py `grpo`), and why:
- rewards scaled by the group std (`scale_rewards=true`): GRPO as published (DeepSeekMath), Tunix's default,
  so a run after STAT compares with published GRPO numbers; `false` gives Dr. GRPO, which drops the std
  because it up-weights groups that are nearly all right or all wrong (a question-difficulty bias).
- loss aggregated per token over the whole batch (`loss_aggregation=token`): every generated token weighs the
  same, so long answers are not down-weighted relative to short ones as with a per-sequence mean
  (`sequence`, the original form), which also biases towards long wrong answers (DAPO, Dr. GRPO).
- beta = 0: no KL penalty and no reference model in memory (DAPO / Dr. GRPO practice for verifiable rewards);
  beta > 0 keeps a frozen copy of the start weights and adds beta * k3 KL to the loss.
- log-probs are of the temperature-scaled policy (logits / grpo.temperature), the distribution rollouts sample.

`grpo.oversample` = n > 1 samples n x prompts_per_step prompts a step and trains on the prompts_per_step
whose rewards differ (DAPO's dynamic sampling, `informative_groups`); the rollout metrics stay those of every
sampled prompt, and trained_zero_std_groups is the share of the trained groups that still carry no signal.

Metrics per step (tqdm bar + <workdir>/metrics.jsonl): reward_mean/std, accuracy, zero_std_groups,
response_length, truncated (share) and truncated_count; from the last of the mu updates: loss, clip_fraction,
entropy, grad_norm, lr, kl (only when beta > 0: without a reference there is no KL to report), and the engine's
mismatch over the tokens it reported: mismatch_abs_mean / mismatch_abs_max (|log p_trainer - log p_engine|),
mismatch_kl (KL(engine || trainer), k3) and correction_capped (share of tokens the correction capped or masked);
rollout_tokens_per_s (weight swap included, weight_sync_s alone) and train_tokens_per_s (old/reference log-probs
and the mu updates) separately.
"""

from __future__ import annotations

import dataclasses
import functools
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
from stat_jax import validity
from stat_jax.config import write_resolved_config
from stat_jax.data.records import MathProblem
from stat_jax.lengths import PromptLimit, check_config_lengths, drop_long_prompts
from stat_jax.rollout.base import Completion, RolloutBackend, RolloutError, SamplingParams
from stat_jax.models import lora
from stat_jax.train import chunked_loss, grpo_loss, loop
from stat_jax.train.metrics import MetricsLogger
from stat_jax.train.optim import build_optimizer

log = logging.getLogger(__name__)

# What an answer cut at grpo.max_new_tokens gets: trained as is | left out of the loss (DAPO's overlong
# filtering) | its reward lowered by `overlong_penalty` (DAPO's soft overlong punishment).
TRUNCATED = ("keep", "mask", "penalize")
ROW_KEYS = ("tokens", "targets", "positions", "attention_mask", "weights", "engine_logp",
            "engine_weight")  # [rows, t]
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
                advantages: np.ndarray, *, seq_len: int, eos_id: int, aggregation: str,
                drop_truncated: bool = False) -> dict[str, np.ndarray]:
    """Rows [prompt + completion (+ EOS if it stopped)], right-padded to seq_len; loss weights on completions
    (none on a truncated one with `drop_truncated`: DAPO's overlong filtering). `engine_logp`: the engine's
    log-probability of each completion token where it reported one; `engine_weight`: 1 / their count there."""
    rows = [(p, c) for p, group in zip(prompt_ids, completions) for c in group]
    n = len(rows)
    tokens = np.zeros((n, seq_len), np.int32)
    targets = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    attention = np.zeros((n, seq_len), np.int32)
    engine_logp, known = np.zeros((n, seq_len), np.float32), np.zeros((n, seq_len), np.float32)
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
        if not (drop_truncated and completion.finish_reason == "length"):
            mask[i, len(prompt) - 1:length] = 1.0  # targets that are completion tokens
        reported = list(completion.logprobs or [])
        if reported and completion.finish_reason == "stop" and completion.stop_token_id == eos_id:
            reported.append(completion.stop_logprob)  # the end token trained on is the one the engine sampled
        engine_logp[i, len(prompt) - 1:len(prompt) - 1 + len(reported)] = reported
        known[i, len(prompt) - 1:len(prompt) - 1 + len(reported)] = 1.0
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    return {"tokens": tokens, "targets": targets, "positions": positions, "attention_mask": attention,
            "weights": np.asarray(token_weights(mask, aggregation)), "advantages": advantages.astype(np.float32),
            "engine_logp": engine_logp, "engine_weight": known / max(float(known.sum()), 1.0)}


def informative_groups(rewards: np.ndarray, keep: int) -> np.ndarray:
    """Indices (ascending) of `keep` of the sampled groups, rewards [groups, G]: the groups whose rewards differ
    first, then all-equal ones in sampled order to fill the update's fixed row count.

    DAPO's dynamic sampling: a group whose G rewards are equal has zero advantage, so it adds tokens to the
    update but no gradient; sampling `grpo.oversample` times the prompts and training on the varied groups
    gives each update more of the signal at the same update cost.
    """
    varied = rewards.std(axis=1) > 0
    order = np.concatenate([np.flatnonzero(varied), np.flatnonzero(~varied)])
    return np.sort(order[:keep])


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


# ----- device side: GRPO's loss on the shared core (train/loop.py) ---------------------------------------
def policy_token_stats(params, graphdef, micro, temperature: float = 1.0, *,
                       chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS, entropy: bool = False,
                       frozen: dict | None = None) -> dict:
    """Per-token {"logp"[, "entropy"]} [rows, t] of the temperature-scaled policy the rollouts sample from.

    The logits are computed `chunk_tokens` (rows x positions) at a time and never exist whole (0 = at once).
    `frozen`: the base when `params` are adapters.
    """
    state = (nnx.State(params),) + (() if frozen is None else (nnx.State(frozen),))
    model = nnx.merge(graphdef, *state)
    hidden = model.hidden_states(micro["tokens"], positions=micro["positions"], attention_mask=micro["attention_mask"])
    return chunked_loss.token_stats(model, hidden, micro["targets"], chunk_tokens=chunk_tokens,
                                    temperature=temperature, entropy=entropy)


def make_logprob_fn(graphdef, temperature: float = 1.0, *,
                    chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS) -> Callable:
    """(params, batch [k, rows, t][, frozen]) -> per-token log-probs [k, rows, t] (no gradient; old or
    reference policy)."""

    def logprobs(params, batch, frozen=None):
        return jax.lax.map(lambda micro: policy_token_stats(params, graphdef, micro, temperature,
                                                            chunk_tokens=chunk_tokens, frozen=frozen)["logp"], batch)

    return logprobs


def grpo_loss_fn(graphdef, *, epsilon_low: float, epsilon_high: float, beta: float, temperature: float = 1.0,
                 chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS, rollout_correction: str = "none",
                 tis_cap: float = 2.0) -> Callable:
    """The core's per-micro-batch loss: weighted sums of the clipped objective, clip fraction, entropy (, kl),
    and the engine/trainer mismatch.

    micro["old_logp"] is the trainer's log-probs at the rollout params; without it (mu = 1) the current params
    ARE those, so stop_gradient(log p) stands in: the same value and gradient without a second forward pass.
    The per-token loss is weighted by `rollout_correction` (grpo_loss.ROLLOUT_CORRECTIONS) of the ratio of those
    log-probs to the engine's (micro["engine_logp"], where micro["engine_weight"] > 0). micro["ref_logp"] is
    needed when beta > 0. The weights are normalised over the whole batch on the host (`token_weights`), so k
    micro-batches add up exactly to the full-batch value.
    """

    def loss_fn(params, micro, frozen):
        stats = policy_token_stats(params, graphdef, micro, temperature, chunk_tokens=chunk_tokens, entropy=True,
                                   frozen=frozen)
        logp = stats["logp"]
        old_logp = micro["old_logp"] if "old_logp" in micro else jax.lax.stop_gradient(logp)
        per_token, terms = grpo_loss.per_token_terms(
            logp, old_logp, micro["advantages"], epsilon_low=epsilon_low, epsilon_high=epsilon_high,
            ref_logp=micro.get("ref_logp"), beta=beta)
        w = micro["weights"]
        aux = {"clip_fraction": jnp.sum(terms["clipped"] * w), "entropy": jnp.sum(stats["entropy"] * w)}
        if "engine_weight" in micro:  # the batch carries the engine's log-probs (build_batch)
            ew = micro["engine_weight"]
            correction, mismatch = grpo_loss.rollout_correction(old_logp, micro["engine_logp"], ew > 0,
                                                                rollout_correction, tis_cap)
            per_token = per_token * correction
            # over the tokens the engine reported: |log p_trainer - log p_engine|, KL(engine || trainer)
            aux |= {"mismatch_abs_mean": jnp.sum(mismatch["abs_log_ratio"] * ew),
                    "mismatch_abs_max": jnp.max(jnp.where(ew > 0, mismatch["abs_log_ratio"], 0.0)),
                    "mismatch_kl": jnp.sum(mismatch["kl"] * ew), "correction_capped": jnp.sum(mismatch["capped"] * ew)}
        if "kl" in terms:
            aux["kl"] = jnp.sum(jax.lax.stop_gradient(terms["kl"]) * w)
        return jnp.sum(per_token * w), aux

    return loss_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, epsilon_low: float,
                    epsilon_high: float, beta: float, temperature: float = 1.0,
                    chunk_tokens: int = chunked_loss.DEFAULT_CHUNK_TOKENS, dropout_seed: int | None = None,
                    rollout_correction: str = "none", tis_cap: float = 2.0) -> Callable:
    """`(state, batch[, frozen]) -> (state, metrics)`; batch leaves [k micro-batches, rows, t]."""
    loss_fn = grpo_loss_fn(graphdef, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                           temperature=temperature, chunk_tokens=chunk_tokens, rollout_correction=rollout_correction,
                           tis_cap=tis_cap)
    return loop.make_train_step(loss_fn, tx, schedule, dropout_seed=dropout_seed)


def batch_layout(rows: int, length: int, *, old_logp: bool, ref_logp: bool) -> loop.BatchLayout:
    """The update's batch: the row keys per token, advantages per row, the old/reference log-probs if used."""
    token_keys = {key: jnp.float32 if key.startswith(("weights", "engine_")) else jnp.int32 for key in ROW_KEYS}
    token_keys |= {key: jnp.float32 for key, used in (("old_logp", old_logp), ("ref_logp", ref_logp)) if used}
    return loop.BatchLayout(rows, length, token_keys, {"advantages": jnp.float32})


def fit_train_step(g, train_step: Callable, state_sh: dict, abstract_train_state: dict, mesh: Mesh, *,
                   old_logp: bool, ref_logp: bool, abstract_frozen: dict | None = None, donate_params: bool = False):
    """(k, batch shardings, compiled `(params, opt_state, step, batch[, frozen])`, StepMemory): the update
    compiled for the fewest micro-batches that fit `grpo.memory_budget_gb` (grpo.micro_batches = 0), or checked
    at the user's. Full params are not donated: the rollout engine serves those very buffers."""
    advice = ("Lower grpo.prompts_per_step, grpo.num_generations or grpo.max_length, set model.remat=full "
              "(recompute each layer), spread the batch over more devices (mesh.fsdp), or raise "
              "grpo.memory_budget_gb / grpo.memory_fraction.")
    layout = batch_layout(int(g.prompts_per_step) * int(g.num_generations), int(g.max_length), old_logp=old_logp,
                          ref_logp=ref_logp)
    return loop.fit_train_step(train_step, state_sh, abstract_train_state, mesh, layout, section=g, prefix="grpo",
                               fixed=int(g.micro_batches) or None, key="grpo.micro_batches", advice=advice,
                               abstract_frozen=abstract_frozen, donate_params=donate_params)


# ----- the loop ------------------------------------------------------------------------------------------
def overlong_penalty(length: int, max_new_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_new_tokens - buffer tokens, then falling linearly to -1 at
    max_new_tokens (a truncated answer); buffer 0: -1 for a truncated answer only."""
    if length >= max_new_tokens:
        return -1.0
    return min(0.0, (max_new_tokens - buffer - length) / buffer) if buffer else 0.0


def rollout_batch(g, completions: Sequence[Sequence[Completion]], problems: Sequence[MathProblem],
                  prompt_ids: Sequence[Sequence[int]], reward_fn: RewardFn, eos_id: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One step's rollouts -> (the update's host batch, rollout metrics): rewards (with `grpo.truncated`'s
    handling of answers cut at grpo.max_new_tokens), the groups kept (grpo.oversample), advantages, rows."""
    check_groups(completions, len(problems), int(g.num_generations))
    if g.rollout_correction != "none" and any(c.logprobs is None for group in completions for c in group):
        raise RolloutError(f"grpo.rollout_correction={g.rollout_correction} needs the engine's log-probabilities, "
                           f"and the rollout backend returned none; use a backend that reports them "
                           f"(rollout.backend=jetstream) or set grpo.rollout_correction=none")
    rewards = np.array([[reward_fn(c.text, p) for c in group] for p, group in zip(problems, completions)], np.float32)
    if g.truncated == "penalize":
        rewards += float(g.overlong_penalty) * np.array(
            [[overlong_penalty(len(c.token_ids), int(g.max_new_tokens), int(g.overlong_buffer)) for c in group]
             for group in completions], np.float32)
    # The reward curve is the policy's, over every sampled prompt; the update trains on the kept ones.
    sampled = rollout_metrics(rewards, completions)
    if len(problems) > int(g.prompts_per_step):
        keep = informative_groups(rewards, int(g.prompts_per_step))
        prompt_ids, completions, rewards = [prompt_ids[i] for i in keep], [completions[i] for i in keep], rewards[keep]
        sampled["trained_zero_std_groups"] = float((rewards.std(axis=1) == 0).mean())
    advantages = grpo_loss.group_advantages(rewards.reshape(-1), int(g.num_generations),
                                            scale_by_std=bool(g.scale_rewards))
    host = build_batch(prompt_ids, completions, advantages, seq_len=int(g.max_length), eos_id=eos_id,
                       aggregation=str(g.loss_aggregation), drop_truncated=g.truncated == "mask")
    return host, sampled


def rollout_metrics(rewards: np.ndarray, completions: Sequence[Sequence[Completion]]) -> dict[str, float]:
    """Reward statistics of one step's rollouts; rewards [prompts, G]. Accuracy = share of full rewards (>= 1);
    truncated: the share and count of answers cut at grpo.max_new_tokens."""
    truncated = sum(c.finish_reason == "length" for group in completions for c in group)
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "accuracy": float((rewards >= 1.0).mean()),
            # groups whose G rewards are all equal: zero advantage, no learning signal
            "zero_std_groups": float((rewards.std(axis=1) == 0).mean()),
            "response_length": sum(len(c.token_ids) for group in completions for c in group) / rewards.size,
            "truncated": truncated / rewards.size, "truncated_count": truncated}


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
        (int(g.oversample) == g.oversample and g.oversample >= 1,
         f"grpo.oversample must be a whole number >= 1 (prompts sampled per trained prompt), got {g.oversample}"),
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
        (g.rollout_correction in grpo_loss.ROLLOUT_CORRECTIONS,
         f"grpo.rollout_correction={g.rollout_correction!r}: choose one of {sorted(grpo_loss.ROLLOUT_CORRECTIONS)}"),
        (g.tis_cap >= 1, f"grpo.tis_cap must be >= 1 (the largest importance weight kept), got {g.tis_cap}"),
        (g.truncated in TRUNCATED, f"grpo.truncated={g.truncated!r}: choose one of {TRUNCATED}"),
        (0 <= g.overlong_buffer < g.max_new_tokens,
         f"grpo.overlong_buffer must be in [0, grpo.max_new_tokens), got {g.overlong_buffer}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


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
    swapped in each step); reward_fn: default `grpo.reward` (the math grader). With train.lora.rank > 0 only
    adapters train (result["adapter_dir"]: their PEFT files). result["compilations"] (own backend): compiled
    variants of the engine's kernels and of the adapter merge that this run added, one each when no weight swap
    recompiled.
    """
    config = validity.watch(config)
    with validity.reads() as reads:  # a finished run or a checkpoint is reused while these are unchanged
        return _train_grpo(config, problems, workdir, resume, backend, reward_fn, mesh, reads)


def step_sampling(config, step: int) -> SamplingParams:
    """A step's sampling, seeded by the step (a resumed run samples exactly what the uninterrupted one did), with
    the engine's log-probabilities (the rollout correction and the mismatch metrics read them)."""
    g = config.grpo
    return SamplingParams(temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k),
                          max_new_tokens=int(g.max_new_tokens), seed=int(config.seed) * 1_000_003 + step,
                          logprobs=True)


def _grpo_problems(g, problems: Sequence[MathProblem] | None) -> list[MathProblem]:
    """The given problems, else those of grpo.train_files; an empty list is an error."""
    if problems is None:
        if not g.train_files:
            raise ValueError("grpo needs prompts: --config.grpo.train_files=problems.jsonl")
        problems = [p for f in g.train_files for p in load_prompts(f)]
    if not problems:
        raise ValueError("grpo: the problem list is empty")
    return list(problems)


def _fitting_prompts(config, tokenizer, problems: Sequence[MathProblem]):
    """(problems, their prompt ids, the long-prompt report): prompts that cannot run (rollout limits, or prompt +
    max_new_tokens over a grpo.max_length row) are left out and counted, or stop here (rollout.on_long_prompt=
    error): before any device work, never mid-run."""
    g = config.grpo
    prompt_ids = grpo_prompt_ids(config, tokenizer, problems)
    limit = PromptLimit.from_config(config, int(g.max_new_tokens), max_row_length=int(g.max_length))
    problems, prompt_ids, long_prompts = drop_long_prompts(
        problems, prompt_ids, limit, str(config.rollout.get("on_long_prompt", "skip")), "grpo prompts",
        [p.id for p in problems])
    if long_prompts["skipped_long_prompts"]:
        log.warning("grpo: %d prompts do not fit the limits and are left out (first: %s)",
                    long_prompts["skipped_long_prompts"], long_prompts["skipped_long_prompt_examples"][0])
    return problems, prompt_ids, long_prompts


def _student(config):
    """(model dir, ModelConfig, tokenizer, the end-of-turn token a finished completion is scored on: the one
    rollouts stop at and SFT teaches)."""
    from stat_jax.data.stop_tokens import end_token_id
    from stat_jax.models.config import ModelConfig
    from stat_jax.models.hub import resolve_model_path
    from stat_jax.models.student import load_tokenizer

    model_path = resolve_model_path(config.model.path)
    model_cfg = ModelConfig.from_hf_dir(model_path)
    tokenizer = load_tokenizer(config)
    return model_path, model_cfg, tokenizer, end_token_id(tokenizer, model_cfg.eos_token_ids)


def _start_backend(config, graphdef, params: dict, tokenizer) -> RolloutBackend:
    """The run's own rollout backend (config.rollout), serving `params` (swapped each step)."""
    from stat_jax.rollout.factory import make_rollout_backend

    return make_rollout_backend(config, nnx.merge(graphdef, nnx.State(params)), tokenizer)


def _metrics_logger(config, workdir: Path, total_steps: int, start_step: int) -> MetricsLogger:
    """metrics.jsonl and TensorBoard events (and the resolved config beside them, process 0 only)."""
    is_writer = jax.process_index() == 0
    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(config, workdir)
    return MetricsLogger(workdir / "metrics.jsonl", total_steps=total_steps, start_step=start_step, desc="grpo",
                         is_writer=is_writer,  # TensorBoard events too, as SFT writes them (train.tensorboard)
                         tensorboard_dir=workdir / "tensorboard" if config.train.tensorboard else None)


def _compiled_update(g, policy: loop.Policy, tx, schedule, state_sh, abstract_train_state, mesh: Mesh,
                     dropout_seed: int | None):
    """(micro-batches k, batch shardings, the compiled update), compiled from abstract arrays before any weight
    is loaded, so an update that cannot fit stops here. Adapters may be donated: the engine serves a merged copy
    of them, not their buffers."""
    step_impl = make_train_step(policy.graphdef, tx, schedule, epsilon_low=float(g.epsilon_low),
                                epsilon_high=float(g.epsilon_high), beta=float(g.beta),
                                temperature=float(g.temperature), chunk_tokens=int(g.loss_chunk_tokens),
                                dropout_seed=dropout_seed, rollout_correction=str(g.rollout_correction),
                                tis_cap=float(g.tis_cap))
    k, batch_sh, compiled_step, step_memory = fit_train_step(
        g, step_impl, state_sh, abstract_train_state, mesh, old_logp=g.num_iterations > 1, ref_logp=bool(g.beta),
        abstract_frozen=policy.abstract_frozen, donate_params=policy.adapters)
    log.info("grpo: %d rows x %d tokens per update in %d micro-batches, step memory %s per device",
             g.prompts_per_step * g.num_generations, int(g.max_length), k, step_memory.describe())
    return k, batch_sh, compiled_step


def _start_state(config, ckpt, policy: loop.Policy, abstract_train_state, state_sh, tx, mesh: Mesh):
    """(train state, GRPO steps done, the frozen base or None, the reference params or None): restored from the
    latest checkpoint or initialised from the start model.

    The reference is the start model, frozen. Full fine-tuning keeps it in the compute dtype: the model casts
    every weight to it anyway, so its logits are unchanged and a bf16 run holds half the bytes. With adapters
    it is the base itself: all-zero adapters add nothing, so no second copy is kept. beta == 0 turns it off:
    nothing is kept, and the start weights are dropped once the state exists.
    """
    mu = int(config.grpo.num_iterations)
    initial_params, frozen = loop.load_policy(policy, mesh, int(config.seed))
    ref_params = None
    if config.grpo.beta:
        ref_params = (jax.tree.map(jnp.zeros_like, initial_params) if policy.adapters
                      else reference_params(initial_params, config.model.dtype))
    state, _, latest = loop.restore_or_init(ckpt, abstract_train_state, state_sh, tx, lambda: initial_params,
                                            config, "grpo")
    del initial_params
    if latest is not None:
        if int(jax.device_get(state["step"])) != latest * mu:
            raise ValueError(f"{ckpt.directory}/{latest}: the checkpoint holds {int(jax.device_get(state['step']))} "
                             f"optimizer updates, not {latest} steps x grpo.num_iterations={mu}; resume with the "
                             f"num_iterations it was written with")
        log.info("grpo: resumed from step %d", latest)
    return state, latest or 0, frozen, ref_params  # GRPO steps done (state["step"] counts optimizer updates)


def _train_grpo(config, problems: Sequence[MathProblem] | None, workdir: str | Path | None, resume: bool,
                backend: RolloutBackend | None, reward_fn: RewardFn | None, mesh: Mesh | None,
                reads: validity.Reads) -> dict[str, Any]:
    g = config.grpo
    _validate(g)
    if backend is None and config.rollout.backend != "jetstream":
        raise ValueError(f"grpo samples with the policy being trained, so it needs rollout.backend=jetstream "
                         f"(in-process, params swapped each step), not {config.rollout.backend!r}")
    workdir = Path(workdir or config.workdir)
    export_dir, result_path = workdir / "hf", workdir / "grpo_result.json"
    problems = _grpo_problems(g, problems)
    data_hash = loop.rows_hash(problems, leave_out=("source",))  # the file a prompt came from: moving it changes none
    if (done := loop.previous_result(workdir, result_path, export_dir, config, data_hash, resume, "grpo")) is not None:
        return done

    reward_fn = reward_fn or resolve_reward(str(g.reward), float(g.format_reward))
    mesh = mesh or sharding.mesh_from_config(config.mesh)
    model_path, model_cfg, tokenizer, eos_id = _student(config)
    problems, prompt_ids, long_prompts = _fitting_prompts(config, tokenizer, problems)

    total_steps, mu = int(g.steps), int(g.num_iterations)
    # The optimizer (and its learning-rate schedule) counts updates: mu of them per GRPO step.
    tx, schedule = build_optimizer(g, total_steps * mu)
    policy, state_sh, abstract_train_state, dropout_seed = loop.policy_from_config(
        config, model_cfg, model_path, mesh, tx, workdir / "checkpoints", resume)
    k, batch_sh, compiled_step = _compiled_update(g, policy, tx, schedule, state_sh, abstract_train_state, mesh,
                                                  dropout_seed)
    ckpt = loop.open_checkpoints(workdir / "checkpoints", g, resume)
    state, start_step, frozen, ref_params = _start_state(config, ckpt, policy, abstract_train_state, state_sh, tx,
                                                         mesh)
    logprob_fn = jax.jit(make_logprob_fn(policy.graphdef, float(g.temperature),
                                         chunk_tokens=int(g.loss_chunk_tokens)), out_shardings=batch_sh["tokens"])
    update = _Update(loop.run_on_mesh(compiled_step, mesh, frozen), logprob_fn, k, batch_sh,
                     g.prompts_per_step * g.num_generations, mu, mesh, ref_params, frozen)
    rollout_graphdef, served = rollout_policy(policy, model_cfg, mesh, frozen)
    own_backend = backend is None
    backend = _start_backend(config, rollout_graphdef, served(state["params"]), tokenizer) if own_backend else backend
    engine_before = getattr(backend, "compilation_counts", dict)() if own_backend else {}
    logger = _metrics_logger(config, workdir, total_steps, start_step)

    def meta() -> dict[str, Any]:
        return {"data_hash": data_hash, "reads": dict(reads.values), "total_steps": total_steps,
                **policy.checkpoint_meta()}

    def step_fn(step: int, state: dict):
        started = time.perf_counter()
        chosen = prompts_for_step(len(problems), int(g.prompts_per_step) * int(g.oversample), step, int(config.seed))
        t0 = time.perf_counter()
        backend.update_params(served(state["params"]))
        sync_s = time.perf_counter() - t0
        completions = backend.generate([prompt_ids[i] for i in chosen], step_sampling(config, step),
                                       int(g.num_generations), progress=False)
        rollout_s = time.perf_counter() - t0
        host, sampled = rollout_batch(g, completions, [problems[i] for i in chosen],
                                      [prompt_ids[i] for i in chosen], reward_fn, eos_id)
        t1 = time.perf_counter()
        state, metrics = update(state, host)
        train_s = time.perf_counter() - t1
        return state, {**metrics, **sampled, "step_s": time.perf_counter() - started,
                       **throughput(completions, host, mu, rollout_s=rollout_s, sync_s=sync_s, train_s=train_s)}

    try:
        state, preempted, last = loop.run_loop("grpo", state, start_step, total_steps, step_fn, logger.log, ckpt,
                                               meta)
    finally:
        logger.close()
        ckpt.close()
        if own_backend:
            backend.close()

    result = {"export_dir": str(export_dir), "metrics_path": str(workdir / "metrics.jsonl"),
              "checkpoint_dir": str(workdir / "checkpoints"), "steps": int(jax.device_get(state["step"])) // mu,
              "total_steps": total_steps, "preempted": preempted, "data_hash": data_hash, "reads": dict(reads.values),
              "last_metrics": last, "prompts": len(problems), **long_prompts}
    if own_backend:  # this run's compilations (engines of one process share a cache): one each, swaps included
        engine = {k: v - engine_before.get(k, 0) for k, v in getattr(backend, "compilation_counts", dict)().items()}
        result["compilations"] = {**engine, **served.compilation_counts()}
    return loop.finish(result, policy, state["params"], frozen, export_dir=export_dir, workdir=workdir,
                       result_path=result_path, tokenizer_source=config.model.tokenizer_path or model_path,
                       dtype=str(g.export_dtype))


@dataclasses.dataclass
class _Update:
    """The update half of a GRPO step: the rollout batch placed on the mesh (every process holds the whole,
    identically seeded batch), the old (mu > 1) and reference (beta > 0) log-probs, then mu jitted updates."""

    train_step: Callable
    logprob_fn: Callable
    k: int  # micro-batches
    batch_sh: dict
    rows: int
    mu: int
    mesh: Mesh
    ref_params: dict | None
    frozen: dict | None

    def __call__(self, state: dict, host: dict[str, np.ndarray]) -> tuple[dict, dict[str, float]]:
        frozen = () if self.frozen is None else (self.frozen,)
        with jax.set_mesh(self.mesh):
            batch = loop.to_device_batch(host, self.k, self.batch_sh, global_rows=self.rows)
            if self.mu > 1:  # computed once, before the first of the mu updates moves the params
                batch["old_logp"] = self.logprob_fn(state["params"], batch, *frozen)
            if self.ref_params is not None:
                batch["ref_logp"] = self.logprob_fn(self.ref_params, batch, *frozen)
        for _ in range(self.mu):
            state, metrics = self.train_step(state, batch)
        return state, {key: float(v) for key, v in jax.device_get(metrics).items()}  # the last update's


class _Served:
    """What the rollout engine serves from the trained params: themselves, or base + adapters merged by one
    jitted program (compiled once per run: same shapes and shardings every step)."""

    def __init__(self, merge: Callable | None, frozen: dict | None):
        self._merge, self._frozen = merge, frozen

    def __call__(self, params: dict) -> dict:
        return params if self._merge is None else self._merge(params, self._frozen)

    def compilation_counts(self) -> dict[str, int]:
        return {} if self._merge is None else {"merge_adapters": self._merge._cache_size()}


def rollout_policy(policy: loop.Policy, model_cfg, mesh: Mesh, frozen: dict | None) -> tuple[nnx.GraphDef, _Served]:
    """(graphdef of the model the engine serves, params -> the params it serves)."""
    if not policy.adapters:
        return policy.graphdef, _Served(None, None)
    from stat_jax.models import abstract_model

    graphdef, abstract_params = nnx.split(abstract_model(model_cfg, **policy.model_kw))
    plain_sh = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
    merge = jax.jit(functools.partial(lora.merged_params, scale=policy.lcfg.scale), out_shardings=plain_sh)
    return graphdef, _Served(merge, frozen)


def main(config, args) -> int:
    """`stat-jax grpo --config=configs/grpo_*.py [--resume]`."""
    check_config_lengths(config, "grpo")
    result = train_grpo(config, workdir=config.workdir, resume=bool(getattr(args, "resume", False)))
    if result["preempted"]:
        return loop.PREEMPTED_STATUS
    print(json.dumps({k: result[k] for k in ("export_dir", "metrics_path", "steps", "last_metrics")}))
    return 0
