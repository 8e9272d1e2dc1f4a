"""Adapter exports reproduce the Flax logits in transformers: the merged HF directory, and PEFT's adapter files
loaded by `peft` onto the transformers base (tiny random Llama and Qwen2; the real student under -m slow)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from stat_jax.models import export_hf_checkpoint, load_hf_checkpoint, lora
from tests.models.hf_fixtures import hf_logits, max_abs_diff_valid, padded_batch, save_hf_model

peft = pytest.importorskip("peft")

TOL = 1e-4
REAL_STUDENT = Path(__file__).resolve().parents[2] / ".cache" / "smollm2-135m-instruct"


def _trained_adapters(model, lcfg: lora.LoraConfig, seed: int = 0):
    """`model` with adapters whose A and B are both non-zero (as after training), so the export is tested."""
    lora.add_adapters(model, lcfg, seed=seed)
    graphdef, adapters, base = lora.split_adapters(model)
    leaves, tree = jax.tree.flatten(nnx.to_pure_dict(adapters))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    moved = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    return nnx.merge(graphdef, nnx.State(moved), nnx.State(nnx.to_pure_dict(base)))


def _flax_logits(model, tokens, mask, positions):
    return np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))


@pytest.mark.parametrize("variant,targets", [("llama", tuple(lora.TARGETS)), ("qwen2", ("q", "v", "o", "down"))])
def test_merged_and_peft_exports_match_the_flax_adapted_logits(tmp_path, variant, targets):
    base_dir = tmp_path / "base"
    save_hf_model(variant, base_dir)
    lcfg = lora.LoraConfig(rank=4, alpha=8, dropout=0.05, targets=targets)
    model = _trained_adapters(load_hf_checkpoint(base_dir), lcfg)
    tokens, mask, positions = padded_batch("right")
    ours = _flax_logits(model, tokens, mask, positions)
    base_logits = _flax_logits(load_hf_checkpoint(base_dir), tokens, mask, positions)
    assert max_abs_diff_valid(ours, base_logits, mask) > 1e-2  # the adapters change the model

    # PEFT: adapter_config.json + adapter_model.safetensors onto the transformers base.
    adapter_dir = lora.export_peft_adapter(model, tmp_path / "adapter", lcfg, base_model_name_or_path=str(base_dir))
    config = json.loads((adapter_dir / lora.ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    assert max_abs_diff_valid(hf_logits(peft_model, tokens, mask, positions), ours, mask) <= TOL

    # Merged: a plain HF directory (W + scale A B) that transformers loads without peft.
    merged_dir = export_hf_checkpoint(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert max_abs_diff_valid(hf_logits(merged, tokens, mask, positions), ours, mask) <= TOL
    flax_merged = _flax_logits(lora.merge_adapters(model), tokens, mask, positions)
    assert not lora.has_adapters(model)
    assert max_abs_diff_valid(flax_merged, ours, mask) <= TOL


def test_peft_export_refuses_a_model_without_adapters(tmp_path):
    save_hf_model("llama", tmp_path / "base")
    with pytest.raises(ValueError, match="no adapters"):
        lora.export_peft_adapter(load_hf_checkpoint(tmp_path / "base"), tmp_path / "out", lora.LoraConfig(rank=4))


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_STUDENT / "config.json").is_file(), reason=f"real student not at {REAL_STUDENT}")
def test_peft_export_of_the_real_student_matches_flax(tmp_path):
    lcfg = lora.LoraConfig(rank=16, alpha=32, dropout=0.05)  # the paper's adapter settings
    model = _trained_adapters(load_hf_checkpoint(REAL_STUDENT), lcfg)
    tokens, mask, positions = padded_batch("right", lengths=(24, 9), total=24, vocab=model.config.vocab_size)
    ours = _flax_logits(model, tokens, mask, positions)
    adapter_dir = lora.export_peft_adapter(model, tmp_path / "adapter", lcfg,
                                           base_model_name_or_path=str(REAL_STUDENT),
                                           base_hash=lora.base_fingerprint(REAL_STUDENT))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(REAL_STUDENT, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    theirs = hf_logits(peft_model, tokens, mask, positions)
    assert np.std(theirs[mask.astype(bool)]) > 1.0
    assert max_abs_diff_valid(theirs, ours, mask) <= 2e-3  # 30 layers of float32 with a 49k vocabulary
