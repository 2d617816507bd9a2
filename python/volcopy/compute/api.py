"""The REST contract of the compute handoff: states, the microversion, and body validation.

Shared by the reference agent (which validates requests) and the client (which builds them);
docs/compute-api.md is the reference a user reads.
"""

from __future__ import annotations

import re
from enum import Enum

from .rbd import MalformedRbdConnection, from_connection_info

MICROVERSION = "2.97"  # the first compute API microversion with the volume-migration actions
MIN_MICROVERSION = "2.1"
VERSION_HEADER = "OpenStack-API-Version"
LEGACY_VERSION_HEADER = "X-OpenStack-Nova-API-Version"

START = "volume-migration-start"
CANCEL = "volume-migration-cancel"
PREPARE = "volume-migration-prepare"  # optional, between start and complete: the new volume known early
COMPLETE = "volume-migration-complete"
ACTIONS = (START, CANCEL, PREPARE, COMPLETE)


class State(str, Enum):
    NONE = "none"
    FENCING = "fencing"  # start is setting the fence (a restarted agent resolves it from QEMU's graph)
    FENCED = "fenced"
    OVERLAY_FULL = "overlay-full"  # fenced, and the guest paused: the overlay's file system is full
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETING = "completing"
    COMPLETED = "completed"
    FAILED = "failed"


class BadRequest(ValueError):
    """A malformed request; the message says what is wrong (the agent answers 400 with it)."""


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")


def _identifier(body: dict, key: str, action: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not _ID.match(value):
        raise BadRequest(f"{action}: '{key}' must be an id string (letters, digits, '._:-', at most 255)")
    return value


def _generation(body: dict, action: str) -> int:
    value = body.get("generation")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{action}: 'generation' must be the positive integer start returned")
    return value


def _only_keys(body: dict, allowed: set, action: str) -> None:
    extra = set(body) - allowed
    if extra:
        raise BadRequest(f"{action}: unexpected key(s) {', '.join(sorted(extra))}")


def parse_version(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", value)
    if not match:
        raise BadRequest(f"invalid microversion {value!r}")
    return int(match.group(1)), int(match.group(2))


def parse_action(body) -> tuple[str, dict]:
    """Validates a server action body; returns (action, arguments)."""
    if not isinstance(body, dict) or len(body) != 1:
        raise BadRequest("the body must be a JSON object with exactly one action")
    action, args = next(iter(body.items()))
    if action not in ACTIONS:
        raise BadRequest(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    if not isinstance(args, dict):
        raise BadRequest(f"{action}: the action's value must be an object")
    if action == START:
        _only_keys(args, {"attachment_id"}, action)
        return action, {"attachment_id": _identifier(args, "attachment_id", action)}
    if action == CANCEL:
        _only_keys(args, {"attachment_id", "generation"}, action)
        return action, {
            "attachment_id": _identifier(args, "attachment_id", action),
            "generation": _generation(args, action),
        }
    # prepare and complete take the same arguments: the new volume
    _only_keys(args, {"attachment_id", "new_attachment_id", "connection_info", "generation"}, action)
    parsed = {
        "attachment_id": _identifier(args, "attachment_id", action),
        "new_attachment_id": _identifier(args, "new_attachment_id", action),
        "generation": _generation(args, action),
    }
    info = args.get("connection_info")
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("driver_volume_type"), str)
        or not isinstance(info.get("data"), dict)
    ):
        raise BadRequest(
            f"{action}: 'connection_info' must be an object with 'driver_volume_type' and 'data'"
        )
    if info["driver_volume_type"] == "rbd":  # opened by QEMU itself: every field it needs is checked here
        try:
            from_connection_info(info)
        except MalformedRbdConnection as exc:
            raise BadRequest(f"{action}: {exc}") from None
    if parsed["new_attachment_id"] == parsed["attachment_id"]:
        raise BadRequest(f"{action}: 'new_attachment_id' must differ from 'attachment_id'")
    parsed["connection_info"] = info
    return action, parsed
