"""Checks of a Hugging Face model directory that read files only: every problem at once, before any weight loads.

`model_dir_problems(path, ...)` returns one `StatJaxError` per problem found in
- config.json: valid JSON, a supported architecture, and consistent sizes (heads, KV heads, head dim, token ids
  inside the vocabulary), then transformers' own validation of it (which the tokenizer loader runs too);
- the weights: each safetensors header against its file's size (a truncated copy, a corrupt header), the shard
  index against the files, and every tensor's name, shape and dtype against what config.json implies
  (vocabulary against the embeddings, tied embeddings against `lm_head.weight`);
- the tokenizer: its files parse, it loads, its vocabulary fits the model's, and it has a chat template when the
  command renders chat prompts.
Model problems are `ModelError`s (exit status 5), tokenizer problems `TokenizerError`s (6).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from stat_jax.errors import ModelError, ModelFileError, ModelNotFoundError, StatJaxError, TokenizerError

INDEX_FILE = "model.safetensors.index.json"
# A tokenizer directory holds one of these (fast tokenizers: tokenizer.json; sentencepiece: tokenizer.model;
# BPE: vocab.json + merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "chat_template.json")
# safetensors dtype -> numpy dtype
ST_DTYPES: dict[str, Any] = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                             "BOOL": np.bool_}
DTYPE_BYTES = {k: np.dtype(v).itemsize for k, v in ST_DTYPES.items()}
WEIGHT_DTYPES = ("F32", "F16", "BF16")  # what a model's weights may be stored as (cast on load)
RE_EXPORT = "re-copy or re-export the checkpoint (the file is damaged or was cut short)"


class CheckpointError(ModelError, ValueError):
    """A checkpoint directory or tensor does not match what the model expects."""


class CorruptWeightsError(CheckpointError):
    """A safetensors file or shard index is damaged: cut short, corrupt header, offsets outside the file."""

    hint = RE_EXPORT


class WeightMismatchError(CheckpointError):
    """A tensor's name, shape or dtype does not match what config.json describes."""

    hint = "config.json and the weights come from different models: use the checkpoint's own config.json"


class ModelConfigError(ModelError, ValueError):
    """config.json is inconsistent (sizes that do not fit together, ids outside the vocabulary)."""

    hint = "fix config.json (it must describe the checkpoint's weights), or use the checkpoint's original one"


