"""The tools compared, each with the flags its users really use, and each made to flush at the end.

A tool is a function of the case that returns its command line, or None where it does not apply.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .machine_settings import FIO_HUGE_PAGES, huge_pages_free


@dataclass
class Case:
    name: str
    workload: str  # W1 ... W7
    src: str
    dst: str
    size: int
    allocated: int  # bytes of src in data extents
    dst_is_device: bool
    dst_zero: bool  # dst reads as zeros before every run, and tools may be told so
    garbage: bool  # dst is refilled with garbage before every run
    file_to_file: bool
    data: tuple[tuple[int, int], ...] = ()  # src's data extents (offset, length); empty when dense
    resident: float = 0.0  # the part of src read into the page cache before every run (W1-hot, part-hot)
    scratch: str = tempfile.gettempdir()  # a directory for the tools' own files (fio's I/O logs)


def volcopy(case: Case, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "volcopy.cli", "copy", case.src, case.dst, "--json", *extra]
    return args + (["--dst-is-zero"] if case.dst_zero else [])


def volcopy_as_typed(case: Case) -> list[str]:
    """W7: the command as its target names it and a user types it: the installed script (python -m
    imports runpy too), printing its summary (--json imports json too)."""
    script = Path(sys.executable).parent / "volcopy"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "volcopy.cli"]
    return [*command, "copy", case.src, case.dst]


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
    iodepth 32, over the bytes that must move: all of a dense volume, or, for a sparse one, its data
    extents at their offsets (replayed from an I/O log; the first bytes of a sparse file are mostly
    holes, which cost a reader nothing). Its buffers are on huge pages where the harness could reserve
    them, as volcopy's are (machine_settings.huge_pages_for_fio says why)."""
    memory = "shmhuge" if huge_pages_free() >= FIO_HUGE_PAGES else "malloc"
    common = ["--ioengine=io_uring", "--direct=1", "--iodepth=32", f"--mem={memory}"]
    if case.data:
        read = [f"--read_iolog={_io_log(case, 'read', case.src)}", "--replay_no_stall=1"]
        write = [f"--read_iolog={_io_log(case, 'write', case.dst)}", "--replay_no_stall=1"]
    else:
        read = [f"--filename={case.src}", "--rw=read", "--bs=1M", f"--size={case.size}"]
        write = [f"--filename={case.dst}", "--rw=write", "--bs=1M", f"--size={case.size}"]
    return [
        "fio",
        "--output=/dev/null",
        "--name=read",
        *read,
        *common,
        "--name=write",
        *write,
        "--end_fsync=1",
        *common,
    ]


def disk_read_floor(case: Case) -> list[str]:
    """On the disk: fio reading what verify's read-back of dst reads, with the fio limit's settings: all
    of a device (a block device has no holes to skip), a file's data extents. It reads src, laid out as
    dst is after the copy (the same extents, or, on a loop device, a file as sparse), because each tool
    runs on a freshly reset dst."""
    memory = "shmhuge" if huge_pages_free() >= FIO_HUGE_PAGES else "malloc"
    if case.data and not case.dst_is_device:
        read = [f"--read_iolog={_io_log(case, 'read', case.src)}", "--replay_no_stall=1"]
    else:
        read = [f"--filename={case.src}", "--rw=read", "--bs=1M", f"--size={case.size}"]
    return [
        "fio",
        "--output=/dev/null",
        "--name=read",
        *read,
        "--ioengine=io_uring",
        "--direct=1",
        "--iodepth=32",
        f"--mem={memory}",
    ]


def fio_start_up(scratch: str) -> list[str]:
    """fio reading 1 MiB: its start-up alone, which is inside every time of the fio limit."""
    file = Path(scratch) / "fio-start-up"
    return ["fio", "--output=/dev/null", "--name=start-up", f"--filename={file}", "--size=1M", "--rw=read"]


