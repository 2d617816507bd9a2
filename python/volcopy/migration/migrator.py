"""The Cinder side of a volume migration: fence, copy, complete, or cancel on any failure.

    migrator = Migrator("sqlite:////var/lib/cinder/volcopy.sqlite", compute=NovaCompute(...))
    migration = migrator.migrate(src_connection_info, dst_connection_info,
                                 attachments=[(server_id, src_attachment_id, dst_attachment_id)])

The flow is a state machine in the journal (pending -> fencing -> copying -> completing -> completed,
or -> cancelling -> cancelled). Each external effect is a step recorded as intended before and done
after, so recover() in a restarted process finishes or rolls back whatever was running.

Who runs a migration is who holds its tooz lock (see owners.py): any host's recover() takes over
exactly the migrations whose lock it can take, the running owner checks it still holds it before each
external effect (and every few seconds during a copy), and all its journal writes are conditional on
it still being the owner. A journal that does not answer is waited for (Journal.retry_for); a step
that cannot be recorded is not taken, so the fences stay as recorded for recover().
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from .. import copier
from ..compute.errors import ComputeConflict, ComputeError, ComputeNotFound
from ..digest import digest
from ..errors import Cancelled, CheckpointError, InvalidRequest, VerifyError, VolcopyError
from ..rate import BandwidthBudget, RateLimit
from ..rbd_volume import RBDSpec
from ..volume import size_of
from . import journal as j
from .clone import can_clone, clone_file
from .deep_copy import deep_copy
from .errors import (
    JournalError,
    JournalUnreachable,
    LostOwnership,
    MigrationCancelled,
    MigrationConflict,
    MigrationError,
)
from .failpoints import failpoint
from .journal import RETRY_FIRST, RETRY_MAX, Journal, Migration
from .owners import HELD, LOST, REGAINED, Owners, coordination_url, this_process
from .shared_checkpoint import SharedCheckpoint
from .volumes import VolumeRef

log = logging.getLogger(__name__)

COPY_OPTIONS = {"engine", "block_size", "queue_depth", "direct", "sparse", "dst_is_zero", "rate_limit"}
PROGRESS_INTERVAL = 1.0  # seconds between progress rows in the journal
LOCK_CHECK_INTERVAL = 2.0  # seconds between checks, during a copy, that this process still owns it
CANCEL_WAIT = 300.0  # seconds a restarted fence waits for an earlier cancel to finish
MAX_ATTEMPTS = 3  # fences set again after a crash while fencing, before giving up
MERGE_WAIT = 3600.0  # seconds a complete waits for the compute to merge the guest's writes into dst
MERGE_RETRIES = 3  # completes repeated after the compute's merge failed
WATCH_INTERVAL = 2.0  # seconds between looks at the fenced attachments during the copy
# A fenced attachment the copy cannot go on with: the guest's writes are stuck, or its space runs out.
COMPUTE_TROUBLE = ("failed", "overlay-full")

# A compute's answer that will not change if asked again: the fence (or complete) is refused.
REFUSED = (ComputeConflict, ComputeNotFound)

AttachmentMove = tuple[str, str, str]  # (server_id, src_attachment_id, dst_attachment_id)


_RUNNING: set[str] = set()  # ids of the migrations this process is running now


@dataclass
class _Outcome:
    detail: str | None = None  # what the step found, for the journal


class _Abort(Exception):
    """Inside the flow: stop and cancel every fence, for this reason."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _check_attachments(attachments) -> list[list[str]]:
    if attachments is None:
        return []
    checked = []
    for attachment in attachments:
        if (
            not isinstance(attachment, (tuple, list))
            or len(attachment) != 3
            or not all(isinstance(part, str) and part for part in attachment)
        ):
            raise InvalidRequest(
                "each attachment must be (server_id, src_attachment_id, dst_attachment_id), "
                f"not {attachment!r}"
            )
        checked.append(list(attachment))
    if len({a[1] for a in checked}) != len(checked):
        raise InvalidRequest("an attachment of src is listed twice")
    return checked


def _check_copy_options(options: dict) -> None:
    unknown = set(options) - COPY_OPTIONS
    if unknown:
        raise InvalidRequest(
            f"unknown copy option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(COPY_OPTIONS))}"
        )
    if isinstance(options.get("rate_limit"), RateLimit):
        raise InvalidRequest(
            "a migration's rate_limit is kept in its journal: a whole number of bytes per second, "
            "not a RateLimit"
        )
    copier.check_options(
        options.get("engine", "auto"),
        options.get("block_size"),
        options.get("queue_depth"),
        options.get("direct", "auto"),
        options.get("rate_limit"),
        None,
    )


def default_checkpoint_dir(journal: Journal) -> str:
    """Beside the journal's file for SQLite; in the state directory for a database server."""
    url = journal.engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return os.path.abspath(url.database) + ".checkpoints"
    if os.geteuid() == 0:
        return "/var/lib/volcopy/checkpoints"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "volcopy", "checkpoints")


