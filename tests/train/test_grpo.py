"""GRPO: the objective against hand computations, the jitted step against the objective, learning on a toy
verifiable task through JetStream, and resume after an exception and after kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stat_jax import sharding
from stat_jax.config import build_config
from stat_jax.data.char_tokenizer import save_char_tokenizer
from stat_jax.data.records import MathProblem
from stat_jax.models import export_hf_checkpoint, init_model
from stat_jax.models.llama import tiny_llama
from stat_jax.stat import io
from stat_jax.train import grpo, grpo_loss
from stat_jax.train.metrics import read_metrics


# ----- pure pieces -----------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)  # two groups of 4
    adv = grpo_loss.group_advantages(rewards, 4, scale_by_std=True)
    std = np.std([1, 0, 0, 1], ddof=1)
    np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(adv[4:], 0.0)  # identical rewards carry no signal
    np.testing.assert_allclose(grpo_loss.group_advantages(rewards, 4, scale_by_std=False)[:4], [0.5, -0.5, -0.5, 0.5])
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_loss.group_advantages(rewards, 3)


def _reference_loss(logp, old, adv, weights, eps_lo, eps_hi):
    """Straight numpy PPO-clip, token by token."""
    total = 0.0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = np.exp(logp[i, t] - old[i, t])
            total += -min(r * adv[i], np.clip(r, 1 - eps_lo, 1 + eps_hi) * adv[i]) * weights[i, t]
    return total


def test_objective_and_gradient_match_hand_reference_ratio_one_and_clipped():
    rng = np.random.default_rng(0)
    logp = rng.normal(-2.0, 0.5, (3, 5)).astype(np.float32)
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
    adv = np.array([1.5, -0.7, 0.4], np.float32)
    weights = grpo.token_weights(mask, "token")
    for name, old in (("ratio_one", logp.copy()), ("clipped", logp - np.float32(0.6))):  # ratio e^0.6 = 1.82
        loss_fn = lambda lp: grpo_loss.grpo_objective(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))[0]
        loss = float(loss_fn(jnp.asarray(logp)))
        assert loss == pytest.approx(_reference_loss(logp, old, adv, weights, 0.2, 0.2), rel=1e-5), name
        grad = np.asarray(jax.grad(loss_fn)(jnp.asarray(logp)))
        ratio = np.exp(logp - old)
        clipped_away = ((adv[:, None] > 0) & (ratio > 1.2)) | ((adv[:, None] < 0) & (ratio < 0.8))
        expected = np.where(clipped_away, 0.0, -adv[:, None] * ratio) * weights  # d(-r*A)/dlogp = -r*A
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7, err_msg=name)
        if name == "clipped":
            assert clipped_away[0, 1] and not clipped_away[1, 2]  # positive advantage clipped, negative not


def test_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logp = jnp.asarray(np.random.default_rng(1).normal(-1, 0.3, (2, 4)), jnp.float32)
    assert float(jnp.abs(grpo_loss.k3_kl(logp, logp)).max()) == 0.0
    assert float(grpo_loss.k3_kl(logp, logp + 0.3).min()) > 0.0
    mask = jnp.ones((2, 4))
    _, m = grpo_loss.grpo_objective(logp, logp, jnp.zeros(2), mask, ref_logp=logp, beta=0.1)
    assert float(m["kl"]) == 0.0


def test_kl_term_and_its_gradient_match_hand_reference():
    rng = np.random.default_rng(3)
    logp = rng.normal(-2.0, 0.5, (2, 4)).astype(np.float32)
    ref = logp + rng.normal(0, 0.4, (2, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)
    beta = 0.3

    def loss_fn(lp):  # ratio = 1 and zero advantages: the loss is the KL penalty alone
        return grpo_loss.grpo_objective(lp, jax.lax.stop_gradient(lp), jnp.zeros(2), jnp.asarray(mask),
                                        ref_logp=jnp.asarray(ref), beta=beta)[0]

    d = ref - logp
    n = mask.sum()
    assert float(loss_fn(jnp.asarray(logp))) == pytest.approx(beta * np.sum((np.exp(d) - d - 1) * mask) / n, rel=1e-5)
    expected = beta * (1.0 - np.exp(d)) * mask / n  # d/dlogp of e^(ref-logp) - (ref-logp) - 1
    np.testing.assert_allclose(np.asarray(jax.grad(loss_fn)(jnp.asarray(logp))), expected, rtol=1e-5, atol=1e-8)


def test_sequence_aggregation_weighs_rows_equally():
    per_token = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = jnp.asarray([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert float(grpo_loss.aggregate(per_token, mask, "token")) == pytest.approx(9 / 5)
    assert float(grpo_loss.aggregate(per_token, mask, "sequence")) == pytest.approx((1 + 5) / 2)
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        grpo_loss.aggregate(per_token, mask, "row")


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_token_weights_reproduce_aggregation(mode):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    mask = (rng.random((4, 6)) > 0.4).astype(np.float32)
    mask[2] = 0  # a row with no completion tokens
    weighted = float(np.sum(x * grpo.token_weights(mask, mode)))
    assert weighted == pytest.approx(float(grpo_loss.aggregate(jnp.asarray(x), jnp.asarray(mask), mode)), rel=1e-5)


def test_math_reward_uses_the_grader_and_the_optional_format_bonus():
    problem = MathProblem(id="p", problem="What is 1/2 + 1/4?", answer="3/4")
    reward = grpo.math_reward(format_reward=0.1)
    assert reward("so the answer is \\boxed{\\frac{3}{4}}", problem) == pytest.approx(1.1)  # equivalent form
    assert reward("\\boxed{0.5}", problem) == pytest.approx(0.1)  # boxed but wrong: format bonus only
    assert reward("3/4", problem) == 0.0  # no final boxed answer
    assert grpo.resolve_reward("math")("\\boxed{0.75}", problem) == 1.0
    with pytest.raises(ValueError, match="package.module:function"):
        grpo.resolve_reward("even_digit")


def test_prompt_order_is_seeded_and_covers_every_problem_each_epoch():
    steps = [grpo.prompts_for_step(10, 5, s, seed=3) for s in (1, 2)]
    assert sorted(steps[0] + steps[1]) == list(range(10))
    assert grpo.prompts_for_step(10, 5, 2, seed=3) == steps[1]
    assert grpo.prompts_for_step(10, 5, 1, seed=4) != steps[0]


def test_a_backend_returning_short_groups_is_an_error():
    from stat_jax.rollout.base import Completion, RolloutError

    c = Completion(0, 0, [1], "1", "stop")
    grpo.check_groups([[c, c], [c, c]], 2, 2)
    with pytest.raises(RolloutError, match=r"sizes \[2, 1\] for 2 prompts"):
        grpo.check_groups([[c, c], [c]], 2, 2)


def test_bad_prompt_file_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        grpo.load_prompts(path)


# ----- the jitted step against the objective ----------------------------------------------------------------
@pytest.fixture(scope="module")
def step_inputs(seed=0, rows=4, t=8, prompt_len=3):
    cfg = tiny_llama(vocab_size=40, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16)
    graphdef, params = nnx.split(init_model(cfg, seed=seed))
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 40, (rows, t + 1)).astype(np.int32)
    lengths = np.array([t + 1, t - 2, t, t - 3])[:rows]  # right padding on some rows
    attention = (np.arange(t)[None, :] < (lengths[:, None] - 1)).astype(np.int32)
    mask = attention * (np.arange(t)[None, :] >= prompt_len - 1)
    batch = {"tokens": tokens[:, :-1] * attention, "targets": tokens[:, 1:] * attention,
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
             "attention_mask": attention, "weights": grpo.token_weights(mask.astype(np.float32), "token"),
             "advantages": rng.normal(0, 1, rows).astype(np.float32)}
    return graphdef, params, batch, mask.astype(np.float32), rng


def _micro(batch, k):
    return {key: jnp.asarray(x).reshape(k, x.shape[0] // k, *x.shape[1:]) for key, x in batch.items()}


def test_train_step_matches_objective_on_model_logits_and_accumulates_exactly(step_inputs):
    temperature, beta = 0.7, 0.1
    graphdef, params, batch, mask, _ = step_inputs
    rng = np.random.default_rng(1)
    logp0 = np.asarray(grpo.make_logprob_fn(graphdef, temperature)(params, _micro(batch, 1))[0])
    noise = lambda: rng.normal(0, 0.4, logp0.shape).astype(np.float32)  # noqa: E731
    old_logp, ref_logp = logp0 + noise(), logp0 + noise()  # ratios far from 1: some tokens are clipped

    def reference(p, old):  # the tested pure objective on hand-tempered logits
        model = nnx.merge(graphdef, nnx.State(p))
        logits = model(jnp.asarray(batch["tokens"]), positions=jnp.asarray(batch["positions"]),
                       attention_mask=jnp.asarray(batch["attention_mask"]))
        logp = grpo_loss.token_logprobs(logits / temperature, jnp.asarray(batch["targets"]))
        old = jax.lax.stop_gradient(logp) if old is None else jnp.asarray(old)
        return grpo_loss.grpo_objective(logp, old, jnp.asarray(batch["advantages"]), jnp.asarray(mask),
                                        epsilon_high=0.28, ref_logp=jnp.asarray(ref_logp), beta=beta)

    # SGD with lr 1 exposes the gradient: new params = params - grad.
    step = jax.jit(grpo.make_train_step(graphdef, optax.sgd(1.0), lambda s: 1.0, epsilon_low=0.2, epsilon_high=0.28,
                                        beta=beta, temperature=temperature))
    for old in (old_logp, None):  # explicit old log-probs (mu > 1), and the on-policy shortcut (mu = 1)
        (want_loss, want_metrics), want_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params, old)
        assert float(want_metrics["clip_fraction"]) > (0.05 if old is not None else -1)
        # k = 2 micro-batches against the full-batch reference is the accumulation check; each k is a compile.
        for k in ((2,) if old is not None else (1,)):
            inputs = {**batch, "ref_logp": ref_logp} | ({"old_logp": old} if old is not None else {})
            state = {"step": jnp.int32(0), "params": params, "opt_state": optax.sgd(1.0).init(params)}
            new_state, metrics = step(state, _micro(inputs, k))
            got_grads = jax.tree.map(lambda a, b: a - b, params, new_state["params"])
            assert float(metrics["loss"]) == pytest.approx(float(want_loss), rel=1e-5, abs=1e-7)
            assert float(metrics["kl"]) == pytest.approx(float(want_metrics["kl"]), rel=1e-5)
            assert float(metrics["clip_fraction"]) == pytest.approx(float(want_metrics["clip_fraction"]), abs=1e-6)
            jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6), got_grads, want_grads)


def test_reference_params_are_cast_to_the_compute_dtype_without_copying_float32(step_inputs):
    graphdef, params, *_ = step_inputs
    same = grpo.reference_params(params, "float32")
    assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params)))
    half = grpo.reference_params(params, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype("bfloat16")}


# ----- the toy verifiable task ------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
EVEN = set("02468")


def even_digit_reward(response: str, problem: MathProblem) -> float:
    """The toy rule: the answer must start with an even digit (also used by the CLI runs, via grpo.reward)."""
    return 1.0 if response[:1] in EVEN else 0.0


PROBLEMS = [MathProblem(id=f"q{i}", problem=f"Say an even digit ({i}).", answer="0") for i in range(8)]
TOY = {"grpo.prompts_per_step": 4, "grpo.num_generations": 8, "grpo.max_new_tokens": 2, "grpo.learning_rate": 2e-2,
       "grpo.checkpoint_every": 3, "grpo.instruction": "{problem}"}  # bare question: fits the 64-token prefill
# Resume runs exercise the other code paths too: mu = 2 updates per batch (old log-probs), and a KL reference.
RESUME = {**TOY, "grpo.steps": 6, "grpo.num_iterations": 2, "grpo.beta": 0.05}


@pytest.fixture(scope="module")
def toy_student(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_student")
    tok = save_char_tokenizer(out)
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                     head_dim=16, num_layers=2, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id)
    export_hf_checkpoint(init_model(cfg, seed=0), out)
    return out


def toy_config(student, workdir, **values):
    overrides = {"model.path": student, "workdir": workdir, **values}
    return build_config(str(REPO / "configs/grpo_tiny.py"), [(k, str(v)) for k, v in overrides.items()])


def one_device_mesh():
    return sharding.make_mesh(devices=jax.devices()[:1])


def test_grpo_raises_reward_on_toy_task(toy_student, tmp_path):
    result = grpo.train_grpo(toy_config(toy_student, tmp_path / "run", **TOY, **{"grpo.steps": 24}), PROBLEMS,
                             mesh=one_device_mesh(), reward_fn=even_digit_reward)
    rows = read_metrics(result["metrics_path"])
    rewards = [r["reward_mean"] for r in rows]
    assert len(rewards) == 24
    first, last = np.mean(rewards[:6]), np.mean(rewards[-6:])
    assert last > first + 0.25, rewards
    for key in ("loss", "clip_fraction", "entropy", "response_length", "rollout_tokens_per_s", "train_tokens_per_s",
                "accuracy", "zero_std_groups", "grad_norm"):
        assert key in rows[-1]
    assert "kl" not in rows[-1]  # beta = 0: there is no reference, so no KL is claimed
    assert all(r["step_s"] >= r["rollout_s"] + r["train_s"] for r in rows)  # the whole step, both parts in it
    assert all(r["clip_fraction"] == 0.0 for r in rows)  # mu = 1: every update is on-policy, ratio exactly 1
    assert (tmp_path / "run" / "hf" / "config.json").exists()


def test_informative_groups_keeps_groups_with_varied_rewards_first_in_sampled_order():
    rewards = np.array([[1, 1], [0, 1], [0, 0], [1, 0], [0.5, 0.5]], np.float32)
    assert grpo.informative_groups(rewards, 2).tolist() == [1, 3]
    assert grpo.informative_groups(rewards, 3).tolist() == [0, 1, 3]  # filled with the first all-equal group
    assert grpo.informative_groups(rewards, 5).tolist() == [0, 1, 2, 3, 4]


def test_oversampling_trains_on_the_groups_whose_rewards_differ(toy_student, tmp_path, monkeypatch):
    """Six of eight prompts always score 1 (no signal); with oversample=2 every step samples all eight and
    must train on the two that can vary whenever their rewards do. Every step's metrics, the engine mismatch
    among them, also go to TensorBoard (a recording stand-in for tensorboardX)."""
    import sys
    import types

    scalars = []
    writer = types.SimpleNamespace(add_scalar=lambda key, value, step: scalars.append((key, step)), close=lambda: None,
                                   flush=lambda: None)
    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=lambda logdir: writer))

    def reward(response, problem):
        return 1.0 if int(problem.id[1:]) < 6 else even_digit_reward(response, problem)

    config = toy_config(toy_student, tmp_path / "run", **TOY, **{"grpo.steps": 3, "grpo.oversample": 2})
    rows = read_metrics(grpo.train_grpo(config, PROBLEMS, mesh=one_device_mesh(), reward_fn=reward)["metrics_path"])
    assert len(rows) == 3
    for key in ("mismatch_abs_mean", "mismatch_abs_max", "mismatch_kl", "correction_capped", "truncated_count"):
        assert [step for k, step in scalars if k == key] == [1, 2, 3], key
        assert all(key in r for r in rows)
    assert max(r["mismatch_abs_max"] for r in rows) < 1e-4  # a float32 engine and trainer: round-off only
    for r in rows:
        varied = round(8 * (1 - r["zero_std_groups"]))  # the sampled groups with differing rewards (of 8)
        assert varied <= 2
        assert r["trained_zero_std_groups"] == (4 - varied) / 4, r
    assert any(r["trained_zero_std_groups"] < r["zero_std_groups"] for r in rows)


def test_resume_reuses_a_run_only_over_the_same_prompts(toy_student, tmp_path):
    """The same prompts in a moved file continue the run; with one answer changed the run is refused before any
    model is loaded, and its result is left as it was."""
    first, moved = tmp_path / "a.jsonl", tmp_path / "moved" / "b.jsonl"
    io.write_jsonl(first, ({"id": p.id, "problem": p.problem, "answer": p.answer} for p in PROBLEMS))
    moved.parent.mkdir()
    shutil.copy(first, moved)
    workdir = tmp_path / "run"

    def train(prompts_file, **kw):
        config = toy_config(toy_student, workdir, **TOY, **{"grpo.steps": 2, "grpo.train_files": prompts_file})
        return grpo.train_grpo(config, mesh=one_device_mesh(), reward_fn=even_digit_reward, **kw)

    train(first)
    assert train(moved, resume=True)["steps"] == 2  # another path, the same rows: the checkpoints continue
    saved = json.loads((workdir / "grpo_result.json").read_text())
    assert train(moved, resume=True) == saved  # nothing changed: the finished run is reused
    rows = moved.read_text().splitlines()
    moved.write_text("\n".join([rows[0].replace('"answer": "0"', '"answer": "2"'), *rows[1:]]) + "\n")
    loads = []
    with mock.patch.object(grpo.loop, "load_policy", side_effect=lambda *a, **k: loads.append(a)):
        with pytest.raises(grpo.loop.ChangedDataError, match="trained on other rows"):
            train(moved, resume=True)
    assert not loads  # refused from the checkpoint's meta, before the weights were read
    assert json.loads((workdir / "grpo_result.json").read_text()) == saved


@pytest.fixture(scope="module")
def uninterrupted(toy_student, tmp_path_factory):
    """The reference for the resume tests: 6 uninterrupted steps with mu = 2 and beta > 0, on one device."""
    workdir = tmp_path_factory.mktemp("grpo_uninterrupted")
    result = grpo.train_grpo(toy_config(toy_student, workdir, **RESUME), PROBLEMS, mesh=one_device_mesh(),
                             reward_fn=even_digit_reward)
    return {r["step"]: r for r in read_metrics(result["metrics_path"])}


def assert_same_steps(got, want, steps):
    for step in steps:
        assert got[step]["reward_mean"] == want[step]["reward_mean"], step
        for key in ("loss", "kl", "clip_fraction", "entropy"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_sigterm_checkpoints_stops_and_resumes_to_the_same_run(toy_student, uninterrupted, tmp_path):
    assert uninterrupted[6]["kl"] > 0 and max(r["clip_fraction"] for r in uninterrupted.values()) > 0
    calls = {"n": 0}

    def reward_then_sigterm(response, problem):
        calls["n"] += 1
        if calls["n"] == 4 * 32 + 1:  # during step 5: the guard lets the step finish, checkpoints it, stops
            os.kill(os.getpid(), signal.SIGTERM)
        return even_digit_reward(response, problem)

    config = toy_config(toy_student, tmp_path / "b", **RESUME)
    stopped = grpo.train_grpo(config, PROBLEMS, mesh=one_device_mesh(), reward_fn=reward_then_sigterm)
    assert stopped["preempted"] and stopped["steps"] == 5
    assert (tmp_path / "b" / "checkpoints" / "5").is_dir() and not (tmp_path / "b" / "grpo_result.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        grpo.train_grpo(config, PROBLEMS, mesh=one_device_mesh(), reward_fn=even_digit_reward)
    resumed = grpo.train_grpo(config, PROBLEMS, mesh=one_device_mesh(), reward_fn=even_digit_reward, resume=True)
    got = {r["step"]: r for r in read_metrics(resumed["metrics_path"])}
    assert sorted(got) == list(range(1, 7))
    assert_same_steps(got, uninterrupted, range(1, 7))
    assert json.loads((tmp_path / "b" / "grpo_result.json").read_text())["steps"] == 6


def _cli(student, workdir, prompts, *flags):
    values = {"model.path": student, "workdir": workdir, "grpo.train_files": prompts, **RESUME,
              "grpo.reward": "tests.train.test_grpo:even_digit_reward"}
    return [sys.executable, "-m", "stat_jax.cli", "grpo", f"--config={REPO / 'configs/grpo_tiny.py'}",
            *(f"--config.{k}={v}" for k, v in values.items()), *flags]


def _kill9_then_resume(student, tmp_path, *flags) -> dict[int, dict]:
    """A 6-step CLI run (RESUME settings) killed -9 after step 4, then resumed; its metrics rows by step."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer, "id": p.id}) + "\n"
                               for p in PROBLEMS))
    workdir = tmp_path / "run"
    # One CPU device, like the in-process reference's one-device mesh.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(_cli(student, workdir, prompts, *flags), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while True:  # kill right after step 4 is logged: past the step-3 checkpoint, before the end
        rows = read_metrics(workdir / "metrics.jsonl")
        if rows and rows[-1]["step"] >= 4 and (workdir / "checkpoints" / "3").is_dir():
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the GRPO run did not reach step 4 in time"
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no handler, no final checkpoint
    proc.wait()
    proc.stdout.close()
    killed_at = read_metrics(workdir / "metrics.jsonl")[-1]["step"]
    assert killed_at < 6 and not (workdir / "grpo_result.json").exists()

    done = subprocess.run(_cli(student, workdir, prompts, *flags, "--resume"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {r["step"]: r for r in read_metrics(workdir / "metrics.jsonl")}


# Slow since the default run outgrew ~25 minutes (41 s): the default run keeps GRPO's SIGTERM-and-resume above
# (same steps as the uninterrupted run) and the shared trainer loop's kill -9 through SFT (tests/train/test_sft.py).
@pytest.mark.slow
def test_kill9_then_resume_reproduces_the_uninterrupted_run(toy_student, uninterrupted, tmp_path):
    got = _kill9_then_resume(toy_student, tmp_path)
    assert sorted(got) == list(range(1, 7))  # the replayed step is not duplicated
    assert_same_steps(got, uninterrupted, range(1, 7))


def test_cli_runs_with_the_math_grader_reward(toy_student, tmp_path, capsys):
    from stat_jax.cli import main as cli_main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"{i}+{i}=?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    status = cli_main(["grpo", "--config=configs/grpo_tiny.py", f"--config.model.path={toy_student}",
                       f"--config.workdir={tmp_path / 'run'}", f"--config.grpo.train_files={prompts}",
                       "--config.grpo.steps=2", "--config.grpo.instruction={problem}", "--config.mesh.fsdp=1",
                       "--config.mesh.data=-1"])
    assert status == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and 0.0 <= out["last_metrics"]["reward_mean"] <= 1.0
    assert cli_main(["grpo", "--config=configs/grpo_tiny.py", "--config.grpo.num_generations=one"]) == 2


