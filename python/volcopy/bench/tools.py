"""The tools compared, each with the flags its users really use, and each made to flush at the end.

A tool is a function of the case that returns its command line, or None where it does not apply.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Case:
    name: str
    workload: str  # W1 ... W5
    src: str
    dst: str
    size: int
    allocated: int  # bytes of src in data extents
    dst_is_device: bool
    dst_zero: bool  # dst reads as zeros before every run, and tools may be told so
    garbage: bool  # dst is refilled with garbage before every run
    file_to_file: bool


def volcopy(case: Case, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "volcopy.cli", "copy", case.src, case.dst, "--json", *extra]
    return args + (["--dst-is-zero"] if case.dst_zero else [])


def volcopy_verify(case: Case) -> list[str]:
    return volcopy(case, "--verify")


def dd(case: Case) -> list[str]:
    """Cinder's copy: volume_utils.copy_volume with O_DIRECT (conv=sparse where dst is zero)."""
    conv = "fsync,notrunc" + (",sparse" if case.dst_zero else "")
    return [
        "dd",
        f"if={case.src}",
        f"of={case.dst}",
        "bs=1M",
        f"count={case.size}",
        "iflag=count_bytes,direct",
        "oflag=direct",
        f"conv={conv}",
        "status=none",
    ]


def qemu_img(case: Case) -> list[str]:
    zero = ["--target-is-zero"] if case.dst_zero else []
    return [
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        "-n",
        "-t",
        "none",
        "-T",
        "none",
        "-W",
        "-m",
        "16",
        *zero,
        case.src,
        case.dst,
    ]


def nbdcopy(case: Case) -> list[str]:
    zero = ["--destination-is-zero"] if case.dst_zero else []
    return ["nbdcopy", "--flush", *zero, case.src, case.dst]


def cp(case: Case) -> list[str] | None:
    if not case.file_to_file:
        return None
    return ["sh", "-c", 'cp --sparse=always "$1" "$2" && sync "$2"', "cp", case.src, case.dst]


def fio_limit(case: Case) -> list[str]:
    """The physical limit: one job reading src and one writing dst at once, io_uring, O_DIRECT, 1 MiB,
    iodepth 32, over the bytes that must move (the allocated ones)."""
    size = max(case.allocated, 1 << 20)
    common = ["--ioengine=io_uring", "--direct=1", "--bs=1M", "--iodepth=32", f"--size={size}"]
    return [
        "fio",
        "--output=/dev/null",
        "--name=read",
        f"--filename={case.src}",
        "--rw=read",
        *common,
        "--name=write",
        f"--filename={case.dst}",
        "--rw=write",
        "--end_fsync=1",
        *common,
    ]


def fio_write_floor(case: Case) -> list[str]:
    """For files in memory (W4): fio only writing dst, one pread/pwrite job per CPU on its own part of
    the file. Filling the fresh pages of dst is the part of a memory-to-memory copy no tool can skip."""
    jobs = os.cpu_count() or 1
    part = max(case.size // jobs, 1 << 20)
    return [
        "fio",
        "--output=/dev/null",
        "--name=write",
        f"--filename={case.dst}",
        "--rw=write",
        "--ioengine=psync",
        "--bs=1M",
        f"--numjobs={jobs}",
        f"--size={part}",
        f"--offset_increment={part}",
        "--end_fsync=1",
    ]


TOOLS: dict[str, Callable[[Case], list[str] | None]] = {
    "volcopy": volcopy,
    "dd": dd,
    "qemu-img": qemu_img,
    "nbdcopy": nbdcopy,
    "cp": cp,
    "fio limit": fio_limit,
}
LIMIT = "fio limit"  # not a copy: its output is not checked, and it is the yardstick
WRITE_FLOOR = "fio dst writes only"  # not a copy either: the W4 floor
YARDSTICKS = (LIMIT, WRITE_FLOOR)
