"""The journal: every migration and every step it takes, in a database that outlives the process.

A step is written as *intended* before its external effect and as *done* (or *failed*) after it, so a
restarted orchestrator knows exactly what may have happened. The owner's writes are conditional on it
still being the owner (``as_owner``): a process that lost a migration to another cannot overwrite what
the new owner records. A lost connection to the database is retried with backoff for ``retry_for``
seconds (logged at each attempt), then is one JournalUnreachable. A volume belongs to at most one running
migration: the claim is a primary key, so the database itself refuses a second migration of it, from
any process on any host sharing the journal. Any SQLAlchemy URL works; SQLite is the embedded default
and PostgreSQL the shared one.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    delete,
    event,
    select,
    update,
)
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .errors import JournalError, JournalUnreachable, LostOwnership, MigrationNotFound, VolumeBusy

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RETRY_FOR = 60.0  # seconds a call waits for an unreachable database before giving up
RETRY_FIRST, RETRY_MAX = 0.1, 5.0  # seconds between attempts: doubling from the first, at most the max

# Migration states. Final ones release the volumes' claims.
PENDING = "pending"  # recorded; nothing external done yet
FENCING = "fencing"  # asking the compute(s) to stop writing to src
COPYING = "copying"  # src is fenced (or detached); copying or cloning onto dst
COMPLETING = "completing"  # dst is a verified copy; asking the compute(s) to move onto it
CANCELLING = "cancelling"  # lifting every fence that may have been set
COMPLETED = "completed"
CANCELLED = "cancelled"
FINAL_STATES = (COMPLETED, CANCELLED)

# Step statuses.
INTENDED, DONE, FAILED = "intended", "done", "failed"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    def as_dict(self) -> dict:
        """The row as JSON-ready values (times in ISO 8601)."""
        row = {column.name: getattr(self, column.name) for column in self.__table__.columns}
        return {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}


class SchemaVersion(Base):
    __tablename__ = "volcopy_schema"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class Migration(Base):
    __tablename__ = "volcopy_migrations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    src_key: Mapped[str] = mapped_column(String(512))
    dst_key: Mapped[str] = mapped_column(String(512))
    src: Mapped[dict] = mapped_column(JSON)  # {"path": ...} or {"connection_info": ...}
    dst: Mapped[dict] = mapped_column(JSON)
    attachments: Mapped[list] = mapped_column(JSON)  # [[server_id, src_attachment_id, dst_attachment_id]]
    options: Mapped[dict] = mapped_column(JSON)  # the copy options, so that recover() copies alike
    owner: Mapped[str] = mapped_column(String(255))  # "host:pid" of the process running it
    checkpoint: Mapped[str | None] = mapped_column(Text)
    copy_path: Mapped[str | None] = mapped_column(String(16))  # "copy", "clone" or "driver-clone"
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    rate: Mapped[float] = mapped_column(Float, default=0.0)  # bytes per second
    resumed_from: Mapped[int] = mapped_column(BigInteger, default=0)
    src_digest: Mapped[str | None] = mapped_column(String(32))
    dst_digest: Mapped[str | None] = mapped_column(String(32))
    dst_valid: Mapped[bool] = mapped_column(Boolean, default=False)  # True only once completed
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    reason: Mapped[str | None] = mapped_column(Text)  # why it was cancelled
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def percent(self) -> float:
        return 100.0 * self.bytes_done / self.bytes_total if self.bytes_total else 0.0

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def as_dict(self) -> dict:
        return super().as_dict() | {"percent": round(self.percent, 1)}


class Step(Base):
    __tablename__ = "volcopy_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    migration_id: Mapped[str] = mapped_column(ForeignKey("volcopy_migrations.id"), index=True)
    name: Mapped[str] = mapped_column(String(32))  # start, copy, clone, verify, complete, cancel
    target: Mapped[str] = mapped_column(String(512), default="")  # "server/attachment", or ""
    status: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    intended_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class VolumeClaim(Base):
    """A row per volume in a running migration; its primary key is what refuses a second one."""

    __tablename__ = "volcopy_volume_claims"

    volume: Mapped[str] = mapped_column(String(512), primary_key=True)
    migration_id: Mapped[str] = mapped_column(ForeignKey("volcopy_migrations.id"))


class Placement(Base):
    """A migration run by the data movers (volcopy.movers): its job on the jobboard, the mover it was
    placed on, and the mover that runs it now (another one after a takeover)."""

    __tablename__ = "volcopy_placements"

    migration_id: Mapped[str] = mapped_column(ForeignKey("volcopy_migrations.id"), primary_key=True)
    job: Mapped[str] = mapped_column(String(36))  # the TaskFlow job's uuid; "": not posted yet
    placed_on: Mapped[str] = mapped_column(String(255))
    run_by: Mapped[str | None] = mapped_column(String(255))
    backends: Mapped[list] = mapped_column(JSON, default=list)  # its volumes', as the submitter knew them
    backend_limit: Mapped[int] = mapped_column(Integer, default=0)  # jobs at once on one backend; 0: none
    placed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CheckpointPiece(Base):
    """Bytes of a migration's checkpoint file at ``offset``: the file kept where every host sharing the
    journal reads it, so that a copy taken over by another host resumes (see shared_checkpoint.py)."""

    __tablename__ = "volcopy_checkpoint_pieces"

    migration_id: Mapped[str] = mapped_column(ForeignKey("volcopy_migrations.id"), primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets another process read progress while the migration writes; the busy timeout makes
    # writers from several processes wait for each other instead of failing. The timeout first: the
    # switch to WAL takes a lock too, and without it failed at once ("database is locked") when several
    # processes opened a new journal together.
    cursor = connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _create_owner_only(url) -> None:
    """A new SQLite journal file readable by its owner alone: the journal keeps what reaches the
    volumes (a CHAP password in connection_info, a Ceph key in an rbd: spec). SQLite gives its -wal and
    -shm files the database file's mode. An existing file keeps the mode its owner chose."""
    path, query = url.database, url.query
    if not path or path == ":memory:" or query.get("mode") in ("ro", "rw", "memory"):
        return  # nothing to create: in memory, or SQLite is told to find it there
    if query.get("uri") and path.startswith("file:"):
        path = urllib.parse.urlparse(path).path
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError:  # there already, or its directory is not: SQLite's own error tells the latter
        pass


