"""Opening volumes: a regular file or a block device, given as a path or an open descriptor, or a Ceph
RBD image given as ``rbd:POOL/IMAGE...`` (rbd_volume.py).

Every check that can refuse a request happens here, before any byte of dst is written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from . import rbd_volume
from ._core import KIND_BLOCKDEV, KIND_FILE, KIND_RBD, Endpoint
from .errors import InvalidRequest
from .rbd_volume import RBDImage, RBDSpec, is_rbd

VolumeSpec = str | os.PathLike[str] | int | RBDSpec

BLKSSZGET = 0x1268  # logical block size of a block device
BLKROGET = 0x125E  # whether a block device is read-only: it still opens O_RDWR, then fails each write


class Volume:
    """An opened volume. ``fd`` carries O_DIRECT when ``direct``; ``fd_buffered`` never does. An RBD
    image has no descriptors (-1): ``rbd`` holds it. (Not a dataclass: _core.py says why.)"""

    def __init__(
        self,
        *,
        name: str,
        kind: int,
        size: int,
        fd: int,
        fd_buffered: int,
        direct: bool,
        identities: frozenset = frozenset(),  # what makes two volumes the same
        created: bool = False,
        path: str | None = None,  # of a file created for this copy
        rbd: RBDImage | None = None,
    ):
        self.name, self.kind, self.size = name, kind, size
        self.fd, self.fd_buffered, self.direct = fd, fd_buffered, direct
        self.identities, self.created, self.path, self.rbd = identities, created, path, rbd

    def endpoint(self) -> Endpoint:
        handle = self.rbd.handle if self.rbd else None
        return Endpoint(self.fd, self.fd_buffered, self.kind, self.direct, self.name, handle)

    def read(self, offset: int, size: int) -> bytes:
        return self.rbd.read(offset, size) if self.rbd else os.pread(self.fd_buffered, size, offset)

    def remove_created(self) -> None:
        """Deletes a volume this copy created (a half-written copy is worth nothing), and closes it."""
        if self.rbd:
            self.rbd.remove()
        elif self.path:
            os.unlink(self.path)
        self.close()

    def close(self) -> None:
        for fd in {self.fd, self.fd_buffered}:
            if fd >= 0:
                os.close(fd)
        self.fd = self.fd_buffered = -1
        if self.rbd:
            self.rbd.close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe(spec: VolumeSpec) -> str:
    if is_rbd(spec):
        return str(rbd_volume.parse(spec))
    if isinstance(spec, int):
        return f"fd {spec}"
    return os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else repr(spec)


def block_device_dir(rdev: int) -> str | None:
    """The sysfs directory of a block device (a partition's lies inside its disk's)."""
    path = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    return os.path.realpath(path) if os.path.exists(path) else None


def read_attribute(path: str) -> str | None:
    """A sysfs attribute's text, or None."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _rdev_of(sysfs_dir: str) -> int | None:
    dev = read_attribute(os.path.join(sysfs_dir, "dev"))
    if not dev:
        return None
    major, minor = dev.split(":")
    return os.makedev(int(major), int(minor))


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _closure(start: str, step) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in step(todo.pop()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def _below(d: str) -> list[str]:
    """What is built on a device: its partitions, and the devices holding it (an LV, a dm or md device)."""
    parts = [os.path.join(d, c) for c in _listdir(d) if os.path.exists(os.path.join(d, c, "partition"))]
    holders = os.path.join(d, "holders")
    return parts + [os.path.realpath(os.path.join(holders, h)) for h in _listdir(holders)]


def _above(d: str) -> list[str]:
    """What a device is built on: the disk of a partition, the devices under a dm or md device, the
    device under a loop device over a device."""
    up = [os.path.dirname(d)] if os.path.exists(os.path.join(d, "partition")) else []
    up += [os.path.realpath(os.path.join(d, "slaves", s)) for s in _listdir(os.path.join(d, "slaves"))]
    backing = _stat(loop_backing_file(d))
    if backing and stat.S_ISBLK(backing.st_mode):
        up += [x for x in [block_device_dir(backing.st_rdev)] if x]
    return up


def loop_backing_file(sysfs_dir: str) -> str | None:
    return read_attribute(os.path.join(sysfs_dir, "loop", "backing_file"))


def _stat(path: str | None) -> os.stat_result | None:
    try:
        return os.stat(path) if path else None
    except OSError:
        return None


def _loop_backing(sysfs_dir: str) -> set:
    """The backing file of a loop device, as an identity (a device under it is in _above)."""
    st = _stat(loop_backing_file(sysfs_dir))
    return {("inode", st.st_dev, st.st_ino)} if st and stat.S_ISREG(st.st_mode) else set()


def _identities(st: os.stat_result) -> frozenset:
    """A block device is known by its device number, a file by its inode; a loop device is also
    known by its backing file, so that a file and the loop device over it count as the same."""
    if stat.S_ISREG(st.st_mode):
        return frozenset({("inode", st.st_dev, st.st_ino)})
    d = block_device_dir(st.st_rdev)
    return frozenset({("blockdev", st.st_rdev)} | (_loop_backing(d) if d else set()))


def _overlapping(st: os.stat_result) -> frozenset:
    """The identities of every volume that shares bytes with this one: itself, what it is built on
    (a partition's disk, a loop device's file, a dm device's parts) and what is built on it (its
    partitions, its holders). Two partitions of one disk do not overlap: neither is above the other."""
    d = block_device_dir(st.st_rdev) if stat.S_ISBLK(st.st_mode) else None
    if d is None:
        return _identities(st)
    related = {d} | _closure(d, _above) | _closure(d, _below)
    ids = set()
    for r in related:
        rdev = _rdev_of(r)
        if rdev is not None:
            ids.add(("blockdev", rdev))
        ids |= _loop_backing(r)
    return frozenset(ids)


def _kind(st: os.stat_result, name: str, role: str) -> int:
    if stat.S_ISREG(st.st_mode):
        return KIND_FILE
    if stat.S_ISBLK(st.st_mode):
        return KIND_BLOCKDEV
    what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file or block device"
    raise InvalidRequest(f"{role} {name} is {what}, not a volume")


def size_of(path: str | RBDSpec) -> int:
    """The size of a volume given by path: a file's length, a device's capacity, an RBD image's size."""
    if is_rbd(path):
        image = rbd_volume.open_image(path, "volume")
        try:
            return image.info.size
        finally:
            image.close()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _size(fd: int, st: os.stat_result) -> int:
    return st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)


