"""GRPO: the objective against hand computations, and learning on a toy verifiable task through JetStream."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stat_jax import sharding
from stat_jax.config import load_config_file
from stat_jax.data.char_tokenizer import save_char_tokenizer
from stat_jax.data.records import MathProblem
from stat_jax.models import export_hf_checkpoint, init_model
from stat_jax.models.llama import tiny_llama
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


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_token_weights_reproduce_aggregation(mode):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    mask = (rng.random((4, 6)) > 0.4).astype(np.float32)
    mask[2] = 0  # a row with no completion tokens
    weighted = float(np.sum(x * grpo.token_weights(mask, mode)))
    assert weighted == pytest.approx(float(grpo_loss.aggregate(jnp.asarray(x), jnp.asarray(mask), mode)), rel=1e-5)


def test_prompt_order_is_seeded_and_covers_every_problem_each_epoch():
    steps = [grpo.prompts_for_step(10, 5, s, seed=3) for s in (1, 2)]
    assert sorted(steps[0] + steps[1]) == list(range(10))
    assert grpo.prompts_for_step(10, 5, 2, seed=3) == steps[1]
    assert grpo.prompts_for_step(10, 5, 1, seed=4) != steps[0]


def test_bad_prompt_file_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        grpo.load_prompts(path)


# ----- the toy verifiable task ------------------------------------------------------------------------------
EVEN = set("02468")


def even_digit_reward(response: str, problem: MathProblem) -> float:
    return 1.0 if response[:1] in EVEN else 0.0


@pytest.fixture(scope="module")
def toy_student(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_student")
    tok = save_char_tokenizer(out)
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                     head_dim=16, num_layers=2, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id)
    export_hf_checkpoint(init_model(cfg, seed=0), out)
    return out


def toy_config(student, workdir, steps):
    c = load_config_file("configs/grpo_tiny.py")
    c.model.path = str(student)
    c.workdir = str(workdir)
    c.grpo.steps = steps
    c.grpo.prompts_per_step = 4
    c.grpo.num_generations = 8
    c.grpo.max_new_tokens = 2
    c.grpo.learning_rate = 2e-2
    c.grpo.checkpoint_every = 3
    c.grpo.instruction = "{problem}"  # the bare question: keeps prompts inside the 64-token prefill bucket
    return c


PROBLEMS = [MathProblem(id=f"q{i}", problem=f"Say an even digit ({i}).", answer="0") for i in range(8)]


def one_device_mesh():
    return sharding.make_mesh(devices=jax.devices()[:1])


def test_grpo_raises_reward_on_toy_task(toy_student, tmp_path):
    result = grpo.train_grpo(toy_config(toy_student, tmp_path / "run", steps=24), PROBLEMS, mesh=one_device_mesh(),
                             reward_fn=even_digit_reward)
    rows = read_metrics(result["metrics_path"])
    rewards = [r["reward_mean"] for r in rows]
    assert len(rewards) == 24
    first, last = np.mean(rewards[:6]), np.mean(rewards[-6:])
    assert last > first + 0.25, rewards
    for key in ("loss", "kl", "clip_fraction", "entropy", "response_length", "rollout_tokens_per_s",
                "train_tokens_per_s", "accuracy"):
        assert key in rows[-1]
    assert (tmp_path / "run" / "hf" / "config.json").exists()


class Interrupt(Exception):
    pass


def test_resume_after_interruption_reproduces_next_steps(toy_student, tmp_path):
    reference = grpo.train_grpo(toy_config(toy_student, tmp_path / "a", steps=6), PROBLEMS, mesh=one_device_mesh(),
                                reward_fn=even_digit_reward)
    calls = {"n": 0}

    def dying_reward(response, problem):
        calls["n"] += 1
        if calls["n"] > 4 * 32:  # dies during step 5, after the step-3 checkpoint
            raise Interrupt
        return even_digit_reward(response, problem)

    with pytest.raises(Interrupt):
        grpo.train_grpo(toy_config(toy_student, tmp_path / "b", steps=6), PROBLEMS, mesh=one_device_mesh(),
                        reward_fn=dying_reward)
    resumed = grpo.train_grpo(toy_config(toy_student, tmp_path / "b", steps=6), PROBLEMS, mesh=one_device_mesh(),
                              reward_fn=even_digit_reward, resume=True)
    a = {r["step"]: r for r in read_metrics(reference["metrics_path"])}
    b = {r["step"]: r for r in read_metrics(resumed["metrics_path"])}
    assert sorted(b) == list(range(1, 7))
    for step in (4, 5, 6):
        assert b[step]["reward_mean"] == a[step]["reward_mean"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4, abs=1e-6)
    assert json.loads((tmp_path / "b" / "grpo_result.json").read_text())["steps"] == 6


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
