"""``volcopy movers list``: the live movers of the group, from the coordination backend."""

from __future__ import annotations

import json
import os
import time

from ..units import format_size
from .defaults import COORDINATION_ENVIRONMENT, DEFAULT_GROUP


def add_parsers(commands) -> None:
    ms = commands.add_parser("movers", help="the data movers in the coordination group (see docs/movers.md)")
    actions = ms.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", help="each live mover: host, transports, slots in use, rate, last heartbeat"
    )
    listing.add_argument(
        "--coordination-url",
        help=f"tooz's URL of the coordination backend (default: ${COORDINATION_ENVIRONMENT})",
    )
    listing.add_argument(
        "--group", default=DEFAULT_GROUP, help=f"the movers' group (default {DEFAULT_GROUP})"
    )
    listing.add_argument("--json", action="store_true")


def movers(args) -> int:
    from ..errors import InvalidRequest
    from .fleet import Fleet

    url = args.coordination_url or os.environ.get(COORDINATION_ENVIRONMENT)
    if not url:
        raise InvalidRequest(f"give --coordination-url URL or set ${COORDINATION_ENVIRONMENT}")
    with Fleet(url, args.group) as fleet:
        found = fleet.movers()
        now = time.time()  # before the fleet's disconnect, which takes its time
    if args.json:
        shown = [m.as_dict() | {"heartbeat_age": round(now - m.heartbeat_at, 3)} for m in found]
        print(json.dumps(shown, indent=2))
        return 0
    if not found:
        print(f"no mover in group {args.group}")
        return 0
    rows = [("MOVER", "HOST", "TRANSPORTS", "SLOTS", "RATE", "BANDWIDTH", "HEARTBEAT")]
    for m in found:
        rows.append(
            (
                m.name,
                m.host,
                ",".join(m.transports),
                f"{m.slots_in_use}/{m.slots}",
                f"{format_size(m.rate)}/s",
                f"{format_size(m.bandwidth)}/s" if m.bandwidth else "unlimited",
                f"{max(0.0, now - m.heartbeat_at):.1f} s ago",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0