def _io_log(case: Case, op: str, path: str) -> str:
    """A fio (version 2) I/O log of requests of up to 1 MiB over the data extents."""
    log = Path(case.scratch) / f"fio-{op}-{re.sub(r'[^A-Za-z0-9]+', '-', case.name)}.log"
    lines = ["fio version 2 iolog", f"{path} add", f"{path} open"]
    done = 0
    for offset, length in case.data:
        # O_DIRECT moves whole 4 KiB blocks: the extent rounded out, without repeating a block
        start, end = max(offset // 4096 * 4096, done), min(-(-(offset + length) // 4096) * 4096, case.size)
        for at in range(start, end, 1 << 20):
            lines.append(f"{path} {op} {at} {min(1 << 20, end - at)}")
        done = max(done, end)
    log.write_text("\n".join([*lines, f"{path} close", ""]))
    return str(log)


def write_floor(case: Case) -> list[str]:
    """For files in memory (W4): dd writing zeros to dst, reading nothing. Filling the fresh pages of dst
    is the part of a memory-to-memory copy that no tool can skip, and writes to one file in memory hold
    its inode lock, so more writers would not make it faster."""
    return [
        "dd",
        "if=/dev/zero",
        f"of={case.dst}",
        "bs=1M",
        f"count={case.size}",
        "iflag=count_bytes",
        "conv=fsync,notrunc",
        "status=none",
    ]


def read_floor(case: Case) -> list[str]:
    """For files in memory (W4): a dd per CPU reading its share of src into nothing, 1 MiB at a time. The
    least a read of a volume this size from this memory costs: a copy that sees its data (to hash it) pays
    this beside the write floor, and verify's read-back of dst pays it again. (dd, not fio: fio's own
    start-up takes longer than the read.)"""
    jobs = os.cpu_count() or 1
    share = -(-case.size // jobs)
    readers = " ".join(str(k * share) for k in range(jobs))
    script = (
        f"pids=; for at in {readers}; do "
        f'dd if="$1" of=/dev/null bs=1M skip=$at count={share} iflag=skip_bytes,count_bytes status=none & '
        'pids="$pids $!"; done; for pid in $pids; do wait $pid || exit 1; done'
    )
    return ["sh", "-c", script, "read-floor", case.src]


def python_start_up(case: Case) -> list[str]:
    """The Python that runs volcopy, starting and exiting with nothing to do: what any command written in
    it costs at least (W7)."""
    return [sys.executable, "-c", "pass"]


# A command with a subcommand, parsed by argparse the least it can be (no help texts, no options).
_PARSE_COPY = (
    "import argparse, sys\n"
    "parser = argparse.ArgumentParser(prog='volcopy')\n"
    "copy = parser.add_subparsers(dest='command', required=True).add_parser('copy')\n"
    "copy.add_argument('src')\n"
    "copy.add_argument('dst')\n"
    "parser.parse_args()\n"
)


def python_parses_copy(case: Case) -> list[str]:
    """The same Python parsing `copy SRC DST` with argparse, copying nothing: what a command line tool
    written in it with the standard library's parser costs at least (W7). Importing argparse brings re,
    enum, gettext and locale with it."""
    return [sys.executable, "-c", _PARSE_COPY, "copy", case.src, case.dst]


TOOLS: dict[str, Callable[[Case], list[str] | None]] = {
    "volcopy": volcopy,
    "dd": dd,
    "qemu-img": qemu_img,
    "nbdcopy": nbdcopy,
    "cp": cp,
    "fio limit": fio_limit,
}
LIMIT = "fio limit"  # not a copy: its output is not checked, and it is the yardstick
WRITE_FLOOR = "floor: dd zeros to dst"  # not copies either: the W4 floors
READ_FLOOR = "floor: dd reads src"
DISK_READ_FLOOR = "floor: fio reads src"  # on the disk: the one more read that verify adds
PYTHON_FLOOR = "floor: Python starts and exits"  # W7
ARGPARSE_FLOOR = "floor: Python parses copy SRC DST with argparse"  # W7
YARDSTICKS = (LIMIT, WRITE_FLOOR, READ_FLOOR, DISK_READ_FLOOR, PYTHON_FLOOR, ARGPARSE_FLOOR)
W7_MORE_ROUNDS = 4  # W7 runs --rounds times this: its runs last milliseconds, and vary by milliseconds