# ----- safetensors files ----------------------------------------------------------------------------------
def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensor name -> {dtype, shape, data_offsets}, data start) of a safetensors file, checked against its size.

    Raises CorruptWeightsError naming the file and what is wrong (too short, header cut off or not JSON, a
    tensor whose bytes lie past the end of the file, offsets that do not match shape and dtype).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptWeightsError(f"{path}: {size} bytes, too short to be a safetensors file (cut short?)")
        (header_size,) = struct.unpack("<Q", raw)
        if 8 + header_size > size:
            raise CorruptWeightsError(f"{path}: its header claims {header_size} bytes but the file has {size} "
                                      "(cut short, or not a safetensors file)")
        try:
            header = json.loads(f.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptWeightsError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CorruptWeightsError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_size
    _check_offsets(path, header, size - data_start)
    return header, data_start


def _check_offsets(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptWeightsError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from e
        if dtype not in DTYPE_BYTES:
            raise CorruptWeightsError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CorruptWeightsError(f"{path}: tensor {name!r} has an invalid shape {shape}")
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or end - begin != need:
            raise CorruptWeightsError(f"{path}: tensor {name!r} ({dtype} {shape}) needs {need} bytes but its "
                                      f"offsets are {[begin, end]}")
        if end > data_bytes:
            raise CorruptWeightsError(f"{path}: tensor {name!r} ends at byte {end} of the data but the file holds "
                                      f"{data_bytes} (cut short)")


Headers = dict[str, tuple[dict[str, Any], int]]  # file name -> (its safetensors header, its data start)


def weight_files(path: Path) -> tuple[dict[str, str], Headers, list[StatJaxError]]:
    """(tensor name -> file name, each readable file's header, problems), from the shard index, else from every
    *.safetensors file's header. The one reading of a checkpoint's layout: the preflight and the loader use it."""
    index = path / INDEX_FILE
    if index.is_file():
        return _indexed_weights(path, index)
    names = ["model.safetensors"] if (path / "model.safetensors").is_file() else sorted(
        p.name for p in path.glob("*.safetensors"))
    if not names:
        found = sorted(p.name for p in path.glob("*.bin"))[:3]
        return {}, {}, [ModelNotFoundError(
            f"{path}: no *.safetensors weights (no model.safetensors, and no {INDEX_FILE})"
            + (f"; found {found}: PyTorch .bin is not read" if found else ""),
            hint="save the model with transformers' save_pretrained(safe_serialization=True), or "
                 "`stat-jax import-gguf FILE DIR` for a GGUF file")]
    headers, problems = _read_headers(path, names)
    return {k: name for name, (header, _) in headers.items() for k in header}, headers, problems


def _read_headers(path: Path, names: Sequence[str]) -> tuple[Headers, list[StatJaxError]]:
    """The headers of the files that read, and one problem per file that does not."""
    headers: Headers = {}
    problems: list[StatJaxError] = []
    for name in names:
        try:
            headers[name] = safetensors_header(path / name)
        except CorruptWeightsError as e:
            problems.append(e)
    return headers, problems


def _missing_shard(path: Path, index: Path, fname: str, weight_map: dict[str, str]) -> ModelNotFoundError:
    listed = [k for k, f in weight_map.items() if f == fname]
    return ModelNotFoundError(f"{path}/{fname}: missing, and {index.name} lists {len(listed)} tensors in it "
                              f"(first: {listed[0]!r})", hint="finish the download (or re-export)")


def _indexed_weights(path: Path, index: Path) -> tuple[dict[str, str], Headers, list[StatJaxError]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return {}, {}, [CorruptWeightsError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})")]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (path / f).is_file()]
    problems: list[StatJaxError] = [_missing_shard(path, index, f, weight_map) for f in missing]
    headers, unreadable = _read_headers(path, [f for f in files if f not in missing])
    problems += unreadable
    absent = [k for k, f in weight_map.items() if f in headers and k not in headers[f][0]]
    if absent:
        problems.append(CorruptWeightsError(f"{index}: {len(absent)} tensors it lists are not in their file "
                                            f"(first: {absent[0]!r} in {weight_map[absent[0]]})"))
    return {k: f for k, f in weight_map.items() if f in headers and k in headers[f][0]}, headers, problems


# ----- what config.json implies ----------------------------------------------------------------------------
def hf_layout(cfg) -> list[tuple[tuple, str, tuple[int, ...], str]]:
    """(our parameter path, HF tensor name, HF shape, how the two layouts relate) for every tensor of the decoder
    a ModelConfig describes; the relations are `stat_jax.models.checkpoint.CONVERSIONS`."""
    h, kv, d, e, m, v = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size,
                         cfg.vocab_size)
    out = [(("embed",), "model.embed_tokens.weight", (v, e), "same"),
           (("final_norm", "weight"), "model.norm.weight", (e,), "same")]
    if not cfg.tie_word_embeddings:
        out.append((("lm_head",), "lm_head.weight", (v, e), "transpose"))
    for i in range(cfg.num_layers):
        p, L = f"model.layers.{i}.", ("layers", i)
        out += [(L + ("input_norm", "weight"), p + "input_layernorm.weight", (e,), "same"),
                (L + ("post_attention_norm", "weight"), p + "post_attention_layernorm.weight", (e,), "same"),
                (L + ("attention", "q_proj"), p + "self_attn.q_proj.weight", (h * d, e), "heads_in"),
                (L + ("attention", "k_proj"), p + "self_attn.k_proj.weight", (kv * d, e), "heads_in"),
                (L + ("attention", "v_proj"), p + "self_attn.v_proj.weight", (kv * d, e), "heads_in"),
                (L + ("attention", "o_proj"), p + "self_attn.o_proj.weight", (e, h * d), "heads_out"),
                (L + ("mlp", "gate_proj"), p + "mlp.gate_proj.weight", (m, e), "transpose"),
                (L + ("mlp", "up_proj"), p + "mlp.up_proj.weight", (m, e), "transpose"),
                (L + ("mlp", "down_proj"), p + "mlp.down_proj.weight", (e, m), "transpose")]
        if cfg.attention_bias:
            out += [(L + ("attention", f"{x}_bias"), p + f"self_attn.{x}_proj.bias", (n * d,), "heads_bias")
                    for x, n in (("q", h), ("k", kv), ("v", kv))]
        if cfg.qk_norm:
            out += [(L + ("attention", f"{x}_norm", "weight"), p + f"self_attn.{x}_norm.weight", (d,), "same")
                    for x in ("q", "k")]
    return out


def expected_hf_tensors(cfg) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the decoder a ModelConfig describes."""
    return {key: shape for _, key, shape, _ in hf_layout(cfg)}


def _config_dict(path: Path) -> tuple[dict[str, Any] | None, list[StatJaxError]]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None, [ModelNotFoundError(f"{cfg_file}: no config.json in checkpoint directory {path}")]
    try:
        d = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, [ModelFileError(f"{cfg_file}: not valid JSON ({e})")]
    if not isinstance(d, dict):
        return None, [ModelFileError(f"{cfg_file}: not a JSON object")]
    return d, []


_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")


def config_consistency_problems(d: dict[str, Any], source: str) -> list[StatJaxError]:
    """Sizes that are not positive integers or do not fit together, token ids outside the vocabulary."""
    bad = [k for k in _SIZE_KEYS if k in d and d[k] is not None
           and (not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] <= 0)]
    if bad:
        return [ModelConfigError(f"{source}: {', '.join(f'{k}={d[k]!r}' for k in bad)} must be positive integers")]
    problems: list[StatJaxError] = []
    heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
    kv, head_dim = d.get("num_key_value_heads") or heads, d.get("head_dim")
    if heads and hidden and hidden % heads:
        problems.append(ModelConfigError(f"{source}: hidden_size={hidden} is not a multiple of "
                                         f"num_attention_heads={heads}"))
    if heads and kv and heads % kv:
        problems.append(ModelConfigError(f"{source}: num_attention_heads={heads} is not a multiple of "
                                         f"num_key_value_heads={kv} (each KV head serves a whole group)"))
    dim = head_dim or (hidden // heads if heads and hidden else None)
    if dim and dim % 2:
        problems.append(ModelConfigError(f"{source}: head_dim={dim} is odd; rotary embeddings need an even one"))
    vocab = d.get("vocab_size")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = d.get(key)
        ids = ids if isinstance(ids, list) else [] if ids is None else [ids]
        outside = [i for i in ids if not isinstance(i, int) or (vocab and not 0 <= i < vocab)]
        if outside:
            problems.append(ModelConfigError(f"{source}: {key}={d.get(key)!r} is outside the vocabulary "
                                             f"(vocab_size={vocab})"))
    return problems


def _model_config(path: Path) -> tuple[Any, list[StatJaxError]]:
    """(ModelConfig or None, problems) of config.json: ours, then transformers' own validation."""
    from stat_jax.models.config import ModelConfig

    d, problems = _config_dict(path)
    if d is None:
        return None, problems
    source = str(path / "config.json")
    problems = config_consistency_problems(d, source)
    if problems:
        return None, problems
    try:
        cfg = ModelConfig.from_hf_dir(path)
    except StatJaxError as e:
        return None, [e]
    except (KeyError, ValueError, TypeError) as e:  # config.json of an unexpected shape
        return None, [ModelFileError(f"{source}: {e}")]
    return cfg, _transformers_config_problems(path, source)


def _transformers_config_problems(path: Path, source: str) -> list[StatJaxError]:
    """transformers validates config.json strictly (types, ranges); the tokenizer loader reads it too."""
    import transformers

    try:
        transformers.AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001  (any rejection is reported as one line)
        return [ModelConfigError(f"{source}: transformers rejects it: {type(e).__name__}: {e}")]
    return []


def _tensor_problems(path: Path, cfg, where: dict[str, str], file_headers: Headers) -> list[StatJaxError]:
    """Every tensor the model needs, present with the shape and a float dtype config.json implies."""
    expected = expected_hf_tensors(cfg)
    headers = {name: header for name, (header, _) in file_headers.items()}
    problems: list[StatJaxError] = []
    embed = headers.get(where.get("model.embed_tokens.weight", ""), {}).get("model.embed_tokens.weight")
    if embed and list(embed["shape"]) != list(expected["model.embed_tokens.weight"]):
        problems.append(WeightMismatchError(
            f"{path}: model.embed_tokens.weight is {embed['shape']} but config.json says vocab_size="
            f"{cfg.vocab_size}, hidden_size={cfg.hidden_size}"))
    missing = [k for k in expected if k not in where]
    if "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
        problems.append(WeightMismatchError(
            f"{path}: config.json says tie_word_embeddings=false but the weights have no lm_head.weight",
            hint="set tie_word_embeddings=true in config.json if the model shares its embeddings with the output "
                 "layer; else the checkpoint is incomplete"))
    if missing:
        problems.append(WeightMismatchError(f"{path}: {len(missing)} tensors the model needs are missing "
                                            f"(first: {missing[0]!r})", hint=RE_EXPORT))
    wrong = [(k, headers[where[k]][k]) for k in expected if k in where and k != "model.embed_tokens.weight"]
    shapes = [f"{k} is {info['shape']}, config.json implies {list(expected[k])}"
              for k, info in wrong if list(info["shape"]) != list(expected[k])]
    if shapes:
        problems.append(WeightMismatchError(f"{path}: {len(shapes)} tensors have the wrong shape ({shapes[0]}"
                                            + (", ..." if len(shapes) > 1 else "") + ")"))
    dtypes = [f"{k} is {info['dtype']}" for k, info in wrong if info["dtype"] not in WEIGHT_DTYPES]
    if dtypes:
        problems.append(WeightMismatchError(f"{path}: {len(dtypes)} tensors are not stored as floating point "
                                            f"({dtypes[0]}; weights are {'/'.join(WEIGHT_DTYPES)})", hint=RE_EXPORT))
    if not problems and cfg.tie_word_embeddings and "lm_head.weight" in where:
        problems += _untied_head_problems(path, where, file_headers)
    return problems


def _untied_head_problems(path: Path, where: dict[str, str], headers: Headers) -> list[StatJaxError]:
    """A tied model ignores a stored lm_head.weight: it must equal the embeddings (checked on three rows)."""
    samples = [_sample_rows(path / where[key], key, headers[where[key]])
               for key in ("model.embed_tokens.weight", "lm_head.weight")]
    same = samples[0].shape == samples[1].shape and bool((samples[0] == samples[1]).all())
    return [] if same else _tied_mismatch(path)


def _sample_rows(file: Path, key: str, file_header: tuple[dict[str, Any], int]):
    """The first, middle and last rows of a 2-D tensor, as float32, read through a memory map."""
    header, start = file_header
    info = header[key]
    dtype = ST_DTYPES[info["dtype"]]
    n, width = info["shape"]
    data = np.memmap(file, dtype=dtype, mode="r", offset=start + info["data_offsets"][0], shape=(n, width))
    return np.asarray(data[sorted({0, n // 2, n - 1})], dtype=np.float32)


def _tied_mismatch(path: Path) -> list[StatJaxError]:
    return [WeightMismatchError(f"{path}: config.json says tie_word_embeddings=true, but the stored lm_head.weight "
                                "differs from model.embed_tokens.weight (a tied model would ignore it)",
                                hint="set tie_word_embeddings=false in config.json if the model has its own "
                                     "output layer")]


def weight_problems(path: Path, cfg) -> list[StatJaxError]:
    """The safetensors files and index, then (when they are sound and config.json parsed) every tensor."""
    where, headers, problems = weight_files(path)
    if problems or cfg is None or not where:
        return problems
    return _tensor_problems(path, cfg, where, headers)


# ----- the tokenizer ------------------------------------------------------------------------------------------
def has_chat_template(tok_dir: Path) -> bool:
    """A chat template in chat_template.jinja / chat_template.json or tokenizer_config.json's chat_template."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (tok_dir / name).is_file() and (tok_dir / name).read_text(errors="replace").strip():
            return True
    try:
        return bool(json.loads((tok_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def tokenizer_problems(tok_dir: Path, key: str, *, chat_template: bool, vocab_size: int | None = None,
                       load: bool = True) -> list[StatJaxError]:
    """The tokenizer files parse and load, the vocabulary fits the model's, and the chat template exists if needed."""
    if not tok_dir.is_dir():
        return [TokenizerError(f"tokenizer directory {tok_dir} does not exist ({key})")]
    if not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        return [TokenizerError(f"{tok_dir} holds no tokenizer ({' / '.join(TOKENIZER_FILES)} missing; {key})",
                               hint="copy the tokenizer files next to config.json, or set "
                                    "--config.model.tokenizer_path=DIR")]
    problems: list[StatJaxError] = list(_tokenizer_json_problems(tok_dir))
    if chat_template and not has_chat_template(tok_dir):
        problems.append(TokenizerError(
            f"{tok_dir}: the tokenizer has no chat template (no chat_template.jinja, and tokenizer_config.json has "
            "no chat_template), and this command renders chat prompts",
            hint="copy the model's chat_template.jinja next to its tokenizer, or set "
                 "--config.eval.use_chat_template=false for a base model (plain prompts)"))
    if problems or not load:
        return problems
    return _tokenizer_load_problems(tok_dir, vocab_size, chat_template)


def _tokenizer_json_problems(tok_dir: Path) -> Iterator[StatJaxError]:
    for name in TOKENIZER_JSON_FILES:
        f = tok_dir / name
        if f.is_file():
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield TokenizerError(f"{f}: not valid JSON ({e}; cut short?)",
                                     hint="re-copy the tokenizer files from the original checkpoint")


def _tokenizer_load_problems(tok_dir: Path, vocab_size: int | None, chat_template: bool) -> list[StatJaxError]:
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:  # noqa: BLE001  (any failure to load is reported as one line)
        return [TokenizerError(f"{tok_dir}: the tokenizer does not load: {type(e).__name__}: {e}")]
    if vocab_size is not None and len(tokenizer) > vocab_size:
        return [TokenizerError(f"{tok_dir}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size "
                               f"is {vocab_size}: some token ids have no embedding",
                               hint="use the tokenizer the model was trained with")]
    if chat_template:
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True,
                                          tokenize=False)
        except Exception as e:  # noqa: BLE001  (a template that does not render is reported as one line)
            return [TokenizerError(f"{tok_dir}: the chat template does not render a conversation: "
                                   f"{type(e).__name__}: {e}",
                                   hint="re-copy chat_template.jinja / tokenizer_config.json from the original "
                                        "checkpoint")]
    return []


# ----- the whole directory -------------------------------------------------------------------------------------
def model_dir_problems(path: Path, *, tokenizer_dir: Path | None = None, tokenizer_key: str = "model.path",
                       chat_template: bool = False) -> list[StatJaxError]:
    """Every problem of a local model directory (config.json, weights, tokenizer), without loading any weight."""
    cfg, problems = _model_config(path)
    problems += weight_problems(path, cfg)
    problems += tokenizer_problems(tokenizer_dir or path, tokenizer_key, chat_template=chat_template,
                                   vocab_size=cfg.vocab_size if cfg else None, load=cfg is not None)
    return problems
