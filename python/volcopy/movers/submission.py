"""The Migrator's side of the fleet: ``Migrator(fleet_url=...).migrate()`` records the migration, places
it on a live mover that reaches both volumes, posts it as a job on the movers' jobboard, and waits for
it to end, as an in-process migrate() would: the completed migration, or MigrationCancelled.

Nothing is recorded when no live mover reaches both volumes (NoMoverFits names the transports and the
movers seen). When the ones that do are all busy, the job is queued for whichever of them has a free
slot first. The
migration is in the journal before its job is posted, and its placement is written after: a crash in
between leaves a pending migration that no job runs and that recover() finishes here (it skips only
the placed ones, which are the movers'). Ctrl-C while waiting asks for a cancel, as in-process.
"""

from __future__ import annotations

import time

from ..migration import journal as j
from ..migration.errors import MigrationCancelled, MigrationConflict
from ..migration.journal import Migration
from .defaults import DEFAULT_GROUP

POLL_INTERVAL = 0.2  # seconds between looks at the journal while the migration runs on its mover
CANCEL_WAIT = 60.0  # seconds Ctrl-C waits for the cancel it asked for


def run_on_a_mover(migrator, src_ref, dst_ref, attachments, verify, progress, copy_options) -> Migration:
    m = submit(migrator, src_ref, dst_ref, attachments, verify, copy_options)
    return wait(migrator, m.id, progress)


def submit(migrator, src_ref, dst_ref, attachments, verify, copy_options) -> Migration:
    """The migration recorded, placed and posted; returned pending, for status() to follow."""
    from .fleet import Fleet
    from .jobboard import connect, persistence, post

    group = migrator.fleet_group or DEFAULT_GROUP
    journal_url = migrator.journal.engine.url.render_as_string(hide_password=False)
    with Fleet(migrator.fleet_url, group) as fleet:
        fences = bool(attachments)
        mover = fleet.place_between(src_ref.transport, dst_ref.transport, fences, queue=True)
    placed_on = mover.name if mover else ""  # "": every mover that reaches both is busy; the first free
    backend = persistence(journal_url)
    board = connect(migrator.fleet_url, group, backend)
    try:
        migration_id = migrator._new_id()
        try:
            m = migrator._record(migration_id, src_ref, dst_ref, attachments, verify, copy_options)
        finally:
            migrator.owners.release(migration_id)  # the mover takes it
        job = post(board, backend, m.id, placed_on, (src_ref.transport, dst_ref.transport), fences)
        migrator.journal.place(m.id, job, placed_on)
    finally:
        board.close()
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
