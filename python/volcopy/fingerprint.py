"""What a checkpoint must match to be resumed: src and its state, dst's identity, and the request.

- src: which volume, and for a file its size, modification and change times, so that a src edited
  between two runs is not resumed over (for a loop device, those of its file). Another block device
  has no such times: its identity and size.
- dst: an identity that survives a re-attach, since os-brick may attach the same volume again under
  another /dev name: for a file its inode with its generation and birth time (a file deleted and
  created again may get the same inode number, not the same generation or birth); for a device its
  WWN, serial or dm/md uuid, or for a loop device its backing file; or an id the caller passes
  (Cinder's volume id). A device with none of these is known by its number and diskseq: another
  volume attached there later is refused, and so is a re-attach (pass dst_id for that).
- an RBD image: its cluster fsid, pool, namespace and image id (which survive a rename), and for a src
  the snapshot id, or for the image itself its size and librbd's modification time.
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


def _file_identity(fd: int) -> tuple:
    st = os.fstat(fd)
    generation, birth = _generation(fd), _birth_time(fd)
    if generation is None and birth is None:  # nothing else tells two files of one inode number apart
        return ("file", st.st_dev, st.st_ino)
    # st_dev is left out where it can: it may change across a remount (btrfs subvolumes, NFS)
    return ("file", st.st_ino, generation, birth)


def _file_state(fd: int) -> tuple:
    st = os.fstat(fd)
    return (_file_identity(fd), st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _device_identity(rdev: int, with_state: bool) -> tuple:
    """A disk by its WWN, serial or dm/md uuid; a loop device by its backing file (and, for a src,
    that file's state); otherwise its device number and diskseq, which a later attach never repeats
    (so a re-attach there is refused: the safe side)."""
    d = block_device_dir(rdev)
    if d is None:
        return ("blockdev", rdev)
    partition = read_attribute(os.path.join(d, "partition"))
    disk = os.path.dirname(d) if partition else d
    where = (partition, read_attribute(os.path.join(d, "start")))
    for name in ("wwid", "device/wwid", "device/serial", "serial", "dm/uuid", "md/uuid"):
        value = read_attribute(os.path.join(disk, name))
        if value:
            return ("device", name, value, where)
    backing = loop_backing_file(disk)
    if backing:
        try:
            fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                identity = _file_state(fd) if with_state else _file_identity(fd)
            finally:
                os.close(fd)
            return ("loop", identity, read_attribute(os.path.join(disk, "loop", "offset")), where)
    return ("blockdev", rdev, read_attribute(os.path.join(disk, "diskseq")), where)


def fingerprints(source: Volume, target: Volume, length: int, extents, dst_id: str | None) -> Fingerprints:
    if source.rbd:
        src = source.rbd.state
    elif stat.S_ISREG((src_st := os.fstat(source.fd_buffered)).st_mode):
        src = _file_state(source.fd_buffered)
    else:
        src = (_device_identity(src_st.st_rdev, with_state=True), source.size)
    if target.rbd:  # its image id survives any reopening; a caller's id must not hide a new image
        dst = target.rbd.identity
    elif dst_id is not None:
        dst = ("id", dst_id)
    else:
        dst_st = os.fstat(target.fd_buffered)
        is_file = stat.S_ISREG(dst_st.st_mode)
        dst = _file_identity(target.fd_buffered) if is_file else _device_identity(dst_st.st_rdev, False)
    request = (length, extents.tobytes() if extents is not None else None)
    return Fingerprints(src=_hash(*src), dst=_hash(*dst), request=_hash(*request))
