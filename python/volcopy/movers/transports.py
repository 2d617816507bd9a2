"""Transports: how a volume is reached, and which of them this host can really attach.

A transport is named as Cinder names a connection_info's ``driver_volume_type`` (``iscsi``,
``fibre_channel``, ``nvmeof``, ``rbd``, ``local``), plus ``file`` for a volume given as a path. A mover
claims a transport only after checking it here: os-brick's connector for the protocol is built
(``InitiatorConnector.factory``) and asked for this host's initiator properties
(``get_connector_properties``, what Nova hands Cinder at attach), and what the protocol needs on the host
is looked for (the initiator tool, an HBA, the kernel's fabrics device). RBD is opened by volcopy's own
librbd endpoint, so it counts when this build has librbd.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from ..errors import InvalidRequest

FILE = "file"
LOCAL = "local"
RBD = "rbd"
ISCSI = "iscsi"
FIBRE_CHANNEL = "fibre_channel"
NVMEOF = "nvmeof"
KNOWN = (FILE, LOCAL, RBD, ISCSI, FIBRE_CHANNEL, NVMEOF)

NVME_FABRICS_DEVICE = "/dev/nvme-fabrics"  # the kernel's nvme-fabrics module; connecting writes to it


def transport_of(spec) -> str:
    """The transport of a volume as the Migrator takes it: a path (``rbd:`` ones are RBD images) or
    Cinder's connection_info."""
    from ..rbd_volume import is_rbd

    if isinstance(spec, (str, os.PathLike)):
        return RBD if is_rbd(spec) else FILE
    if isinstance(spec, dict) and isinstance(spec.get("driver_volume_type"), str):
        return spec["driver_volume_type"].lower()
    raise InvalidRequest(
        f"a volume is a path or Cinder connection_info (a dict with 'driver_volume_type'), "
        f"not {type(spec).__name__}"
    )


@contextmanager
def _quiet_os_brick() -> Iterator[None]:
    """os-brick warns of what it does not find (no iSCSI initiator file, ...); why_not() says it in its
    own words, and a refused transport is an error of one line."""
    logger = logging.getLogger("os_brick")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _connector_properties(protocol: str) -> dict:
    """os-brick's connector for the protocol, built and asked for this host's properties. As root its
    privileged calls run in this process, as in attach.py."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eventlet's deprecation, through oslo.privsep
        from os_brick import privileged
        from os_brick.initiator import connector

    if os.geteuid() == 0:
        privileged.default.set_client_mode(False)
    with _quiet_os_brick():
        brick = connector.InitiatorConnector.factory(protocol.upper(), None, use_multipath=False)
        return brick.get_connector_properties(None, multipath=False, enforce_multipath=False) or {}


def _check_rbd() -> str | None:
    from .._core import rbd_compiled

    return None if rbd_compiled() else "this build of volcopy has no librbd (librbd-dev at build time)"


def _check_local() -> str | None:
    _connector_properties(LOCAL)
    return None


def _check_iscsi() -> str | None:
    if not _connector_properties(ISCSI).get("initiator"):
        return "os-brick finds no iSCSI initiator name (/etc/iscsi/initiatorname.iscsi; Debian: open-iscsi)"
    if shutil.which("iscsiadm") is None:
        return "iscsiadm is not installed (Debian: open-iscsi)"
    return None


def _check_fibre_channel() -> str | None:
    if not _connector_properties(FIBRE_CHANNEL).get("wwpns"):
        return "os-brick finds no Fibre Channel HBA (no port WWNs under /sys/class/fc_host)"
    return None


def _check_nvmeof() -> str | None:
    if not _connector_properties(NVMEOF).get("nqn"):
        return "os-brick finds no NVMe host NQN (/etc/nvme/hostnqn; Debian: nvme-cli)"
    if shutil.which("nvme") is None:
        return "the nvme command is not installed (Debian: nvme-cli)"
    if not os.path.exists(NVME_FABRICS_DEVICE):
        return f"the kernel's nvme-fabrics module is not loaded ({NVME_FABRICS_DEVICE} is missing)"
    return None


_CHECKS: dict[str, Callable[[], str | None]] = {
    FILE: lambda: None,  # a path this host opens: its own file systems and devices, or shared ones
    LOCAL: _check_local,
    RBD: _check_rbd,
    ISCSI: _check_iscsi,
    FIBRE_CHANNEL: _check_fibre_channel,
    NVMEOF: _check_nvmeof,
}


def why_not(transport: str) -> str | None:
    """None when this host can attach volumes of the transport, else why not."""
    check = _CHECKS.get(transport)
    if check is None:
        return f"unknown transport (known: {', '.join(KNOWN)})"
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - os-brick raises its own kinds; any means "cannot here"
        return f"os-brick's {transport} connector fails here: {type(exc).__name__}: {exc}"


def usable(wanted: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The transports of ``wanted`` (default: every known one) that work here, and why each other
    does not."""
    works, refused = [], {}
    for transport in wanted or KNOWN:
        reason = why_not(transport)
        if reason is None:
            works.append(transport)
        else:
            refused[transport] = reason
    return works, refused
