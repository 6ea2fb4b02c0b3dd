"""CPU time of server processes, read from Linux /proc, for benches that print a server's CPU per request
or per file beside their rates (rates move with what else the machine does; the CPU a unit of work costs
much less)."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int | str) -> tuple[int, float]:
    """(parent pid, CPU seconds so far) of a process; OSError when it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (NaN when it cannot be read, as off Linux)."""
    try:
        return _stat(pid)[1]
    except OSError:
        return float("nan")


def tree_cpu(pid: int) -> float:
    """User + system CPU time so far of process `pid` and every process below it (its pool workers)."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)], used[int(entry)] = _stat(entry)
            except OSError:  # gone meanwhile
                continue
    tree, total = [pid], 0.0
    while tree:
        current = tree.pop()
        total += used.get(current, 0.0)
        tree += [child for child, parent in parents.items() if parent == current]
    return total


def pid_running(marker: str) -> int:
    """The process whose command line holds `marker` (a server a helper started, found by its config)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    return int(entry)
            except OSError:
                continue
    raise RuntimeError(f"no process with {marker} in its command line")
