"""Hugging Face checkpoint directories <-> NNX parameters.

Loading memory-maps each `.safetensors` file and builds every parameter with
`jax.make_array_from_callback`, so each device receives only its own shard, read straight from the page
cache: no full host copy of the model and no second copy on any device. The target dtype cast happens per
shard. Export writes HF-layout safetensors (sharded with an index when large) plus `config.json`, and
copies the tokenizer files, so `transformers.AutoModelForCausalLM.from_pretrained` loads the result.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from stat_jax import sharding
from stat_jax.errors import ModelNotFoundError
from stat_jax.models.build import abstract_model, as_dtype
from stat_jax.models.config import ModelConfig
from stat_jax.models.dir_check import (  # noqa: F401  (CheckpointError, safetensors_header: re-exported)
    ST_DTYPES, CheckpointError, hf_layout, safetensors_header, weight_files)
from stat_jax.models.transformer import DecoderLM

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)

_ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}


# ----- safetensors (format: u64 header size, JSON header, raw little-endian bytes) ------------------------
class SafetensorsFile:
    """Zero-copy (memory-mapped) access to the tensors of one safetensors file."""

    def __init__(self, path: Path, header: tuple[dict[str, Any], int] | None = None):
        """`header`: (header, data start) as `safetensors_header(path)` read it, checked against the file's size."""
        self.path = path
        self.header, self._data_start = header or safetensors_header(path)
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self):
        return self.header.keys()

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        buf = self._mmap[self._data_start + begin : self._data_start + end]
        return buf.view(ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _ST_NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {arr.dtype} to safetensors")
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    tmp.replace(path)


# ----- the HF <-> NNX key map ------------------------------------------------------------------------------
# A layout relation (dir_check.hf_layout) -> (to_ours(w, hf_shape, cfg), from_ours(w, hf_shape, cfg)).
CONVERSIONS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda w, s, c: w, lambda w, s, c: w),
    "transpose": (lambda w, s, c: w.T, lambda w, s, c: w.T),
    # HF [n*d, e] -> ours [e, n, d]
    "heads_in": (lambda w, s, c: w.T.reshape(c.hidden_size, s[0] // c.head_dim, c.head_dim),
                 lambda w, s, c: w.reshape(c.hidden_size, s[0]).T),
    # HF [e, h*d] -> ours [h, d, e]
    "heads_out": (lambda w, s, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
                  lambda w, s, c: w.reshape(s[1], c.hidden_size).T),
    # HF [n*d] -> ours [n, d]
    "heads_bias": (lambda w, s, c: w.reshape(s[0] // c.head_dim, c.head_dim), lambda w, s, c: w.reshape(s)),
}


def _key_map(cfg: ModelConfig) -> list[tuple[tuple, str, tuple[int, ...], Callable, Callable]]:
    """(our path, HF key, HF shape, to_ours(w), from_ours(w)) for every tensor."""
    return [(path, key, shape, lambda w, s=shape, k=kind: CONVERSIONS[k][0](w, s, cfg),
             lambda w, s=shape, k=kind: CONVERSIONS[k][1](w, s, cfg)) for path, key, shape, kind in hf_layout(cfg)]


def _open_checkpoint(path: Path) -> dict[str, SafetensorsFile]:
    """Maps every tensor name to the (memory-mapped) file holding it; a damaged layout raises its first problem."""
    if not path.is_dir():
        raise ModelNotFoundError(f"checkpoint directory {path} does not exist")
    where, headers, problems = weight_files(path)
    if problems:
        raise problems[0]
    files = {name: SafetensorsFile(path / name, header) for name, header in headers.items()}
    return {key: files[name] for key, name in where.items()}


def _check_no_unexpected_tensors(path: Path, tensors: dict[str, Any], expected: set[str],
                                 other_prefixes: tuple[str, ...] = ()) -> None:
    """Weights the model would ignore mean config.json describes another model (e.g. a missing bias flag)."""
    # A tied checkpoint may still store lm_head.weight; old Llama files store the RoPE table.
    benign = {"lm_head.weight"} | {k for k in tensors if k.endswith("rotary_emb.inv_freq")}
    benign |= {k for k in tensors if other_prefixes and k.startswith(other_prefixes)}  # e.g. a PRM's "score."
    unexpected = sorted(set(tensors) - expected - benign)
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(
            f"{path}: {len(unexpected)} tensor(s) not used by the model config.json describes: {shown}; "
            f"check the config (architecture, tie_word_embeddings, attention_bias)"
        )


def load_hf_checkpoint(
    path: str | Path,
    mesh: Mesh | None = None,
    *,
    dtype="float32",
    param_dtype="float32",
    remat: bool = False,
    attention_block: int | None = None,
    config: ModelConfig | None = None,
    other_prefixes: tuple[str, ...] = (),
) -> DecoderLM:
    """Loads a local HF checkpoint directory into a DecoderLM, each parameter placed on its mesh shard.

    `other_prefixes`: tensors under these names belong to a head loaded separately (e.g. a PRM's "score.").
    """
    path = Path(path)
    cfg = config or ModelConfig.from_hf_dir(path)
    tensors = _open_checkpoint(path)
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_block=attention_block)
    graphdef, abstract_state = nnx.split(abstract)
    target_dtype = np.dtype(as_dtype(param_dtype))
    if mesh is None:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
    shardings = sharding.state_shardings(abstract_state, mesh)
    flat_shardings = dict(nnx.to_flat_state(shardings))
    flat_abstract = dict(nnx.to_flat_state(abstract_state))

    key_map = _key_map(cfg)
    _check_no_unexpected_tensors(path, tensors, {key for _, key, _, _, _ in key_map}, other_prefixes)
    loaded = {}
    for our_path, hf_key, hf_expected, to_ours, _ in key_map:
        if hf_key not in tensors:
            raise CheckpointError(f"{path}: tensor {hf_key!r} is missing (needed for {'/'.join(map(str, our_path))})")
        source = tensors[hf_key]
        hf_array = source.get(hf_key)
        expected = tuple(flat_abstract[our_path].shape)
        try:
            array = to_ours(hf_array)  # a view of the memory map: nothing is read yet
        except ValueError:  # the size does not even fit the head reshape
            array = None
        if array is None or tuple(array.shape) != expected:
            raise CheckpointError(
                f"{source.path}: tensor {hf_key!r} has shape {tuple(hf_array.shape)} but config.json implies "
                f"{hf_expected} (for {'/'.join(map(str, our_path))}); is config.json from another model?"
            )
        named = flat_shardings[our_path].get_value()

        def read_shard(index, array=array):
            return np.ascontiguousarray(array[index]).astype(target_dtype)

        loaded[our_path] = jax.make_array_from_callback(expected, named, read_shard)
    state = abstract_state
    for our_path, var in nnx.to_flat_state(state):
        var.set_value(loaded[our_path]) if hasattr(var, "set_value") else setattr(var, "value", loaded[our_path])
    return nnx.merge(graphdef, state)


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def iter_hf_tensors(model: DecoderLM, dtype="float32") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, HF-layout host array) one tensor at a time; adapted kernels as W + scale·A·B."""
    cfg = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    np_dtype = np.dtype(as_dtype(dtype))
    for our_path, hf_key, _, _, from_ours in _key_map(cfg):
        host = _to_host(flat[our_path].get_value() if our_path in flat else _merged_kernel(model, our_path))
        yield hf_key, np.ascontiguousarray(from_ours(host)).astype(np_dtype)


def _merged_kernel(model: DecoderLM, our_path: tuple) -> jax.Array:
    """The kernel at `our_path` when low-rank adapters sit on it (models/lora.py), merged one tensor at a time."""
    node = model
    for part in our_path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    if not hasattr(node, "merged"):
        raise CheckpointError(f"model has no parameter {'/'.join(map(str, our_path))} to export")
    return node.merged()


def export_hf_checkpoint(
    model: DecoderLM,
    out_dir: str | Path,
    *,
    tokenizer_source: str | Path | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Writes an HF directory (safetensors, config.json, tokenizer files) that transformers loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    is_writer = jax.process_index() == 0
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    weight_map: dict[str, str] = {}
    written: list[str] = []

    def flush():
        if not shards[-1]:
            return
        name = f"model-{len(written) + 1:05d}.safetensors"
        if is_writer:
            write_safetensors(out / name, shards[-1])
        for k in shards[-1]:
            weight_map[k] = name
        written.append(name)
        shards[-1] = {}
        sizes[-1] = 0

    for key, arr in iter_hf_tensors(model, dtype):
        if sizes[-1] and sizes[-1] + arr.nbytes > max_shard_bytes:
            flush()
        shards[-1][key] = arr
        sizes[-1] += arr.nbytes
    flush()

    if is_writer:
        if len(written) == 1:
            (out / written[0]).replace(out / "model.safetensors")
            written = ["model.safetensors"]
            stale_index = out / "model.safetensors.index.json"
            if stale_index.exists():
                stale_index.unlink()
        else:
            total = sum((out / n).stat().st_size for n in written)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _remove_stale_weights(out, keep=set(written))
        (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(torch_dtype=dtype), indent=2))
        if tokenizer_source is not None:
            copy_tokenizer_files(tokenizer_source, out)
    return out


def _remove_stale_weights(out: Path, keep: set[str]) -> None:
    """Deletes weight files of an earlier export into `out`: transformers reads `model.safetensors` before
    an index, so a leftover single file would shadow a new sharded export."""
    for p in out.glob("model*.safetensors"):
        if p.name not in keep and re.fullmatch(r"model(-\d{5}(-of-\d{5})?)?\.safetensors", p.name):
            p.unlink()


def copy_tokenizer_files(source: str | Path, dest: str | Path) -> list[str]:
    source, dest = Path(source), Path(dest)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and (source / name).resolve() != (dest / name).resolve():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied
