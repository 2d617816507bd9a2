"""Settings of the machine that the harness holds for the length of a run, and puts back after.

Each yields a sentence for the report saying what was done, or "" where there was nothing to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..units import format_size

PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")

# fio's buffers for the limit: two jobs of 32 x 1 MiB, each rounded up to whole 2 MiB pages, and spare.
FIO_HUGE_PAGES = 48


def _largest_block_order() -> int:
    """The largest order of a free block (/proc/buddyinfo has a column for each order from 0)."""
    with open("/proc/buddyinfo") as f:
        return max(len(line.split()) - 4 - 1 for line in f)  # "Node 0, zone Normal" then the counts


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[str]:
    """Keeps the VM's freed memory in the VM: raises the free page reporting order beyond the largest
    free block, so that nothing is reported.

    A kernel with free page reporting hands blocks of freed memory back to its hypervisor, and a page
    handed back costs a fault on the host when it is used again. Every run allocates its pages afresh
    (page cache after the drop, and on tmpfs all of dst), so each tool's time depended on whether the host
    had taken those pages back yet. On this project's VM, `volcopy copy` 2 GiB tmpfs to tmpfs took
    0.85-5.47 s over four runs with reporting on and 0.78-0.93 s with it held off
    (benchmarks/results/README.md). That is the host's noise, not the tools'."""
    order_file = PAGE_REPORTING / "page_reporting_order"
    try:
        reported = int((PAGE_REPORTING / "reported_kib").read_text()) * 1024
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


def huge_pages_free() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("HugePages_Free:"))


@contextlib.contextmanager
def huge_pages_for_fio() -> Iterator[str]:
    """Reserves huge pages for the buffers of the fio limit.

    A direct request is one run of physical memory per page of its buffer: 1 MiB on 4 KiB pages is 256,
    more than the virtio disk (254) or a loop device (128) takes in one request, so each is split, and
    io_uring hands a request it must split to a kernel worker. fio's own buffers are on 4 KiB pages: on
    W1 its limit took 5.48-5.52 s that way and 3.87-3.92 s on huge pages, where volcopy's buffers are.
    A limit is only a limit with its buffers where the tools' are."""
    try:
        before = int(NR_HUGEPAGES.read_text())
        NR_HUGEPAGES.write_text(str(before + FIO_HUGE_PAGES))
    except (OSError, ValueError) as e:
        yield f" fio's buffers were on 4 KiB pages: no huge pages could be reserved for them ({e})."
        return
    try:
        free = huge_pages_free()
        if free < FIO_HUGE_PAGES:
            yield f" fio's buffers were on 4 KiB pages: only {free} huge pages could be reserved."
        else:
            yield f" fio's buffers were on huge pages ({FIO_HUGE_PAGES} reserved for the run, freed after)."
    finally:
        NR_HUGEPAGES.write_text(str(before))
