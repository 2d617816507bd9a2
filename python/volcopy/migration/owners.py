"""Who runs a migration: "host:pid:start time" in the journal, and whether that process still lives.

The start time (from /proc) tells a live owner from a later process that got the same pid.
"""

from __future__ import annotations

import os
import socket


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22, after the command in parentheses
    except (OSError, IndexError):
        return None


def this_process() -> str:
    """host:pid:start time; the start time tells a live owner from a later process with its pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def process_alive(owner: str) -> bool:
    host, pid, started = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return True  # we cannot tell; that host's recover() takes it over
    return _start_time(int(pid)) == started