def _ioctl_int(fd: int, request: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, request, b"\0" * 4), "little")


def _open(path: str, flags: int, name: str, role: str) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidRequest(f"{role} {name} does not exist") from None
    except IsADirectoryError:
        raise InvalidRequest(f"{role} {name} is a directory, not a volume") from None
    except PermissionError as exc:
        raise InvalidRequest(f"{role} {name}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise InvalidRequest(f"{role} {name} is read-only") from None
        if exc.errno == errno.EBUSY:
            raise InvalidRequest(f"{role} {name} is busy (mounted or held by another program)") from None
        raise InvalidRequest(f"cannot open {role} {name}: {exc.strerror}") from None


def _open_direct(path: str, flags: int, direct, name: str, role: str) -> int:
    """The O_DIRECT descriptor, or -1 when direct is "auto" and the file system refuses O_DIRECT."""
    if direct is False:
        return -1
    try:
        return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        if direct == "auto":
            return -1
        raise InvalidRequest(
            f"{role} {name}: its file system refuses O_DIRECT; use direct='auto' or False"
        ) from None


def _path_of(spec: VolumeSpec, role: str) -> str:
    """Descriptors are reopened through /proc so that we get our own flags (O_DIRECT or not)."""
    if isinstance(spec, int):
        if spec < 0:
            raise InvalidRequest(f"{role} fd {spec} is not a valid descriptor")
        try:
            os.fstat(spec)
        except OSError:
            raise InvalidRequest(f"{role} fd {spec} is not an open descriptor") from None
        return f"/proc/self/fd/{spec}"
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec)
    raise InvalidRequest(f"{role} must be a path or an open file descriptor, not {type(spec).__name__}")


def _rbd_volume(image: RBDImage) -> Volume:
    return Volume(
        name=str(image.spec),
        kind=KIND_RBD,
        size=image.info.size,
        fd=-1,
        fd_buffered=-1,
        direct=False,
        identities=frozenset({image.identity}),
        created=image.created,
        rbd=image,
    )


