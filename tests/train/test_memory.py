"""Training memory (issue 19): chunked loss logits == unchunked (values and gradients) for SFT and GRPO, the
full [tokens, vocab] logits absent from the chunked program, remat policies, and micro-batches chosen from a
memory budget (same update as the unbudgeted step; a step that cannot fit names budget, estimate and fix)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stat_jax import sharding
from stat_jax.config import build_config
from stat_jax.models import init_model
from stat_jax.models.llama import tiny_llama
from stat_jax.models.transformer import resolve_remat
from stat_jax.train import chunked_loss, grpo, loop, sft
from stat_jax.train import memory as train_memory
from stat_jax.train.checkpointing import abstract_state
from stat_jax.train.memory import MemoryBudgetError, StepMemory
from tests.train.sft_fixtures import make_student, reverse_examples, write_jsonl

REPO = Path(__file__).resolve().parents[2]
VOCAB = 300  # larger than hidden, so the logits are the biggest activation, as in real models


def _model(tie: bool, remat="none", vocab=VOCAB, layers=2):
    cfg = tiny_llama(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4,
                     num_kv_heads=2, head_dim=8, tie_word_embeddings=tie)
    graphdef, params = nnx.split(init_model(cfg, seed=2, remat=remat))
    return graphdef, nnx.to_pure_dict(params)


def _sft_batch(rows=3, t=21, k=1, seed=0, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, t + 1)).astype(np.int32)
    seg = np.ones((rows, t), np.int32)
    seg[0, 12:] = 2  # a packed row: the second example attends only to itself
    weights = (rng.random((rows, t)) > 0.3).astype(np.float32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(), "segment_ids": seg}
    return {key: jnp.asarray(x.reshape(k, rows // k, *x.shape[1:])) for key, x in batch.items()}


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-7):
    """Every leaf within rtol of its own scale (max |want|) plus atol.

    Per leaf, not per element: an element that is a sum with cancellation carries the float32 rounding of its
    larger terms, and the chunked sum adds the same terms in another order (one such element of 32 was 1.2e-7
    off, 1.9e-4 of itself, with XLA's own dot emitter). A wrong chunk is off by the gradient's whole scale."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape
        err, scale = float(np.abs(g - w).max(initial=0.0)), float(np.abs(w).max(initial=0.0))
        assert err <= rtol * scale + atol, f"max |diff| {err:.3g} vs rtol * max |want| = {rtol * scale:.3g}"


# ----- chunked logits ------------------------------------------------------------------------------------
def test_chunk_length_bounds_rows_times_positions():
    assert chunked_loss.chunk_length(rows=4, length=100, chunk_tokens=64) == 16
    assert chunked_loss.chunk_length(rows=100, length=50, chunk_tokens=64) == 1  # never 0 positions
    assert chunked_loss.chunk_length(rows=2, length=50, chunk_tokens=0) == 50  # 0 = unchunked
    assert chunked_loss.chunk_length(rows=2, length=50, chunk_tokens=10_000) == 50


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_sft_loss_and_gradients_equal_unchunked(tie):
    graphdef, params = _model(tie)
    batch = _sft_batch()

    def run(chunk_tokens):
        fn = jax.jit(lambda p, b: sft.accumulated_gradients(p, graphdef, b, chunk_tokens=chunk_tokens))
        return fn(params, batch)

    loss0, grads0, tokens0 = run(0)
    loss1, grads1, tokens1 = run(3 * 5)  # 5 positions per chunk: 21 is not a multiple, the tail is padded
    assert float(tokens1) == float(tokens0) > 0
    assert float(loss1) == pytest.approx(float(loss0), rel=1e-6)
    _assert_trees_close(grads1, grads0, rtol=1e-5, atol=1e-7)
    embed_grad = np.asarray(grads1["embed"])
    assert np.abs(embed_grad).max() > 0  # the head (tied: the embedding) gets its gradient through the chunks


def test_chunked_grpo_step_equals_unchunked_with_temperature():
    graphdef, params = _model(tie=True)
    rows, t = 4, 19
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, (rows, t + 1)).astype(np.int32)
    attention = (np.arange(t)[None, :] < np.array([19, 15, 11, 17])[:, None]).astype(np.int32)
    mask = (attention * (np.arange(t)[None, :] >= 4)).astype(np.float32)
    logp_guess = rng.normal(-5, 1, (rows, t)).astype(np.float32)
    batch = {"tokens": tokens[:, :-1] * attention, "targets": tokens[:, 1:] * attention,
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
             "attention_mask": attention, "weights": grpo.token_weights(mask, "token"),
             "advantages": rng.normal(0, 1, rows).astype(np.float32), "old_logp": logp_guess,
             "ref_logp": logp_guess + rng.normal(0, 0.3, (rows, t)).astype(np.float32)}
    batch = {key: jnp.asarray(x)[None] for key, x in batch.items()}
    state = {"step": jnp.int32(0), "params": params, "opt_state": optax.sgd(1.0).init(params)}

    def run(chunk_tokens):  # SGD with lr 1: new params = params - gradient
        step = grpo.make_train_step(graphdef, optax.sgd(1.0), lambda s: 1.0, epsilon_low=0.2, epsilon_high=0.28,
                                    beta=0.05, temperature=0.7, chunk_tokens=chunk_tokens)
        new, metrics = jax.jit(step)(state, batch)
        logp = jax.jit(grpo.make_logprob_fn(graphdef, 0.7, chunk_tokens=chunk_tokens))(params, batch)
        return jax.tree.map(lambda a, b: a - b, params, new["params"]), metrics, logp

    grads0, metrics0, logp0 = run(0)
    grads1, metrics1, logp1 = run(4 * 3)  # 3 positions per chunk
    for key in ("loss", "entropy", "kl", "clip_fraction"):
        assert float(metrics1[key]) == pytest.approx(float(metrics0[key]), rel=1e-6, abs=1e-8), key
    assert float(metrics0["entropy"]) > 0
    np.testing.assert_allclose(np.asarray(logp1), np.asarray(logp0), rtol=1e-6, atol=1e-6)
    _assert_trees_close(grads1, grads0, rtol=1e-5, atol=1e-7)
    # The temperature is applied: log-probs of logits / 0.7 differ from those at temperature 1.
    logp_t1 = jax.jit(grpo.make_logprob_fn(graphdef, 1.0, chunk_tokens=12))(params, batch)
    assert np.abs(np.asarray(logp_t1) - np.asarray(logp1)).max() > 1e-2


