"""The sweep: volcopy alone over block sizes and queue depths, on the disk, tmpfs and a device."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from ..units import format_size
from .report import machine
from .tools import Case, volcopy
from .workbench import Workbench, drop_caches, make_cases, measure, reset

GiB = 1 << 30

# The sweep's grid: at most 32 MiB in flight, so that any of them could be a default within 64 MiB of RSS.
SWEEP_GEOMETRIES = [(bs, qd) for bs in (1, 2, 4, 8) for qd in (2, 4, 8, 16, 32) if bs * qd <= 32]


def _sweep_cases(bench: Workbench, tmpfs: Path) -> list[tuple[str, Case]]:
    """W1's case on the disk, W4's on tmpfs and, as root, W3's onto a zeroed device."""
    only = {"W1", "W4"} | ({"W3"} if os.geteuid() == 0 else set())
    cases = {case.workload: case for case in make_cases(bench, only, tmpfs) if not case.garbage}
    where = (("W1", "disk"), ("W4", "tmpfs"), ("W3", "device"))
    return [(f"{label}: {cases[w].name}", cases[w]) for w, label in where if w in cases]


def sweep(bench: Workbench, tmpfs: Path, rounds: int, memory: str) -> str:
    """volcopy alone over block sizes and queue depths, rounds interleaved over the grid."""
    lines = [
        "# Block size and queue depth sweep",
        "",
        f"`volcopy bench --sweep --rounds {rounds} --scale {bench.scale}`, "
        f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {machine()}. Each round runs `volcopy copy` once at every "
        "point of the grid (start-up included, page cache dropped, dst reset); median wall seconds and "
        "median user+sys CPU seconds of the rounds, and the highest peak RSS. The device is W3's case: "
        "a loop device (direct I/O) has no SEEK_DATA, so every byte is read and zero detection decides."
        + memory,
        "",
    ]
    for title, case in _sweep_cases(bench, tmpfs):
        runs: dict[tuple[int, int], list] = {g: [] for g in SWEEP_GEOMETRIES}
        for _ in range(rounds):
            for (block_size, depth), found in runs.items():
                reset(case)
                drop_caches()
                argv = volcopy(case, "--block-size", f"{block_size}M", "--queue-depth", str(depth))
                seconds, cpu, rss, status, stderr = measure(argv)
                if status:
                    raise RuntimeError(f"volcopy failed in the sweep ({title}): {stderr}")
                found.append((seconds, cpu, rss))
        lines += [
            f"## {title}",
            "",
            "| block size | queue depth | in flight | median s | GiB/s | CPU s | peak RSS |",
            "|---|---|---|---|---|---|---|",
        ]
        for (block_size, depth), found in runs.items():
            seconds = statistics.median(r[0] for r in found)
            lines.append(
                f"| {block_size} MiB | {depth} | {block_size * depth} MiB | {seconds:.3f} | "
                f"{case.size / GiB / seconds:.2f} | {statistics.median(r[1] for r in found):.3f} | "
                f"{format_size(max(r[2] for r in found))} |"
            )
        lines.append("")
        if not case.dst_is_device:
            os.unlink(case.src)
            os.unlink(case.dst)
    return "\n".join(lines)
