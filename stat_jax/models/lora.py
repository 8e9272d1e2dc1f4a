"""Low-rank adapters (LoRA) on the decoder's projections, and their export (merged HF directory, PEFT files).

`add_adapters(model, LoraConfig(rank=16, alpha=32, dropout=0.05, targets=("q", "v")))` replaces each targeted
projection kernel W (an `nnx.Param`) by a `LoraKernel` holding W unchanged plus A [in..., rank] and
B [rank, out...] as `LoraParam`s, so that the projection computes x·W + (alpha/rank)·dropout(x)·A·B
(`layers.project` dispatches to it). B starts at zero: at initialisation the adapted model's logits are the
base's. `nnx.split(model, LoraParam, ...)` separates the trainable adapters from the frozen base.

Adapter axes are logical (the kernel's own input/output axes plus `lora_rank`), so `sharding.state_shardings`
places them through the same table as the base. The names of the targets are the model's projections:
q, k, v, o (attention) and gate, up, down (MLP).

`base_quant` ("int8", "int4", "nf4"; models/quant.py) stores every projection kernel of the frozen base
quantized, targeted or not (QLoRA), and dequantizes it at the compute dtype inside each projection; the
embeddings, head and norms stay as they are. Merging (the HF export, GRPO's rollout weights) dequantizes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import string
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stat_jax.errors import ConfigError, ModelError
from stat_jax.models import quant
from stat_jax.models.layers import matmul

# target name -> (module attribute of a DecoderLayer, kernel attribute, HF submodule, number of input axes of
# the kernel: q/k/v are [embed, heads, head_dim] (1 input axis), o is [heads, head_dim, embed] (2)).
TARGETS: dict[str, tuple[str, str, str, int]] = {
    "q": ("attention", "q_proj", "self_attn", 1),
    "k": ("attention", "k_proj", "self_attn", 1),
    "v": ("attention", "v_proj", "self_attn", 1),
    "o": ("attention", "o_proj", "self_attn", 2),
    "gate": ("mlp", "gate_proj", "mlp", 1),
    "up": ("mlp", "up_proj", "mlp", 1),
    "down": ("mlp", "down_proj", "mlp", 1),
}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class AdapterBaseMismatchError(ModelError, ValueError):
    """Adapters (a checkpoint or export) were trained on another base model than the one given."""

    hint = ("point model.path at the base the adapters were trained on, or start a new run in another workdir "
            "(adapters do not transfer between bases)")


class LoraParam(nnx.Param):
    """A trainable adapter matrix; everything else in an adapted model is the frozen base."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0 = no adapters (full fine-tuning)
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)
    base_quant: str = "none"  # the frozen base's projection kernels: none, int8, int4 or nf4 (models/quant.py)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, section: Any) -> LoraConfig:
        """From `train.lora` (rank, alpha, dropout, targets as a tuple or a "q,k,v" string); None = off."""
        if section is None:
            return cls()
        get = section.get if isinstance(section, Mapping) else lambda k, d: getattr(section, k, d)
        targets = get("targets", tuple(TARGETS))
        if isinstance(targets, str):
            targets = [t for t in targets.replace(" ", "").split(",") if t]
        # Also accept the HF spellings (q_proj, gate_proj) that PEFT configs use.
        targets = tuple(t[:-len("_proj")] if str(t).endswith("_proj") else str(t) for t in targets)
        out = cls(rank=int(get("rank", 0)), alpha=float(get("alpha", 32.0)), dropout=float(get("dropout", 0.0)),
                  targets=targets, base_quant=str(get("base_quant", "none")).lower())
        out.validate()
        return out

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"train.lora.rank={self.rank} must be >= 0 (0 = full fine-tuning)")
        quant.check_base_quant(self.base_quant)
        if self.base_quant != "none" and not self.enabled:
            raise ConfigError(f"train.lora.base_quant={self.base_quant!r} freezes a quantized base, which only "
                              "adapters can train: set train.lora.rank > 0 (e.g. 16), or base_quant='none'")
        if not self.enabled:
            return
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"train.lora.targets={','.join(self.targets)!r}: unknown {unknown or 'empty list'}; "
                              f"choose from {','.join(TARGETS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"train.lora.dropout={self.dropout} must be in [0, 1)")
        if self.alpha <= 0:
            raise ConfigError(f"train.lora.alpha={self.alpha} must be positive")


