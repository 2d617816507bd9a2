"""Ceph RBD images as the compute handoff's volumes: Cinder's RBD connection_info read and checked, and
the image described to QEMU (its ``rbd`` block driver: no host path, no kernel client, no os-brick).

An image is named ``rbd:POOL/IMAGE`` (``rbd:POOL/NAMESPACE/IMAGE`` in a namespace), QEMU's spelling: the
agent's records and a disk's chain use that name, and how to reach the cluster (monitors, user, conf
file) travels beside it. A volume in the agent's configuration may add ``:conf=PATH``, ``:id=USER`` and
``:mon_host=HOST\\:PORT[;...]`` (volcopy's spelling of an RBD volume, volcopy.rbd_volume).

Cinder's RBD driver (initialize_connection) hands out::

    {"driver_volume_type": "rbd",
     "data": {"name": "POOL/IMAGE", "hosts": ["10.0.0.1", ...], "ports": ["6789", ...],
              "cluster_name": "ceph", "auth_enabled": true, "auth_username": "cinder",
              "secret_type": "ceph", "secret_uuid": "...", "volume_id": "...", "discard": true}}

and, from older releases or cinderlib, ``keyring`` (the keyring file's text). Since Victoria (OSSN-0085:
a key does not belong in a message) it no longer sends it, and the agent does not use one it is sent:
with cephx, QEMU's librados finds the key of ``client.USER`` on the host, where os-brick looks too
(``/etc/ceph/CLUSTER.client.USER.keyring``); Nova's libvirt finds it by ``secret_uuid``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

PREFIX = "rbd:"
# what an image's or pool's name may hold here: QEMU's legacy filename and ours use / @ : as separators
_NAME_PART = re.compile(r"^[^/@:\s\\]+$")


class MalformedRbdConnection(ValueError):
    """Cinder's RBD connection_info (or an rbd: name) that cannot describe an image; says what is wrong."""


@dataclass(frozen=True)
class RbdImage:
    pool: str
    image: str
    namespace: str = ""
    servers: tuple[tuple[str, str], ...] = ()  # the monitors (host, port); none: the conf file's
    user: str | None = None  # the cephx user without "client." (Cinder's auth_username)
    auth: bool | None = None  # cephx required (True), refused (False: "none"), or librados's default
    conf: str | None = None  # a ceph.conf for librados; none: librados's default search
    secret_uuid: str | None = None  # the libvirt secret holding the user's key (Nova's), for libvirt

    @property
    def name(self) -> str:
        """QEMU's name of the image, as a disk's chain and the agent's records show it."""
        middle = f"{self.namespace}/" if self.namespace else ""
        return f"{PREFIX}{self.pool}/{middle}{self.image}"

    def blockdev(self) -> dict:
        """QEMU's rbd node options (blockdev-add's BlockdevOptionsRbd, without driver and node-name)."""
        options: dict = {"pool": self.pool, "image": self.image}
        if self.namespace:
            options["namespace"] = self.namespace
        if self.servers:
            options["server"] = [{"host": host, "port": port} for host, port in self.servers]
        if self.user:
            options["user"] = self.user
        if self.conf:
            options["conf"] = self.conf
        if self.auth is not None:
            options["auth-client-required"] = ["cephx"] if self.auth else ["none"]
        return options

    def qemu_filename(self) -> str:
        """The image as a raw volume, in a filename qemu-img takes (a backing file name, say): QEMU's
        json: form, with the format in it (a format given beside a json: name would apply to the rbd
        node, not above it; and a raw volume's format is never probed from its content)."""
        return "json:" + json.dumps({"driver": "raw", "file": {"driver": "rbd", **self.blockdev()}})

    def cli_args(self) -> list[str]:
        """The rbd command's options that reach this image's cluster."""
        args = []
        if self.conf:
            args += ["--conf", self.conf]
        if self.servers:
            args += ["--mon-host", ",".join(_host_port(host, port) for host, port in self.servers)]
        if self.user:
            args += ["--id", self.user]
        if self.auth is False:
            args += ["--auth-client-required", "none"]
        return args

    @property
    def spec(self) -> str:
        """POOL[/NAMESPACE]/IMAGE, as the rbd command names an image."""
        return self.name.removeprefix(PREFIX)