def open_source(spec: VolumeSpec, direct="auto") -> Volume:
    if is_rbd(spec):
        return _rbd_volume(rbd_volume.open_image(spec, "source"))
    name = describe(spec)
    path = _path_of(spec, "source")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidRequest(f"source {name} does not exist") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot open source {name}: {exc.strerror}") from None
    kind = _kind(st, name, "source")
    fd_buffered = _open(path, os.O_RDONLY, name, "source")
    try:
        fd = _open_direct(path, os.O_RDONLY, direct, name, "source")
        return Volume(
            name=name,
            kind=kind,
            size=_size(fd_buffered, st),
            fd=fd if fd >= 0 else fd_buffered,
            fd_buffered=fd_buffered,
            direct=fd >= 0,
            identities=_identities(st),
        )
    except BaseException:
        os.close(fd_buffered)
        raise


def overlaps(source: Volume, spec: VolumeSpec) -> bool:
    """Whether dst (not opened or created: it may not exist yet) shares bytes with source, which would
    then be overwritten while it is read. Each side is checked against what overlaps the other: one
    side alone cannot see every relation (nothing lists the loop devices built on a device).
    An RBD image is the same as another under any spelling that reaches the same cluster, pool,
    namespace and image id (a snapshot of it included)."""
    if is_rbd(spec):
        if source.rbd is None:
            return False
        try:
            image = rbd_volume.open_image(spec, "destination")
        except InvalidRequest:  # not there yet (open_destination gives the real reason, if any)
            return False
        try:
            return image.identity in source.identities
        finally:
            image.close()
    if source.rbd is not None:
        return False
    try:
        dst = os.stat(_path_of(spec, "destination"))
    except FileNotFoundError:
        return False
    src = os.fstat(source.fd_buffered)
    return bool(source.identities & _overlapping(dst) or _identities(dst) & _overlapping(src))


def open_destination(spec: VolumeSpec, length: int, direct="auto") -> Volume:
    """Opens dst for writing; a missing path becomes a new file of ``length`` bytes (reading as zeros),
    an existing smaller file is extended. Nothing is ever truncated: a resumed copy needs what is there.
    A missing RBD image is created; an existing one smaller than ``length`` is refused (it is someone's
    volume: not resized behind their back)."""
    if is_rbd(spec):
        return _open_rbd_destination(spec, length)
    name = describe(spec)
    path = _path_of(spec, "destination")
    if isinstance(spec, int) and fcntl.fcntl(spec, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
        raise InvalidRequest(f"destination {name} is open read-only")
    created = False
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if isinstance(spec, int):
            raise
        try:
            fd_buffered = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            raise InvalidRequest(f"destination {name}: its directory does not exist") from None
        except OSError as exc:
            raise InvalidRequest(f"cannot create destination {name}: {exc.strerror}") from None
        created = True
        st = os.fstat(fd_buffered)
    kind = _kind(st, name, "destination")
    if not created:
        # O_EXCL on a block device refuses one that is mounted or held open exclusively.
        flags = os.O_RDWR | (os.O_EXCL if kind == KIND_BLOCKDEV else 0)
        fd_buffered = _open(path, flags, name, "destination")
    try:
        size = _size(fd_buffered, st)
        if kind == KIND_BLOCKDEV:
            if size < length:
                raise InvalidRequest(
                    f"destination {name} holds {size} bytes, less than the {length} bytes to copy"
                )
            if _ioctl_int(fd_buffered, BLKROGET):
                raise InvalidRequest(f"destination {name} is read-only")
            if _ioctl_int(fd_buffered, BLKSSZGET) > 4096:
                raise InvalidRequest(
                    f"destination {name}: logical blocks larger than 4096 bytes are not supported"
                )
        elif size < length:
            os.ftruncate(fd_buffered, length)
            size = length
        fd = _open_direct(path, os.O_RDWR, direct, name, "destination")
        return Volume(
            name=name,
            kind=kind,
            size=size,
            fd=fd if fd >= 0 else fd_buffered,
            fd_buffered=fd_buffered,
            direct=fd >= 0,
            identities=_identities(os.fstat(fd_buffered)),
            created=created,
            path=path if created else None,
        )
    except BaseException:
        os.close(fd_buffered)
        if created:
            os.unlink(path)
        raise


def _open_rbd_destination(spec, length: int) -> Volume:
    image = rbd_volume.open_image(spec, "destination", write=True, create_size=length)
    if image.info.size < length:
        image.close()
        raise InvalidRequest(
            f"destination {image.spec} holds {image.info.size} bytes, less than the {length} bytes to copy"
        )
    return _rbd_volume(image)