class Migrator:
    def __init__(
        self,
        journal: str | Journal,
        compute=None,
        checkpoint_dir: str | None = None,
        clone: Callable[[str, str], bool] | None = None,
        coordination_url: str | None = None,
        rbd_deep_copy: bool = False,
        fleet_url: str | None = None,
        fleet_group: str | None = None,
        backend_limit: int = 0,
    ):
        """journal: a SQLAlchemy URL ("sqlite:///PATH", "postgresql+psycopg://...") or a Journal.
        compute: a NovaCompute (needed only for attached volumes). clone: the driver's own clone for
        every migration, recovered ones too (see migrate()). coordination_url: the tooz URL of the
        migrations' locks; by default the journal's own PostgreSQL database, or a lock directory
        beside a SQLite journal (PATH.locks). rbd_deep_copy: two RBD images of one cluster are copied by
        librbd's deep copy when dst may be replaced; off by default: measured no faster than the engine
        (its bytes pass through this host too), it cannot be stopped or resumed, and it makes dst again,
        which loses what dst carried besides its data (image metadata such as QoS limits, mirroring).
        fleet_url: the tooz URL of the data movers (docs/movers.md); with it, migrate() runs each
        migration on a mover that reaches both volumes (fleet_group: their group), not here;
        backend_limit: at most that many of those at once on any one backend across the fleet (a
        draining array is not flooded; VolumeRef.backend says what a backend is), 0: no limit."""
        self.journal = journal if isinstance(journal, Journal) else Journal(journal)
        self.compute = compute
        self.clone = clone
        self.checkpoint_dir = checkpoint_dir or default_checkpoint_dir(self.journal)
        self.owner = this_process()
        self.coordination_url = coordination_url
        self.rbd_deep_copy = rbd_deep_copy
        self.fleet_url = fleet_url
        self.fleet_group = fleet_group
        if not isinstance(backend_limit, int) or backend_limit < 0:
            raise InvalidRequest(f"backend_limit must be a whole number, 0 or more, not {backend_limit!r}")
        self.backend_limit = backend_limit
        self._fleet_client = None
        self.bandwidth: BandwidthBudget | None = None  # shared by the engine copies this Migrator runs
        self._owners: Owners | None = None
        self._stops: dict[str, threading.Event] = {}  # run_placed()'s: set, its run stops

    @property
    def owners(self) -> Owners:
        """The locks; connected on first use (reading the journal needs none)."""
        if self._owners is None:
            self._owners = Owners(
                self.coordination_url or coordination_url(self.journal.engine.url), self.owner
            )
        return self._owners

    def fleet_client(self):
        """The connections to the fleet (movers/submission.py); made on first use."""
        if self._fleet_client is None:
            from ..movers.submission import FleetClient

            self._fleet_client = FleetClient(self)
        return self._fleet_client

    def close(self) -> None:
        """Releases the locks' and the fleet's connections (a process that ends releases them anyway)."""
        if self._owners is not None:
            self._owners.stop()
            self._owners = None
        if self._fleet_client is not None:
            self._fleet_client.close()
            self._fleet_client = None

    # ---------------------------------------------------------------- the public calls

    def migrate(
        self,
        src,
        dst,
        attachments: Sequence[AttachmentMove] | None = None,
        *,
        verify: bool = True,
        clone: Callable[[str, str], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
        **copy_options,
    ) -> Migration:
        """Moves src onto dst; returns the completed migration or raises MigrationCancelled.

        src, dst: paths, ``rbd:POOL/IMAGE...`` specs or Cinder connection_info (RBD's is opened
        through librbd, nothing attached; two RBD images of one cluster take librbd's deep copy when
        dst may be replaced, see deep_copy.py). attachments: every attachment of src as
        (server_id, src_attachment_id, dst_attachment_id); None for a detached volume (no compute
        call is made). verify: read dst back and compare its digest with src's before completing
        (the default); False compares the digests the copy computed from what it wrote, which proves
        nothing about what dst holds (a write the disk lost, a clone gone wrong). clone: a
        driver's own clone, called as clone(src_path, dst_path) -> bool (False: copy instead), with
        an RBDSpec in place of the path of an RBD volume.
        progress(done, total) is called about ten times a second during a copy. copy_options go to
        volcopy.copy (engine, block_size, queue_depth, direct, sparse, dst_is_zero, rate_limit).
        """
        src_ref, dst_ref, checked = self._checked(src, dst, attachments, copy_options)
        if self.fleet_url:
            from ..movers.submission import run_on_a_mover

            return run_on_a_mover(self, src_ref, dst_ref, checked, verify, progress, copy_options)
        migration_id = self._new_id()
        try:
            return self._migrate(
                migration_id, src_ref, dst_ref, checked, verify, clone, progress, copy_options
            )
        finally:
            self.owners.release(migration_id)

    def submit(
        self,
        src,
        dst,
        attachments: Sequence[AttachmentMove] | None = None,
        *,
        verify: bool = True,
        **copy_options,
    ) -> Migration:
        """With fleet_url: records the migration and hands it to a mover, without waiting; returns it
        pending (follow it with status(), stop it with cancel()). The arguments are migrate()'s. NoMoverFits
        when no live mover reaches both volumes (with a compute, for an attached one): nothing is recorded
        then; when those that do are all busy, it waits for the first free slot among them."""
        from ..movers.submission import submit

        if not self.fleet_url:
            raise InvalidRequest("submit() hands a migration to the movers: give the Migrator a fleet_url")
        src_ref, dst_ref, checked = self._checked(src, dst, attachments, copy_options)
        return submit(self, src_ref, dst_ref, checked, verify, copy_options)

    def _checked(self, src, dst, attachments, copy_options) -> tuple[VolumeRef, VolumeRef, list[list[str]]]:
        """The request, refused before anything is recorded if it cannot be carried out."""
        src_ref, dst_ref = VolumeRef.of(src, "src"), VolumeRef.of(dst, "dst")
        checked = _check_attachments(attachments)
        if checked and self.compute is None and not self.fleet_url:  # a mover has its own compute
            raise InvalidRequest(
                "an attached volume needs a compute to fence it: pass compute=NovaCompute(...)"
            )
        if checked:
            dst_ref.for_compute()  # what the compute attaches: refused now if it cannot be given one
        # RBD namesakes reached apart may be in two clusters: the engine, which opens both, refuses one
        # image under two spellings (by cluster fsid and image id) before it writes
        if src_ref.key == dst_ref.key and src_ref.cluster == dst_ref.cluster:
            raise InvalidRequest(f"src and dst are the same volume ({src_ref})")
        _check_copy_options(copy_options)
        return src_ref, dst_ref, checked

    def _new_id(self) -> str:
        """A new migration's id, with its lock taken: one whose lock is held already shares its key
        with a running migration's (tooz's postgresql driver hashes names into 65,536 keys)."""
        for _ in range(100):
            migration_id = str(uuid.uuid4())
            if self.owners.acquire(migration_id):
                return migration_id
        raise MigrationError(f"no free lock in coordination {self.owners.where} after 100 draws")

    def _migrate(self, migration_id, src_ref, dst_ref, checked, verify, clone, progress, copy_options):
        m = self._record(migration_id, src_ref, dst_ref, checked, verify, copy_options)
        failpoint("after-record")
        return self._run(m, clone=clone or self.clone, progress=progress)

    def _record(
        self, migration_id, src_ref, dst_ref, checked, verify, copy_options, placement=None
    ) -> Migration:
        """The new migration in the journal, pending, with its volumes claimed (and its placement: a
        migration for the movers)."""
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        m = self.journal.create(
            Migration(
                id=migration_id,
                state=j.PENDING,
                src_key=src_ref.key,
                dst_key=dst_ref.key,
                src=src_ref.to_json(),
                dst=dst_ref.to_json(),
                attachments=checked,
                options=dict(copy_options, verify=bool(verify)),
                owner=self.owner,
                checkpoint=os.path.join(self.checkpoint_dir, f"{migration_id}.ckpt"),
            ),
            placement,
        )
        log.info("migration %s: %s -> %s, %d attachment(s)", m.id, src_ref, dst_ref, len(checked))
        return m

    def status(self, migration_id: str) -> Migration:
        """The migration as the journal has it: state, bytes_done, bytes_total, rate, percent, reason."""
        return self.journal.get(migration_id)

    def list(self, unfinished_only: bool = False) -> list[Migration]:
        return self.journal.list(unfinished_only)

    def steps(self, migration_id: str) -> list[j.Step]:
        self.journal.get(migration_id)
        return self.journal.steps(migration_id)

    def cancel(self, migration_id: str, wait: float = 0.0) -> Migration:
        """Cancels a migration that has not reached completing. A migration running in a live process
        (on any host) is asked to (it stops within about a second) and waited for up to ``wait``
        seconds; one whose owner is gone is cancelled here, unless its fences need a compute this
        Migrator lacks and it is a mover's (the mover that takes its job cancels it)."""
        m = self.journal.get(migration_id)
        if m.state == j.CANCELLED:
            return m
        if m.state in (j.COMPLETING, j.COMPLETED):
            raise MigrationConflict(
                f"migration {m.id} is {m.state}: the guest already uses dst, it cannot be cancelled", m.id
            )
        self.journal.update(m.id, cancel_requested=True)
        movers_own = bool(m.attachments) and self.compute is None and self.journal.placement(m.id) is not None
        with nullcontext() if movers_own else self._owned(m.id) as m:
            if m is not None:
                if not m.finished:
                    self._run_guarded(m, lambda: self._cancel(m, "cancelled on request", raise_after=False))
                return self.journal.get(m.id)
        # its process sees the request within about a second
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self.journal.get(migration_id).finished:
            time.sleep(0.1)
        return self.journal.get(migration_id)

    def recover(self) -> list[Migration]:
        """Finishes or rolls back every unfinished migration whose owner is gone, on any host sharing
        the journal: exactly those whose lock this process can take (a live owner holds its lock). A
        copy resumes from its checkpoint, a fence being set is lifted and set again, a complete is
        repeated, a cancel is finished. Returns those migrations as they ended (a failure is logged
        and the migration left for the next recover())."""
        recovered = []
        placed = self.journal.placements()  # the movers' to run: their jobs outlive any mover
        for listed in self.journal.list(unfinished_only=True):
            if listed.id in placed:
                continue
            taken = False
            try:
                with self._owned(listed.id) as m:
                    if m is None or m.finished:
                        continue
                    taken = True
                    try:
                        self._run_guarded(m, lambda m=m: self._recover_one(m))
                    except MigrationCancelled:
                        pass  # an ending like any other: the reason is in the journal
            except VolcopyError as exc:
                log.error("migration %s: recover stopped: %s", listed.id, exc)
            if taken:
                recovered.append(self.journal.get(listed.id))
        return recovered

    def run_placed(
        self, migration_id: str, mover: str, stop: threading.Event | None = None, progress=None
    ) -> Migration | None:
        """A mover's part (volcopy.movers): runs a migration placed on the fleet from where the journal
        has it (pending starts, copying resumes from the shared checkpoint, ...) and returns it as it
        ended; None when a live process holds it (its previous mover, still running it). MigrationCancelled
        is an ending like any other. ``stop`` set: the run stops before its next external effect
        without cancelling anything (LostOwnership; the journal stays as recorded for the next owner).
        progress(done, total): as for migrate()."""
        with self._owned(migration_id) as m:
            if m is None:
                return None
            if not m.finished:
                self.journal.run_by(m.id, mover, as_owner=self.owner)
                if stop is not None:
                    self._stops[m.id] = stop
                try:
                    self._run_guarded(m, lambda: self._recover_one(m, progress))
                except MigrationCancelled:
                    pass
                finally:
                    self._stops.pop(m.id, None)
            return self.journal.get(migration_id)

    # ---------------------------------------------------------------- the flow

    @contextmanager
    def _owned(self, migration_id: str) -> Iterator[Migration | None]:
        """The migration, made this process's, with its lock held to the end of the block; None when a
        live owner (this process's other thread, or any process on any host) holds its lock."""
        if migration_id in _RUNNING or not self.owners.acquire(migration_id):
            yield None
            return
        try:
            m = self.journal.get(migration_id)  # read again under the lock: its owner may have gone on
            if m.finished:
                yield m
                return
            if m.attachments and self.compute is None:
                raise InvalidRequest(
                    f"migration {m.id} has attachments: a compute is needed to go on with it"
                )
            if not self.journal.take_over(m.id, m.owner, self.owner):
                yield None  # another process took it over and ended between our read and the lock
                return
            if m.owner != self.owner:
                log.info("migration %s: taken over from %s in state %s", m.id, m.owner, m.state)
            m.owner = self.owner
            checkpoint = os.path.join(self.checkpoint_dir, f"{m.id}.ckpt")
            if m.checkpoint != checkpoint:  # another host's path: the shared checkpoint comes here
                try:
                    os.makedirs(self.checkpoint_dir, exist_ok=True)
                except OSError as exc:
                    raise MigrationError(f"checkpoint directory {self.checkpoint_dir}: {exc}", m.id) from None
                self._set(m, checkpoint=checkpoint)
            yield m
        finally:
            self.owners.release(migration_id)

    def _run_guarded(self, m: Migration, flow: Callable[[], None]) -> None:
        """Runs flow as this migration's owner; an error that leaves the migration as recorded says so."""
        _RUNNING.add(m.id)
        try:
            flow()
        except LostOwnership as exc:
            raise LostOwnership(
                f"migration {m.id}: {exc}; this process stopped before any further external effect", m.id
            ) from None
        except JournalError as exc:
            raise JournalError(
                f"migration {m.id} stays {m.state} as recorded: {exc}; recover() goes on from there", m.id
            ) from None
        finally:
            _RUNNING.discard(m.id)

    def _recover_one(self, m: Migration, progress=None) -> None:
        if m.state == j.CANCELLING or (m.cancel_requested and m.state != j.COMPLETING):
            self._cancel(m, m.reason or "cancelled on request", raise_after=False)
        elif m.state == j.FENCING:
            self._lift_fences(m)  # whichever start may have happened, then fence again
            if m.attempts >= MAX_ATTEMPTS:
                self._cancel(m, f"fencing was interrupted {m.attempts} times", raise_after=False)
                return
            self._set(m, state=j.PENDING, attempts=m.attempts + 1)
            self._flow(m, clone=self.clone, progress=progress)
        else:
            self._flow(m, clone=self.clone, progress=progress)  # pending starts, copying resumes, ...

    def _run(self, m: Migration, clone=None, progress=None) -> Migration:
        self._run_guarded(m, lambda: self._flow(m, clone, progress))
        log.info("migration %s: %s", m.id, m.state)
        return self.journal.get(m.id)

    def _flow(self, m: Migration, clone=None, progress=None) -> None:
        try:
            if m.state == j.PENDING:
                self._fence(m)
            if m.state == j.COPYING:
                self._copy(m, clone, progress)
            if m.state == j.COMPLETING:
                self._complete(m)
        except _Abort as abort:
            self._cancel(m, str(abort))
        except KeyboardInterrupt:
            if m.state == j.COMPLETING:
                raise  # a guest may already use dst: only going forward is safe, by recover()
            self._cancel(m, "interrupted")

    def _set(self, m: Migration, **fields) -> None:
        """Writes fields to the journal, while this process still owns the migration, and to the
        caller's copy of the row."""
        self.journal.update(m.id, as_owner=self.owner, **fields)
        for name, value in fields.items():
            setattr(m, name, value)

    def _ensure_owner(self, m: Migration) -> None:
        """Before an external effect: this process still holds the migration's lock (taken again if it
        died with its session and nobody took the migration meanwhile). Waits for an unreachable
        database as the journal does, then raises JournalUnreachable; LostOwnership if another
        process has the lock or the migration."""
        self._check_stopped(m)
        deadline = time.monotonic() + self.journal.retry_for
        delay = RETRY_FIRST
        while True:
            found = self.owners.check(m.id)
            if found == HELD:
                return
            if found == REGAINED:
                owner = self.journal.get(m.id).owner
                if owner == self.owner:
                    log.warning("migration %s: its lock died with its session; taken again", m.id)
                    return
                self.owners.release(m.id)
                raise LostOwnership(f"now run by {owner}, no longer by {self.owner}", m.id)
            if found == LOST:
                raise LostOwnership("its lock is held by another process", m.id)
            left = deadline - time.monotonic()
            if left <= 0:
                raise JournalUnreachable(
                    f"coordination {self.owners.where} is unreachable: the lock of migration {m.id} "
                    f"cannot be checked for {self.journal.retry_for:.0f} s"
                )
            log.warning("migration %s: its lock cannot be checked; retrying in %.1f s", m.id, delay)
            time.sleep(min(delay, left))
            delay = min(2 * delay, RETRY_MAX)

    def _check_stopped(self, m: Migration) -> None:
        stop = self._stops.get(m.id)
        if stop is not None and stop.is_set():
            raise LostOwnership("stopped by its mover, for another to go on with it", m.id)

    @contextmanager
    def _step(
        self, m: Migration, name: str, target: str = "", point: str | None = None
    ) -> Iterator[_Outcome]:
        step_id = self.journal.step_intended(m.id, name, target, as_owner=self.owner)
        try:
            self._ensure_owner(m)
        except BaseException as exc:
            self.journal.step_ended(step_id, j.FAILED, f"not taken: {_one_line(exc)}")
            raise
        if point:
            failpoint(f"before-{point}")
        outcome = _Outcome()
        try:
            yield outcome
        except BaseException as exc:
            self.journal.step_ended(step_id, j.FAILED, _one_line(exc))
            raise
        if point:
            failpoint(f"after-{point}")
        self.journal.step_ended(step_id, j.DONE, outcome.detail)

    def _check_cancel_requested(self, m: Migration) -> None:
        if self.journal.get(m.id).cancel_requested:
            raise _Abort("cancelled on request")

    def _generation(self, m: Migration, server: str, src_att: str) -> int | None:
        """The fencing token start returned for the attachment (in the start step's detail), or, when
        the answer was lost, the compute's current one for a fence still set (None: nothing set)."""
        for step in reversed(self.journal.steps(m.id)):
            if step.name == "start" and step.target == f"{server}/{src_att}":
                if step.status == j.DONE:
                    return int(step.detail.removeprefix("generation "))
                break  # the latest start's answer was lost: an earlier start's token is stale
        state = self.compute.migration_state(server, src_att)
        return state["generation"] if state["state"] not in ("none", "cancelled", "completed") else None

    def _fence(self, m: Migration) -> None:
        """Step "start" per attachment. Reverted by "cancel" of every attachment whose start was
        intended (it may have reached the compute even if the answer never came back)."""
        self._set(m, state=j.FENCING)
        for number, (server, src_att, _) in enumerate(m.attachments, 1):
            self._check_cancel_requested(m)
            try:
                with self._step(m, "start", f"{server}/{src_att}", point=f"start-{number}") as step:
                    fence = self.compute.migration_start(server, src_att)
                    step.detail = f"generation {fence['generation']}"
            except ComputeError as exc:
                raise _Abort(f"the compute refused the fence of {server}/{src_att}: {exc}") from None
        self._set(m, state=j.COPYING)

    def _copy(self, m: Migration, clone, progress) -> None:
        """Step "clone" or "copy", then "verify" (with verify=True). Never reverted: src is only read;
        dst is left for the caller and marked invalid by the cancel. An interrupted copy resumes from
        its checkpoint."""
        self._check_cancel_requested(m)
        self._prepare(m)
        src_ref, dst_ref = VolumeRef.from_json(m.src), VolumeRef.from_json(m.dst)
        options = dict(m.options)
        verify = options.pop("verify", False)
        try:
            with src_ref.attached() as src, dst_ref.attached() as dst:
                path = self._clone(m, clone, src, dst, progress, options)
                # FICLONE: dst shares src's very extents, equal by construction; a deep copy is
                # checked like a clone: read back with verify
                src_digest = dst_digest = None
                if path is None:
                    path = "copy"
                    # What the engine wrote is what it hashed: the copy gives both digests. With verify,
                    # dst is read back while the engine copies, and a difference raises VerifyError.
                    options["verify"] = bool(verify)
                    src_digest = dst_digest = self._copy_with_engine(m, src, dst, options, progress)
                if verify or path == "driver-clone":  # a driver's clone is not taken on trust
                    with self._step(m, "verify", str(dst_ref)):
                        if path != "copy":  # the copy read dst back already
                            src_digest = src_digest or digest(src)
                            dst_digest = digest(dst, length=size_of(src))
                failpoint("after-copy")
        except (JournalError, LostOwnership):
            raise  # nothing can be recorded, or it is another's to record: the flow stops here
        except _Abort:
            raise  # a fenced attachment the compute reports in trouble
        except Cancelled:
            raise _Abort("cancelled on request") from None  # only a request in the journal cancels a copy
        except VerifyError as exc:
            raise _Abort(f"dst differs from src: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - whatever stopped the copy, the fences are lifted
            raise _Abort(f"the copy failed: {_one_line(exc)}") from None
        self._set(m, copy_path=path, src_digest=src_digest, dst_digest=dst_digest)
        if src_digest != dst_digest:
            raise _Abort(f"dst differs from src: digest {dst_digest} != {src_digest}")
        self._check_cancel_requested(m)  # the last moment a cancel can still go back to src
        self._set(m, state=j.COMPLETING)

    def _prepare(self, m: Migration) -> None:
        """Step "prepare" per attachment, before the copy: the compute attaches dst and may start moving
        the guest's writes onto it while the copy writes dst (libvirt), so that complete is shorter.
        Optional: a compute that lacks it (404, 400) or refuses it moves at complete, which checks dst
        again and is the step that decides."""
        if not m.attachments:
            return
        dst = VolumeRef.from_json(m.dst).for_compute()
        for server, src_att, dst_att in m.attachments:
            generation = self._generation(m, server, src_att)
            try:
                with self._step(m, "prepare", f"{server}/{src_att}"):
                    self.compute.migration_prepare(server, src_att, dst_att, dst, generation)
            except ComputeError as exc:
                log.warning("migration %s: not prepared, complete moves: %s: %s", m.id, src_att, exc)

    def _clone(
        self, m: Migration, clone, src: str | RBDSpec, dst: str | RBDSpec, progress, options: dict
    ) -> str | None:
        """The same-backend fast path: the driver's clone, else FICLONE for two files, else librbd's
        deep copy for two RBD images when asked for (not with a rate limit, which it cannot keep to);
        None to copy with the engine instead."""
        if clone is not None:
            with self._step(m, "clone", "driver") as step:
                if clone(src, dst):
                    return "driver-clone"
                step.detail = "the driver's clone declined"
        if isinstance(src, str) and isinstance(dst, str) and can_clone(src, dst):
            with self._step(m, "clone", "ficlone") as step:
                if clone_file(src, dst):
                    return "clone"
                step.detail = "the file system cannot share extents"
        if self.rbd_deep_copy and isinstance(src, RBDSpec) and isinstance(dst, RBDSpec):
            if options.get("rate_limit") or self.bandwidth is not None:
                log.info("migration %s: a rate limit is set: copied by the engine, not librbd", m.id)
                return None
            return self._deep_copy(m, src, dst, progress)
        return None

    def _deep_copy(self, m: Migration, src: RBDSpec, dst: RBDSpec, progress) -> str | None:
        """Step "clone" rbd-deep-copy. librbd cannot stop a deep copy: a cancel request, a lost lock or a
        fenced attachment in trouble, noticed by the progress reports as during an engine copy, acts
        once it has ended. A deep copy interrupted by a crash is not resumed: dst then holds data, so
        recover() copies over it with the engine."""
        cancel = threading.Event()  # set by report(); nothing can stop librbd
        report, seen = self._reporter(m, progress, cancel)
        started = time.monotonic()
        with self._step(m, "clone", "rbd-deep-copy") as step:
            why_not = deep_copy(src, dst, report)
            step.detail = why_not
        if why_not:
            return None
        if seen["trouble"]:
            raise _Abort(seen["trouble"])
        self._check_cancel_requested(m)  # asked for during the deep copy: before reading dst back
        size = size_of(src)
        self._set(m, bytes_done=size, bytes_total=size, rate=size / max(time.monotonic() - started, 1e-9))
        return "rbd-deep-copy"

    def _compute_trouble(self, m: Migration) -> str | None:
        """Why the copy cannot go on, if a fenced attachment is failed or its overlay is full."""
        for server, src_att, _ in m.attachments:
            state = self.compute.migration_state(server, src_att)
            if state["state"] in COMPUTE_TROUBLE:
                reason = f": {state['reason']}" if state.get("reason") else ""
                return f"the compute reports {server}/{src_att} {state['state']}{reason}"
        return None

    def _reporter(
        self, m: Migration, progress, cancel: threading.Event, shared: SharedCheckpoint | None = None
    ):
        """The progress function of a copy: progress rows in the journal, and the checks an engine copy
        stops at (cancel set): a cancel request, the lock held by another process (LostOwnership), a
        fenced attachment in trouble (kept in the returned dict's "trouble")."""
        last = {"at": time.monotonic(), "done": 0, "checked": time.monotonic()}
        last.update(watched=time.monotonic(), trouble=None)

        def report(done: int, total: int) -> None:
            # LostOwnership raised here stops the copy and is raised again by copier.copy.
            if progress is not None:
                progress(done, total)
            self._check_stopped(m)
            if shared is not None:
                shared.sync()
            now = time.monotonic()
            if now - last["at"] >= PROGRESS_INTERVAL:
                rate = (done - last["done"]) / (now - last["at"])
                last.update(at=now, done=done)
                try:
                    if self.journal.report_progress(m.id, done, total, rate, as_owner=self.owner):
                        cancel.set()
                except LostOwnership:
                    raise
                except MigrationError as exc:  # the journal hiccuped: the copy goes on
                    log.warning("migration %s: progress not recorded: %s", m.id, exc)
            if now - last["checked"] >= LOCK_CHECK_INTERVAL:
                last["checked"] = now
                found = self.owners.check(m.id)
                if found == LOST:
                    raise LostOwnership("its lock is held by another process", m.id)
                if found == REGAINED:
                    owner = self.journal.get(m.id).owner
                    if owner != self.owner:
                        raise LostOwnership(f"now run by {owner}, no longer by {self.owner}", m.id)
                    log.warning("migration %s: its lock died with its session; taken again", m.id)
            if m.attachments and now - last["watched"] >= WATCH_INTERVAL:
                last["watched"] = now
                try:
                    trouble = self._compute_trouble(m)
                except ComputeError as exc:
                    log.warning("migration %s: cannot look at the compute: %s", m.id, exc)
                    trouble = None
                if trouble:
                    last["trouble"] = trouble
                    cancel.set()
            if 2 * done >= total:
                failpoint("mid-copy")

        return report, last

    def _copy_with_engine(self, m: Migration, src, dst, options: dict, progress) -> str:
        cancel = threading.Event()
        shared = SharedCheckpoint(self.journal, m.id, m.checkpoint, self.owner)
        shared.restore()
        failpoint("checkpoint-restored")
        report, last = self._reporter(m, progress, cancel, shared)
        # Cinder's volume id knows dst again when os-brick attaches it under another device name.
        dst_id = m.dst_key if m.dst_key.startswith("volume:") else None
        share = self.bandwidth.join(options.get("rate_limit")) if self.bandwidth is not None else None
        if share is not None:
            options = options | {"rate_limit": share}  # follows the budget as other copies come and go
        started_afresh = False
        try:
            while True:
                try:
                    with self._step(m, "copy", f"{m.src_key} -> {m.dst_key}"):
                        result = copier.copy(
                            src,
                            dst,
                            checkpoint=m.checkpoint,
                            dst_id=dst_id,
                            progress=report,
                            cancel=cancel,
                            **options,
                        )
                    break
                except CheckpointError as exc:
                    if started_afresh:
                        raise
                    # A checkpoint that is not this copy's: another host's, whose fingerprints of the
                    # volumes hold only there (a device known by its number, a file system without inode
                    # generations), or one made before src changed. dst is the migration's all the
                    # same: the copy starts from the beginning.
                    log.warning("migration %s: %s; copying from the start", m.id, exc)
                    shared.forget()
                    started_afresh = True
                except Cancelled:
                    if last["trouble"]:
                        raise _Abort(last["trouble"]) from None
                    raise
        finally:
            if share is not None:
                self.bandwidth.leave(share)
        self._set(
            m,
            bytes_done=result.size,
            bytes_total=result.size,
            rate=result.rate,
            resumed_from=result.resumed_from,
        )
        return result.digest

    def _complete(self, m: Migration) -> None:
        """Step "complete" per attachment. Not reverted once one has succeeded (the guest then does its
        I/O on dst): it is repeated until every attachment is done, as the contract makes it idempotent."""
        dst_ref = VolumeRef.from_json(m.dst)
        completes = [s for s in self.journal.steps(m.id) if s.name == "complete"]
        done = {s.target for s in completes if s.status == j.DONE}
        # A complete sent before (its answer maybe lost) may have put a guest on dst already.
        sent_before = bool(completes)
        for number, (server, src_att, dst_att) in enumerate(m.attachments, 1):
            target = f"{server}/{src_att}"
            if target in done:
                continue
            generation = self._generation(m, server, src_att)
            try:
                with self._step(m, "complete", target, point=f"complete-{number}"):
                    self._complete_one(server, src_att, dst_att, dst_ref.for_compute(), generation)
            except REFUSED as exc:
                if not done and not sent_before:  # no guest uses dst yet: going back to src is possible
                    raise _Abort(f"the compute refused to complete {target}: {exc}") from None
                raise self._left(m, f"complete of {target} refused after others succeeded: {exc}") from None
            except ComputeError as exc:
                raise self._left(m, f"complete of {target} failed: {exc}") from None
            done.add(target)
        failpoint("before-finish")
        self._set(m, state=j.COMPLETED, dst_valid=True, reason=None)
        _remove(m.checkpoint)

    def _complete_one(self, server: str, src_att: str, dst_att: str, info: dict, generation: int) -> None:
        """complete, then wait until the compute has merged the guest's writes into dst: only then
        does dst hold everything. A failed merge is retried by repeating complete. Once a complete has
        been answered the guest may run on dst: a refusal after that is no longer a reason to go
        back to src, so it is raised as a plain ComputeError (the migration then stays completing)."""
        for attempt in range(MERGE_RETRIES + 1):
            try:
                self.compute.migration_complete(server, src_att, dst_att, info, generation)
            except REFUSED as exc:
                if attempt == 0:
                    raise
                raise ComputeError(f"a repeated complete was refused: {exc}") from None
            deadline = time.monotonic() + MERGE_WAIT
            while (state := self.compute.migration_state(server, src_att))["state"] == "completing":
                if time.monotonic() > deadline:
                    raise ComputeError(f"the merge into dst did not end in {MERGE_WAIT:.0f} s")
                time.sleep(0.2)
            if state["state"] == "completed":
                return
            log.warning("complete of %s/%s: %s: %s", server, src_att, state["state"], state.get("reason"))
        raise ComputeError(
            f"the compute could not merge the guest's writes into dst ({state.get('reason')}); "
            f"the data is in {state.get('data_location')}"
        )

    def _left(self, m: Migration, reason: str) -> MigrationError:
        """A failure that rolls nothing back: the migration stays as it is for recover() to go on."""
        self._set(m, reason=reason)
        return MigrationError(f"migration {m.id} stays {m.state}: {reason}; recover() will retry", m.id)

    def _lift_fences(self, m: Migration) -> None:
        """Step "cancel" for every attachment whose start may have reached the compute."""
        started = {s.target for s in self.journal.steps(m.id) if s.name == "start"}
        for number, (server, src_att, _) in enumerate(m.attachments, 1):
            target = f"{server}/{src_att}"
            if target not in started:
                continue
            try:
                with self._step(m, "cancel", target, point=f"cancel-{number}") as step:
                    try:
                        generation = self._generation(m, server, src_att)
                        if generation is None:
                            step.detail = "no fence is set"
                        else:
                            self.compute.migration_cancel(server, src_att, generation)
                    except ComputeNotFound:  # its start was refused for the same reason: nothing to lift
                        step.detail = "the compute does not know the attachment"
            except ComputeError as exc:
                raise self._left(m, f"cancel of {target} failed: {exc}") from None
        if m.state == j.FENCING:  # a new fence follows: the compute must have finished this cancel
            for server, src_att, _ in m.attachments:
                if f"{server}/{src_att}" in started:
                    self._wait_cancelled(server, src_att)

    def _wait_cancelled(self, server: str, attachment: str) -> None:
        deadline = time.monotonic() + CANCEL_WAIT
        while self.compute.migration_state(server, attachment)["state"] not in ("none", "cancelled"):
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"the cancel of {server}/{attachment} did not finish in {CANCEL_WAIT:.0f} s"
                )
            time.sleep(0.2)

    def _cancel(self, m: Migration, reason: str, raise_after: bool = True) -> None:
        """Lifts every fence, then ends cancelled: src is in use as before, dst is not a valid copy."""
        log.warning("migration %s: cancelling: %s", m.id, reason)
        self._set(m, state=j.CANCELLING, reason=reason, dst_valid=False)
        self._lift_fences(m)
        failpoint("before-finish")
        self._set(m, state=j.CANCELLED)
        _remove(m.checkpoint)
        if raise_after:
            raise MigrationCancelled(f"migration {m.id} cancelled: {reason}", m.id, reason)


def _remove(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
