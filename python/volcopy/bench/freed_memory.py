"""Keeping a VM's freed memory in the VM for the length of a benchmark run.

A kernel with free page reporting hands blocks of freed memory back to its hypervisor, and a page handed
back costs a fault on the host when it is used again. Every run allocates its pages afresh (page cache
after the drop, and on tmpfs all of dst), so each tool's time depended on whether the host had taken those
pages back yet. On this project's VM, `volcopy copy` 2 GiB tmpfs to tmpfs took 0.85-5.47 s over four runs
with reporting on and 0.78-0.93 s with it held off (benchmarks/results/README.md). That is the host's
noise, not the tools', so the harness holds reporting off while it measures and puts it back after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..units import format_size

PARAMETERS = Path("/sys/module/page_reporting/parameters")


def _largest_block_order() -> int:
    """The largest order of a free block (/proc/buddyinfo has a column for each order from 0)."""
    with open("/proc/buddyinfo") as f:
        return max(len(line.split()) - 4 - 1 for line in f)  # "Node 0, zone Normal" then the counts


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[str]:
    """Raises the reporting order beyond the largest free block, so that nothing is reported, for the
    length of the block. Yields a sentence for the report saying what was done, or "" where this kernel
    reports nothing."""
    order_file = PARAMETERS / "page_reporting_order"
    try:
        reported = int((PARAMETERS / "reported_kib").read_text()) * 1024
        order = order_file.read_text().strip()
    except (OSError, ValueError):
        reported = 0
    if not reported:  # no reporting here, or none that ever happened: nothing to hold
        yield ""
        return
    beyond = str(_largest_block_order() + 1)
    said = (
        f" This VM reports freed memory to its host (blocks of order {order} and up, "
        f"{format_size(reported)} so far)"
    )
    try:
        order_file.write_text(beyond)
    except OSError as e:
        yield f"{said}, and it could not be held off ({e.strerror}): tmpfs times will swing from run to run."
        return
    try:
        yield (
            f"{said}; for this run it was held off (page_reporting_order {order} -> {beyond}, restored "
            "after), because a page taken back by the host costs a fault there when it is used again."
        )
    finally:
        order_file.write_text(order)
