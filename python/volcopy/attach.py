"""Attaching volumes on this host through os-brick, from Cinder's connection_info.

Used by the compute agent (to attach dst at complete) and by the migration orchestrator. os-brick's
privileged calls go through oslo.privsep; when we are already root they run in this process instead
of through a helper daemon started with sudo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Attached:
    path: str
    connection_info: dict
    device_info: dict
    connector: Any


def _connector(protocol: str):
    from os_brick import privileged
    from os_brick.initiator import connector

    if os.geteuid() == 0:
        privileged.default.set_client_mode(False)
    return connector.InitiatorConnector.factory(protocol, root_helper=None, use_multipath=False)


def attach(connection_info: dict) -> Attached:
    """Connects the volume and returns the local path to it."""
    protocol = connection_info["driver_volume_type"]
    brick = _connector(protocol)
    device_info = brick.connect_volume(connection_info["data"])
    path = device_info.get("path")
    if not isinstance(path, str):
        raise RuntimeError(
            f"os-brick's {protocol} connector returned a {type(path).__name__}, not a device path"
        )
    return Attached(path=path, connection_info=connection_info, device_info=device_info, connector=brick)


def detach(attached: Attached) -> None:
    attached.connector.disconnect_volume(attached.connection_info["data"], attached.device_info)


def detach_recorded(connection_info: dict, device_info: dict) -> None:
    """Disconnects a volume attached earlier, possibly by a process that has since ended."""
    brick = _connector(connection_info["driver_volume_type"])
    brick.disconnect_volume(connection_info["data"], device_info)
