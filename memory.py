"""How much memory this process can still use: what decides loading versus streaming, and models per pass."""

from __future__ import annotations

import os


def available_memory() -> int:
    """What can be allocated without swapping: MemAvailable, or less when a cgroup (a container, a batch job) caps
    this process lower."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    meminfo = _read_numbers("/proc/meminfo", "MemAvailable:")
    if meminfo is not None:
        available = meminfo * 1024
    limit, used = _read_numbers("/sys/fs/cgroup/memory.max"), _read_numbers("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        available = min(available, max(limit - used, 0))
    return available


def _read_numbers(path: str, key: str = "") -> int | None:
    """The number after `key` on its line of a /proc or /sys file; None when absent or unlimited ("max")."""
    try:
        with open(path, encoding="ascii") as file:
            for line in file:
                if line.startswith(key):
                    value = line[len(key):].split()[0]
                    return int(value) if value.isdigit() else None
    except OSError:
        pass
    return None
