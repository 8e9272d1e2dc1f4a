"""The student answers the held-out questions (k samples each) through any `RolloutBackend`, resumably."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stat_jax.data.records import MathProblem
from stat_jax.distributed import barrier, is_coordinator
from stat_jax.rollout.base import RolloutBackend, SamplingParams


def _done_rows(partial: Path) -> dict[str, dict[str, Any]]:
    done = {}
    if partial.exists():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash: everything after it is redone
            done[row["id"]] = row
    return done


def sample_responses(backend: RolloutBackend, problems: Sequence[MathProblem], prompts: Sequence[str],
                     sampling: SamplingParams, num_samples: int, partial: Path, chunk_size: int = 64
                     ) -> list[dict[str, Any]]:
    """[{id, prompt, responses, finish_reasons}] per question; chunks are appended to `partial` as they finish.

    Questions already in `partial` with the same prompt (an interrupted earlier run) are not generated again.
    On several processes every one generates the same chunks (the device programs are collective); process 0
    alone writes `partial`, and the others resume from what it kept, so all of them generate the same questions.
    """
    writer = is_coordinator()
    wanted = {p.id: prompt for p, prompt in zip(problems, prompts)}
    if writer:
        done = {k: r for k, r in _done_rows(partial).items() if len(r["responses"]) == num_samples}
        done = {k: r for k, r in done.items() if wanted.get(k) == r["prompt"]}
        partial.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite only the complete, still-valid rows so a torn line is never followed by new ones.
        with partial.open("w", encoding="utf-8") as f:
            for row in done.values():
                f.write(json.dumps(row) + "\n")
    barrier(f"rollout partial {partial.name}")  # the others read the file only once process 0 has rewritten it
    if not writer:
        done = _done_rows(partial)
    todo = [i for i, p in enumerate(problems) if p.id not in done]
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start:start + chunk_size]
        completions = backend.generate([prompts[i] for i in chunk], sampling, n=num_samples)
        rows = [{"id": problems[i].id, "prompt": prompts[i], "responses": [c.text for c in samples],
                 "finish_reasons": [c.finish_reason for c in samples]} for i, samples in zip(chunk, completions)]
        done.update((row["id"], row) for row in rows)
        if writer:
            with partial.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    return [done[p.id] for p in problems]
