"""The workbench: generated sources, loop devices, the cases of each workload, resetting a destination
and measuring one command."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from ..units import format_size
from .tools import Case
from .workloads import make_dense, make_sparse, make_spread

GiB = 1 << 30
MiB = 1 << 20
W6_EXTENT = 256 << 10


def _loop(path: Path, read_only: bool = False) -> str:
    args = ["losetup", "--direct-io=on", "--find", "--show"] + (["--read-only"] if read_only else [])
    return subprocess.run(args + [str(path)], check=True, capture_output=True, text=True).stdout.strip()


def _garbage(path: str, size: int) -> None:
    block = np.random.default_rng(7).bytes(64 * MiB)
    fd = os.open(path, os.O_WRONLY)
    try:
        for at in range(0, size, len(block)):
            os.pwrite(fd, block[: min(len(block), size - at)], at)
        os.fsync(fd)
    finally:
        os.close(fd)


def reset(case: Case) -> None:
    if case.dst_is_device:
        if case.garbage:
            _garbage(case.dst, case.size)
        else:  # a loop device discards by punching its backing file: it reads as zeros after
            subprocess.run(["blkdiscard", case.dst], check=True)
    else:
        if os.path.exists(case.dst):
            os.unlink(case.dst)
        with open(case.dst, "wb") as f:
            f.truncate(case.size)


def drop_caches() -> None:
    os.sync()
    if os.geteuid() == 0:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")


RESIDENT_PIECE = 16 * MiB  # part-hot: every other piece of this size is cached


def warm(case: Case) -> None:
    """Reads case.resident of src into the page cache: all of it, or every other RESIDENT_PIECE for a
    half (the rest stays cold: the descriptor is marked RANDOM, so nothing is read ahead)."""
    step = RESIDENT_PIECE if case.resident >= 1.0 else int(RESIDENT_PIECE / case.resident)
    fd = os.open(case.src, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for at in range(0, case.size, step):
            for piece in range(at, min(at + RESIDENT_PIECE, case.size), MiB):
                os.pread(fd, min(MiB, case.size - piece), piece)
    finally:
        os.close(fd)


class Workbench:
    """Generates the sources once and owns the loop devices."""

    def __init__(self, workdir: Path, scale: float):
        self.workdir, self.scale = workdir, scale
        self.devices: list[str] = []
        self.data: dict[str, tuple[tuple[int, int], ...]] = {}  # a sparse source's data extents
        workdir.mkdir(parents=True, exist_ok=True)

    def size(self, nominal: int) -> int:
        return max(MiB, int(nominal * self.scale) // MiB * MiB)

    def source(
        self,
        name: str,
        size: int,
        allocated: float | None = None,
        allocated_bytes: int | None = None,
        directory: Path | None = None,
    ) -> tuple[str, int]:
        path = (directory or self.workdir) / name
        if allocated is None:
            if not (path.exists() and path.stat().st_size == size):
                make_dense(str(path), size)
            return str(path), size
        extents = make_sparse(str(path), size, allocated, allocated_bytes=allocated_bytes)
        self.data[str(path)] = tuple((int(offset), int(length)) for offset, length in extents)
        return str(path), sum(length for _, length in extents)

    def spread_source(self, name: str, size: int, count: int, length: int) -> tuple[str, int]:
        path = self.workdir / name
        extents = make_spread(str(path), size, count, length)
        self.data[str(path)] = tuple(extents)
        return str(path), count * length

    def device(self, backing: str, size: int | None = None, read_only: bool = False) -> str:
        if size is not None:
            with open(backing, "wb") as f:
                f.truncate(size)
        device = _loop(Path(backing), read_only)
        self.devices.append(device)
        return device

    def close(self) -> None:
        for device in self.devices:
            subprocess.run(["losetup", "-d", device], check=False)


def build_case(
    name: str,
    workload: str,
    src: str,
    dst: str,
    size: int,
    allocated: int,
    *,
    device: bool = False,
    garbage: bool = False,
    data: tuple[tuple[int, int], ...] = (),
    resident: float = 0.0,
) -> Case:
    return Case(
        name,
        workload,
        src,
        dst,
        size,
        allocated,
        dst_is_device=device,
        dst_zero=not garbage,
        garbage=garbage,
        file_to_file=not device,
        data=data,
        resident=resident,
    )


def make_cases(bench: Workbench, only: set[str], tmpfs: Path) -> list[Case]:
    w, cases = bench.workdir, []
    if "W1" in only:
        size = bench.size(4 * GiB)
        src, _ = bench.source("w1-src.img", size)
        cases.append(
            build_case(
                f"W1 dense {format_size(size)} file to file", "W1", src, str(w / "w1-dst.img"), size, size
            )
        )
    # A source just written or downloaded (Cinder's image-to-volume copy, an image cache), all or half of
    # it still in the page cache: the W1 source and destination.
    for workload, resident in (("W1-hot", 1.0), ("part-hot", 0.5)):
        if workload in only:
            size = bench.size(4 * GiB)
            src, _ = bench.source("w1-src.img", size)
            cached = "in the page cache" if resident == 1.0 else "half in the page cache"
            name = f"{workload} dense {format_size(size)} file to file, src {cached}"
            dst = str(w / "w1-dst.img")
            cases.append(build_case(name, workload, src, dst, size, size, resident=resident))
    sparse_size = bench.size(16 * GiB)
    if "W2" in only or "W3" in only:
        src, allocated = bench.source("w2-src.img", sparse_size, allocated=0.05)
        if "W2" in only:
            cases.append(
                build_case(
                    f"W2 sparse {format_size(sparse_size)} (5%) file to file",
                    "W2",
                    src,
                    str(w / "w2-dst.img"),
                    sparse_size,
                    allocated,
                    data=bench.data[src],
                )
            )
        if "W3" in only:  # the W2 image behind a loop device: no SEEK_DATA, zero detection decides
            src_dev = bench.device(src, read_only=True)
            dst_dev = bench.device(str(w / "w3-dst-backing.img"), sparse_size)
            for garbage in (False, True):
                label = "garbage" if garbage else "zeroed"
                cases.append(
                    build_case(
                        f"W3 sparse {format_size(sparse_size)} loop to {label} loop",
                        "W3",
                        src_dev,
                        dst_dev,
                        sparse_size,
                        allocated,
                        device=True,
                        garbage=garbage,
                        data=bench.data[src],
                    )
                )
    if "W4" in only:
        size = bench.size(2 * GiB)
        src, _ = bench.source("volcopy-bench-w4-src.img", size, directory=tmpfs)
        cases.append(
            build_case(
                f"W4 dense {format_size(size)} tmpfs to tmpfs",
                "W4",
                src,
                str(tmpfs / "volcopy-bench-w4-dst.img"),
                size,
                size,
            )
        )
    if "W5" in only:  # time must follow the allocated bytes, not the size
        allocated_bytes = int(bench.size(16 * GiB) * 0.05)
        for nominal in (4, 16, 64):
            size = bench.size(nominal * GiB)
            src, allocated = bench.source(
                f"w5-sparse-{nominal}.img", size, allocated=0.0, allocated_bytes=allocated_bytes
            )
            cases.append(
                build_case(
                    f"W5 sparse {format_size(size)} ({format_size(allocated)} data) file to file",
                    "W5",
                    src,
                    str(w / f"w5-sparse-{nominal}-dst.img"),
                    size,
                    allocated,
                    data=bench.data[src],
                )
            )
        for nominal in (1, 2, 4):
            size = bench.size(nominal * GiB)
            src, _ = bench.source(f"w5-dense-{nominal}.img", size)
            cases.append(
                build_case(
                    f"W5 dense {format_size(size)} file to file",
                    "W5",
                    src,
                    str(w / f"w5-dense-{nominal}-dst.img"),
                    size,
                    size,
                )
            )
    if "W6" in only:  # holes must cost neither time nor memory: against a dense copy of the same data
        size = max(bench.size(1 << 40) * 8, GiB)  # 8 TiB (ext4 refuses 16 TiB)
        count = max(16, bench.size(GiB) // W6_EXTENT)
        src, allocated = bench.spread_source("w6-src.img", size, count, W6_EXTENT)
        data = f"{format_size(allocated)} data in {count} extents"
        name = f"W6 sparse {format_size(size)} ({data}) file to file"
        dst = str(w / "w6-dst.img")
        cases.append(build_case(name, "W6", src, dst, size, allocated, data=bench.data[src]))
        dense, _ = bench.source("w6-dense.img", allocated)
        name = f"W6-dense {format_size(allocated)} file to file, W6's data without its holes"
        cases.append(build_case(name, "W6-dense", dense, str(w / "w6-dense-dst.img"), allocated, allocated))
    if "W7" in only:  # a command's fixed cost: its start-up and exit around a copy of 1 MiB (not scaled)
        src, _ = bench.source("w7-src.img", MiB)
        name = "W7 a command's fixed cost: 1.0 MiB file to file"
        cases.append(build_case(name, "W7", src, str(w / "w7-dst.img"), MiB, MiB))
    for case in cases:  # fio's I/O logs go with the workloads, and are removed with them
        case.scratch = str(w)
    return cases


def measure(argv: list[str]) -> tuple[float, float, int, int, str]:
    """Wall seconds, user+sys CPU seconds, peak RSS bytes, exit status and stderr's end, of one command.

    The peak RSS comes from GNU time, which forks the tool from a small process: a child of this Python
    would carry Python's own peak into its count (exec keeps the old address space's high-water mark)."""
    with tempfile.NamedTemporaryFile(prefix="volcopy-bench-rss-") as rss_file:
        started = time.monotonic()
        proc = subprocess.Popen(
            ["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        rss_kib = int((Path(rss_file.name).read_text().split() or ["0"])[-1])
    return seconds, usage.ru_utime + usage.ru_stime, rss_kib * 1024, proc.returncode, stderr.decode()[-300:]
