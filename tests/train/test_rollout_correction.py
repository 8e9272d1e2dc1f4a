"""GRPO on what the engine sampled (issue 42): the importance-sampling corrections, their expectation on a bandit
whose engine samples at another temperature, the jitted step's mismatch metrics, and truncated answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from stat_jax.data.records import MathProblem
from stat_jax.rollout.base import Completion, RolloutError
from stat_jax.train import grpo, grpo_loss
from tests.train.test_grpo import _micro, step_inputs  # noqa: F401  (the fixture)

K = 6
ENGINE_TEMPERATURE = 3.0  # the engine samples from softmax(theta / 3), the trainer computes softmax(theta)


def _bandit():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(0, 2.5, K), jnp.float32), jnp.asarray(rng.normal(0, 1, K), jnp.float32)


def _expected_loss(theta, advantages, engine_probs, mode, cap):
    """E over the engine's samples (weights engine_probs: exact, or a fixed batch's counts) of the corrected
    GRPO loss of a one-token answer a, advantage A(a)."""
    logp = jax.nn.log_softmax(theta)[:, None]  # rows = the K answers, one token each
    engine_logp = jax.nn.log_softmax(theta / ENGINE_TEMPERATURE)[:, None]
    weights, _ = grpo_loss.rollout_correction(logp, engine_logp, jnp.ones_like(logp, bool), mode, cap)
    per_token, _ = grpo_loss.per_token_terms(logp, jax.lax.stop_gradient(logp), advantages)
    return jnp.sum(engine_probs[:, None] * weights * per_token)


def test_corrected_gradient_is_the_on_policy_gradient_in_expectation_and_the_uncorrected_is_not():
    theta, advantages = _bandit()
    p = jax.nn.softmax(theta)
    # On-policy: the gradient of E_p[A] is sum_a p(a) A(a) grad log p(a); the loss is its negative.
    on_policy = -jax.grad(lambda t: jnp.sum(jax.lax.stop_gradient(p) * advantages * jax.nn.log_softmax(t)))(theta)
    q = jax.nn.softmax(theta / ENGINE_TEMPERATURE)
    grad = lambda mode, cap, probs: jax.grad(_expected_loss)(theta, advantages, probs, mode, cap)  # noqa: E731
    corrected, uncorrected = grad("token_tis", 1e6, q), grad("none", 2.0, q)
    np.testing.assert_allclose(corrected, on_policy, rtol=1e-5, atol=1e-6)
    assert float(jnp.linalg.norm(uncorrected - on_policy)) > 0.3 * float(jnp.linalg.norm(on_policy))
    # A fixed batch of 100,000 engine samples: the corrected estimate is within sampling error of the on-policy
    # gradient (7e-4 here, of components up to 0.2), the uncorrected one is not (7e-2).
    engine = np.asarray(q, np.float64)
    counts = np.bincount(np.random.default_rng(1).choice(K, 100_000, p=engine / engine.sum()), minlength=K)
    batch = jnp.asarray(counts / counts.sum(), jnp.float32)
    assert float(jnp.abs(grad("token_tis", 1e6, batch) - on_policy).max()) < 0.005
    assert float(jnp.abs(grad("none", 2.0, batch) - on_policy).max()) > 0.05


def test_token_tis_caps_each_weight_and_sequence_mask_drops_whole_answers():
    trainer = jnp.log(jnp.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    engine = jnp.log(jnp.array([[0.5, 0.1, 0.4], [0.45, 0.5, 0.5]]))  # ratios [1, 5, 1.25], [1.11, 1, 1]
    known = jnp.array([[True, True, True], [True, True, False]])
    w, terms = grpo_loss.rollout_correction(trainer, engine, known, "token_tis", 2.0)
    np.testing.assert_allclose(w, [[1, 2, 1.25], [1 / 0.9, 1, 1]], rtol=1e-6)
    np.testing.assert_allclose(terms["capped"], [[0, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(terms["abs_log_ratio"][0], np.abs(np.log([1, 5, 1.25])), rtol=1e-6)
    assert float(terms["kl"][1, 2]) == 0.0 and float(terms["kl"][0, 1]) > 0  # unknown tokens count nothing
    w, terms = grpo_loss.rollout_correction(trainer, engine, known, "sequence_mask", 2.0)  # 6.25 > 2 >= 1.11
    np.testing.assert_allclose(w, [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_allclose(terms["capped"], [[1, 1, 1], [0, 0, 0]])
    w, terms = grpo_loss.rollout_correction(trainer, engine, known, "none", 2.0)
    assert float(jnp.min(w)) == 1.0 and float(jnp.max(terms["capped"])) == 0.0
    with pytest.raises(ValueError, match="grpo.rollout_correction='tis'.*sequence_mask"):
        grpo_loss.rollout_correction(trainer, engine, known, "tis", 2.0)


def test_the_step_weights_its_loss_and_reports_the_mismatch_the_same_in_any_micro_batching(step_inputs):  # noqa
    graphdef, params, batch, mask, rng = step_inputs
    temperature, cap = 0.7, 1.5
    logp0 = np.asarray(grpo.make_logprob_fn(graphdef, temperature)(params, _micro(batch, 1))[0])
    engine = (logp0 + rng.normal(0, 0.5, logp0.shape)).astype(np.float32)
    known = mask * (np.arange(mask.shape[1])[None, :] % 4 != 1)  # some completion tokens were not reported
    inputs = {**batch, "engine_logp": engine * known, "engine_weight": (known / known.sum()).astype(np.float32)}
    step = jax.jit(grpo.make_train_step(graphdef, optax.sgd(1.0), lambda s: 1.0, epsilon_low=0.2, epsilon_high=0.2,
                                        beta=0.0, temperature=temperature, rollout_correction="token_tis",
                                        tis_cap=cap))
    plain = jax.jit(grpo.make_train_step(graphdef, optax.sgd(1.0), lambda s: 1.0, epsilon_low=0.2,
                                         epsilon_high=0.2, beta=0.0, temperature=temperature))
    state = {"step": jnp.int32(0), "params": params, "opt_state": optax.sgd(1.0).init(params)}
    gap = np.abs(logp0 - engine)[known > 0]
    ratio = np.exp(logp0 - engine)
    # At the rollout params every clipped ratio is 1: the loss is -sum(weights * A * correction).
    want_loss = -np.sum(batch["weights"] * batch["advantages"][:, None] * np.where(known > 0, np.minimum(ratio, cap), 1))
    runs = [step(state, _micro(inputs, k))[1] for k in (1, 2)]
    for metrics in runs:
        assert float(metrics["loss"]) == pytest.approx(float(want_loss), rel=1e-5, abs=1e-7)
        assert float(metrics["mismatch_abs_mean"]) == pytest.approx(float(gap.mean()), rel=1e-5)
        assert float(metrics["mismatch_abs_max"]) == pytest.approx(float(gap.max()), rel=1e-6)
        kl = ratio - 1 - np.log(ratio)
        assert float(metrics["mismatch_kl"]) == pytest.approx(float(kl[known > 0].mean()), rel=1e-4)
        assert float(metrics["correction_capped"]) == pytest.approx(float((ratio[known > 0] > cap).mean()), abs=1e-6)
    assert 0 < float(runs[0]["correction_capped"]) < 1
    uncorrected = float(plain(state, _micro(inputs, 1))[1]["loss"])
    assert uncorrected == pytest.approx(float(-np.sum(batch["weights"] * batch["advantages"][:, None])), rel=1e-5)
    assert abs(uncorrected - float(want_loss)) > 1e-3  # the correction changed the update


def _grpo_section(**kw) -> ConfigDict:
    g = dict(num_generations=2, prompts_per_step=2, max_new_tokens=4, max_length=16, rollout_correction="none",
             truncated="keep", overlong_buffer=0, overlong_penalty=1.0, scale_rewards=True, loss_aggregation="token")
    return ConfigDict({**g, **kw})


def _completion(tokens, finish, logprobs=None):
    return Completion(0, 0, tokens, "1" if finish == "stop" else "x", finish, logprobs=logprobs,
                      stop_token_id=2 if finish == "stop" and logprobs else None,
                      stop_logprob=-0.5 if finish == "stop" and logprobs else None)


GROUPS = [[_completion([5], "stop", [-0.1]), _completion([5, 6, 7, 8], "length", [-0.2] * 4)],
          [_completion([6, 5], "stop", [-0.3, -0.4]), _completion([7], "stop", [-1.0])]]
PROBLEMS = [MathProblem("a", "q", "1"), MathProblem("b", "q", "1")]


def reward(text, problem):
    return float(text == "1")


def test_truncated_answers_are_kept_masked_or_penalized_and_counted():
    prompts = [[1, 3], [1, 4]]
    keep, metrics = grpo.rollout_batch(_grpo_section(), GROUPS, PROBLEMS, prompts, reward, eos_id=2)
    masked, _ = grpo.rollout_batch(_grpo_section(truncated="mask"), GROUPS, PROBLEMS, prompts, reward, eos_id=2)
    assert metrics["truncated_count"] == 1 and metrics["truncated"] == 0.25
    assert keep["weights"][1].sum() > 0 and masked["weights"][1].sum() == 0 and masked["weights"][0].sum() > 0
    penalized, metrics = grpo.rollout_batch(_grpo_section(truncated="penalize"), GROUPS, PROBLEMS, prompts, reward,
                                            eos_id=2)
    assert metrics["reward_mean"] == pytest.approx((1 - 1 + 1 + 1) / 4)  # the truncated answer's 0 became -1
    assert [grpo.overlong_penalty(n, 8, 4) for n in (3, 4, 6, 8)] == [0.0, 0.0, -0.5, -1.0]
    assert [grpo.overlong_penalty(n, 8, 0) for n in (7, 8)] == [0.0, -1.0]
    # The engine's log-probs land on the completion tokens, the sampled end token's after them.
    np.testing.assert_allclose(keep["engine_logp"][0, 1:3], [-0.1, -0.5])
    assert (keep["engine_weight"] > 0).sum() == 2 + 4 + 3 + 2


def test_a_correction_without_engine_log_probs_is_refused_with_the_way_out():
    groups = [[_completion([5], "stop"), _completion([6], "stop")]] * 2
    grpo.rollout_batch(_grpo_section(), groups, PROBLEMS, [[1], [1]], reward, eos_id=2)  # "none" needs none
    with pytest.raises(RolloutError, match="grpo.rollout_correction=token_tis needs the engine's log-probabilities"):
        grpo.rollout_batch(_grpo_section(rollout_correction="token_tis"), groups, PROBLEMS, [[1], [1]], reward,
                           eos_id=2)
