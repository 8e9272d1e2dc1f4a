"""The in-process JetStream backend: HF greedy parity, seeds, stop tokens, param swaps, failures, long prompts."""

from __future__ import annotations

import pytest
import torch
import transformers
from flax import nnx

from stat_jax.models import init_model
from stat_jax.rollout.base import RolloutError, SamplingParams
from stat_jax.rollout.engine import EngineSettings
from stat_jax.rollout.inprocess import JetStreamBackend, params_state_like

from tests.rollout.fixtures import QUESTIONS, SETTINGS, chat_prompts

MAX_NEW = 12
GREEDY = SamplingParams(max_new_tokens=MAX_NEW)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=MAX_NEW, seed=7)


@pytest.fixture(scope="module")
def backend(student):
    with JetStreamBackend(student.model, student.tokenizer, SETTINGS) as b:
        yield b


@pytest.fixture(scope="module")
def greedy_out(backend, student):
    return backend.generate(chat_prompts(student.tokenizer, QUESTIONS), GREEDY, progress=False)


def _hf_greedy(model_dir, tokenizer, prompts, max_new):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = gen[0, ids.shape[1]:].tolist()
        out.append(new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new)
    return out


def test_greedy_equals_transformers_generate(student, greedy_out):
    prompts = chat_prompts(student.tokenizer, QUESTIONS)
    lengths = [len(student.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert min(lengths) <= 16 < 32 < max(lengths) <= 64 and len(prompts) > SETTINGS.max_concurrent_decodes
    expected = _hf_greedy(student.dir, student.tokenizer, prompts, MAX_NEW)
    got = [row[0].token_ids for row in greedy_out]
    assert got == expected
    assert len({tuple(g) for g in got}) > 1  # the prompts matter: not one repeated sequence
    for row, exp in zip(greedy_out, expected):
        assert row[0].finish_reason == ("length" if len(exp) == MAX_NEW else "stop")
        assert row[0].text == student.tokenizer.decode(exp, skip_special_tokens=True)


def test_token_id_prompts_equal_text_prompts(backend, student, greedy_out):
    ids = [student.tokenizer(p, add_special_tokens=False)["input_ids"] for p in
           chat_prompts(student.tokenizer, QUESTIONS[:3])]
    out = backend.generate(ids, GREEDY, progress=False)
    assert [r[0].token_ids for r in out] == [r[0].token_ids for r in greedy_out[:3]]


def test_seeded_sampling_is_reproducible_and_slot_independent(backend, student):
    prompts = chat_prompts(student.tokenizer, QUESTIONS[:3])
    first = backend.generate(prompts, SAMPLED, n=3, progress=False)
    again = backend.generate(prompts, SAMPLED, n=3, progress=False)
    ids = lambda out: [[c.token_ids for c in row] for row in out]  # noqa: E731
    assert ids(first) == ids(again)
    # One slot instead of three: every request lands in a different slot, at a different time.
    with JetStreamBackend(student.model, student.tokenizer,
                          EngineSettings(max_concurrent_decodes=1, max_prefill_length=64, max_target_length=96)) as one:
        assert ids(one.generate(prompts, SAMPLED, n=3, progress=False)) == ids(first)
    other_seed = backend.generate(prompts, SamplingParams(**{**SAMPLED.__dict__, "seed": 8}), n=3, progress=False)
    assert ids(other_seed) != ids(first)
    assert all(len({tuple(c.token_ids) for c in row}) > 1 for row in first)  # samples of a prompt differ


def test_stop_tokens_end_a_sequence(backend, student, greedy_out):
    # Pick a generated token that first appears at position >= 2 and make it a stop token.
    for i, row in enumerate(greedy_out):
        tokens = row[0].token_ids
        pos = next((k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k]), None)
        if pos is not None:
            break
    assert pos is not None
    sampling = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(tokens[pos],))
    out = backend.generate(chat_prompts(student.tokenizer, [QUESTIONS[i]]), sampling, progress=False)[0][0]
    assert out.token_ids == tokens[:pos] and out.finish_reason == "stop"


def test_update_params_changes_outputs_without_recompiling(backend, student, greedy_out):
    prompts = chat_prompts(student.tokenizer, QUESTIONS)
    compiled = backend.compilation_counts()
    original = nnx.state(student.model)
    other = params_state_like(init_model(student.model.config, seed=1), original)  # sharded like the served
    backend.update_params(other)
    changed = backend.generate(prompts, GREEDY, progress=False)
    assert [r[0].token_ids for r in changed] != [r[0].token_ids for r in greedy_out]
    # Other outputs finish at other steps, so the scheduler may meet new (bucket, rows, cache length) shapes;
    # the swap itself compiles nothing: the original params' run below reuses exactly greedy_out's kernels.
    after_changed = backend.compilation_counts()
    assert after_changed["generate"] >= compiled["generate"]
    backend.update_params(student.model)  # back: the outputs must be exactly the original ones
    restored = backend.generate(prompts, GREEDY, progress=False)
    assert [r[0].token_ids for r in restored] == [r[0].token_ids for r in greedy_out]
    assert backend.compilation_counts() == after_changed
    with pytest.raises(ValueError, match="shape"):
        wrong = init_model(student.model.config.__class__(**{**student.model.config.__dict__, "hidden_size": 32,
                                                              "head_dim": 8}))
        backend.update_params(wrong)


def test_step_failure_raises_rollout_error_and_recovers(backend, student, greedy_out, monkeypatch):
    prompts = chat_prompts(student.tokenizer, QUESTIONS[:2])

    def broken_step(decode_state):
        raise FloatingPointError("injected generate failure")

    monkeypatch.setattr(backend.engine, "step", broken_step)
    with pytest.raises(RolloutError, match="in-process rollout failed.*injected generate failure"):
        backend.generate(prompts, GREEDY, progress=False)
    monkeypatch.undo()
    out = backend.generate(prompts, GREEDY, progress=False)  # a fresh decode state, same compiled kernels
    assert [r[0].token_ids for r in out] == [r[0].token_ids for r in greedy_out[:2]]


def test_long_prompts_error_or_truncate(backend, student, caplog):
    too_long = [list(range(10, 80))]  # 70 tokens > the 64-token largest bucket
    with pytest.raises(RolloutError, match="rollout.max_prefill_length=64"):
        backend.generate(too_long, GREEDY, progress=False)
    with pytest.raises(RolloutError, match="rollout.max_target_length=96"):
        backend.generate([list(range(10, 70))], SamplingParams(max_new_tokens=40), progress=False)
    backend.truncate_long_prompts = True
    try:
        out = backend.generate(too_long, GREEDY, progress=False)
        kept = backend.generate([list(range(16, 80))], GREEDY, progress=False)
    finally:
        backend.truncate_long_prompts = False
    assert "truncated to its last 64" in caplog.text
    assert out[0][0].token_ids == kept[0][0].token_ids
