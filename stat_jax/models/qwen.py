"""Qwen2 / Qwen2.5 family (q/k/v bias, rope_theta 1e6, tied embeddings for the small sizes) and Qwen3
(q/k RMSNorm, no bias). The architecture lives in `transformer.py`; this module holds released shapes.
"""

from stat_jax.models.config import ModelConfig


def qwen2_5_0_5b() -> ModelConfig:
    return ModelConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
        bos_token_id=151643, eos_token_ids=(151643,),
    )


def qwen2_5_3b() -> ModelConfig:
    return ModelConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
        num_heads=16, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
        bos_token_id=151643, eos_token_ids=(151643,),
    )


def tiny_qwen2(**overrides) -> ModelConfig:
    fields = dict(
        architecture="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=512, tie_word_embeddings=True, attention_bias=True, bos_token_id=1,
        eos_token_ids=(2,), pad_token_id=0,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_qwen3(**overrides) -> ModelConfig:
    fields = dict(
        architecture="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=512, tie_word_embeddings=True, attention_bias=False, qk_norm=True,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    )
    fields.update(overrides)
    return ModelConfig(**fields)
