"""The engine's per-token sampling log-probabilities (issue 42): what it drew each token from, checked against an
independent float64 recomputation, against the trainer's float32 log-probs, and against a bfloat16 engine's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from stat_jax.data.stop_tokens import end_token_id
from stat_jax.models import load_hf_checkpoint
from stat_jax.rollout.base import SamplingParams
from stat_jax.rollout.inprocess import JetStreamBackend
from stat_jax.train import grpo
from tests.rollout.fixtures import QUESTIONS, SETTINGS, chat_prompts

TEMPERATURE, TOP_P, TOP_K = 0.8, 0.9, 20
SAMPLED = SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K, max_new_tokens=16, seed=11, logprobs=True)
# float32 engine against float64 (or the float32 trainer): round-off of a few float32 ulps of the logits, summed
# over a 64-wide model; measured well under this.
F32_BOUND = 1e-4


@pytest.fixture(scope="module")
def prompts(student):
    return [student.tokenizer(p, add_special_tokens=False)["input_ids"]
            for p in chat_prompts(student.tokenizer, QUESTIONS[:4])]


def _generate(model, student, prompts, sampling=SAMPLED, n=3):
    with JetStreamBackend(model, student.tokenizer, SETTINGS) as backend:
        return backend.generate(prompts, sampling, n=n, progress=False)


@pytest.fixture(scope="module")
def sampled(student, prompts):
    return _generate(student.model, student, prompts)


def _filtered_logprobs(logits: np.ndarray) -> np.ndarray:
    """log-softmax [t, V] of logits / T over the top-k tokens and the top-p nucleus (mass strictly before a token
    below top_p), in float64: the sampling rule, written independently of stat_jax.rollout.sampling."""
    scaled = logits / TEMPERATURE
    out = np.full_like(scaled, -np.inf)
    for i, row in enumerate(scaled):
        order = np.argsort(-row, kind="stable")[:TOP_K]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        kept = order[(np.cumsum(probs) - probs) < TOP_P]
        out[i, kept] = row[kept] - np.log(np.exp(row[kept] - row[kept].max()).sum()) - row[kept].max()
    return out


def test_engine_logprobs_equal_a_float64_recomputation(student, prompts, sampled):
    hf = transformers.AutoModelForCausalLM.from_pretrained(student.dir, dtype=torch.float64).eval()
    eos = end_token_id(student.tokenizer, student.model.config.eos_token_ids)
    checked, stops = 0, 0
    for prompt, row in zip(prompts, sampled):
        for c in row:
            assert len(c.logprobs) == len(c.token_ids) and c.finish_reason in ("stop", "length")
            drawn = c.token_ids + ([c.stop_token_id] if c.finish_reason == "stop" else [])
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + drawn])).logits[0, len(prompt) - 1:-1].numpy()
            want = _filtered_logprobs(logits)[np.arange(len(drawn)), drawn]
            got = np.array(c.logprobs + ([c.stop_logprob] if c.finish_reason == "stop" else []))
            np.testing.assert_allclose(got, want, atol=F32_BOUND, rtol=0)
            checked += len(drawn)
            stops += c.finish_reason == "stop" and c.stop_token_id == eos
    assert checked > 100 and np.isfinite(want).all()


def test_greedy_tokens_have_log_probability_zero_and_none_is_returned_unasked(student, prompts):
    greedy = _generate(student.model, student, prompts[:2], SamplingParams(max_new_tokens=8, logprobs=True), n=1)
    assert all(lp == 0.0 for row in greedy for c in row for lp in c.logprobs)
    unasked = _generate(student.model, student, prompts[:2], SamplingParams(max_new_tokens=8), n=1)
    assert all(c.logprobs is None and c.stop_logprob is None for row in unasked for c in row)
    assert [c.token_ids for row in unasked for c in row] == [c.token_ids for row in greedy for c in row]


def _trainer_mismatch(student, prompts, completions) -> np.ndarray:
    """|log p_trainer - log p_engine| over the tokens the engine reported, the trainer a float32 model computing
    the temperature-scaled log-probs GRPO trains on (top-k/top-p off, so the two distributions are the same)."""
    eos = end_token_id(student.tokenizer, student.model.config.eos_token_ids)
    host = grpo.build_batch(prompts, completions, np.zeros(sum(map(len, completions)), np.float32), seq_len=96,
                            eos_id=eos, aggregation="token")
    graphdef, params = nnx.split(student.model)
    logp = grpo.policy_token_stats(nnx.to_pure_dict(params), graphdef, host, TEMPERATURE)["logp"]
    known = host["engine_weight"] > 0
    return np.abs(np.asarray(logp) - host["engine_logp"])[known]


def test_float32_engine_matches_the_trainer_and_a_bfloat16_engine_measurably_does_not(student, prompts):
    sampling = SamplingParams(temperature=TEMPERATURE, max_new_tokens=16, seed=5, logprobs=True)
    f32 = _trainer_mismatch(student, prompts, _generate(student.model, student, prompts, sampling))
    bf16_model = load_hf_checkpoint(student.dir, student.mesh, dtype="bfloat16", param_dtype="float32")
    bf16 = _trainer_mismatch(student, prompts, _generate(bf16_model, student, prompts, sampling))
    assert f32.size > 100 and bf16.size > 100
    assert f32.max() < F32_BOUND, f32.max()
    assert bf16.mean() > 1e-3 and bf16.max() > 100 * f32.max(), (bf16.mean(), bf16.max(), f32.max())
