"""The two volumes of a migration, given as a local path, as Cinder's connection_info, or as an RBD image
(``rbd:POOL/IMAGE...``).

A path is used as it is; connection_info is attached on this host through os-brick for the copy and
detached afterwards whatever happens, except an RBD volume's (``driver_volume_type: rbd``), which the
engine opens itself through librbd, as it opens an ``rbd:`` spec: nothing is attached. The journal
stores the spec, so recover() can reach the volume again.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .. import rbd_volume
from ..errors import InvalidRequest
from ..rbd_volume import RBDSpec

SECRET_WORDS = ("password", "secret", "token", "key")


def redacted(value):
    """A copy of connection_info (or any JSON) fit to show: CHAP passwords, keys and the like masked."""
    if isinstance(value, dict):
        return {
            k: "***" if any(word in k.lower() for word in SECRET_WORDS) else redacted(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def _rbd_to_json(spec: RBDSpec) -> dict:
    """An RBDSpec for the journal: the options as a dict, so that redacted() masks a key in them."""
    return {
        "pool": spec.pool,
        "namespace": spec.namespace,
        "image": spec.image,
        "snap": spec.snap,
        "conf": spec.conf,
        "user": spec.user,
        "options": dict(spec.options),
    }


def _rbd_from_json(stored: dict) -> RBDSpec:
    return RBDSpec(
        stored["pool"],
        stored["namespace"],
        stored["image"],
        stored["snap"],
        stored["conf"],
        stored["user"],
        tuple(stored["options"].items()),
    )


@dataclass(frozen=True)
class VolumeRef:
    path: str | None = None
    connection_info: dict | None = None
    rbd: dict | None = None  # an RBD image named by an rbd: spec (_rbd_to_json)

    @classmethod
    def of(cls, spec, role: str) -> VolumeRef:
        """From what a caller passes: a path, ``rbd:POOL/IMAGE...`` or an RBDSpec, or connection_info
        ({"driver_volume_type", "data"})."""
        if rbd_volume.is_rbd(spec):
            return cls(rbd=_rbd_to_json(rbd_volume.parse(spec)))
        if isinstance(spec, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(spec))
            if role == "src" and not os.path.exists(path):
                raise InvalidRequest(f"{role} {path} does not exist")
            if role == "dst" and not os.path.isdir(os.path.dirname(path)):
                raise InvalidRequest(f"{role} {path}: directory {os.path.dirname(path)} does not exist")
            return cls(path=path)
        if (
            isinstance(spec, dict)
            and isinstance(spec.get("driver_volume_type"), str)
            and isinstance(spec.get("data"), dict)
        ):
            try:
                json.dumps(spec)
            except (TypeError, ValueError):
                raise InvalidRequest(f"{role} connection_info must be JSON-serialisable") from None
            if spec["driver_volume_type"] == "rbd":
                rbd_volume.from_connection_info(spec)  # refused now, before anything is recorded
            return cls(connection_info=spec)
        raise InvalidRequest(
            f"{role} must be a path, rbd:POOL/IMAGE or Cinder connection_info (a dict with "
            f"'driver_volume_type' and 'data'), not {type(spec).__name__}"
        )

    @classmethod
    def from_json(cls, stored: dict) -> VolumeRef:
        return cls(
            path=stored.get("path"), connection_info=stored.get("connection_info"), rbd=stored.get("rbd")
        )

    @property
    def transport(self) -> str:
        """How it is reached, as the data movers name it (movers/transports.py): ``file``, ``rbd``, or
        connection_info's ``driver_volume_type``."""
        if self.path:
            return "file"
        return "rbd" if self.rbd else self.connection_info["driver_volume_type"].lower()

    def to_json(self) -> dict:
        if self.path:
            return {"path": self.path}
        return {"rbd": self.rbd} if self.rbd else {"connection_info": self.connection_info}

    @property
    def rbd_spec(self) -> RBDSpec | None:
        """The RBD image the engine opens itself, from an rbd: spec or RBD connection_info; else None."""
        if self.rbd:
            return _rbd_from_json(self.rbd)
        if self.connection_info and self.connection_info["driver_volume_type"] == "rbd":
            return rbd_volume.from_connection_info(self.connection_info)
        return None

    @property
    def key(self) -> str:
        """What identifies the volume in the journal's claims, however it is given."""
        if self.path:
            return "path:" + os.path.realpath(self.path)
        spec = self.rbd_spec
        if spec is not None:
            # The image alone, however it is given (rbd: or connection_info) and reached (conf, monitors,
            # user): two spellings of one image must claim one key. Images of one name on two clusters
            # share it too, which refuses the second migration: the safe side.
            return str(RBDSpec(spec.pool, spec.namespace, spec.image, spec.snap))
        data = self.connection_info["data"]
        if data.get("volume_id"):
            return "volume:" + str(data["volume_id"])
        if self.connection_info["driver_volume_type"] == "local" and data.get("device_path"):
            return "path:" + os.path.realpath(data["device_path"])
        # A hash, not the data: connection_info may hold auth_password or keys, and the key is shown
        # (migrations list, step targets).
        canonical = json.dumps(data, sort_keys=True).encode()
        import hashlib  # here: every volcopy command imports this module to build its parser

        return self.connection_info["driver_volume_type"] + ":" + hashlib.sha256(canonical).hexdigest()

    @property
    def cluster(self) -> tuple | None:
        """How an RBD volume's cluster is reached (conf file, monitors), None otherwise. Two volumes of
        one key reached alike are one image; reached apart, they may be namesakes in two clusters."""
        spec = self.rbd_spec
        return None if spec is None else (spec.conf, dict(spec.options).get("mon_host"))

    @property
    def backend(self) -> str:
        """The storage backend the volume lives on, as far as its connection tells (for the movers'
        per-backend limit): an iSCSI or NVMe-oF target portal, Fibre Channel target ports, a Ceph pool
        of a cluster, a local device; for a path, the file system (or device) it is on, on this host."""
        if self.path:
            path = self.path if os.path.exists(self.path) else os.path.dirname(self.path)
            st = os.stat(path)
            device = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
            return f"device:{os.major(device)}:{os.minor(device)}"
        spec = self.rbd_spec
        if spec is not None:
            cluster = self.cluster or (None, None)
            return f"rbd:{cluster[0] or ''}:{cluster[1] or ''}:{spec.pool}"
        kind = self.connection_info["driver_volume_type"].lower()
        data = self.connection_info["data"]
        for field in ("target_portal", "target_portals", "target_wwn", "portals", "device_path"):
            value = data.get(field)
            if value:
                found = sorted(map(str, value)) if isinstance(value, list) else value
                return f"{kind}:{found}"
        return kind

    def __str__(self) -> str:
        if self.path:
            return self.path
        if self.rbd:
            return str(_rbd_from_json(self.rbd))
        data = self.connection_info["data"]
        return f"{self.connection_info['driver_volume_type']} volume {data.get('volume_id', '')}".strip()

    def for_compute(self) -> dict:
        """The connection_info a compute attaches this volume with at complete."""
        if self.connection_info:
            return self.connection_info
        if self.rbd:
            raise InvalidRequest(
                f"{self}: a compute attaches dst with Cinder's connection_info, which an rbd: spec is "
                "not; give dst as RBD connection_info ('driver_volume_type': 'rbd') for an attached volume"
            )
        return {"driver_volume_type": "local", "data": {"device_path": self.path}}

    @contextmanager
    def attached(self) -> Iterator[str | RBDSpec]:
        """The volume as the engine opens it, for as long as the block runs: its local path (attached
        through os-brick for connection_info), or for RBD an RBDSpec, opened through librbd, nothing
        attached."""
        if self.path:
            yield self.path
            return
        spec = self.rbd_spec
        if spec is not None:
            yield spec
            return
        from ..attach import attach, detach

        attachment = attach(self.connection_info)
        try:
            yield attachment.path
        finally:
            detach(attachment)
