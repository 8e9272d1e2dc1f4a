"""Low-rank adapters in SFT: the base is untouched at init and frozen in training, gradients reach only the
adapters (and equal the chain rule through the merged weight), a tiny task's loss falls, checkpoints hold only
adapters plus the base's fingerprint, kill -9 then resume equals the uninterrupted run, another base is refused."""

import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from stat_jax.config import build_config
from stat_jax.data import sft_data
from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.data.records import SFTExample
from stat_jax.models import init_model, lora
from stat_jax.models.llama import tiny_llama
from stat_jax.models.qwen import tiny_qwen2
from stat_jax.train import loop, sft
from stat_jax.train.metrics import read_metrics
from stat_jax.train.optim import build_optimizer
from tests.train import sft_fixtures
from tests.train.sft_fixtures import reverse_examples

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 16, 4
LORA = {"train.lora.rank": 8, "train.lora.alpha": 16, "train.lora.dropout": 0.1, "train.learning_rate": 3e-2}


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _tiny(tok, family="llama", seed=1):
    make = tiny_llama if family == "llama" else tiny_qwen2
    cfg = make(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8,
               eos_token_ids=(tok.eos_token_id,))
    return init_model(cfg, seed=seed)


def _batch(tok, n=4, seq_len=32, micro=1):
    data = sft_data.tokenize_examples(tok, [SFTExample(**e) for e in reverse_examples(n, seed=5)])
    host = next(sft_data.SFTBatches(data, batch_size=n, seq_len=seq_len, seed=0, packing=False))
    return {k: jnp.asarray(v.reshape(micro, n // micro, seq_len)) for k, v in host.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_adapters_at_init_leave_the_logits_unchanged(tok, family):
    model = _tiny(tok, family)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, len(tok), (2, 10)), jnp.int32)
    base = np.asarray(model(tokens))
    lora.add_adapters(model, lora.LoraConfig(rank=4, alpha=8, targets=tuple(lora.TARGETS)), seed=0)
    assert lora.has_adapters(model)
    # Equal up to float32 rounding: the plain stack may run as one scan over the layers and the adapted one
    # unrolled (models/transformer.py), which XLA fuses differently (~6e-8 here); a non-zero B moves ~1e-2.
    np.testing.assert_allclose(np.asarray(model(tokens)), base, rtol=0, atol=1e-6)
    _, adapters, _ = lora.split_adapters(model)
    # A is random (so B's gradient is not zero), B is zero (so the product starts at zero).
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(adapters)}
    assert len(flat) == 2 * 7 * model.config.num_layers
    assert all(np.abs(np.asarray(v)).max() > 0 for k, v in flat.items() if k.endswith("lora_a"))
    assert all(not np.asarray(v).any() for k, v in flat.items() if k.endswith("lora_b"))


def test_unknown_target_is_a_config_error():
    with pytest.raises(ValueError, match=r"unknown \['qkv'\].*q,k,v,o,gate,up,down"):
        lora.LoraConfig.from_config({"rank": 4, "targets": "q,qkv"})
    assert lora.LoraConfig.from_config({"rank": 4, "targets": "q_proj, down"}).targets == ("q", "down")


def _perturbed(adapters: dict, scale=0.1) -> dict:
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_gradients_reach_only_adapters_and_follow_the_merged_weight(tok):
    model = _tiny(tok)
    lcfg = lora.LoraConfig(rank=3, alpha=6, targets=("q", "o", "down"))
    lora.add_adapters(model, lcfg, seed=0)
    graphdef, adapters, base = lora.split_adapters(model)
    adapters, base = _perturbed(nnx.to_pure_dict(adapters)), nnx.to_pure_dict(base)
    batch = _batch(tok)
    grad_fn = jax.jit(lambda p, g, b, f=None: sft.accumulated_gradients(p, g, b, frozen=f), static_argnums=1)
    _, grads, _ = grad_fn(adapters, graphdef, batch, base)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)  # nothing of the base is differentiated

    # The same model with the adapters folded in, fully differentiable: dL/dB = s A^T dL/dW, dL/dA = s dL/dW B^T.
    merged = lora.merge_adapters(nnx.merge(graphdef, nnx.State(adapters), nnx.State(base)))
    m_graphdef, m_params = nnx.split(merged)
    _, full_grads, _ = grad_fn(nnx.to_pure_dict(m_params), m_graphdef, batch)
    for i in range(model.config.num_layers):
        for module, attr, n_in in (("attention", "q_proj", 1), ("attention", "o_proj", 2), ("mlp", "down_proj", 1)):
            g_w = np.asarray(full_grads["layers"][i][module][attr])
            a = np.asarray(adapters["layers"][i][module][attr]["lora_a"])
            b = np.asarray(adapters["layers"][i][module][attr]["lora_b"])
            got = grads["layers"][i][module][attr]
            want_b = lcfg.scale * np.tensordot(a, g_w, axes=(list(range(n_in)), list(range(n_in))))
            want_a = lcfg.scale * np.tensordot(g_w, b, axes=(list(range(n_in, g_w.ndim)), list(range(1, b.ndim))))
            np.testing.assert_allclose(np.asarray(got["lora_b"]), want_b, rtol=2e-4, atol=1e-7)
            np.testing.assert_allclose(np.asarray(got["lora_a"]), want_a, rtol=2e-4, atol=1e-7)