T = TypeVar("T")


def _retried(method: Callable[..., T]) -> Callable[..., T]:
    """The call again, as one transaction, while the database is unreachable (see Journal._retry)."""

    @functools.wraps(method)
    def call(self: Journal, *args, **kwargs) -> T:
        return self._retry(method.__name__, lambda: method(self, *args, **kwargs))

    return call


class Journal:
    def __init__(self, url: str, retry_for: float = RETRY_FOR):
        """url: a SQLAlchemy URL. retry_for: seconds each call retries a lost connection before it
        raises JournalUnreachable (opening the journal is not retried: a wrong URL is told at once)."""
        self.url = url
        self.retry_for = retry_for
        try:
            self.engine = create_engine(url, pool_pre_ping=True)
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise JournalError(f"cannot use journal {url!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            _create_owner_only(self.engine.url)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._create_schema()

    @property
    def where(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on error."""
        try:
            with self._sessions.begin() as session:
                yield session
        except IntegrityError:
            raise  # a constraint doing its work: the caller says what it means
        except DBAPIError as exc:
            raise self._error(exc) from None

    def _error(self, exc: DBAPIError) -> JournalError:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            return JournalUnreachable(f"journal {self.where} is unreachable: {reason}")
        return JournalError(f"journal {self.where} refused the request: {reason}")

    def _create_schema(self) -> None:
        attempts = 10
        for attempt in range(attempts):
            try:
                Base.metadata.create_all(self.engine)  # only the tables that are missing
                break
            except (IntegrityError, ProgrammingError):
                break  # another process created the tables at the same moment (the version check follows)
            except OperationalError as exc:
                # SQLite's word for the same race; anything else is the database's answer to give. SQLite
                # creates the tables one by one, each in its own transaction: with several processes
                # starting at once (a fleet of movers) one can lose the race on table after table, so it
                # tries again, a little later each time (3 tries were not always enough for 3 movers).
                # "database is locked": a read that must become a write while another process wrote,
                # which SQLite refuses at once, without its busy timeout.
                lost_race = any(word in str(exc.orig) for word in ("already exists", "database is locked"))
                if not lost_race or attempt == attempts - 1:
                    raise self._error(exc) from None
                time.sleep(0.05 * (attempt + 1))
            except DBAPIError as exc:
                raise self._error(exc) from None

        def record_version() -> None:
            try:
                with self._session() as s:
                    if s.scalar(select(SchemaVersion.version)) is None:
                        s.add(SchemaVersion(version=SCHEMA_VERSION))
            except IntegrityError:
                pass  # the same: another process wrote the version first

        def read_versions() -> list:
            with self._session() as s:
                return s.scalars(select(SchemaVersion.version)).all()

        # SQLite's "database is locked" here too, for the same race: tried again like a lost connection
        self._retry("recording the schema version", record_version)
        versions = self._retry("reading the schema version", read_versions)
        if versions != [SCHEMA_VERSION]:
            raise JournalError(
                f"journal {self.where} has schema version {versions}; this volcopy knows {SCHEMA_VERSION}"
            )

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """Runs call() until it does not find the database unreachable, for at most retry_for seconds.
        Each call is one transaction, so a failed attempt changed nothing; one whose commit reached the
        database but whose answer was lost is made harmless by the callers (see create, take_over)."""
        deadline = time.monotonic() + self.retry_for
        delay = RETRY_FIRST
        while True:
            try:
                return call()
            except JournalUnreachable as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                log.warning("%s: %s; retrying in %.1f s (giving up in %.0f s)", what, exc, delay, left)
                time.sleep(min(delay, left))
                delay = min(2 * delay, RETRY_MAX)

    def _check_owner(self, s: Session, migration_id: str, owner: str | None, touch: bool = True) -> None:
        """In the caller's transaction: the migration is still ``owner``'s (None: anyone may write).
        The row stays locked to the end of the transaction, so a take-over waits for it. touch: the
        migration's updated_at is now (not for a write beside its row, such as its checkpoint)."""
        if owner is None:
            return
        result = s.execute(
            update(Migration)
            .where(Migration.id == migration_id, Migration.owner == owner)
            .values(updated_at=utcnow() if touch else Migration.updated_at)
        )
        if result.rowcount != 1:
            now = s.scalar(select(Migration.owner).where(Migration.id == migration_id))
            raise LostOwnership(f"now run by {now}, no longer by {owner}", migration_id)

    # ---------------------------------------------------------------- migrations

    @_retried
    def create(self, migration: Migration, placement: Placement | None = None) -> Migration:
        """Records a new migration and claims its volumes, in one transaction; with a placement (a
        migration for the movers), that too, so that no moment exists when it is not the movers'."""
        try:
            with self._session() as s:
                s.add(migration)
                s.flush()  # the migration row first: the claims refer to it
                s.add_all(
                    VolumeClaim(volume=key, migration_id=migration.id)
                    # one key for both: two RBD images of one name in two clusters (VolumeRef.key)
                    for key in dict.fromkeys((migration.src_key, migration.dst_key))
                )
                if placement is not None:
                    s.add(placement)
        except IntegrityError:
            with self._session() as s:
                if s.get(Migration, migration.id) is not None:
                    return migration  # an earlier attempt was committed; only its answer was lost
            holder = self.claimant(migration.src_key) or self.claimant(migration.dst_key)
            raise VolumeBusy(
                f"volume is already in migration {holder or '(just finished)'}; one migration per volume"
                " at a time",
                holder,
            ) from None
        return migration

    @_retried
    def claimant(self, volume_key: str) -> str | None:
        with self._session() as s:
            return s.scalar(select(VolumeClaim.migration_id).where(VolumeClaim.volume == volume_key))

    @_retried
    def get(self, migration_id: str) -> Migration:
        with self._session() as s:
            m = s.get(Migration, migration_id)
        if m is None:
            raise MigrationNotFound(f"no migration {migration_id} in journal {self.where}", migration_id)
        return m

    @_retried
    def list(self, unfinished_only: bool = False) -> list[Migration]:
        query = select(Migration).order_by(Migration.created_at)
        if unfinished_only:
            query = query.where(Migration.state.not_in(FINAL_STATES))
        with self._session() as s:
            return list(s.scalars(query))

    @_retried
    def update(self, migration_id: str, as_owner: str | None = None, **fields) -> None:
        """Changes fields of a migration; a final state also releases its volumes. as_owner: only while
        the migration is still this owner's (LostOwnership otherwise, and nothing changes)."""
        fields["updated_at"] = utcnow()
        if fields.get("state") in FINAL_STATES:
            fields["finished_at"] = fields["updated_at"]
        with self._session() as s:
            self._check_owner(s, migration_id, as_owner)
            s.execute(update(Migration).where(Migration.id == migration_id).values(**fields))
            if fields.get("state") in FINAL_STATES:
                s.execute(delete(VolumeClaim).where(VolumeClaim.migration_id == migration_id))
                s.execute(delete(CheckpointPiece).where(CheckpointPiece.migration_id == migration_id))

    @_retried
    def take_over(self, migration_id: str, previous_owner: str, owner: str) -> bool:
        """Makes ``owner`` run the migration if ``previous_owner`` still had it: of several processes
        recovering at once, exactly one gets each migration. (Already ``owner``'s is True: an earlier
        attempt was committed and only its answer was lost.)"""
        with self._session() as s:
            result = s.execute(
                update(Migration)
                .where(Migration.id == migration_id, Migration.owner.in_([previous_owner, owner]))
                .values(owner=owner, updated_at=utcnow())
            )
            return result.rowcount == 1

    def report_progress(
        self, migration_id: str, done: int, total: int, rate: float, as_owner: str | None = None
    ) -> bool:
        """Writes progress; returns whether a cancel was asked for meanwhile (read in the same round).
        Never retried: the copy does not wait for a progress row; the next one will do."""
        with self._session() as s:
            self._check_owner(s, migration_id, as_owner)
            s.execute(
                update(Migration)
                .where(Migration.id == migration_id)
                .values(bytes_done=done, bytes_total=total, rate=rate, updated_at=utcnow())
            )
            return bool(s.scalar(select(Migration.cancel_requested).where(Migration.id == migration_id)))

    # ---------------------------------------------------------------- steps

    @_retried
    def step_intended(
        self, migration_id: str, name: str, target: str = "", as_owner: str | None = None
    ) -> int:
        """Records a step about to be taken; as_owner: only while the migration is still this owner's.
        (A step ended is recorded whoever owns the migration now: it is what happened.)"""
        with self._session() as s:
            self._check_owner(s, migration_id, as_owner)
            step = Step(migration_id=migration_id, name=name, target=target, status=INTENDED)
            s.add(step)
            s.flush()
            return step.id

    @_retried
    def step_ended(self, step_id: int, status: str, detail: str | None = None) -> None:
        with self._session() as s:
            s.execute(
                update(Step).where(Step.id == step_id).values(status=status, detail=detail, ended_at=utcnow())
            )

    @_retried
    def steps(self, migration_id: str) -> list[Step]:
        with self._session() as s:
            return list(s.scalars(select(Step).where(Step.migration_id == migration_id).order_by(Step.id)))

    # ---------------------------------------------------------------- the shared checkpoint

    def save_checkpoint_pieces(
        self, migration_id: str, pieces: list[tuple[int, bytes]], as_owner: str, replace_all: bool = False
    ) -> None:
        """Writes pieces of the migration's checkpoint file (each replaces the piece at its offset; with
        replace_all, every piece there was), only while the migration is still ``as_owner``'s. Never
        retried, like progress: the engine's next checkpoint is sent with what this one missed."""
        with self._session() as s:
            self._check_owner(s, migration_id, as_owner, touch=False)
            stale = CheckpointPiece.migration_id == migration_id
            if not replace_all:
                stale = stale & CheckpointPiece.offset.in_([offset for offset, _ in pieces])
            s.execute(delete(CheckpointPiece).where(stale))
            s.add_all(CheckpointPiece(migration_id=migration_id, offset=o, data=d) for o, d in pieces)

    @_retried
    def drop_checkpoint_pieces(self, migration_id: str, as_owner: str) -> None:
        with self._session() as s:
            self._check_owner(s, migration_id, as_owner, touch=False)
            s.execute(delete(CheckpointPiece).where(CheckpointPiece.migration_id == migration_id))

    @_retried
    def checkpoint_pieces(self, migration_id: str) -> list[tuple[int, bytes]]:
        with self._session() as s:
            rows = s.execute(
                select(CheckpointPiece.offset, CheckpointPiece.data)
                .where(CheckpointPiece.migration_id == migration_id)
                .order_by(CheckpointPiece.offset)
            )
            return [(offset, bytes(data)) for offset, data in rows]

    # ---------------------------------------------------------------- placements (movers)

    @_retried
    def placement(self, migration_id: str) -> Placement | None:
        with self._session() as s:
            return s.get(Placement, migration_id)

    @_retried
    def placements(self) -> dict[str, Placement]:
        with self._session() as s:
            return {p.migration_id: p for p in s.scalars(select(Placement))}

    @_retried
    def replace_job(self, migration_id: str, old: str, new: str) -> bool:
        """Makes ``new`` the migration's job if ``old`` still is: of several movers posting a lost job
        again, one wins."""
        with self._session() as s:
            result = s.execute(
                update(Placement)
                .where(Placement.migration_id == migration_id, Placement.job == old)
                .values(job=new)
            )
            return result.rowcount == 1

    @_retried
    def run_by(self, migration_id: str, mover: str, as_owner: str) -> None:
        """Records the mover that runs the migration now, while it is ``as_owner``'s."""
        with self._session() as s:
            self._check_owner(s, migration_id, as_owner)
            s.execute(update(Placement).where(Placement.migration_id == migration_id).values(run_by=mover))
