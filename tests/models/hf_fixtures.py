"""Tiny random Hugging Face checkpoints built with transformers + torch, written to a temp dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

VARIANTS = {
    "llama": dict(cls="LlamaConfig", tie_word_embeddings=False, rope_theta=10000.0),
    "llama_tied": dict(cls="LlamaConfig", tie_word_embeddings=True, rope_theta=500000.0),
    "llama_rope_llama3": dict(
        cls="LlamaConfig", tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    "qwen2": dict(cls="Qwen2Config", tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2_untied": dict(cls="Qwen2Config", tie_word_embeddings=False, rope_theta=1000000.0),
    "qwen3": dict(cls="Qwen3Config", tie_word_embeddings=True, rope_theta=1000000.0, head_dim=32),
}


def make_hf_model(variant: str, seed: int = 0):
    spec = dict(VARIANTS[variant])
    cls = getattr(transformers, spec.pop("cls"))
    torch.manual_seed(seed)
    cfg = cls(**TINY, **spec)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Non-trivial norms and biases so a swapped or missing tensor cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def save_hf_model(variant: str, path: Path, seed: int = 0):
    model = make_hf_model(variant, seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def padded_batch(kind: str, lengths=(11, 7, 4), total=12, vocab=128, seed=0):
    """tokens, attention_mask, positions for a left- or right-padded batch."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    tokens = np.zeros((b, total), np.int32)
    mask = np.zeros((b, total), np.int32)
    for i, n in enumerate(lengths):
        row = rng.integers(3, vocab, size=n)
        if kind == "left":
            tokens[i, total - n:] = row
            mask[i, total - n:] = 1
        else:
            tokens[i, :n] = row
            mask[i, :n] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


def hf_logits(model, tokens, mask, positions) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def save_variants(root: Path, variants=tuple(VARIANTS), seed: int = 0) -> dict[str, tuple[Path, object]]:
    """Writes each variant to root/<variant>; returns variant -> (checkpoint dir, torch model)."""
    out = {}
    for variant in variants:
        path = Path(root) / variant
        out[variant] = (path, save_hf_model(variant, path, seed))
    return out


def max_abs_diff_valid(a, b, mask) -> float:
    """Largest |a - b| over the positions where mask is 1 (padding positions are ignored)."""
    valid = np.asarray(mask).astype(bool)
    return float(np.max(np.abs(np.asarray(a, np.float32)[valid] - np.asarray(b, np.float32)[valid])))