def test_train_step_changes_only_adapters_and_dropout_follows_the_seed(tok):
    model = _tiny(tok)
    lcfg = lora.LoraConfig(rank=4, alpha=8, dropout=0.2)
    lora.add_adapters(model, lcfg, seed=0)
    graphdef, adapters, base = lora.split_adapters(model)
    adapters, base = nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)
    tx, schedule = build_optimizer({"learning_rate": 1e-2, "warmup_steps": 0}, 10)
    state = {"step": jnp.int32(0), "params": adapters, "opt_state": tx.init(adapters)}
    # Optimizer moments exist for the adapters only: the base (the bulk of the model) has none.
    moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    n = lora.adapter_param_count(adapters)
    assert 2 * n <= moments <= 2 * n + 4  # mu, nu and a few step counters
    step = jax.jit(sft.make_train_step(graphdef, tx, schedule, dropout_seed=3))
    base_before = jax.tree.map(np.asarray, base)
    new_state, metrics = step(state, _batch(tok, micro=2), base)
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), base_before)
    changed = {"/".join(map(str, p)): bool(np.any(np.asarray(a) != np.asarray(b))) for (p, a), b in
               zip(jax.tree_util.tree_flatten_with_path(new_state["params"])[0], jax.tree.leaves(adapters))}
    # B moves at once; A's gradient s·dL/dW·B^T is zero while B is still zero (as in PEFT).
    assert all(v for k, v in changed.items() if "lora_b" in k)
    assert not any(v for k, v in changed.items() if "lora_a" in k)
    # Same seed and step: the same dropout masks, so the same update; another seed: other masks.
    again, _ = step(state, _batch(tok, micro=2), base)
    other, _ = jax.jit(sft.make_train_step(graphdef, tx, schedule, dropout_seed=4))(state, _batch(tok, micro=2), base)
    leaf = lambda s: np.asarray(s["params"]["layers"][0]["mlp"]["up_proj"]["lora_b"])  # noqa: E731
    np.testing.assert_array_equal(leaf(again), leaf(new_state))
    assert np.abs(leaf(other) - leaf(new_state)).max() > 0


def test_merged_params_of_pure_dicts_equal_the_merged_model(tok):
    """What GRPO's rollout engine serves (a jitted merge of adapters + base) is the merged model's params."""
    model = _tiny(tok)
    lcfg = lora.LoraConfig(rank=3, alpha=6, targets=("q", "o", "down", "up"))
    lora.add_adapters(model, lcfg, seed=0)
    graphdef, adapters, base = lora.split_adapters(model)
    adapters, base = _perturbed(nnx.to_pure_dict(adapters)), nnx.to_pure_dict(base)
    got = jax.jit(lambda a, f: lora.merged_params(a, f, lcfg.scale))(adapters, base)
    want = nnx.to_pure_dict(nnx.split(lora.merge_adapters(nnx.merge(graphdef, nnx.State(adapters),
                                                                      nnx.State(base))))[1])
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7),
                 got, want)
    q = ("layers", 0, "attention", "q_proj")
    moved = np.asarray(got[q[0]][q[1]][q[2]][q[3]]) - np.asarray(base[q[0]][q[1]][q[2]][q[3]]["kernel"])
    assert np.abs(moved).max() > 1e-3  # the adapters are in it


