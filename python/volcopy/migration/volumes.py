"""The two volumes of a migration, given as a local path or as Cinder's connection_info.

A path is used as it is; connection_info is attached on this host through os-brick for the copy and
detached afterwards whatever happens. The journal stores the spec, so recover() can attach it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import InvalidRequest

SECRET_WORDS = ("password", "secret", "token", "key")


def redacted(value):
    """A copy of connection_info (or any JSON) fit to show: CHAP passwords and the like masked."""
    if isinstance(value, dict):
        return {
            k: "***" if any(word in k.lower() for word in SECRET_WORDS) else redacted(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


@dataclass(frozen=True)
class VolumeRef:
    path: str | None = None
    connection_info: dict | None = None

    @classmethod
    def of(cls, spec, role: str) -> VolumeRef:
        """From what a caller passes: a path, or connection_info ({"driver_volume_type", "data"})."""
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
            return cls(connection_info=spec)
        raise InvalidRequest(
            f"{role} must be a path or Cinder connection_info (a dict with 'driver_volume_type' and "
            f"'data'), not {type(spec).__name__}"
        )

    @classmethod
    def from_json(cls, stored: dict) -> VolumeRef:
        return cls(path=stored.get("path"), connection_info=stored.get("connection_info"))

    def to_json(self) -> dict:
        return {"path": self.path} if self.path else {"connection_info": self.connection_info}

    @property
    def key(self) -> str:
        """What identifies the volume in the journal's claims, however it is given."""
        if self.path:
            return "path:" + os.path.realpath(self.path)
        data = self.connection_info["data"]
        if data.get("volume_id"):
            return "volume:" + str(data["volume_id"])
        if self.connection_info["driver_volume_type"] == "local" and data.get("device_path"):
            return "path:" + os.path.realpath(data["device_path"])
        # A hash, not the data: connection_info may hold auth_password or keys, and the key is shown
        # (migrations list, step targets).
        canonical = json.dumps(data, sort_keys=True).encode()
        return self.connection_info["driver_volume_type"] + ":" + hashlib.sha256(canonical).hexdigest()

    def __str__(self) -> str:
        if self.path:
            return self.path
        data = self.connection_info["data"]
        return f"{self.connection_info['driver_volume_type']} volume {data.get('volume_id', '')}".strip()

    def for_compute(self) -> dict:
        """The connection_info a compute attaches this volume with at complete."""
        if self.connection_info:
            return self.connection_info
        return {"driver_volume_type": "local", "data": {"device_path": self.path}}

    @contextmanager
    def attached(self) -> Iterator[str]:
        """The volume's local path for as long as the block runs."""
        if self.path:
            yield self.path
            return
        from ..attach import attach, detach

        attachment = attach(self.connection_info)
        try:
            yield attachment.path
        finally:
            detach(attachment)
