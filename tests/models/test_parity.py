"""Flax logits == transformers logits (float32) for tiny random Llama / Qwen2 / Qwen3 checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from stat_jax.models import ModelConfig, init_model, load_hf_checkpoint
from stat_jax.models.llama import tiny_llama
from tests.models.hf_fixtures import VARIANTS, hf_logits, max_abs_diff_valid, padded_batch, save_variants

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_variants(tmp_path_factory.mktemp("hf"))


def flax_logits(model, tokens, mask, positions):
    return np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, variant, padding):
    path, hf_model = checkpoints[variant]
    model = load_hf_checkpoint(path)
    tokens, mask, positions = padded_batch(padding)
    ours = flax_logits(model, tokens, mask, positions)
    ref = hf_logits(hf_model, tokens, mask, positions)
    assert ours.shape == ref.shape == (3, 12, 128)
    # Guard against a vacuous comparison (e.g. all-zero logits on both sides).
    assert np.std(ref[mask.astype(bool)]) > 1e-2
    assert max_abs_diff_valid(ours, ref, mask) <= TOL


def test_config_parsed_from_transformers_checkpoint(checkpoints):
    expect = {
        "llama": dict(architecture="llama", tie_word_embeddings=False, attention_bias=False, rope_theta=1e4),
        "llama_tied": dict(architecture="llama", tie_word_embeddings=True, rope_theta=5e5),
        "llama_rope_llama3": dict(architecture="llama", tie_word_embeddings=True, rope_theta=5e5),
        "qwen2": dict(architecture="qwen2", tie_word_embeddings=True, attention_bias=True, rope_theta=1e6),
        "qwen2_untied": dict(architecture="qwen2", tie_word_embeddings=False, attention_bias=True),
        "qwen3": dict(architecture="qwen3", qk_norm=True, attention_bias=False, head_dim=32),
    }
    for variant, fields in expect.items():
        cfg = ModelConfig.from_hf_dir(checkpoints[variant][0])
        assert {k: getattr(cfg, k) for k in fields} == fields, variant
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.num_layers) == (4, 2, 2)
    scaling = ModelConfig.from_hf_dir(checkpoints["llama_rope_llama3"][0]).rope_scaling
    assert (scaling.rope_type, scaling.factor, scaling.original_max_position_embeddings) == ("llama3", 8.0, 32)


def test_llama3_rope_scaling_changes_logits_on_both_sides(checkpoints):
    """Parity alone would pass if both sides ignored rope_scaling; show that each side applies it."""
    path, hf_scaled = checkpoints["llama_rope_llama3"]
    tokens, mask, positions = padded_batch("right")

    scaled = load_hf_checkpoint(path)
    unscaled = load_hf_checkpoint(path, config=dataclasses.replace(scaled.config, rope_scaling=None))
    ours_scaled = flax_logits(scaled, tokens, mask, positions)
    ours_unscaled = flax_logits(unscaled, tokens, mask, positions)

    hf_config = transformers.LlamaConfig.from_pretrained(path)
    hf_config.rope_parameters = {"rope_type": "default", "rope_theta": hf_config.rope_parameters["rope_theta"]}
    hf_unscaled = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    hf_unscaled.load_state_dict(hf_scaled.state_dict())
    ref_scaled = hf_logits(hf_scaled, tokens, mask, positions)
    ref_unscaled = hf_logits(hf_unscaled, tokens, mask, positions)

    # The effect must be well above the parity tolerance, or the parity check could not tell them apart.
    assert max_abs_diff_valid(ours_scaled, ours_unscaled, mask) > 10 * TOL
    assert max_abs_diff_valid(ref_scaled, ref_unscaled, mask) > 10 * TOL
    assert max_abs_diff_valid(ours_unscaled, ref_unscaled, mask) <= TOL
    assert max_abs_diff_valid(ours_scaled, ref_scaled, mask) <= TOL


def test_padding_does_not_change_valid_logits(checkpoints):
    """The same sequence gives the same logits alone, left-padded, and right-padded."""
    model = load_hf_checkpoint(checkpoints["qwen2"][0])
    left = padded_batch("left")
    right = padded_batch("right")
    alone = flax_logits(model, left[0][1:2, -7:], left[1][1:2, -7:], left[2][1:2, -7:])
    np.testing.assert_allclose(flax_logits(model, *left)[1, -7:], alone[0], atol=1e-5)
    np.testing.assert_allclose(flax_logits(model, *right)[1, :7], alone[0], atol=1e-5)


def test_remat_gives_identical_logits_and_grads():
    """remat=True recomputes activations in the backward pass: same numbers, different program."""
    cfg = tiny_llama(num_layers=1)  # remat wraps each layer; one is enough and halves compile time
    tokens, mask, positions = (jnp.asarray(a) for a in padded_batch("right"))
    results = {}
    for remat in (False, True):
        graphdef, params = nnx.split(init_model(cfg, seed=3, remat=remat))

        def loss(params, graphdef=graphdef):
            logits = nnx.merge(graphdef, params)(tokens, positions, mask)
            return jnp.mean(logits**2), logits

        grad_fn = jax.grad(loss, has_aux=True)
        program = str(jax.make_jaxpr(grad_fn)(params))
        assert ("remat" in program or "checkpoint" in program) == remat  # the primitive's name varies by jax
        results[remat] = jax.jit(grad_fn)(params)
    (grads_plain, logits_plain), (grads_remat, logits_remat) = results[False], results[True]
    np.testing.assert_allclose(np.asarray(logits_remat), np.asarray(logits_plain), atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_plain), jax.tree.leaves(grads_remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_match_with_small_causal_attention_blocks(checkpoints, padding, monkeypatch):
    """Block-wise causal attention (used for long sequences) must not change the numbers: force blocks of 5
    on a 12-token batch, so a ragged last block and padded rows both cross block boundaries."""
    from stat_jax.models import transformer

    monkeypatch.setattr(transformer, "CAUSAL_ATTENTION_BLOCK", 5, raising=False)
    path, hf_model = checkpoints["qwen3"]
    tokens, mask, positions = padded_batch(padding)
    ours = flax_logits(load_hf_checkpoint(path), tokens, mask, positions)
    assert max_abs_diff_valid(ours, hf_logits(hf_model, tokens, mask, positions), mask) <= TOL
