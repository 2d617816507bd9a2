"""What complete may attach: the agent's configuration, never the caller, decides which devices a
guest may be given."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ComputeForbidden

IMAGE_FORMATS = ("raw", "qcow2")


@dataclass
class DstPolicy:
    """os-brick protocols complete may use, and where a "local" device may lie."""

    connectors: list[str]
    device_prefixes: list[str]  # "/dev/disk/by-id/" is a directory; "/dev/loop" any loop device

    def check(self, connection_info: dict) -> None:
        protocol = connection_info.get("driver_volume_type")
        if protocol not in self.connectors:
            raise ComputeForbidden(
                f"connector {protocol!r} is not allowed by this compute agent (allowed: "
                f"{', '.join(self.connectors) or 'none'})"
            )
        data = connection_info.get("data", {})
        if protocol == "local":
            path = os.path.normpath(str(data.get("device_path", "")))
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
