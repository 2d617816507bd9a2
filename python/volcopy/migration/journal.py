"""The journal: every migration and every step it takes, in a database that outlives the process.

A step is written as *intended* before its external effect and as *done* (or *failed*) after it, so a
restarted orchestrator knows exactly what may have happened. A volume belongs to at most one running
migration: the claim is a primary key, so the database itself refuses a second migration of it, from
any process on any host sharing the journal. Any SQLAlchemy URL works; SQLite is the embedded default
and PostgreSQL the shared one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
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

from .errors import JournalError, MigrationNotFound, VolumeBusy

SCHEMA_VERSION = 1

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


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets another process read progress while the migration writes; the busy timeout makes
    # writers from several processes wait for each other instead of failing.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Journal:
    def __init__(self, url: str):
        self.url = url
        try:
            self.engine = create_engine(url, pool_pre_ping=True)
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise JournalError(f"cannot use journal {url!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
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
        if isinstance(exc, OperationalError):
            return JournalError(f"journal {self.where} is unreachable: {reason}")
        return JournalError(f"journal {self.where} refused the request: {reason}")

    def _create_schema(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
        except (IntegrityError, ProgrammingError):
            pass  # another process created the tables at the same moment (the version check follows)
        except DBAPIError as exc:
            raise self._error(exc) from None
        try:
            with self._session() as s:
                if s.scalar(select(SchemaVersion.version)) is None:
                    s.add(SchemaVersion(version=SCHEMA_VERSION))
        except IntegrityError:
            pass  # the same: another process wrote the version first
        with self._session() as s:
            versions = s.scalars(select(SchemaVersion.version)).all()
        if versions != [SCHEMA_VERSION]:
            raise JournalError(
                f"journal {self.where} has schema version {versions}; this volcopy knows {SCHEMA_VERSION}"
            )

    # ---------------------------------------------------------------- migrations

    def create(self, migration: Migration) -> Migration:
        """Records a new migration and claims its volumes, in one transaction."""
        try:
            with self._session() as s:
                s.add(migration)
                s.flush()  # the migration row first: the claims refer to it
                s.add_all(
                    VolumeClaim(volume=key, migration_id=migration.id)
                    for key in (migration.src_key, migration.dst_key)
                )
        except IntegrityError:
            holder = self.claimant(migration.src_key) or self.claimant(migration.dst_key)
            raise VolumeBusy(
                f"volume is already in migration {holder or '(just finished)'}; one migration per volume"
                " at a time",
                holder,
            ) from None
        return migration

    def claimant(self, volume_key: str) -> str | None:
        with self._session() as s:
            return s.scalar(select(VolumeClaim.migration_id).where(VolumeClaim.volume == volume_key))

    def get(self, migration_id: str) -> Migration:
        with self._session() as s:
            m = s.get(Migration, migration_id)
        if m is None:
            raise MigrationNotFound(f"no migration {migration_id} in journal {self.where}", migration_id)
        return m

    def list(self, unfinished_only: bool = False) -> list[Migration]:
        query = select(Migration).order_by(Migration.created_at)
        if unfinished_only:
            query = query.where(Migration.state.not_in(FINAL_STATES))
        with self._session() as s:
            return list(s.scalars(query))

    def update(self, migration_id: str, **fields) -> None:
        """Changes fields of a migration; a final state also releases its volumes."""
        fields["updated_at"] = utcnow()
        if fields.get("state") in FINAL_STATES:
            fields["finished_at"] = fields["updated_at"]
        with self._session() as s:
            s.execute(update(Migration).where(Migration.id == migration_id).values(**fields))
            if fields.get("state") in FINAL_STATES:
                s.execute(delete(VolumeClaim).where(VolumeClaim.migration_id == migration_id))

    def take_over(self, migration_id: str, previous_owner: str, owner: str) -> bool:
        """Makes ``owner`` run the migration if ``previous_owner`` still had it: of several processes
        recovering at once, exactly one gets each migration."""
        with self._session() as s:
            result = s.execute(
                update(Migration)
                .where(Migration.id == migration_id, Migration.owner == previous_owner)
                .values(owner=owner, updated_at=utcnow())
            )
            return result.rowcount == 1

    def report_progress(self, migration_id: str, done: int, total: int, rate: float) -> bool:
        """Writes progress; returns whether a cancel was asked for meanwhile (read in the same round)."""
        with self._session() as s:
            s.execute(
                update(Migration)
                .where(Migration.id == migration_id)
                .values(bytes_done=done, bytes_total=total, rate=rate, updated_at=utcnow())
            )
            return bool(s.scalar(select(Migration.cancel_requested).where(Migration.id == migration_id)))

    # ---------------------------------------------------------------- steps

    def step_intended(self, migration_id: str, name: str, target: str = "") -> int:
        with self._session() as s:
            step = Step(migration_id=migration_id, name=name, target=target, status=INTENDED)
            s.add(step)
            s.flush()
            return step.id

    def step_ended(self, step_id: int, status: str, detail: str | None = None) -> None:
        with self._session() as s:
            s.execute(
                update(Step).where(Step.id == step_id).values(status=status, detail=detail, ended_at=utcnow())
            )

    def steps(self, migration_id: str) -> list[Step]:
        with self._session() as s:
            return list(s.scalars(select(Step).where(Step.migration_id == migration_id).order_by(Step.id)))
