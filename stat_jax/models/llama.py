"""Llama-3.x family: GQA, RMSNorm, SwiGLU, llama3 RoPE scaling; 3.2-1B/3B tie their embeddings.

The architecture lives in `transformer.py` (shared with Qwen); this module holds the released shapes, so a
random model of a real size can be built without downloading anything (benchmarks, sharding dry runs).
"""

from stat_jax.models.config import ModelConfig, RopeScaling

_LLAMA3_ROPE = RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)


def llama3_2_1b() -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    )


def llama3_2_3b() -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28,
        num_heads=24, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    )


def tiny_llama(**overrides) -> ModelConfig:
    """A few-thousand-parameter Llama for tests."""
    fields = dict(
        architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
        pad_token_id=0,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def save_char_llama(out_dir, *, hidden_size: int, num_layers: int, num_heads: int, max_seq_len: int,
                    seed: int = 0) -> dict:
    """A randomly initialised small Llama with the character tokenizer, saved as an HF checkpoint directory (the
    demo's student before pre-training); returns its parameter count and vocabulary size."""
    from pathlib import Path

    from stat_jax.data.char_tokenizer import save_char_tokenizer
    from stat_jax.models import export_hf_checkpoint, init_model, param_count

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(out_dir)
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                     num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_heads,
                     head_dim=hidden_size // num_heads, max_position_embeddings=2 * max_seq_len,
                     bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    model = init_model(cfg, seed=seed)
    export_hf_checkpoint(model, out_dir, tokenizer_source=out_dir)
    return {"params": param_count(model), "vocab": len(tok)}
