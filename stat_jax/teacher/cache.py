"""A persistent on-disk cache of validated teacher answers: one small JSON file per request key."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    """Writes `text` to `path` so that readers see the old file or the new one, never a torn write.

    `durable` also fsyncs before the rename, so the file survives a power loss or kernel crash (not only a
    crash of this process): ~0.6-1 ms a file on this project's machines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AnswerCache:
    """`key -> answer` where key is `TeacherRequest.cache_key(backend_id)` (sha256 hex).

    One file per key under a two-level fan-out keeps directories small and makes concurrent writers safe
    without a lock: each write is atomic and two writers of one key write the same answer.
    """

    def __init__(self, root: str | os.PathLike, *, durable: bool = True):
        self.root = Path(root)
        self.durable = durable  # fsync each answer (see atomic_write_text); off only for answers that cost nothing
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            # Only a file written outside atomic_write can be torn; treat it as a miss and overwrite it.
            return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        atomic_write_text(self._path(key), json.dumps(entry, sort_keys=True), durable=self.durable)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json"))
