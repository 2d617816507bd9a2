"""Ceph RBD images as volumes, opened by the native core through librbd: no host path, no krbd.

An image is named the way QEMU names one, ``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE]...``:
``conf`` is the ceph.conf to read, ``id`` the cephx user (without ``client.``), and any other key a
librados setting such as ``mon_host`` or ``keyring``; a backslash escapes ``:``, ``/``, ``@`` and
itself. Cinder's RBD connection_info names the same things (:func:`from_connection_info`).
"""

from __future__ import annotations

import errno
import re
import threading
from collections.abc import Callable, Mapping

from . import _core
from .errors import CopyIOError, InvalidRequest

PREFIX = "rbd:"
# Settings whose value is a secret: never printed.
_SECRET_KEYS = {"key", "keyfile"}
# librados' names: lowercase words joined by _, - or spaces (a cephx key starts "AQ": never one)
_SETTING_NAME = re.compile(r"[a-z][a-z0-9_ -]*")
# What a caller's mistake looks like; anything else (a cluster not answering) is an I/O failure.
_REQUEST_ERRORS = {
    errno.ENOENT,
    errno.EINVAL,
    errno.EROFS,
    errno.EOPNOTSUPP,
    errno.EEXIST,
    errno.EPERM,
    errno.EBUSY,
}


class RBDSpec:
    """An image's name, read-only and hashable. (Not a dataclass: _core.py says why.)"""

    __slots__ = ("pool", "namespace", "image", "snap", "conf", "user", "options", "own_clients")

    def __init__(
        self,
        pool: str,
        namespace: str,
        image: str,
        snap: str | None = None,
        conf: str | None = None,
        user: str | None = None,
        options: tuple[tuple[str, str], ...] = (),
        # Clients of the caller's own with the image open (os-brick's wrapper that handed it over): not
        # someone else using it. Not part of the name.
        own_clients: int = 0,
    ):
        values = (pool, namespace, image, snap, conf, user, options, own_clients)
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"an RBDSpec is read-only: cannot set {name}")

    def __reduce__(self):
        return RBDSpec, tuple(getattr(self, name) for name in self.__slots__)

    def _name(self) -> tuple:
        return (self.pool, self.namespace, self.image, self.snap, self.conf, self.user, self.options)

    def __eq__(self, other) -> bool:
        return isinstance(other, RBDSpec) and self._name() == other._name()

    def __hash__(self) -> int:
        return hash(self._name())

    def __repr__(self) -> str:  # its name, a key masked
        return f"RBDSpec({str(self)!r})"

    def __str__(self) -> str:
        where = "/".join(_escape(p) for p in (self.pool, self.namespace, self.image) if p)
        text = PREFIX + where + (f"@{_escape(self.snap)}" if self.snap else "")
        for key, value in (("conf", self.conf), ("id", self.user), *self.options):
            if value is not None:
                text += f":{key}=" + ("***" if key.lower() in _SECRET_KEYS else _escape(value, ":"))
        return text

    @property
    def image_spec(self) -> str:
        """POOL[/NAMESPACE]/IMAGE[@SNAP], as the rbd command takes it."""
        where = "/".join(p for p in (self.pool, self.namespace, self.image) if p)
        return where + (f"@{self.snap}" if self.snap else "")


def _escape(text: str, separators: str = ":/@") -> str:
    return re.sub(f"([\\\\{separators}])", r"\\\1", text)


def is_rbd(spec) -> bool:
    return isinstance(spec, (str, RBDSpec)) and (isinstance(spec, RBDSpec) or spec.startswith(PREFIX))


def _split(text: str, separators: str) -> list[tuple[str, str]]:
    """Splits at unescaped separators; each piece with the separator that ended it ('' at the end)."""
    pieces, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in separators:
            pieces.append(("".join(current), ch))
            current = []
        else:
            current.append(ch)
    if escaped:
        # not the text itself: it may be the settings, with a secret among them
        raise InvalidRequest("an rbd: name or one of its settings ends with a lone backslash")
    pieces.append(("".join(current), ""))
    return pieces


def _split_once(text: str) -> tuple[str, str]:
    """The location and the settings: the text up to the first unescaped ':', and after it, both still
    escaped (in the settings, '/' and '@' are plain characters of paths and values)."""
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            return text[:i], text[i + 1 :]
    return text, ""


def parse(text: str) -> RBDSpec:
    """``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE]...`` as an RBDSpec; InvalidRequest when malformed."""
    if isinstance(text, RBDSpec):
        return text
    location, settings = _split_once(text[len(PREFIX) :])
    # the location only: the settings may hold a secret
    usage = f"{PREFIX}{location}: an RBD volume is rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER]"
    pieces = _split(location, "/@")
    separators = [separator for _, separator in pieces]
    names, snap = [piece for piece, _ in pieces], None
    if "@" in separators:
        at = separators.index("@")
        if at != len(pieces) - 2 or not names[-1]:
            raise InvalidRequest(f"{usage} (the snapshot name must come last and not be empty)")
        snap = names.pop()
    if len(names) not in (2, 3) or not all(names):
        raise InvalidRequest(usage)
    pool, namespace, image = (names[0], "", names[1]) if len(names) == 2 else names
    conf = user = None
    options = []
    for number, (setting, _) in enumerate(_split(settings, ":") if settings else [], 1):
        key, equals, value = setting.partition("=")
        # Not shown: a secret given without its key (base64, often ending in "=") lands here.
        if not equals or not value or not _SETTING_NAME.fullmatch(key):
            raise InvalidRequest(
                f"{usage} (setting {number} after the image is not KEY=VALUE with a Ceph setting's name)"
            )
        if key == "conf":
            conf = value
        elif key == "id":
            user = value
        else:
            options.append((key, value.replace(";", ",")))  # QEMU's mon_host list separator
    return RBDSpec(pool, namespace, image, snap or None, conf, user, tuple(options))


