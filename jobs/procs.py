"""Process trees from /proc: what the scale benchmark counts and the tests stop. Linux only; elsewhere empty."""

from __future__ import annotations

import os
from collections import defaultdict


def descendants(pid: int) -> set[int]:
    """Pids of every process below ``pid`` (empty where /proc is unavailable)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[ppid].append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def ray_workers(pids: set[int]) -> list[str]:
    """The process titles of the Ray worker processes among ``pids`` (task and actor workers, idle ones included;
    not the node's agents)."""
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cmd.startswith("ray::") or "default_worker.py" in cmd) and "Agent" not in cmd:
            found.append(cmd[:60])
    return found
