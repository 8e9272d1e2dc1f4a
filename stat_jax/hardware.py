"""How much memory the host and each device have: read by the trainers' memory budget (train/memory.py) and by the
rollout engine's cache sizing (rollout/engine.py), so it sits below both."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def host_memory_bytes() -> int:
    """Physical RAM, or the cgroup's memory limit when that is lower (containers)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def device_memory_bytes(device=None) -> int:
    """Memory of one device: its allocator limit on GPU/TPU; on CPU the host's RAM split over the local devices."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return host_memory_bytes() // max(jax.local_device_count(), 1)