# ----- whole runs ------------------------------------------------------------------------------------------
def make_student(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random Llama whose frozen embeddings can express a confident prediction (sft_fixtures)."""
    return sft_fixtures.make_student(out_dir, seed=seed, initializer_range=0.2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return sft_fixtures.sft_run_setup(tmp_path_factory.mktemp("sft_lora"), 160, initializer_range=0.2)


def _overrides(student, data, workdir, **extra):
    return sft_fixtures.sft_overrides(student, data, workdir, steps=STEPS, every=EVERY, **LORA, **extra)


@pytest.fixture(scope="module")
def reference(setup):
    root, student, data = setup
    config = build_config(str(REPO / "configs/sft_tiny.py"), _overrides(student, data, root / "reference"))
    result = sft.train_sft(config)
    return result, read_metrics(result["metrics_path"])


def test_adapter_sft_learns_and_checkpoints_only_adapters(setup, reference):
    _, student, _ = setup
    result, rows = reference
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.6 * first, (first, last)
    # The checkpoint: adapters, their optimizer state and the step; the base's fingerprint in the meta.
    ckpt = Path(result["checkpoint_dir"])
    tree = ocp.StandardCheckpointer().metadata(ckpt / str(STEPS) / "state").item_metadata.tree
    flat = {"/".join(map(str, k)) for k in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape"))[0] for k in [tuple(getattr(p, "key", p) for p in k[0])]}
    params = {k for k in flat if k.startswith("params/")}
    assert params and all(k.endswith(("lora_a", "lora_b")) for k in params), sorted(params)[:5]
    assert loop.latest_checkpoint_meta(ckpt)["base_fingerprint"] == lora.base_fingerprint(student)
    # Exports: the merged HF directory (no adapters left in it) and the PEFT adapter files.
    adapter = Path(result["adapter_dir"])
    assert (adapter / lora.ADAPTER_CONFIG).is_file() and (adapter / lora.ADAPTER_WEIGHTS).is_file()
    assert (Path(result["export_dir"]) / "model.safetensors").is_file()


def test_resume_against_another_base_is_refused(setup, reference, tmp_path):
    root, _, data = setup
    other = make_student(tmp_path / "other_student", seed=5)  # same shapes, other weights
    workdir = tmp_path / "run"
    shutil.copytree(Path(reference[0]["checkpoint_dir"]).parent, workdir)
    (workdir / "sft_result.json").unlink()
    config = build_config(str(REPO / "configs/sft_tiny.py"), _overrides(other, data, workdir))
    with pytest.raises(lora.AdapterBaseMismatchError, match="fingerprint"):
        sft.train_sft(config, resume=True)


def _cli(student, data, workdir, *flags):
    return sft_fixtures.sft_cli(_overrides(student, data, workdir), *flags)


@pytest.mark.slow  # three trainer processes: ~2 min on 2 busy cores
def test_kill9_then_resume_with_adapters_reproduces_the_uninterrupted_run(setup, reference, tmp_path):
    _, student, data = setup
    workdir = tmp_path / "run"
    proc = sft_fixtures.start_and_wait(_cli(student, data, workdir), workdir, min_step=EVERY + 1,
                                       need_checkpoint=EVERY)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert read_metrics(workdir / "metrics.jsonl")[-1]["step"] < STEPS

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(_cli(student, data, workdir, "--resume"), cwd=REPO, capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    want = {r["step"]: (r["loss"], r["grad_norm"]) for r in reference[1]}
    for r in rows:  # dropout included: its masks depend on (seed, step) only
        np.testing.assert_allclose((r["loss"], r["grad_norm"]), want[r["step"]], rtol=1e-5, err_msg=str(r["step"]))


def test_adapters_train_with_the_chunked_attention_at_any_block_size(setup, tmp_path, monkeypatch):
    """model.attention_block with train.lora: the adapters' model uses the configured query block (the chunked
    attention is traced with it) and trains as the autodiff block attention does (attention_block=0)."""
    from stat_jax.models import transformer

    _, student, data = setup
    blocks_traced = []
    chunked = transformer.causal_attention

    def spy(q, k, v, mask, *, block):
        blocks_traced.append(block)
        return chunked(q, k, v, mask, block=block)

    monkeypatch.setattr(transformer, "causal_attention", spy)
    losses = {}
    for block in (16, 0):  # 48-token rows: three query blocks of 16, or the autodiff blocks
        config = build_config(str(REPO / "configs/sft_tiny.py"),
                              sft_fixtures.sft_overrides(student, data, tmp_path / f"block{block}", steps=4, every=4,
                                                         **LORA, **{"model.attention_block": block}))
        losses[block] = [row["loss"] for row in read_metrics(sft.train_sft(config)["metrics_path"])]
        if block:
            assert blocks_traced and set(blocks_traced) == {16}, blocks_traced
            blocks_traced.clear()
    assert not blocks_traced  # attention_block=0 never reaches the chunked attention
    assert len(losses[16]) == 4 and losses[16][-1] < losses[16][0], losses
    np.testing.assert_allclose(losses[16], losses[0], rtol=1e-5)
