"""ml-collections config files with `--config.a.b=value` overrides, validated before any work starts.

A config file is a Python file with `get_config()` (optionally `get_config(arg)`, selected with
`--config=path.py:arg`) returning a `ConfigDict`. Overrides may only set keys that exist, and values are
parsed to the type of the existing field; anything else fails fast with a message naming the key.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict, FieldReference

from stat_jax.errors import ConfigError  # noqa: F401  (re-exported: `from stat_jax.config import ConfigError`)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
    path_str, _, arg = spec.partition(":")
    path = Path(path_str)
    if not path.is_file() and not path.is_absolute() and (CONFIG_DIR.parent / path).is_file():
        path = CONFIG_DIR.parent / path
    if not path.is_file() and (CONFIG_DIR / path.name).is_file() and len(path.parts) == 1:
        path = CONFIG_DIR / path.name
    if not path.is_file():
        raise ConfigError(f"config file {path_str!r} not found (looked in . and {CONFIG_DIR})")
    return path, (arg or None)


def load_config_file(spec: str) -> ConfigDict:
    """Imports `path.py[:arg]` and returns its `get_config([arg])`."""
    path, arg = resolve_config_path(spec)
    module_name = "stat_jax_config_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # the config file itself is broken
        raise ConfigError(f"{path}: failed to import config file: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a config file must define get_config()")
    config = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected ConfigDict")
    return config


def _parse_value(raw: str, current: Any, key: str) -> Any:
    if isinstance(current, FieldReference):
        current = current.get()
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--config.{key}={raw!r}: expected a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}={raw!r}: expected an integer (current value {current!r})") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}={raw!r}: expected a number (current value {current!r})") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = tuple(v.strip() for v in raw.split(",") if v.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    if isinstance(current, ConfigDict):
        raise ConfigError(f"--config.{key}: is a section, set one of its fields: {sorted(current.keys())}")
    # None or another type: accept a Python literal, else the raw string.
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


# Sections that map a user-chosen name to a string, so the command line may add keys to them: a benchmark of
# the user's own is `--config.eval.paths.mine=FILE` (+ `--config.eval.fields.mine=problem:q,answer:a`).
OPEN_SECTIONS = ("eval.paths", "eval.fields", "eval.headline")


def _add_open_key(node: ConfigDict, section: str, name: str, raw: str) -> None:
    if not name.isidentifier() or name != name.lower():
        raise ConfigError(f"--config.{section}.{name}: a name here must be lower-case letters, digits and '_'")
    with node.unlocked():
        node[name] = raw


def _parent_section(config: ConfigDict, key: str, label: str) -> tuple[ConfigDict, str]:
    """(the section holding dotted `key`'s last part, that part); an unknown section is a ConfigError."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], ConfigDict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"{label}{key}: unknown section {where!r}; known keys here: {sorted(node.keys())}")
        node = node[part]
    return node, parts[-1]


def apply_overrides(config: ConfigDict, overrides: Sequence[tuple[str, str]]) -> ConfigDict:
    """Applies (dotted key, raw value) pairs; unknown keys and wrong types raise ConfigError."""
    for key, raw in overrides:
        node, leaf = _parent_section(config, key, "--config.")
        section = key.rpartition(".")[0]
        if leaf not in node and section in OPEN_SECTIONS:
            _add_open_key(node, section, leaf, raw)
            continue
        if leaf not in node:
            raise ConfigError(f"--config.{key}: unknown key {leaf!r}; valid keys here: {sorted(node.keys())}")
        value = _parse_value(raw, node._fields[leaf] if hasattr(node, "_fields") else node[leaf], key)
        try:
            node[leaf] = value  # locked ConfigDicts still allow existing keys; they type-check the value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--config.{key}={raw!r}: {e}") from e
    return config


def split_override_args(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` arguments from the rest."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv):
                key, value = body, argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"{arg}: missing a value (use {arg}=VALUE)")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def with_variant(spec: str, variant: str) -> str:
    """`path.py:variant` for a config spec; a spec naming another variant is refused (`--quick` is `:quick`)."""
    path, _, current = spec.partition(":")
    if current and current != variant:
        raise ConfigError(f"--config={spec} names the variant {current!r} and the command asks for {variant!r}",
                          hint=f"use --config={path}:{variant}, or --config={spec} alone")
    return f"{path}:{variant}"


def build_config(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ConfigDict:
    config = load_config_file(spec)
    config = apply_overrides(config, overrides)
    config.lock()
    return config


def config_to_dict(config: ConfigDict) -> dict[str, Any]:
    """The whole config as JSON values, for writing down or printing: not a dependency (stat_jax/validity.py)."""
    from stat_jax import validity

    with validity.unrecorded():
        return json.loads(config.to_json_best_effort())


def sub_config(config: ConfigDict, workdir: str | Path, **overrides: Any) -> ConfigDict:
    """An unlocked copy of `config` writing under `workdir`, with dotted-key overrides set on existing fields (or
    on new names in an open section, as on the command line: `eval.paths.<benchmark>`).

    How a stage hands a real command (SFT, eval, GRPO) its config: the pipeline's stages, the demo's cells.
    """
    c = config.copy_and_resolve_references()
    c.unlock()
    c.workdir = str(workdir)
    for key, value in overrides.items():
        node, leaf = _parent_section(c, key, "sub_config: ")
        section = key.rpartition(".")[0]
        if leaf not in node and section not in OPEN_SECTIONS:
            raise ConfigError(f"sub_config: {key!r} is not a config field (under {section or 'the top'}: "
                              f"{sorted(node)})")
        node[leaf] = value
    return c


RESOLVED_CONFIG_FILE = "config.json"


def write_resolved_config(config: ConfigDict, workdir: str | Path) -> Path:
    """Writes the resolved configuration a run uses to `<workdir>/config.json` (every command, one format)."""
    path = Path(workdir) / RESOLVED_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True, default=str) + "\n")
    return path
