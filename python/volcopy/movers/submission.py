"""The Migrator's side of the fleet: ``Migrator(fleet_url=...).migrate()`` records the migration, places
it on a live mover that reaches both volumes, posts it as a job on the movers' jobboard, and waits for
it to end, as an in-process migrate() would: the completed migration, or MigrationCancelled.

Nothing is recorded when no live mover reaches both volumes (NoMoverFits names the transports and the
movers seen). When the ones that do are all busy, the job is queued for whichever of them has a free
slot first. The migration is recorded with its placement in one transaction, then its job is posted:
if this process dies (or Redis fails) in between, a mover finds a placed migration without a job and
posts it (conductor.repost_lost_jobs); recover() leaves placed migrations to the movers. Ctrl-C once
the migration is recorded asks for its cancel, as in-process.
"""

from __future__ import annotations

import logging
import time

from ..errors import VolcopyError
from ..migration import journal as j
from ..migration.errors import MigrationCancelled, MigrationConflict
from ..migration.journal import Migration, Placement
from .defaults import DEFAULT_GROUP
from .errors import CoordinationUnreachable
from .membership import one_line

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2  # seconds between looks at the journal while the migration runs on its mover
CANCEL_WAIT = 60.0  # seconds Ctrl-C waits for the cancel it asked for


def run_on_a_mover(migrator, src_ref, dst_ref, attachments, verify, progress, copy_options) -> Migration:
    m = submit(migrator, src_ref, dst_ref, attachments, verify, copy_options)
    return wait(migrator, m.id, progress)


class FleetClient:
    """What a Migrator keeps to submit to the fleet: the group (placement), the jobboard, and TaskFlow's
    persistence in the journal's database; made at the first submission, closed with the Migrator."""

    def __init__(self, migrator):
        from .fleet import Fleet
        from .jobboard import connect, persistence

        self.group = migrator.fleet_group or DEFAULT_GROUP
        self.fleet = Fleet(migrator.fleet_url, self.group)
        try:
            self.backend = persistence(migrator.journal.engine.url.render_as_string(hide_password=False))
            self.board = connect(migrator.fleet_url, self.group, self.backend)
        except BaseException:
            self.fleet.close()
            raise

    def waiting(self) -> dict[str, int]:
        """Jobs posted for each mover and not claimed yet: placement counts them as slots taken."""
        from taskflow.exceptions import TaskFlowException

        from .membership import BACKEND_ERRORS

        counts: dict[str, int] = {}
        try:
            for job in self.board.iterjobs(only_unclaimed=True):
                mover = (job.details or {}).get("mover")
                if mover:
                    counts[mover] = counts.get(mover, 0) + 1
        except (TaskFlowException, *BACKEND_ERRORS) as exc:
            raise CoordinationUnreachable(f"the movers' jobboard is unreachable: {one_line(exc)}") from None
        return counts

    def close(self) -> None:
        self.board.close()
        self.fleet.close()


def submit(migrator, src_ref, dst_ref, attachments, verify, copy_options) -> Migration:
    """The migration recorded, placed and posted; returned pending, for status() to follow."""
    from taskflow.exceptions import TaskFlowException

    from .jobboard import post

    client = migrator.fleet_client()
    fences = bool(attachments)
    transports = (src_ref.transport, dst_ref.transport)
    mover = client.fleet.place_between(*transports, fences, queue=True, waiting=client.waiting())
    placed_on = mover.name if mover else ""  # "": every mover that fits is busy; the first one free
    backends = [src_ref.backend, dst_ref.backend]
    limit = migrator.backend_limit
    migration_id = migrator._new_id()
    try:
        # Placed as it is recorded (its job not posted yet): recover() leaves it to the movers, and a
        # mover posts its job if this process cannot.
        placement = Placement(
            migration_id=migration_id, job="", placed_on=placed_on, backends=backends, backend_limit=limit
        )
        m = migrator._record(migration_id, src_ref, dst_ref, attachments, verify, copy_options, placement)
    finally:
        migrator.owners.release(migration_id)  # the mover takes it
    try:
        job = post(client.board, client.backend, m.id, placed_on, transports, fences, backends, limit)
        # False: a mover posted it first (this one took too long); the mover that claims this job drops it
        migrator.journal.replace_job(m.id, "", job)
    except (VolcopyError, TaskFlowException) as exc:
        log.warning("migration %s: its job is not posted (%s): a mover will post it", m.id, exc)
    except KeyboardInterrupt:
        try:
            migrator.cancel(m.id)  # recorded already: Ctrl-C asks for its cancel, as while waiting
        except Exception as exc:  # noqa: BLE001 - the interrupt is what the caller must see
            log.error("migration %s: interrupted, and not cancelled: %s", m.id, exc)
        raise
    return m


def wait(migrator, migration_id: str, progress=None) -> Migration:
    """The migration once it has ended: completed, or MigrationCancelled."""
    try:
        m = _until_finished(migrator, migration_id, progress, None)
    except KeyboardInterrupt:
        try:
            migrator.cancel(migration_id)
        except MigrationConflict:
            pass  # completing: only going forward is safe, and its mover does that
        m = _until_finished(migrator, migration_id, None, time.monotonic() + CANCEL_WAIT)
        if not m.finished:
            raise
    if m.state == j.CANCELLED:
        raise MigrationCancelled(f"migration {m.id} cancelled: {m.reason}", m.id, m.reason or "")
    return m


def _until_finished(migrator, migration_id: str, progress, deadline: float | None) -> Migration:
    shown = None
    while True:
        m = migrator.journal.get(migration_id)
        if progress is not None and m.bytes_total and (m.bytes_done, m.bytes_total) != shown:
            shown = (m.bytes_done, m.bytes_total)
            progress(*shown)
        if m.finished or (deadline is not None and time.monotonic() > deadline):
            return m
        time.sleep(POLL_INTERVAL)