def test_chunked_program_never_holds_the_whole_logits():
    """The optimized SFT gradient program has no [rows, t, vocab] float32 buffer once chunked; unchunked has."""
    vocab, rows, t = 2048, 2, 128
    graphdef, params = _model(tie=True, vocab=vocab, layers=1)
    batch = _sft_batch(rows=rows, t=t, vocab=vocab)
    full = f"f32[{rows},{t},{vocab}]"

    def compiled(chunk_tokens):
        fn = jax.jit(lambda p, b: sft.accumulated_gradients(p, graphdef, b, chunk_tokens=chunk_tokens))
        return fn.lower(params, batch).compile()

    whole, chunked = compiled(0), compiled(rows * 16)
    assert full in whole.as_text() and full not in chunked.as_text()
    logits_bytes = rows * t * vocab * 4
    saved = StepMemory.of(whole).temporaries - StepMemory.of(chunked).temporaries
    assert saved > logits_bytes, (saved, logits_bytes)  # at least the logits and more (their gradient, softmax)


# ----- remat policies ------------------------------------------------------------------------------------
def test_remat_policy_names_and_bools():
    assert resolve_remat(True) == resolve_remat("per_layer") == resolve_remat("true") == "full"
    assert resolve_remat(False) == resolve_remat("false") == "none"
    assert resolve_remat("dots_with_no_batch_dims") == "dots"
    with pytest.raises(ValueError, match=r"model.remat='sometimes'.*none, full, dots"):
        resolve_remat("sometimes")