def _host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_rbd_name(path: str | None) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def _split_name(text: str, what: str) -> tuple[str, str, str]:
    """POOL/IMAGE or POOL/NAMESPACE/IMAGE -> (pool, namespace, image)."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(_NAME_PART.match(p) for p in parts):
        raise MalformedRbdConnection(
            f"{what} must be 'POOL/IMAGE' (or 'POOL/NAMESPACE/IMAGE'), names without '/', '@', ':', "
            f"spaces or backslashes; got {text!r}"
        )
    return (parts[0], "", parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def _optional_str(data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise MalformedRbdConnection(f"RBD connection_info: data.{key} must be a non-empty string")
    return value


def _servers(data: dict) -> tuple[tuple[str, str], ...]:
    hosts, ports = data.get("hosts", []), data.get("ports", [])
    if not isinstance(hosts, list) or not isinstance(ports, list) or len(hosts) != len(ports):
        raise MalformedRbdConnection(
            "RBD connection_info: data.hosts and data.ports must be lists of the same length "
            "(the monitors' addresses and ports)"
        )
    servers = []
    for host, port in zip(hosts, ports, strict=True):
        if not isinstance(host, str) or not host.strip("[]") or any(c.isspace() for c in host):
            raise MalformedRbdConnection(f"RBD connection_info: monitor host {host!r} is not a host name")
        text = str(port) if isinstance(port, int) and not isinstance(port, bool) else port
        if not isinstance(text, str) or not text.isdigit() or not 0 < int(text) < 65536:
            raise MalformedRbdConnection(f"RBD connection_info: monitor port {port!r} is not a TCP port")
        servers.append((host.strip("[]"), text))
    return tuple(servers)


def from_connection_info(connection_info: dict) -> RbdImage:
    """The image Cinder's RBD connection_info describes; MalformedRbdConnection says what is wrong."""
    data = connection_info.get("data")
    if not isinstance(data, dict):
        raise MalformedRbdConnection("RBD connection_info: 'data' must be an object")
    name = data.get("name")
    if not isinstance(name, str):
        raise MalformedRbdConnection("RBD connection_info: data.name must be the string 'POOL/IMAGE'")
    pool, namespace, image = _split_name(name, "RBD connection_info: data.name")
    auth = data.get("auth_enabled")
    if auth is not None and not isinstance(auth, bool):
        raise MalformedRbdConnection("RBD connection_info: data.auth_enabled must be true or false")
    user = _optional_str(data, "auth_username")
    if auth and not user:
        raise MalformedRbdConnection("RBD connection_info: data.auth_enabled needs data.auth_username")
    for key in ("cluster_name", "secret_uuid", "secret_type", "volume_id", "keyring"):
        _optional_str(data, key)
    if data.get("format", "raw") != "raw":
        raise MalformedRbdConnection("RBD connection_info: an RBD image is a raw volume (data.format)")
    return RbdImage(
        pool=pool,
        image=image,
        namespace=namespace,
        servers=_servers(data),
        user=user,
        auth=auth,
        secret_uuid=data.get("secret_uuid"),
    )


def from_name(spelling: str) -> RbdImage:
    """``rbd:POOL/IMAGE[:conf=PATH][:id=USER][:mon_host=HOST\\:PORT;...]`` (the agent's configuration,
    in volcopy's spelling: volcopy.rbd_volume) as an image. A snapshot is refused: a guest's disk
    that the handoff moves is writable."""
    from ..errors import InvalidRequest
    from ..rbd_volume import parse

    try:
        spec = parse(spelling)
    except InvalidRequest as exc:
        raise MalformedRbdConnection(str(exc)) from None
    if spec.snap:
        raise MalformedRbdConnection(f"{spelling!r}: a snapshot is read-only, not a guest's disk to move")
    settings = dict(spec.options)
    if set(settings) - {"mon_host"}:
        raise MalformedRbdConnection(
            f"{spelling!r}: the settings after the image may be conf, id and mon_host, not "
            f"{', '.join(sorted(set(settings) - {'mon_host'}))}"
        )
    servers = []
    for monitor in filter(None, settings.get("mon_host", "").split(",")):
        host, _, port = monitor.rpartition(":")
        if not host or not port.isdigit():
            raise MalformedRbdConnection(f"{spelling!r}: mon_host {monitor!r} is not HOST:PORT")
        servers.append((host.strip("[]"), port))
    for part in (spec.pool, spec.namespace, spec.image):
        if part and not _NAME_PART.match(part):
            raise MalformedRbdConnection(f"{spelling!r}: names without '/', '@', ':', spaces or backslashes")
    return RbdImage(spec.pool, spec.image, spec.namespace, tuple(servers), spec.user, conf=spec.conf)


def recorded_image(path: str | None, recorded: str | None) -> RbdImage | None:
    """The RBD image the agent recorded a volume by (its JSON of connection_info and os-brick's
    device_info), or None for a host path."""
    if not is_rbd_name(path) or not recorded:
        return None
    return from_connection_info(json.loads(recorded)["connection_info"])


def name_of_node(options: dict) -> str | None:
    """The rbd: name of an image from QEMU's description of a node (its json: filename's options,
    nested or flattened), or None when the node is not an rbd image."""
    while isinstance(options.get("file"), dict) and options.get("driver") != "rbd":
        options = options["file"]
    if options.get("driver") != "rbd" or "pool" not in options or "image" not in options:
        return None
    return RbdImage(options["pool"], options["image"], options.get("namespace", "")).name


__all__ = [
    "MalformedRbdConnection",
    "RbdImage",
    "from_connection_info",
    "from_name",
    "is_rbd_name",
    "name_of_node",
    "recorded_image",
]
