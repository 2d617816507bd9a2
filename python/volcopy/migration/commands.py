"""The migration commands of the volcopy CLI: ``volcopy migrate`` and ``volcopy migrations ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import InvalidRequest
from ..movers.defaults import COORDINATION_ENVIRONMENT, DEFAULT_GROUP
from ..progress_bar import ProgressBar
from ..units import format_size
from .volumes import VolumeRef, redacted

JOURNAL_ENVIRONMENT = "VOLCOPY_JOURNAL"


def default_journal() -> str:
    if os.geteuid() == 0:
        directory = "/var/lib/volcopy"
    else:
        directory = os.path.join(
            os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "volcopy"
        )
    return f"sqlite:///{directory}/journal.sqlite"


def add_parsers(commands, size_type) -> None:
    journal_help = (
        f"SQLAlchemy URL of the journal (default: --config-file's, else ${JOURNAL_ENVIRONMENT}, else "
        f"{default_journal()})"
    )
    config_help = (
        "an INI file whose [volcopy] section sets journal, coordination_url, group, ... (oslo.config)"
    )
    m = commands.add_parser(
        "migrate",
        help="migrate a volume: fence its attachments, copy, complete (or cancel on failure)",
        description="Migrate SRC onto DST as Cinder would. A volume is a path, an RBD image "
        "(rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER]) or Cinder connection_info as JSON "
        "('{...}' or @FILE; RBD's is opened through librbd, nothing attached). The compute is reached "
        "at --compute-url with the token in $OS_TOKEN "
        "(or through OS_AUTH_URL and friends).",
    )
    m.add_argument("src")
    m.add_argument("dst")
    m.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="SERVER:SRC_ATT:DST_ATT",
        help="an attachment of SRC (repeat for a multi-attached volume); none: SRC is detached",
    )
    m.add_argument("--compute-url", help="the compute API endpoint, e.g. http://compute:8774/v2.1")
    m.add_argument("--journal", help=journal_help)
    m.add_argument("--config-file", help=config_help)
    m.add_argument("--checkpoint-dir", help="for the copy's checkpoint (default: beside a SQLite journal)")
    m.add_argument(
        "--no-verify",
        action="store_true",
        help="do not read DST back before completing (the copy's digests are then compared with "
        "themselves: a write the disk lost goes unseen)",
    )
    m.add_argument("--rate", type=size_type, help="bytes per second, e.g. 200M")
    m.add_argument("--engine", choices=["auto", "io_uring", "aio", "sync", "threads"])
    m.add_argument(
        "--rbd-deep-copy",
        action="store_true",
        help="two RBD images of one cluster: let librbd's deep copy move them (see docs/cinder.md)",
    )
    m.add_argument(
        "--coordination-url",
        help=f"run it on a data mover of this tooz URL's group (default: ${COORDINATION_ENVIRONMENT}; "
        "none: here); see docs/movers.md",
    )
    m.add_argument("--group", help=f"the movers' group (default {DEFAULT_GROUP})")
    m.add_argument(
        "--backend-limit",
        type=int,
        help="with --coordination-url: wait while that many migrations of the fleet run on src's or "
        "dst's backend (0: no limit)",
    )
    m.add_argument("--json", action="store_true", help="print the migration as JSON")

    ms = commands.add_parser("migrations", help="list, show, cancel or recover migrations in the journal")
    ms.add_argument("--journal", help=journal_help)
    ms.add_argument("--config-file", help=config_help)
    actions = ms.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every migration, newest last")
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="one migration with its steps")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    cancel = actions.add_parser("cancel", help="cancel a migration that has not reached completing")
    cancel.add_argument("id")
    cancel.add_argument("--compute-url")
    cancel.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a running one (60)")
    recover = actions.add_parser("recover", help="finish or roll back migrations whose process is gone")
    recover.add_argument("--compute-url")
    for action in (listing, show, cancel, recover):
        # where a user types it too, after the action; SUPPRESS: absent there, it keeps the one before
        action.add_argument("--journal", default=argparse.SUPPRESS, help=journal_help)
        action.add_argument("--config-file", default=argparse.SUPPRESS, help=config_help)


def _volume(text: str):
    """A path, or connection_info as JSON inline or in @FILE."""
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(f"connection_info is not valid JSON: {exc}") from None
    return text


def _attachment(text: str) -> tuple[str, str, str]:
    parts = text.split(":")
    if len(parts) != 3 or not all(parts):
        raise InvalidRequest(f"--attach wants SERVER:SRC_ATTACHMENT:DST_ATTACHMENT, not {text!r}")
    return parts[0], parts[1], parts[2]


def _compute(url: str | None, needed: bool):
    if not url and not (needed or os.environ.get("OS_AUTH_URL") or os.environ.get("OS_ENDPOINT")):
        return None
    from ..compute import NovaCompute
    from ..compute.errors import ComputeError

    if url:
        token = os.environ.get("OS_TOKEN")
        if not token:
            raise ComputeError("--compute-url needs a token in $OS_TOKEN")
        return NovaCompute(endpoint=url, token=token)
    if not (os.environ.get("OS_AUTH_URL") or os.environ.get("OS_ENDPOINT")):
        raise ComputeError("an attached volume needs the compute: --compute-url URL (token in $OS_TOKEN)")
    return NovaCompute()


def _migrator(args, compute_needed: bool = False):
    """A Migrator from the command line, else --config-file's [volcopy] section, else the environment,
    else the defaults."""
    from .migrator import Migrator

    options = None
    if getattr(args, "config_file", None):
        from .config import GROUP, load_file

        options = load_file(args.config_file)[GROUP]

    def pick(name: str, environment: str | None = None):
        given = getattr(args, name, None)
        if given is None and options is not None:
            given = options[name]
        if given is None and environment:
            given = os.environ.get(environment)
        return given

    url = pick("journal", JOURNAL_ENVIRONMENT)
    if not url:  # the default's directory is ours to make; one given by the user must exist
        url = default_journal()
        os.makedirs(os.path.dirname(url[len("sqlite:///") :]), exist_ok=True)
    return Migrator(
        url,
        compute=_compute(getattr(args, "compute_url", None), compute_needed),
        checkpoint_dir=pick("checkpoint_dir"),
        rbd_deep_copy=getattr(args, "rbd_deep_copy", False),
        fleet_url=pick("coordination_url", COORDINATION_ENVIRONMENT) or None,
        fleet_group=pick("group"),
        backend_limit=pick("backend_limit") or 0,
    )


def _shown_volume(stored: dict) -> str:
    """A volume as the journal has it, fit to show: a path, an rbd: spec, or connection_info as JSON,
    secrets masked."""
    ref = VolumeRef.from_json(stored)
    if ref.connection_info:
        return json.dumps(redacted(ref.connection_info))
    return json.dumps(ref.path) if ref.path else str(ref)


def _summary(m) -> str:
    rows = [
        ("migration", m.id),
        ("state", m.state + (f" ({m.reason})" if m.reason else "")),
        ("src", _shown_volume(m.src)),
        ("dst", _shown_volume(m.dst)),
        ("attachments", ", ".join(":".join(a) for a in m.attachments) or "none (detached)"),
        ("progress", f"{m.percent:.1f}% of {format_size(m.bytes_total)} at {format_size(m.rate)}/s"),
        ("path", m.copy_path or "-"),
        ("digest", m.dst_digest or "-"),
        ("dst valid", "yes" if m.dst_valid else "no"),
        ("updated", m.updated_at.isoformat(timespec="seconds")),
    ]
    if m.resumed_from:
        rows.insert(6, ("resumed from", format_size(m.resumed_from)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def migrate(args) -> int:
    from .errors import MigrationCancelled

    attachments = [_attachment(a) for a in args.attach]
    migrator = _migrator(args, compute_needed=bool(attachments))
    options = {key: value for key, value in (("rate_limit", args.rate), ("engine", args.engine)) if value}
    bar = ProgressBar() if sys.stderr.isatty() and not args.json else None
    try:
        m = migrator.migrate(
            _volume(args.src),
            _volume(args.dst),
            attachments=attachments or None,
            verify=not args.no_verify,
            progress=bar,
            **options,
        )
    except MigrationCancelled as exc:
        if bar:
            bar.close()
        print(f"volcopy: {exc}", file=sys.stderr)
        return 1
    if bar:
        bar.close()
    print(json.dumps(_shown(m), indent=2) if args.json else _summary(m))
    return 0


def migrations(args) -> int:
    migrator = _migrator(args)
    if args.action == "list":
        rows = migrator.list()
        placements = migrator.journal.placements()
        if args.json:
            print(json.dumps([_shown(m) | _mover(placements.get(m.id)) for m in rows], indent=2))
            return 0
        for m in rows:
            placement = placements.get(m.id)
            mover = (placement.run_by or f"({placement.placed_on or 'queued'})") if placement else "-"
            print(f"{m.id}  {m.state:<10}  {m.percent:5.1f}%  {mover:<12}  {m.src_key} -> {m.dst_key}")
        return 0
    if args.action == "show":
        m = migrator.status(args.id)
        steps = migrator.steps(args.id)
        if args.json:
            print(json.dumps(_shown(m) | {"steps": [s.as_dict() for s in steps]}, indent=2))
            return 0
        print(_summary(m))
        for s in steps:
            line = f"    {s.intended_at:%H:%M:%S}  {s.name:<9} {s.status:<9} {s.target}  {s.detail or ''}"
            print(line.rstrip())
        return 0
    if args.action == "cancel":
        m = migrator.cancel(args.id, wait=args.wait)
        print(f"migration {m.id}: {m.state}" + ("" if m.finished else " (cancel requested)"))
        return 0
    if args.action == "recover":
        recovered = migrator.recover()
        for m in recovered:
            print(f"{m.id}  {m.state}" + (f"  ({m.reason})" if m.reason else ""))
        if not recovered:
            print("nothing to recover")
        return 0 if all(m.finished for m in recovered) else 1
    return 2


def _mover(placement) -> dict:
    """Where a migration runs: the mover it was placed on and the one running it (None: in-process)."""
    if placement is None:
        return {"placed_on": None, "run_by": None}
    return {"placed_on": placement.placed_on, "run_by": placement.run_by}


def _shown(m) -> dict:
    """The migration as JSON, without the secrets its connection_info may hold."""
    return m.as_dict() | {"src": redacted(m.src), "dst": redacted(m.dst)}
