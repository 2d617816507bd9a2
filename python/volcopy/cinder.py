"""A drop-in for Cinder's ``volume_utils.copy_volume``, on the volcopy engine.

    from volcopy.cinder import copy_volume
    copy_volume(src_path, dst_path, size_in_m, CONF.volume_dd_blocksize, sparse=True,
                ionice=CONF.volume_copy_ionice, throttle=throttle)

Same signature and meaning, with these differences: ``sparse=True`` is correct whatever dst held
(dd's ``conv=sparse`` leaves stale bytes where src is zero); dst is always flushed; ``execute`` is not
used (nothing is run through a shell: the calling process must be able to open both volumes, as
Cinder's privsep-ed code can); a block size below 1 MiB is raised to 1 MiB, the engine's unit.

A Ceph RBD volume may also be given as Cinder's RBD connection_info, as ``rbd:POOL/IMAGE...`` or as the
file wrapper os-brick's RBD connector returns instead of a path: the engine then opens the image itself
through librbd (holes are not read, zeros are written as holes), instead of moving 4 MiB at a time
through Python.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Mapping
from contextlib import contextmanager
from typing import IO

from . import rbd_volume
from .copier import CopyResult, copy
from .errors import InvalidRequest
from .rbd_volume import RBDSpec
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


def rbd_spec_of_wrapper(handle) -> RBDSpec | None:
    """The image behind os-brick's RBD file wrapper (``RBDVolumeIOWrapper``: what RBDConnector's
    connect_volume returns as 'path' without a local attach), for the native endpoint to open on its
    own; None for any other handle. The wrapper carries the pool, the user and the ceph.conf os-brick
    wrote (mon_host, and the keyring when one was given); its image (os-brick's RBDVolume, or Cinder's
    RBDVolumeProxy, both passing calls on to rbd.Image) gives the name and, through os-brick's client,
    the namespace. The image opened at the head, as the connector opens it (an image opened at a
    snapshot does not say which: name it as ``rbd:POOL/IMAGE@SNAP`` instead)."""
    try:
        pool, user, conf, image = handle.rbd_pool, handle.rbd_user, handle.rbd_conf, handle.rbd_image
        name = image.get_name()
    except AttributeError:
        return None
    client = getattr(image, "client", None)
    ioctx = getattr(client, "ioctx", None)
    namespace = ioctx.get_namespace() if hasattr(ioctx, "get_namespace") else ""
    cluster = getattr(client, "rbd_cluster_name", None) or "ceph"
    if not conf and cluster != "ceph":  # librados' default search looks for ceph.conf only
        conf = f"/etc/ceph/{cluster}.conf"
    # The wrapper has the image open itself (a watch): that is the caller's, not someone else's use.
    return RBDSpec(pool, namespace or "", name, None, conf or None, user or None, own_clients=1)


def _same_image(spec: RBDSpec, handle, role: str) -> None:
    """The image the spec reaches is the one the wrapper holds (same image id), not a namesake."""
    wanted = handle.rbd_image.id()
    image = rbd_volume.open_image(spec, role)
    try:
        if image.info.image_id != wanted:
            raise InvalidRequest(
                f"{role} {spec} is image id {image.info.image_id}, not the wrapper's image {wanted}"
            )
    finally:
        image.close()


def _engine_side(volume, role: str):
    """What the engine opens for one side (a path, a descriptor or an RBDSpec), or None for a handle
    that only Python can move."""
    if isinstance(volume, (str, os.PathLike, RBDSpec)):
        return volume
    if isinstance(volume, Mapping):
        kind = volume.get("driver_volume_type")
        if kind != "rbd":
            raise InvalidRequest(
                f"{role}: {kind} connection_info cannot be opened directly (only rbd can): attach it "
                "with os-brick and pass its path"
            )
        return rbd_volume.from_connection_info(volume)
    spec = rbd_spec_of_wrapper(volume)
    if spec is not None:
        _same_image(spec, volume, role)
        return spec
    return _fd(volume)


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
    """Copies ``size_in_m`` MiB of src to dst: paths, handles or RBD volumes (Cinder's RBD
    connection_info, ``rbd:...``, os-brick's RBD wrapper). Returns the engine's CopyResult, or None when
    a handle without a descriptor (not an RBD wrapper) took the Python path. ``sync`` and ``execute``
    are accepted for Cinder's signature: dst is always flushed, nothing is executed."""
    length, rate = size_in_m * MiB, _rate(throttle)
    with io_priority(ionice):
        src_side, dst_side = _engine_side(src, "src"), _engine_side(dst, "dst")
        if src_side is None or dst_side is None:
            for side, role in ((src_side, "src"), (dst_side, "dst")):
                if side is not None and rbd_volume.is_rbd(side):
                    raise InvalidRequest(
                        f"{role} {rbd_volume.parse(side)} is an RBD volume and the other side a handle "
                        "without a file descriptor: give that side as a path"
                    )
            src_handle = open(src, "rb") if isinstance(src, (str, os.PathLike)) else src
            dst_handle = open(dst, "r+b") if isinstance(dst, (str, os.PathLike)) else dst
            try:
                _copy_handles(src_handle, dst_handle, length, rate)
            finally:
                for opened, given in ((src_handle, src), (dst_handle, dst)):
                    if opened is not given:
                        opened.close()
            return None
        return copy(
            src_side,
            dst_side,
            length=length,
            block_size=_block_size(blocksize),
            sparse=sparse,
            rate_limit=rate,
        )


__all__ = ["copy_volume", "io_priority", "parse_ionice", "rbd_spec_of_wrapper"]
