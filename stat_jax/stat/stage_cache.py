"""Finished stages shared between runs (`stat.stage_cache=DIR`): a sweep profiles once.

Runs that differ only in what later stages read (another `stat.method`, another training seed under the same
`stat.seed`) have identical profiling stages. With a stage cache, a stage that is not done in its own run
directory is looked up there first: an entry of the same stage whose inputs hash the same and whose recorded reads
all still hold (stat_jax/validity.py, the rule every reuse follows) is copied into the run directory instead of
being run again. Every stage that runs is stored. Stages whose files point into their own run directory (trained
models) are not cached (`Stage.cacheable`).

    DIR/<stage>/<key of its input hashes>/<n>/{manifest.json, files/<output paths>}
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stat_jax import validity
from stat_jax.stat import io

log = logging.getLogger(__name__)


def _slot(cache: Path, stage: str, hashes: Mapping[str, str]) -> Path:
    return cache / stage.replace("/", "__") / io.json_hash([stage, dict(hashes)])[:16]


def _intact(entry: Path, manifest: Mapping[str, Any]) -> bool:
    return all((entry / "files" / n).is_file() and io.file_hash(entry / "files" / n) == h
               for n, h in manifest["outputs"].items())


def lookup(cache: Path, stage: str, run_dir: Path, inputs: Sequence[str], config: Any,
           context: Mapping[str, Any], outputs: Sequence[str] = ()) -> Path | None:
    """The cached entry of `stage` valid for these inputs and this config, holding `outputs`, else None."""
    hashes = io.input_hashes(run_dir, inputs)
    slot = _slot(cache, stage, hashes)
    for entry in sorted(slot.glob("[0-9]*")) if slot.is_dir() else ():
        try:
            manifest = io.read_json(entry / io.MANIFEST)
        except (ValueError, OSError):
            continue  # an entry cut short by a kill: never used
        if (manifest.get("inputs") == hashes and "reads" in manifest and set(outputs) <= set(manifest["outputs"])
                and not validity.changed(manifest["reads"], config, context) and _intact(entry, manifest)):
            return entry
    return None


def restore(entry: Path, run_dir: Path, stage: str) -> dict[str, Any]:
    """Copies a cached entry's outputs and manifest into the run directory; returns the manifest."""
    manifest = io.read_json(entry / io.MANIFEST)
    for name in manifest["outputs"]:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry / "files" / name, run_dir / name)
    io.write_json(run_dir / stage / io.MANIFEST, {**manifest, "restored_from": str(entry)})
    return manifest


def store(cache: Path, stage: str, run_dir: Path) -> Path | None:
    """Adds the stage's finished result (its manifest and outputs) to the cache, unless an entry with the same
    reads is there already; returns the entry."""
    manifest = io.read_json(run_dir / stage / io.MANIFEST)
    manifest = {k: v for k, v in manifest.items() if k != "restored_from"}
    slot = _slot(cache, stage, manifest["inputs"])
    slot.mkdir(parents=True, exist_ok=True)
    existing = sorted(slot.glob("[0-9]*"))
    for entry in existing:
        try:
            stored = io.read_json(entry / io.MANIFEST)
        except (ValueError, OSError):
            continue
        if stored.get("reads") == manifest["reads"]:
            if _intact(entry, stored):
                return entry
            log.warning("stage cache: %s was changed after it was stored; replacing it", entry)
            shutil.rmtree(entry, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=slot))
    for name in manifest["outputs"]:
        (tmp / "files" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / name, tmp / "files" / name)
    io.write_json(tmp / io.MANIFEST, manifest)
    entry = slot / str(1 + max((int(e.name) for e in existing if e.name.isdigit()), default=-1))
    try:
        tmp.rename(entry)  # whole or absent: a reader never sees half an entry
    except OSError:  # another process stored the same slot number first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return entry