@pytest.mark.parametrize("key, value, message", [
    ("grpo.num_generations", 1, "num_generations must be >= 2"),
    ("grpo.temperature", 0.0, "temperature must be > 0"),
    ("grpo.oversample", 0, "oversample must be a whole number >= 1"),
    ("grpo.micro_batches", 3, "multiple of grpo.micro_batches=3"),
    ("grpo.loss_aggregation", "row", "'token' or 'sequence'"),
    ("grpo.format_reward", 1.0, "format_reward must be in"),
    ("rollout.backend", "client", "rollout.backend=jetstream"),
    ("grpo.reward", "no_such_module:fn", "cannot import"),
])
def test_bad_settings_fail_fast_naming_the_key(key, value, message, tmp_path):
    config = toy_config(tmp_path / "missing_model", tmp_path / "run", **{key: value})
    with pytest.raises(ValueError, match=message):
        grpo.train_grpo(config, PROBLEMS)
    assert not (tmp_path / "run").exists()  # nothing was started


# ----- adapters (train.lora) ----------------------------------------------------------------------------------
ADAPTERS = {"train.lora.rank": 8, "train.lora.alpha": 16, "train.lora.dropout": 0.0}


@pytest.fixture(scope="module")
def adapter_student(tmp_path_factory):
    from tests.train.sft_fixtures import make_student

    return make_student(tmp_path_factory.mktemp("grpo_adapter_student"), initializer_range=0.2)