def test_remat_policies_trade_memory_not_values():
    """Same loss and gradients; temporaries of the compiled gradient: full < dots < none."""
    batch = _sft_batch(rows=4, t=64)
    results = {}
    for policy in ("none", "dots", "full"):
        graphdef, params = _model(tie=True, remat=policy, layers=3)
        fn = jax.jit(lambda p, b, g=graphdef: sft.accumulated_gradients(p, g, b, chunk_tokens=64))
        results[policy] = (fn(params, batch), StepMemory.of(fn.lower(params, batch).compile()).temporaries)
    (loss_none, grads_none, _), temp_none = results["none"]
    for policy in ("dots", "full"):
        (loss, grads, _), _ = results[policy]
        assert float(loss) == pytest.approx(float(loss_none), rel=1e-6)
        _assert_trees_close(grads, grads_none, rtol=1e-5, atol=1e-7)
    assert results["full"][1] < results["dots"][1] < temp_none, {k: v[1] for k, v in results.items()}


# ----- micro-batches from a memory budget ----------------------------------------------------------------------
def test_micro_batch_candidates_keep_the_batch_split():
    assert train_memory.micro_batch_candidates(16, 1) == [1, 2, 4, 8, 16]
    assert train_memory.micro_batch_candidates(16, 4) == [1, 2, 4]  # 4 rows per micro-batch = 1 per device
    assert train_memory.micro_batch_candidates(6, 4) == [1, 2, 3, 6]  # never split evenly: any divisor
    assert train_memory.micro_batch_candidates(16, 2, process_count=2) == [1, 2, 4, 8]


