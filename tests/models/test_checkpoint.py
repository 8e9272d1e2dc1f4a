"""HF checkpoint directories <-> NNX: round trips through transformers, sharded files, bf16, bad inputs."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from stat_jax.data.char_tokenizer import save_char_tokenizer
from stat_jax.models import (
    CheckpointError,
    ModelConfig,
    UnsupportedModelError,
    export_hf_checkpoint,
    load_hf_checkpoint,
)
from stat_jax.models.checkpoint import SafetensorsFile, write_safetensors
from stat_jax.models.dir_check import expected_hf_tensors
from stat_jax.models.llama import llama3_2_1b
from stat_jax.models.qwen import qwen2_5_3b, tiny_qwen3
from tests.models.hf_fixtures import hf_logits, max_abs_diff_valid, padded_batch, save_variants

VARIANTS = ("llama", "qwen2")  # untied + tied, with and without q/k/v bias


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = save_variants(root, VARIANTS)
    for path, _ in out.values():
        save_char_tokenizer(path)
    return out


@pytest.fixture(scope="module")
def batch():
    return padded_batch("right")


def flax_logits(model, tokens, mask, positions):
    return np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)), np.float32)


def load_transformers(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs).eval()


# ----- round trips -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_export_loads_in_transformers_with_unchanged_logits(checkpoints, batch, tmp_path, variant):
    src, hf_model = checkpoints[variant]
    model = load_hf_checkpoint(src)
    out = export_hf_checkpoint(model, tmp_path / "export", tokenizer_source=src)

    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    reloaded = load_transformers(out)
    assert type(reloaded) is type(hf_model)
    np.testing.assert_array_equal(hf_logits(reloaded, *batch), hf_logits(hf_model, *batch))
    # Every tensor is bit-identical to the source checkpoint (float32 in, float32 out).
    ours, theirs = SafetensorsFile(out / "model.safetensors"), SafetensorsFile(src / "model.safetensors")
    assert set(ours.keys()) == set(expected_hf_tensors(model.config))
    for key in ours.keys():
        np.testing.assert_array_equal(ours.get(key), theirs.get(key), err_msg=key)


def test_tokenizer_files_are_copied(checkpoints, tmp_path):
    src, _ = checkpoints["llama"]
    out = export_hf_checkpoint(load_hf_checkpoint(src), tmp_path / "export", tokenizer_source=src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    original = transformers.AutoTokenizer.from_pretrained(src)
    copied = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "1+2=?"}]
    rendered = copied.apply_chat_template(messages, tokenize=False)
    assert rendered == original.apply_chat_template(messages, tokenize=False) and "<|user|>" in rendered
    assert copied("x = 42").input_ids == original("x = 42").input_ids
    assert copied.eos_token == original.eos_token


def test_sharded_export_round_trip(checkpoints, batch, tmp_path):
    src, hf_model = checkpoints["qwen2"]
    model = load_hf_checkpoint(src)
    out = export_hf_checkpoint(model, tmp_path / "sharded", tokenizer_source=src, max_shard_bytes=40_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(expected_hf_tensors(model.config))
    assert index["metadata"]["total_size"] == sum((out / f).stat().st_size for f in shard_files)
    for f in shard_files:  # every listed file holds exactly the keys the index says
        assert set(SafetensorsFile(out / f).keys()) == {k for k, v in index["weight_map"].items() if v == f}

    ref = hf_logits(hf_model, *batch)
    np.testing.assert_array_equal(hf_logits(load_transformers(out), *batch), ref)
    assert max_abs_diff_valid(flax_logits(load_hf_checkpoint(out), *batch), ref, batch[1]) <= 1e-4


def test_reexport_into_same_directory_leaves_no_stale_weights(checkpoints, batch, tmp_path):
    """single -> sharded -> single into one directory: transformers must load the latest weights."""
    src, hf_model = checkpoints["llama"]
    model = load_hf_checkpoint(src)
    out = tmp_path / "same"
    export_hf_checkpoint(model, out)
    export_hf_checkpoint(model, out, max_shard_bytes=40_000)
    assert not (out / "model.safetensors").exists()
    np.testing.assert_array_equal(hf_logits(load_transformers(out), *batch), hf_logits(hf_model, *batch))
    export_hf_checkpoint(model, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_bfloat16_export_and_load(checkpoints, batch, tmp_path):
    src, hf_model = checkpoints["qwen2"]
    out = export_hf_checkpoint(load_hf_checkpoint(src), tmp_path / "bf16", dtype="bfloat16")

    header = SafetensorsFile(out / "model.safetensors").header
    assert {info["dtype"] for info in header.values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    hf_bf16 = load_transformers(out)
    assert next(hf_bf16.parameters()).dtype == torch.bfloat16
    model = load_hf_checkpoint(out, dtype="bfloat16", param_dtype="bfloat16")
    assert model.layers[0].attention.q_proj[...].dtype == jnp.bfloat16
    ours = flax_logits(model, *batch)
    assert model(jnp.asarray(batch[0][:, :2])).dtype == jnp.bfloat16

    # bf16 weights and compute move these logits (std ~0.2) by ~5e-3; a wrong tensor would move them by ~0.2.
    # Upcast to float32, the bf16 file must match transformers' upcast copy to float32 precision.
    ref32 = hf_logits(hf_model, *batch)
    assert max_abs_diff_valid(ours, ref32, batch[1]) < 2e-2
    assert max_abs_diff_valid(ours, hf_logits(hf_bf16, *batch), batch[1]) < 2e-2
    up = load_hf_checkpoint(out)  # bf16 file -> float32 params
    hf_up = hf_bf16.float()
    assert max_abs_diff_valid(flax_logits(up, *batch), hf_logits(hf_up, *batch), batch[1]) <= 1e-4


# ----- bad inputs ------------------------------------------------------------------------------------------
@pytest.fixture
def broken(checkpoints, tmp_path):
    """A fresh, writable copy of the llama checkpoint to damage."""
    src, _ = checkpoints["llama"]
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(path, edit):
    f = SafetensorsFile(path / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    edit(tensors)
    write_safetensors(path / "model.safetensors", tensors)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf_checkpoint(tmp_path / "nowhere")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json") as e:
        load_hf_checkpoint(broken)
    assert str(broken) in str(e.value)


def test_missing_safetensors(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors") as e:
        load_hf_checkpoint(broken)
    assert str(broken) in str(e.value)


def test_index_lists_missing_shard(broken):
    keys = list(SafetensorsFile(broken / "model.safetensors").keys())
    weight_map = {k: "model.safetensors" for k in keys}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors") as e:
        load_hf_checkpoint(broken)
    assert "model.norm.weight" in str(e.value)


def test_unsupported_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as e:
        load_hf_checkpoint(broken)
    assert "config.json" in str(e.value) and "LlamaForCausalLM" in str(e.value)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_scaling(broken, key):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg[key] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="yarn") as e:
        load_hf_checkpoint(broken)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize(
    "key, new_shape",
    [
        ("model.layers.1.mlp.gate_proj.weight", (64, 96)),  # transposed: same size, wrong layout
        ("model.layers.0.self_attn.q_proj.weight", (60, 64)),  # does not even reshape into heads
        ("model.embed_tokens.weight", (130, 64)),  # vocabulary of another model
    ],
)
def test_tensor_with_wrong_shape(broken, key, new_shape):
    _rewrite_tensors(broken, lambda t: t.__setitem__(key, np.zeros(new_shape, np.float32)))
    with pytest.raises(CheckpointError) as e:
        load_hf_checkpoint(broken)
    msg = str(e.value)
    assert key in msg and str(new_shape) in msg and "model.safetensors" in msg


def test_missing_tensor(broken):
    key = "model.layers.1.mlp.down_proj.weight"
    _rewrite_tensors(broken, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as e:
        load_hf_checkpoint(broken)
    assert str(broken) in str(e.value)


def test_corrupt_safetensors_header(broken):
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_checkpoint(broken)


def test_untied_config_without_lm_head(broken):
    """A tied checkpoint described as untied must not silently get a random lm_head."""
    _rewrite_tensors(broken, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        load_hf_checkpoint(broken)


# ----- config.json parsing, old and new transformers styles ---------------------------------------------
_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096)
_LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _hf_view(d):
    """How transformers itself reads a config dict: (theta, rope type, factor, original length, tied)."""
    cfg = transformers.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
    rope = cfg.rope_parameters
    original_max = rope.get("original_max_position_embeddings") if rope["rope_type"] == "llama3" else None
    return (rope["rope_theta"], rope["rope_type"], rope.get("factor"), original_max, cfg.tie_word_embeddings)


def _our_view(d):
    c = ModelConfig.from_hf_dict(d)
    if c.rope_scaling is None:
        return (c.rope_theta, "default", None, None, c.tie_word_embeddings)
    s = c.rope_scaling
    original_max = s.original_max_position_embeddings if s.rope_type == "llama3" else None
    return (c.rope_theta, s.rope_type, s.factor, original_max, c.tie_word_embeddings)


@pytest.mark.parametrize(
    "d",
    [
        # transformers 4.x style
        dict(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", **_LLAMA3}, tie_word_embeddings=True, **_BASE),
        dict(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0,
             rope_scaling={"type": "linear", "factor": 2.0}, **_BASE),
        # transformers 5.x style: everything under rope_parameters
        dict(model_type="llama", architectures=["LlamaForCausalLM"],
             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **_LLAMA3}, **_BASE),
        dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True, **_BASE),
        # defaults: no rope keys at all, no tie key (transformers unties), llama3 without original length
        dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], **_BASE),
        dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1000000.0, **_BASE),
        dict(model_type="llama", architectures=["LlamaForCausalLM"],
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
             **_BASE),
    ],
    ids=["v4-llama3", "v4-linear", "v5-llama3", "v5-qwen2", "defaults-qwen2", "v4-qwen3", "llama3-no-orig-len"],
)
def test_config_dict_read_like_transformers(d):
    assert _our_view(d) == _hf_view(d)


def test_config_survives_to_hf_dict_and_transformers():
    for cfg in (llama3_2_1b(), qwen2_5_3b(), tiny_qwen3()):
        d = cfg.to_hf_dict()
        assert ModelConfig.from_hf_dict(d) == cfg
        assert _our_view(d) == _hf_view(d)


def test_bias_on_llama_is_rejected():
    d = dict(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True, **_BASE)
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        ModelConfig.from_hf_dict(d)


def test_tensor_the_config_does_not_use(broken):
    """Weights the model would silently ignore (here a Qwen2-style bias in a Llama file) are an error."""
    key = "model.layers.0.self_attn.q_proj.bias"
    _rewrite_tensors(broken, lambda t: t.__setitem__(key, np.zeros((64,), np.float32)))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_hf_checkpoint(broken)


def test_config_missing_required_key(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["hidden_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match="hidden_size") as e:
        load_hf_checkpoint(broken)
    assert "config.json" in str(e.value)