# The dropout key of the current forward pass (set by `dropout_key` around a training forward); None = no dropout.
_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
    """Adapters apply their dropout inside this context (one mask per adapter, drawn from `key`)."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def _free_letter(equation: str) -> str:
    return next(c for c in string.ascii_lowercase if c not in equation)


class LoraKernel(nnx.Module):
    """A frozen projection kernel W plus adapters A [in..., r], B [r, out...]: x·W + scale·dropout(x)·A·B."""

    def __init__(self, kernel: nnx.Param, n_in: int, lcfg: LoraConfig, index: int, *, rngs: nnx.Rngs):
        shape, axes = tuple(kernel.shape), tuple(kernel.get_metadata()["logical_axes"])
        dtype = kernel.get_value().dtype
        fan_in = int(np.prod(shape[:n_in]))
        # W itself, or its quantized values and scales (lcfg.base_quant); adapters stay in W's dtype either way.
        self.kernel = kernel if lcfg.base_quant == "none" else quant.QuantizedKernel(kernel, n_in, lcfg.base_quant)
        self.n_in = n_in
        self.scale = lcfg.scale
        self.rate = lcfg.dropout
        self.index = index  # distinct per adapter, so each draws its own dropout mask from one key
        # PEFT's default: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0.
        bound = 1.0 / np.sqrt(fan_in)
        self.lora_a = LoraParam(
            jax.random.uniform(rngs.params(), shape[:n_in] + (lcfg.rank,), dtype, -bound, bound),
            logical_axes=axes[:n_in] + ("lora_rank",))
        self.lora_b = LoraParam(jnp.zeros((lcfg.rank,) + shape[n_in:], dtype),
                                logical_axes=("lora_rank",) + axes[n_in:])

    def project(self, equation: str, x: jax.Array) -> jax.Array:
        inputs, out = equation.split("->")
        xs, ws = inputs.split(",")
        w_in, w_out = ws[:self.n_in], ws[self.n_in:]
        rest = "".join(c for c in xs if c not in w_in)
        r = _free_letter(equation)
        y = matmul(equation, x, self.frozen_weight(x.dtype))
        key = _DROPOUT_KEY.get()
        if key is not None and self.rate > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.index), 1.0 - self.rate, x.shape)
            x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
        low = matmul(f"{xs},{w_in}{r}->{rest}{r}", x, self.lora_a[...])
        delta = matmul(f"{rest}{r},{r}{w_out}->{out}", low, self.lora_b[...])
        return y + (self.scale * delta).astype(y.dtype)

    def frozen_weight(self, dtype=None) -> jax.Array:
        """W (dequantized from a quantized base) in `dtype`, default W's own."""
        if isinstance(self.kernel, quant.QuantizedKernel):
            return self.kernel.weight(dtype)
        w = self.kernel[...]
        return w if dtype is None else w.astype(dtype)

    def merged(self) -> jax.Array:
        """W + scale·A·B in W's dtype (computed in float32)."""
        return merged_kernel(self.frozen_weight(), self.lora_a[...], self.lora_b[...], self.scale)


