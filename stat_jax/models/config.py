"""Model configuration: a frozen dataclass built from (and written back to) a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from stat_jax.errors import ModelConfigKeyError, ModelError, ModelFileError, ModelNotFoundError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_HF_ARCH_NAME = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_HF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class UnsupportedModelError(ModelError, ValueError):
    """The checkpoint's config describes a model stat-jax does not implement."""

    hint = "stat-jax implements Llama-3.x and Qwen2/2.5/3 decoders; convert or pick one of those"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` is 'llama3' or 'linear'."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM of the Llama/Qwen family."""

    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.architecture not in _HF_ARCH_NAME:
            raise UnsupportedModelError(f"architecture {self.architecture!r} is not one of {sorted(_HF_ARCH_NAME)}")
        # Mirrors transformers: Qwen2 always has q/k/v bias; a Llama/Qwen3 bias would also sit on o_proj.
        if self.attention_bias != (self.architecture == "qwen2"):
            raise UnsupportedModelError(
                f"attention_bias={self.attention_bias} is not implemented for {self.architecture} "
                f"(only qwen2 has q/k/v bias, and it always does)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def num_params(self) -> int:
        e, m, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = e * q + 2 * e * kv + q * e + (q + 2 * kv if self.attention_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        layer = attn + 3 * e * m + 2 * e
        return v * e * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + e

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), with causal attention halved."""
        non_embed = self.num_params - self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        matmul_params = non_embed + self.vocab_size * self.hidden_size  # lm_head is a matmul, the lookup is not
        attn = 2 * self.num_layers * self.num_heads * self.head_dim * seq_len  # QK^T + AV, causal half
        return 3 * (2 * matmul_params + attn)

    # ----- Hugging Face interop -------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        arch = None
        for a in archs:
            if a in SUPPORTED_ARCHITECTURES:
                arch = SUPPORTED_ARCHITECTURES[a]
        if arch is None and model_type in _HF_MODEL_TYPE.values() and not archs:
            arch = model_type
        if arch is None:
            raise UnsupportedModelError(
                f"{source}: architectures={archs} model_type={model_type!r} is not supported; "
                f"stat-jax implements {sorted(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key):
            if key not in d:
                raise ModelConfigKeyError(f"{source}: required key {key!r} is missing")
            return d[key]

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act={act!r}; only 'silu' is implemented")
        if d.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: mlp_bias=true is not implemented")
        if arch != "qwen2" and d.get("attention_bias"):  # transformers then also puts a bias on o_proj
            raise UnsupportedModelError(f"{source}: attention_bias=true is not implemented for {arch}")
        if arch in ("qwen2", "qwen3") and d.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: use_sliding_window=true is not implemented")

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = d.get("head_dim") or hidden // num_heads
        # transformers >= 5 writes `rope_parameters` (theta included); older files have `rope_theta` and
        # `rope_scaling`. Same precedence as transformers: rope_scaling, then rope_parameters, then rope_theta.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta") or d.get("rope_theta") or 10000.0)
        max_positions = int(d.get("max_position_embeddings", 2048))
        rope_scaling = _parse_rope_scaling(rope, source, default_original_max=max_positions)

        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        # Qwen2 always has q/k/v bias (transformers ignores `attention_bias` for it); Llama/Qwen3 read the key.
        attention_bias = True if arch == "qwen2" else bool(d.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            # transformers' default is untied for all three families; tied checkpoints say so explicitly.
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=arch == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelNotFoundError(f"{cfg_file}: no config.json in checkpoint directory {path}")
        try:
            d = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{cfg_file}: not valid JSON ({e})") from e
        cfg = cls.from_hf_dict(d, source=str(cfg_file))
        # generation_config.json is what transformers.generate stops on, and it may list ids config.json lacks
        # (Qwen2.5-Instruct: config.json 151645, generation_config.json [151645, 151643]); the model's EOS ids are
        # both files' (config.json's first). Export writes the union back into config.json.
        extra = generation_eos_ids(path)
        if extra:
            cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + extra)))
        return cfg

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [_HF_ARCH_NAME[self.architecture]],
            "model_type": _HF_MODEL_TYPE[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else _rope_scaling_to_dict(self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                None if not self.eos_token_ids else
                self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
            ),
            "pad_token_id": self.pad_token_id,
        }
        if self.architecture == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=False, attention_dropout=0.0)
        else:
            d.update(use_sliding_window=False, attention_dropout=0.0)
            if self.architecture == "qwen3":
                d.update(attention_bias=self.attention_bias)
        return d


def generation_eos_ids(path: str | Path) -> tuple[int, ...]:
    """`eos_token_id` of `<path>/generation_config.json` (an int or a list), () when the file or key is absent."""
    gen_file = Path(path) / "generation_config.json"
    if not gen_file.is_file():
        return ()
    try:
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{gen_file}: not a JSON object ({e}); fix or delete it") from e
    if eos is None:
        return ()
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{gen_file}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return tuple(int(i) for i in ids)


def _parse_rope_scaling(scaling: dict[str, Any], source: str, default_original_max: int) -> RopeScaling | None:
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "llama3":
        return RopeScaling(
            rope_type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings") or default_original_max),
        )
    if rope_type == "linear":
        return RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
    raise UnsupportedModelError(
        f"{source}: rope_scaling type {rope_type!r} is not implemented (supported: default, linear, llama3)"
    )


def _rope_scaling_to_dict(s: RopeScaling) -> dict[str, Any]:
    if s.rope_type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return {
        "rope_type": "llama3",
        "factor": s.factor,
        "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings,
    }
