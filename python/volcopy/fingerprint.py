"""What a checkpoint must match to be resumed: src and its state, dst's identity, and the request.

- src: which volume, and for a file its size, modification and change times, so that a src edited
  between two runs is not resumed over. A block device has no such times: its identity and size.
- dst: an identity that survives a re-attach, since os-brick may attach the same volume again under
  another /dev name: for a file its inode with its generation and birth time (a file deleted and
  created again may get the same inode number, not the same generation or birth); for a device its
  WWN or serial, or for a loop device its backing file; or an id the caller passes (Cinder's volume id).
- the request: length and extents.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import stat

from ._core import Fingerprints
from .volume import Volume, block_device_dir, loop_backing_file, read_attribute

FS_IOC_GETVERSION = 0x80087601  # the inode generation
STATX_BTIME = 0x800
AT_EMPTY_PATH = 0x1000
_STATX_SIZE = 256
_STATX_BTIME_OFFSET = 80  # struct statx: stx_btime follows the fixed fields and stx_atime


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _generation(fd: int) -> int | None:
    try:
        return int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 8)[:4], "little")
    except OSError:
        return None


def _birth_time(fd: int) -> tuple[int, int] | None:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if libc.statx(fd, b"", AT_EMPTY_PATH, STATX_BTIME, buf) != 0:
        return None
    mask = int.from_bytes(buf.raw[:4], "little")
    if not mask & STATX_BTIME:
        return None
    sec = int.from_bytes(buf.raw[_STATX_BTIME_OFFSET : _STATX_BTIME_OFFSET + 8], "little", signed=True)
    nsec = int.from_bytes(buf.raw[_STATX_BTIME_OFFSET + 8 : _STATX_BTIME_OFFSET + 12], "little")
    return sec, nsec


def _file_identity(path_or_fd) -> tuple:
    fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC) if isinstance(path_or_fd, str) else path_or_fd
    try:
        st = os.fstat(fd)
        return ("file", st.st_dev, st.st_ino, _generation(fd), _birth_time(fd))
    finally:
        if isinstance(path_or_fd, str):
            os.close(fd)


def _device_identity(rdev: int) -> tuple:
    d = block_device_dir(rdev)
    if d is None:
        return ("blockdev", rdev)
    partition = read_attribute(os.path.join(d, "partition"))
    disk = os.path.dirname(d) if partition else d
    where = (partition, read_attribute(os.path.join(d, "start")))
    for name in ("wwid", "device/wwid", "device/serial", "serial"):
        value = read_attribute(os.path.join(disk, name))
        if value:
            return ("device", name, value, where)
    backing = loop_backing_file(disk)
    if backing:
        try:
            offset = read_attribute(os.path.join(disk, "loop", "offset"))
            return ("loop", _file_identity(backing), offset, where)
        except OSError:
            pass
    return ("blockdev", rdev)


def fingerprints(source: Volume, target: Volume, length: int, extents, dst_id: str | None) -> Fingerprints:
    src_st = os.fstat(source.fd_buffered)
    if stat.S_ISREG(src_st.st_mode):
        src = (_file_identity(source.fd_buffered), src_st.st_size, src_st.st_mtime_ns, src_st.st_ctime_ns)
    else:
        src = (_device_identity(src_st.st_rdev), source.size)
    if dst_id is not None:
        dst = ("id", dst_id)
    else:
        dst_st = os.fstat(target.fd_buffered)
        is_file = stat.S_ISREG(dst_st.st_mode)
        dst = _file_identity(target.fd_buffered) if is_file else _device_identity(dst_st.st_rdev)
    request = (length, extents.tobytes() if extents is not None else None)
    return Fingerprints(src=_hash(*src), dst=_hash(*dst), request=_hash(*request))