def merged_kernel(w: jax.Array | Mapping, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale·A·B in W's dtype (computed in float32); A [in..., r], B [r, out...]; W may be a quantized
    kernel's pure dict {"qvalue", "scale"}."""
    if quant.is_quantized(w):
        w = quant.dequantize(w["qvalue"], w["scale"])
    delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merged_params(adapters: Mapping, frozen: Mapping, scale: float) -> dict:
    """Pure dicts of an adapted model (adapters, frozen base) -> the plain model's params, W + scale·A·B.

    Jittable: what the rollout engine serves in GRPO with adapters, one compiled merge per run.
    """

    def walk(a, f):
        if not isinstance(f, Mapping):
            return f
        if quant.is_quantized(f):  # a projection of a quantized base without adapters
            return quant.dequantize(f["qvalue"], f["scale"])
        if set(f) == {"kernel"} and isinstance(a, Mapping) and "lora_a" in a:  # a LoraKernel's frozen W
            return merged_kernel(f["kernel"], a["lora_a"], a["lora_b"], scale)
        return {k: walk(a.get(k) if isinstance(a, Mapping) else None, v) for k, v in f.items()}

    return walk(adapters, frozen)


def _targeted(model) -> Iterator[tuple[int, str, nnx.Module, str]]:
    """(layer index, target name, module, kernel attribute) of every targeted projection of a DecoderLM."""
    for i, layer in enumerate(model.layers):
        for name, (module_attr, kernel_attr, _, _) in TARGETS.items():
            yield i, name, getattr(layer, module_attr), kernel_attr


def add_adapters(model, lcfg: LoraConfig, *, seed: int = 0):
    """Puts adapters on `lcfg.targets` of every layer of `model` (in place); returns the model.

    With `lcfg.base_quant`, every projection kernel (targeted or not) is replaced by its quantized form.
    The adapters are created on the default device; the trainer then places them on the mesh (sft.py).
    """
    lcfg.validate()
    if not lcfg.enabled:
        return model
    rngs = nnx.Rngs(seed)
    for index, (i, name, module, attr) in enumerate(_targeted(model)):
        kernel = getattr(module, attr)
        if isinstance(kernel, LoraKernel | quant.QuantizedKernel):
            raise ValueError(f"layers/{i}/{attr} already has adapters or a quantized kernel")
        if name in lcfg.targets:
            setattr(module, attr, LoraKernel(kernel, TARGETS[name][3], lcfg, index, rngs=rngs))
        elif lcfg.base_quant != "none":
            setattr(module, attr, quant.QuantizedKernel(kernel, TARGETS[name][3], lcfg.base_quant))
    return model


def has_adapters(model) -> bool:
    return any(isinstance(getattr(m, a), LoraKernel) for _, _, m, a in _targeted(model))


def split_adapters(model) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, adapter state, frozen base state) of an adapted model."""
    return nnx.split(model, LoraParam, ...)


def adapter_shapes(model_cfg, lcfg: LoraConfig, *, dtype="float32", param_dtype="float32", remat=False,
                   attention_block: int | None = None):
    """(graphdef, abstract adapter state, abstract base state) without allocating anything."""
    from stat_jax.models.build import as_dtype
    from stat_jax.models.transformer import DecoderLM

    def make():
        return add_adapters(DecoderLM(model_cfg, dtype=as_dtype(dtype), param_dtype=as_dtype(param_dtype),
                                      remat=remat, attention_block=attention_block, rngs=nnx.Rngs(0)), lcfg)

    return split_adapters(nnx.eval_shape(make))


def merge_adapters(model):
    """Folds every adapter into its kernel (W + scale·A·B) and dequantizes a quantized base's kernels, in
    place; returns the now plain DecoderLM."""
    for _, _, module, attr in _targeted(model):
        kernel = getattr(module, attr)
        frozen = kernel.kernel if isinstance(kernel, LoraKernel) else kernel
        if isinstance(frozen, quant.QuantizedKernel):
            frozen = frozen.qvalue
        if isinstance(kernel, LoraKernel | quant.QuantizedKernel):
            meta = {k: v for k, v in frozen.get_metadata().items() if k == "logical_axes"}
            setattr(module, attr, nnx.Param(kernel.merged(), **meta))
    return model


def base_fingerprint(model_dir: str | Path) -> str:
    """sha256 of a base checkpoint directory's config.json and weight files: the identity adapters belong to."""
    model_dir = Path(model_dir)
    files = [model_dir / "config.json"] + sorted(model_dir.glob("*.safetensors"))
    missing = [str(p) for p in files if not p.is_file()]
    if missing or len(files) == 1:
        raise ModelError(f"{model_dir}: cannot fingerprint the base model (missing {missing or '*.safetensors'})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def check_base(expected: str | None, actual: str, where: str) -> None:
    """Raises AdapterBaseMismatchError when adapters recorded for base `expected` meet base `actual`."""
    if expected is not None and expected != actual:
        raise AdapterBaseMismatchError(
            f"{where}: these adapters were trained on a base model with fingerprint {expected[:16]}..., but "
            f"model.path has fingerprint {actual[:16]}... (another checkpoint)")


# ----- PEFT format -------------------------------------------------------------------------------------------
def _peft_tensors(model, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT tensor name, HF-layout array): lora_A.weight [r, in_features], lora_B.weight [out_features, r]."""
    from stat_jax.models.checkpoint import _to_host

    for i, name, module, attr in _targeted(model):
        kernel = getattr(module, attr)
        if not isinstance(kernel, LoraKernel):
            continue
        prefix = f"base_model.model.model.layers.{i}.{TARGETS[name][2]}.{attr}"
        a, b = _to_host(kernel.lora_a.get_value()), _to_host(kernel.lora_b.get_value())
        rank = a.shape[-1]
        # Flattening [h, d] (and [e] -> [e]) row-major matches the HF kernel layouts of models/checkpoint.py.
        yield prefix + ".lora_A.weight", np.ascontiguousarray(a.reshape(-1, rank).T).astype(dtype)
        yield prefix + ".lora_B.weight", np.ascontiguousarray(b.reshape(rank, -1).T).astype(dtype)


def export_peft_adapter(model, out_dir: str | Path, lcfg: LoraConfig, *, base_model_name_or_path: str = "",
                        base_hash: str | None = None, dtype: str = "float32") -> Path:
    """Writes `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads."""
    from stat_jax.models.build import as_dtype
    from stat_jax.models.checkpoint import write_safetensors

    if not has_adapters(model):
        raise ValueError("export_peft_adapter: the model has no adapters (train.lora.rank is 0?)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = dict(_peft_tensors(model, np.dtype(as_dtype(dtype))))
    if jax.process_index() != 0:
        return out
    metadata = {"format": "pt"} | ({"base_fingerprint": base_hash} if base_hash else {})
    write_safetensors(out / ADAPTER_WEIGHTS, tensors, metadata)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model_name_or_path),
        "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout,
        "target_modules": sorted(TARGETS[t][1] for t in lcfg.targets), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def adapter_param_count(state: nnx.State | Iterable) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))
