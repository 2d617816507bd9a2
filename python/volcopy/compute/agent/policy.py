"""What complete may attach: the agent's configuration, never the caller, decides which devices a
guest may be given."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ComputeForbidden
from ..rbd import is_rbd_name

IMAGE_FORMATS = ("raw", "qcow2")


@dataclass
class DstPolicy:
    """os-brick protocols complete may use, and where a "local" device may lie."""

    connectors: list[str]
    device_prefixes: list[str]  # "/dev/disk/by-id/" is a directory; "/dev/loop" any loop device

    def check(self, connection_info: dict) -> None:
        """Before anything is attached: the protocol, a local device's path, the image format."""
        protocol = connection_info.get("driver_volume_type")
        if protocol not in self.connectors:
            raise ComputeForbidden(
                f"connector {protocol!r} is not allowed by this compute agent (allowed: "
                f"{', '.join(self.connectors) or 'none'})"
            )
        data = connection_info.get("data", {})
        if protocol == "local":
            given = os.path.normpath(str(data.get("device_path", "")))
            # Where a symlink (/dev/disk/by-id/...) leads is what the guest would get: both must be allowed.
            for path in {given, os.path.realpath(given)}:
                if not any(path.startswith(prefix) for prefix in self.device_prefixes):
                    raise ComputeForbidden(
                        f"device path {path} lies outside the paths this compute agent may attach "
                        f"({', '.join(self.device_prefixes) or 'none are configured'})"
                    )
        if data.get("format", "raw") not in IMAGE_FORMATS:
            raise ComputeForbidden(
                f"volume format {data.get('format')!r} is not supported "
                f"(supported: {', '.join(IMAGE_FORMATS)})"
            )


def check_not_in_use(path: str, known_volumes: set[str]) -> None:
    """After attaching, before the guest gets it: never a volume of another attachment of this agent,
    nor a device this host has mounted (its root disk, say). An RBD image is known by its name."""
    if is_rbd_name(path):
        if path in known_volumes:
            raise ComputeForbidden(f"{path} is the volume of another attachment of this compute agent")
        return
    real = os.path.realpath(path)
    if real in {os.path.realpath(v) for v in known_volumes}:
        raise ComputeForbidden(f"{path} is the volume of another attachment of this compute agent")
    try:
        device = os.stat(real).st_rdev
    except OSError:
        return
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            major, minor = line.split()[2].split(":")
            if device and os.makedev(int(major), int(minor)) == device:
                raise ComputeForbidden(f"{path} is mounted on this host: it is not a volume to give a guest")
