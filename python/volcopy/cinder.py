"""A drop-in for Cinder's ``volume_utils.copy_volume``, on the volcopy engine.

    from volcopy.cinder import copy_volume
    copy_volume(src_path, dst_path, size_in_m, CONF.volume_dd_blocksize, sparse=True,
                ionice=CONF.volume_copy_ionice, throttle=throttle)

Same signature and meaning, with these differences: ``sparse=True`` is correct whatever dst held
(dd's ``conv=sparse`` leaves stale bytes where src is zero); dst is always flushed; ``execute`` is not
used (nothing is run through a shell: the calling process must be able to open both volumes, as
Cinder's privsep-ed code can); a block size below 1 MiB is raised to 1 MiB, the engine's unit.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from contextlib import contextmanager
from typing import IO

from .copier import CopyResult, copy
from .errors import InvalidRequest
from .units import parse_size

MiB = 1 << 20
HANDLE_CHUNK = 4 * MiB  # what Cinder's own file-handle path moves at a time

# ioprio_set/ioprio_get (x86_64 syscall numbers); IOPRIO_WHO_PROCESS with 0 is the calling thread.
_SYS_IOPRIO_SET, _SYS_IOPRIO_GET, _IOPRIO_WHO_PROCESS = 251, 252, 1
_libc = ctypes.CDLL(None, use_errno=True)


def parse_ionice(ionice: str) -> int:
    """An ionice(1) argument string (``-c3``, ``-c2 -n7``, ``-c 1 -n 0``) as an ioprio value."""
    match = re.fullmatch(r"\s*-c\s*([0-3])(?:\s+-n\s*([0-7]))?\s*", ionice)
    if not match:
        raise InvalidRequest(f"ionice {ionice!r} is not '-c CLASS [-n LEVEL]'")
    return int(match.group(1)) << 13 | int(match.group(2) or 0)


def io_priority_of_this_thread() -> int:
    return _libc.syscall(_SYS_IOPRIO_GET, _IOPRIO_WHO_PROCESS, 0)


@contextmanager
def io_priority(ionice: str | None):
    """Runs the block at the given I/O priority (the copy's I/O is issued from this thread)."""
    if not ionice:
        yield
        return
    wanted, previous = parse_ionice(ionice), io_priority_of_this_thread()
    if _libc.syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, 0, wanted) != 0:
        raise InvalidRequest(f"cannot set ionice {ionice!r}: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        _libc.syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, 0, previous)


def _rate(throttle) -> int | None:
    """Bytes per second from a number, or from Cinder's throttle object (BlkioCgroup's bps_limit)."""
    if throttle is None:
        return None
    limit = getattr(throttle, "bps_limit", throttle)
    return int(limit) if limit else None


def _block_size(blocksize) -> int:
    size = parse_size(blocksize) if isinstance(blocksize, str) else int(blocksize)
    return max(MiB, -(-size // MiB) * MiB)


def _fd(handle) -> int | None:
    try:
        return handle.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


def _copy_handles(src: IO, dst: IO, length: int, rate: int | None) -> None:
    """For handles that are not files here (an RBD image, say): chunk by chunk, at most ``rate``."""
    started, done = time.monotonic(), 0
    while done < length:
        data = src.read(min(HANDLE_CHUNK, length - done))
        if not data:
            break
        dst.write(data)
        done += len(data)
        if rate:
            ahead = done / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    dst.flush()


def copy_volume(
    src,
    dst,
    size_in_m: int,
    blocksize,
    sync: bool = False,
    execute=None,
    ionice: str | None = None,
    throttle=None,
    sparse: bool = False,
) -> CopyResult | None:
    """Copies ``size_in_m`` MiB of src to dst: paths or handles, as Cinder's copy_volume takes them.
    Returns the engine's CopyResult, or None when a handle without a descriptor took the Python path.
    ``sync`` and ``execute`` are accepted for Cinder's signature: dst is always flushed, nothing is
    executed."""
    length, rate = size_in_m * MiB, _rate(throttle)
    with io_priority(ionice):
        if not isinstance(src, (str, os.PathLike)) or not isinstance(dst, (str, os.PathLike)):
            src_fd = src if isinstance(src, (str, os.PathLike)) else _fd(src)
            dst_fd = dst if isinstance(dst, (str, os.PathLike)) else _fd(dst)
            if src_fd is None or dst_fd is None:
                src_handle = open(src, "rb") if isinstance(src, (str, os.PathLike)) else src
                dst_handle = open(dst, "r+b") if isinstance(dst, (str, os.PathLike)) else dst
                try:
                    _copy_handles(src_handle, dst_handle, length, rate)
                finally:
                    for opened, given in ((src_handle, src), (dst_handle, dst)):
                        if opened is not given:
                            opened.close()
                return None
            src, dst = src_fd, dst_fd
        return copy(
            src, dst, length=length, block_size=_block_size(blocksize), sparse=sparse, rate_limit=rate
        )


__all__ = ["copy_volume", "io_priority", "parse_ionice"]