def _keyring_secret(keyring: str) -> str | None:
    """The ``key = ...`` of a keyring's text (Cinder may pass the keyring's content)."""
    match = re.search(r"^\s*key\s*=\s*(\S+)", keyring, re.MULTILINE)
    return match.group(1) if match else None


def from_connection_info(connection_info: Mapping) -> RBDSpec:
    """Cinder's RBD connection_info (``driver_volume_type: rbd``) as an RBDSpec."""
    data = connection_info.get("data") if isinstance(connection_info, Mapping) else None
    if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
        raise InvalidRequest("RBD connection_info needs data.name, 'POOL/IMAGE'")
    names = data["name"].split("/")
    if len(names) not in (2, 3) or not all(names):
        raise InvalidRequest(f"RBD connection_info: data.name {data['name']!r} is not POOL[/NAMESPACE]/IMAGE")
    pool, namespace, image = (names[0], "", names[1]) if len(names) == 2 else names
    options = []
    hosts, ports = data.get("hosts") or [], data.get("ports") or []
    if not isinstance(hosts, list) or not isinstance(ports, list) or len(hosts) != len(ports):
        raise InvalidRequest("RBD connection_info: data.hosts and data.ports must be lists of one length")
    if hosts:
        monitors = [f"[{h}]:{p}" if ":" in str(h) else f"{h}:{p}" for h, p in zip(hosts, ports, strict=True)]
        options.append(("mon_host", ",".join(monitors)))
    user = data.get("auth_username") if data.get("auth_enabled", True) else None
    keyring = data.get("keyring")
    if keyring:
        secret = _keyring_secret(keyring)
        if secret is None:
            raise InvalidRequest("RBD connection_info: data.keyring holds no 'key = ...' line")
        options.append(("key", secret))
    return RBDSpec(pool, namespace, image, data.get("snapshot") or None, None, user or None, tuple(options))


class RBDImage:
    """An open image: the native handle and what identifies it."""

    def __init__(self, spec: RBDSpec, handle: object, info: _core.RBDInfo, created: bool = False):
        self.spec, self.handle, self.info, self.created = spec, handle, info, created

    @property
    def identity(self) -> tuple:
        """Cluster, pool, namespace and image id: the same image under any name or spelling."""
        return ("rbd", self.info.fsid, self.info.pool_id, self.spec.namespace, self.info.image_id)

    @property
    def state(self) -> tuple:
        """What a checkpoint's src must still match: a snapshot is fixed by its id; an image itself by
        its size and librbd's modification time (which librbd updates at most once a minute: read a
        live image from a snapshot to resume safely)."""
        fixed = self.info.snap_id is not None
        return (self.identity, self.info.snap_id, self.info.size, None if fixed else self.info.modified)

    def read(self, offset: int, size: int) -> bytes:
        return _core.rbd_read(self.handle, offset, size)

    def close(self) -> None:
        if self.handle is not None:
            _core.rbd_close(self.handle)
            self.handle = None

    def same_cluster(self, other: RBDImage) -> bool:
        return self.info.fsid == other.info.fsid

    def deep_copy_to(self, dst: RBDImage, progress: Callable[[int, int], None] | None = None) -> None:
        """librbd copies this image into dst's name in one call (rbd_deep_copy): whole objects, holes
        skipped; the bytes still pass through this host. dst (opened for writing) must be empty, of this
        size, without snapshots, and open nowhere else, and this image must have no snapshot (they would
        be carried onto dst): dst is removed and made again with its own layout (features, object size,
        striping, data pool), flattened. InvalidRequest when dst may not be replaced. progress(done,
        total) gets bytes as librbd finishes objects, from its threads; librbd cannot stop a deep copy,
        so an exception progress raises is raised once the copy has ended."""
        size, one_at_a_time = self.info.size, threading.Lock()

        def objects_done(done: int, total: int) -> bool:
            with one_at_a_time:  # librbd may report from more than one thread
                progress(size * done // total if total else size, size)
            return False

        try:
            _core.rbd_deep_copy(self.handle, dst.handle, objects_done if progress is not None else None)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.EBUSY):
                raise InvalidRequest(f"{dst.spec}: {exc.strerror}") from None
            raise CopyIOError(exc.errno, exc.strerror, str(dst.spec), 0, "deep copy") from None
        dst.info = _core.rbd_info(dst.handle)

    def remove(self) -> None:
        """Deletes the image (one this process created and did not finish)."""
        handle, self.handle = self.handle, None
        _core.rbd_remove(handle)


def open_image(spec, role: str, *, write: bool = False, create_size: int | None = None) -> RBDImage:
    """Opens an image for reading, or for writing (creating it, create_size bytes, when asked)."""
    spec = parse(spec)
    try:
        handle, created = _core.rbd_open(
            spec.pool,
            spec.namespace,
            spec.image,
            spec.snap,
            spec.conf,
            spec.user,
            spec.options,
            write=write,
            create_size=create_size,
            own_clients=spec.own_clients,
        )
    except OSError as exc:
        if exc.errno in _REQUEST_ERRORS:
            raise InvalidRequest(f"{role} {spec}: {exc.strerror}") from None
        raise CopyIOError(
            exc.errno, f"cannot open {role} {spec}: {exc.strerror}", str(spec), 0, "setup"
        ) from None
    try:
        return RBDImage(spec, handle, _core.rbd_info(handle), created)
    except OSError as exc:
        _core.rbd_close(handle)
        raise CopyIOError(exc.errno, f"{role} {spec}: {exc.strerror}", str(spec), 0, "setup") from None