@pytest.mark.slow  # 24 GRPO steps: ~1.5 min on 2 busy cores (the full-parameter version is in the default run)
def test_grpo_with_adapters_raises_reward_trains_only_adapters_and_never_recompiles(adapter_student, tmp_path):
    import orbax.checkpoint as ocp

    from stat_jax.models import lora

    config = toy_config(adapter_student, tmp_path / "run", **TOY, **ADAPTERS, **{"grpo.steps": 24})
    result = grpo.train_grpo(config, PROBLEMS, mesh=one_device_mesh(), reward_fn=even_digit_reward)
    rewards = [r["reward_mean"] for r in read_metrics(result["metrics_path"])]
    assert len(rewards) == 24
    assert np.mean(rewards[-6:]) > np.mean(rewards[:6]) + 0.25, rewards
    # The engine sampled from base + adapters merged every step by ONE compiled program, and its own kernels
    # were not recompiled by the 24 weight swaps either.
    counts = result["compilations"]
    assert counts["merge_adapters"] == 1 and counts["generate"] == 1, counts
    # Only the adapters (and their optimizer state) are in the checkpoint; the base's fingerprint in the meta.
    ckpt = tmp_path / "run" / "checkpoints"
    tree = ocp.StandardCheckpointer().metadata(ckpt / "24" / "state").item_metadata.tree
    leaves = ["/".join(str(getattr(p, "key", p)) for p in path)
              for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]]
    params = [k for k in leaves if k.startswith("params/")]
    assert params and all(k.endswith(("lora_a", "lora_b")) for k in params), params[:4]
    assert grpo.loop.latest_checkpoint_meta(ckpt)["base_fingerprint"] == lora.base_fingerprint(adapter_student)
    assert (Path(result["adapter_dir"]) / lora.ADAPTER_WEIGHTS).is_file()
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()


@pytest.mark.slow  # three GRPO runs, two of them trainer processes
def test_kill9_then_resume_with_adapters_reproduces_the_uninterrupted_run(adapter_student, tmp_path):
    reference = grpo.train_grpo(toy_config(adapter_student, tmp_path / "reference", **RESUME, **ADAPTERS), PROBLEMS,
                                mesh=one_device_mesh(), reward_fn=even_digit_reward)
    want = {r["step"]: r for r in read_metrics(reference["metrics_path"])}
    assert want[6]["kl"] > 0  # the reference (zero adapters on the base) is in use
    got = _kill9_then_resume(adapter_student, tmp_path, *(f"--config.{k}={v}" for k, v in ADAPTERS.items()))
    assert sorted(got) == list(range(1, 7))
    assert_same_steps(got, want, range(1, 7))