@pytest.fixture(scope="module")
def sft_setup():
    """A tiny SFT step on one device: graphdef, tx, shardings, abstract state, a placed state and host rows."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    config = build_config(str(REPO / "configs/sft_tiny.py"),
                          [("train.batch_size", "8"), ("data.max_length", "64"), ("model.remat", "none"),
                           ("train.max_grad_norm", "0"), ("train.learning_rate", "0.1")])
    graphdef, params = _model(tie=False)
    shapes = jax.eval_shape(lambda: params)
    param_sh = jax.tree.map(lambda _: sharding.replicated(mesh), params)
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    state_sh = loop.state_shardings_for(shapes, param_sh, tx, mesh)
    full_shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": shapes, "opt_state": jax.eval_shape(tx.init, shapes)}
    host = {k: np.asarray(v[0]) for k, v in _sft_batch(rows=8, t=64, seed=4).items()}
    return config, mesh, graphdef, tx, schedule, state_sh, abstract_state(full_shapes, state_sh), params, host


def _fit_and_step(setup, **train):
    config, mesh, graphdef, tx, schedule, state_sh, abstract, params, host = setup
    config = config.copy_and_resolve_references()
    for key, value in train.items():
        setattr(config.train, key, value)
    k, batch_sh, compiled, memory = sft.fit_train_step(config, graphdef, tx, schedule, state_sh, abstract, mesh)
    params = jax.tree.map(jnp.copy, params)  # the step donates its state; keep the fixture's params alive
    state = jax.device_put({"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}, state_sh)
    new_state, metrics = loop.run_on_mesh(compiled, mesh)(state, loop.to_device_batch(host, k, batch_sh))
    return k, memory, new_state["params"], metrics


def test_a_small_budget_micro_batches_and_gives_the_same_update(sft_setup):
    k1, mem1, params1, metrics1 = _fit_and_step(sft_setup, grad_accum_steps=1, memory_budget_gb=1e3)
    k8, mem8, _, _ = _fit_and_step(sft_setup, grad_accum_steps=8, memory_budget_gb=1e3)
    assert k1 == 1 and mem8.peak < mem1.peak
    # A budget between the two estimates: the unbudgeted (1 micro-batch) step does not fit, 8 micro-batches do.
    budget_gb = (mem1.peak + mem8.peak) / 2 / train_memory.GB
    k, mem, params, metrics = _fit_and_step(sft_setup, grad_accum_steps=0, memory_budget_gb=budget_gb)
    assert k > 1 and mem.peak <= budget_gb * train_memory.GB
    assert float(metrics["loss"]) == pytest.approx(float(metrics1["loss"]), rel=1e-6)
    assert float(metrics["loss_tokens"]) == float(metrics1["loss_tokens"])
    _assert_trees_close(params, params1, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(params["lm_head"]) - np.asarray(sft_setup[7]["lm_head"])).max() > 1e-4  # it moved


def test_sft_that_cannot_fit_stops_before_it_starts_naming_budget_and_fix(tmp_path):
    student = make_student(tmp_path / "student")
    data = write_jsonl(tmp_path / "train.jsonl", reverse_examples(16))
    overrides = {"model.path": student, "data.train_files": data, "workdir": tmp_path / "run",
                 "train.memory_budget_gb": 1e-4}  # 100 kB: not even the parameters fit
    config = build_config(str(REPO / "configs/sft_tiny.py"), [(k, str(v)) for k, v in overrides.items()])
    with pytest.raises(MemoryBudgetError) as error:
        sft.train_sft(config)
    message = str(error.value)
    for needed in ("budget of 0.00 GB", "train.memory_budget_gb=0.0001", "needs an estimated",
                   "train.grad_accum_steps=", "Lower train.batch_size or data.max_length", "model.remat=full"):
        assert needed in message, (needed, message)
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_grpo_budget_picks_micro_batches_and_too_big_names_grpo_keys():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    config = build_config(str(REPO / "configs/grpo_tiny.py"),
                          [("grpo.prompts_per_step", "2"), ("grpo.num_generations", "4"), ("grpo.max_length", "64")])
    g = config.grpo
    graphdef, params = _model(tie=True)
    shapes = jax.eval_shape(lambda: params)
    tx = optax.sgd(1.0)
    state_sh = loop.state_shardings_for(shapes, jax.tree.map(lambda _: sharding.replicated(mesh), params), tx, mesh)
    abstract = abstract_state({"step": jax.ShapeDtypeStruct((), jnp.int32), "params": shapes,
                               "opt_state": jax.eval_shape(tx.init, shapes)}, state_sh)
    step = grpo.make_train_step(graphdef, tx, lambda s: 1.0, epsilon_low=0.2, epsilon_high=0.2, beta=0.0)

    def fit(micro_batches, budget_gb):
        g.micro_batches, g.memory_budget_gb = micro_batches, budget_gb
        return grpo.fit_train_step(g, step, state_sh, abstract, mesh, old_logp=False, ref_logp=False)

    def update(fitted):
        k, batch_sh, compiled, _ = fitted
        state = jax.device_put({"step": jnp.int32(0), "params": jax.tree.map(jnp.copy, params),
                                "opt_state": tx.init(params)}, state_sh)
        state, metrics = loop.run_on_mesh(compiled, mesh)(state, loop.to_device_batch(host, k, batch_sh))
        return state["params"], metrics

    rng = np.random.default_rng(3)
    tokens = rng.integers(0, VOCAB, (8, 65)).astype(np.int32)
    completion = (np.arange(64)[None, :] >= 20).astype(np.float32).repeat(8, 0)  # 20-token prompts
    host = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "attention_mask": np.ones((8, 64), np.int32),
            "positions": np.broadcast_to(np.arange(64, dtype=np.int32), (8, 64)).copy(),
            "weights": grpo.token_weights(completion, "token"), "advantages": rng.normal(0, 1, 8).astype(np.float32),
            "engine_logp": np.zeros((8, 64), np.float32), "engine_weight": np.zeros((8, 64), np.float32)}
    one_step, many = fit(1, 1e3), fit(8, 1e3)[3]
    one = one_step[3]
    budget_gb = (one.peak + many.peak) / 2 / train_memory.GB
    fitted = fit(0, budget_gb)
    k, batch_sh, _, mem = fitted
    assert 1 < k <= 8 and mem.peak <= budget_gb * train_memory.GB
    assert batch_sh["advantages"].spec == sharding.named_sharding(mesh, (None, "batch"), (k, 8 // k)).spec
    # The budgeted step's update is the unbudgeted one's: the same loss and parameters after one SGD step.
    (params_k, metrics_k), (params_1, metrics_1) = update(fitted), update(one_step)
    assert float(metrics_k["loss"]) == pytest.approx(float(metrics_1["loss"]), rel=1e-5, abs=1e-7)
    _assert_trees_close(params_k, params_1, rtol=1e-5, atol=1e-6)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                zip(jax.tree.leaves(params_k), jax.tree.leaves(params)))
    assert moved > 1e-4, moved  # the step moved the weights: equal updates, not two no-ops
    with pytest.raises(MemoryBudgetError, match=r"grpo.micro_batches=8 .*grpo.memory_budget_gb=1e-05.*"
                                                r"Lower grpo.prompts_per_step"):
        fit(0, 1e-5)
