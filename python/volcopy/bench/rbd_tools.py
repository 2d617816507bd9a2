"""The tools compared on RBD volumes, each with the flags its users really use, each made to flush at the
end, and the limit they are held to.

A tool is a function of the case that returns its command line, or None where it does not apply, and
says whether it must make dst itself (``rbd import`` and ``rbd deep cp`` refuse an existing image, ``rbd
export`` an existing file) or is handed an empty one, as Cinder hands a migration a new volume.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..rbd_volume import RBDSpec, is_rbd, parse

# The geometry of volcopy's default pipeline (1 MiB x 32), which the limit measures at.
IO_SIZE = "1M"
QUEUE_DEPTH = 32


@dataclass
class RBDCase:
    name: str
    workload: str  # R1 ... R4
    src: str  # as volcopy names it: rbd:POOL/IMAGE:conf=PATH, or a file's path
    dst: str
    size: int
    allocated: int  # bytes of src in data extents
    dense: bool
    generated: str = ""  # the generated file that src is, or was imported from
    fio_conf: str = ""  # a ceph.conf for fio's rbd engine: the cluster's, with volcopy's librbd settings

    @property
    def src_rbd(self) -> RBDSpec | None:
        return parse(self.src) if is_rbd(self.src) else None

    @property
    def dst_rbd(self) -> RBDSpec | None:
        return parse(self.dst) if is_rbd(self.dst) else None


@dataclass(frozen=True)
class Tool:
    command: Callable[[RBDCase], list[str] | None]
    makes_dst: bool = False  # dst must not exist before it runs


def _rbd(spec: RBDSpec, *args: str) -> list[str]:
    return ["rbd", "-c", spec.conf, *args]


def _flushed(argv: list[str], case: RBDCase) -> list[str]:
    """A command writing a file, then that file synced: the tool's time includes getting it to the disk."""
    if case.dst_rbd:
        return argv
    return ["sh", "-c", f'{shlex.join(argv)} && sync "$1"', "flushed", case.dst]


def volcopy(case: RBDCase) -> list[str]:
    """Onto an empty dst, which it is told reads as zeros (a new RBD image, a new sparse file)."""
    return [sys.executable, "-m", "volcopy.cli", "copy", case.src, case.dst, "--json", "--dst-is-zero"]


def rbd_export_import(case: RBDCase) -> list[str] | None:
    """``rbd export | rbd import`` in export format 2 (image to image); ``rbd import`` of a file (which
    skips runs of zeros); ``rbd export`` to a file (which leaves holes where src reads zeros)."""
    src, dst = case.src_rbd, case.dst_rbd
    if src and dst:
        export = _rbd(src, "export", "--no-progress", "--export-format", "2", src.image_spec, "-")
        load = _rbd(dst, "import", "--no-progress", "--export-format", "2", "-", dst.image_spec)
        # bash: a failed export must fail the pipe, and dash has no pipefail
        return ["bash", "-o", "pipefail", "-c", f"{shlex.join(export)} | {shlex.join(load)}"]
    if dst:
        return _rbd(dst, "import", "--no-progress", case.src, dst.image_spec)
    return _flushed(_rbd(src, "export", "--no-progress", src.image_spec, case.dst), case)


def rbd_deep_cp(case: RBDCase) -> list[str] | None:
    """librbd's deep copy of one image into another of the same cluster (reported beside the client
    copies: it is Ceph's own, for images in one cluster only)."""
    src, dst = case.src_rbd, case.dst_rbd
    if not (src and dst):
        return None
    return _rbd(src, "deep", "cp", "--no-progress", src.image_spec, dst.image_spec)


def qemu_img(case: RBDCase) -> list[str]:
    """qemu-img convert with QEMU's rbd driver, as in the file workloads: no cache (for an image, that
    turns librbd's cache off), out-of-order writes, 16 coroutines, onto an empty dst."""
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
        "--target-is-zero",
        case.src,  # QEMU spells an image as volcopy does: rbd:POOL/IMAGE:conf=PATH
        case.dst,
    ]


def cinder(case: RBDCase) -> list[str]:
    """Cinder's own path: os-brick's RBD file wrapper, 4 MiB at a time (see cinder_path.py)."""
    return [sys.executable, "-m", "volcopy.bench.cinder_path", case.src, case.dst, str(case.size)]


def cinder_start_up(case: RBDCase) -> list[str]:
    """Python importing os-brick's RBD wrapper: inside every time of Cinder's path here, but paid once
    when Cinder's volume service starts, not for each copy."""
    return [sys.executable, "-c", "import os_brick.initiator.linuxrbd"]


def _fio_job(name: str, rw: str, size: int) -> list[str]:
    """One fio job moving every byte of a volume in order at volcopy's request size and queue depth: on
    a file with io_uring and O_DIRECT, on an image with fio's rbd engine (librbd's C API, as volcopy;
    its settings come from the ceph.conf in CEPH_CONF)."""
    spec = parse(name) if is_rbd(name) else None
    if spec:
        where = ["--ioengine=rbd", f"--pool={spec.pool}", f"--rbdname={spec.image}"]
        where.append(f"--clientname={spec.user or 'admin'}")
    else:
        where = [f"--filename={name}", "--ioengine=io_uring", "--direct=1"]
    flush = ["--end_fsync=1"] if rw == "write" and not spec else []
    return [
        f"--name={rw}",
        *where,
        f"--rw={rw}",
        f"--bs={IO_SIZE}",
        f"--size={size}",
        f"--iodepth={QUEUE_DEPTH}",
        *flush,
    ]


def _fio(path: str, rw: str, size: int) -> list[str]:
    return ["fio", "--output=/dev/null", *_fio_job(path, rw, size)]


def _rbd_bench(spec: RBDSpec, io_type: str, size: int) -> list[str]:
    """``rbd bench`` moving every byte of an image in order, at volcopy's request size and queue depth,
    librbd's cache off (as volcopy and qemu-img -t none run)."""
    return _rbd(
        spec,
        "bench",
        "--io-type",
        io_type,
        "--io-size",
        IO_SIZE,
        "--io-threads",
        str(QUEUE_DEPTH),
        "--io-total",
        str(size),
        "--io-pattern",
        "seq",
        "--rbd_cache=false",
        spec.image_spec,
    )


def rbd_bench_limit(case: RBDCase) -> list[str] | None:
    """The limit of a dense copy: a reader of src and a writer of dst at once, each moving the whole
    volume 1 MiB at a time 32 deep (``rbd bench`` on an image, fio on a file), and nothing between them:
    no buffer handed from one to the other, no hash, no zero scan. Its time includes both tools' start-up.
    For a sparse volume there is none: neither tool reads an image's extents.

    ``rbd bench`` does less per byte than any copy of real data can: it writes one buffer over and over
    (Ceph caches a buffer's checksum, so the messenger computes it once, not for every write), and it
    reads into librbd's own buffers (librbd's C API copies every byte read into the caller's)."""
    if not case.dense:
        return None
    src, dst = case.src_rbd, case.dst_rbd
    read = _rbd_bench(src, "read", case.size) if src else _fio(case.src, "read", case.size)
    write = _rbd_bench(dst, "write", case.size) if dst else _fio(case.dst, "write", case.size)
    script = f"{shlex.join(read)} >/dev/null & reader=$!; {shlex.join(write)} >/dev/null && wait $reader"
    return ["sh", "-c", script]


def fio_limit(case: RBDCase) -> list[str] | None:
    """The same limit through the interface volcopy has: fio, one job reading src and one writing dst at
    once, on an image through fio's rbd engine: librbd's C API, buffers of random data, the cache off
    and librbd's copy of written buffers as volcopy leaves it."""
    if not case.dense:
        return None
    jobs = [*_fio_job(case.src, "read", case.size), *_fio_job(case.dst, "write", case.size)]
    return ["env", f"CEPH_CONF={case.fio_conf}", "fio", "--output=/dev/null", *jobs]


LIMIT = "limit: rbd bench read + write"
FIO_LIMIT = "limit: fio read + write (librbd's C API)"
EXPORT_IMPORT = "rbd export/import"  # piped from one to the other between images
DEEP_COPY = "rbd deep cp"
CINDER = "Cinder's path (os-brick)"
CINDER_START_UP = "os-brick's import, in Cinder's path"
TOOLS: dict[str, Tool] = {
    "volcopy": Tool(volcopy),
    EXPORT_IMPORT: Tool(rbd_export_import, makes_dst=True),
    "qemu-img": Tool(qemu_img),
    CINDER: Tool(cinder),
    DEEP_COPY: Tool(rbd_deep_cp, makes_dst=True),
    LIMIT: Tool(rbd_bench_limit),
    FIO_LIMIT: Tool(fio_limit),
    CINDER_START_UP: Tool(cinder_start_up),
}
YARDSTICKS = (LIMIT, FIO_LIMIT, CINDER_START_UP)  # not copies: their output is not checked
BESIDE = (DEEP_COPY,)  # copies reported beside the client tools, not among the peers
