"""Who runs a migration: the holder of a tooz lock named after it. The journal's ``owner`` column
("host:pid:start time") says who that is, for people and for the owner's conditional writes.

The lock decides, on every host alike:
- With a PostgreSQL journal it is tooz's postgresql driver: an advisory lock held by a connection of
  the owner's. The server releases it when that connection dies (the process killed, its host cut
  off, its backend terminated), so any host's recover() takes the migration over then, and never
  while the owner lives.
- With SQLite (one host) it is tooz's file driver: a lock file beside the journal, released by the
  kernel when the process dies. This replaces the check of the owner's pid and start time: one rule
  (the lock is held exactly while its owner lives) for both journals, and the migrator never asks
  which one it has.

tooz's postgresql driver hashes a lock's name into 2 bytes (65,536 advisory keys). Two migrations
whose names collide share a lock: a new migration draws another id then (see Migrator), and recover()
leaves an orphan whose key a running migration holds until that one ends. Both are safe directions.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import warnings

from sqlalchemy.engine import URL

from ..errors import InvalidRequest
from .errors import JournalUnreachable

log = logging.getLogger(__name__)

LOCK_PREFIX = "volcopy-migration-"

# What check() finds.
HELD = "held"  # the lock is ours, as it was
REGAINED = "regained"  # it had died with its session and is ours again: who owns the row must be checked
LOST = "lost"  # another process holds it now
UNREACHABLE = "unreachable"  # it died with its session and the database does not answer


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22, after the command in parentheses
    except (OSError, IndexError):
        return None


def this_process() -> str:
    """host:pid:start time; the start time tells this process from a later one with its pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def coordination_url(journal_url: URL) -> str:
    """The tooz URL for a journal: its own PostgreSQL database, or a lock directory beside SQLite's file."""
    backend = journal_url.get_backend_name()
    if backend == "postgresql":
        query = {k: v for k, v in journal_url.query.items() if k in ("host", "port")}
        url = URL.create(
            "postgresql",
            username=journal_url.username,
            password=journal_url.password,
            host=journal_url.host,
            port=journal_url.port,
            database=journal_url.database,
            query=query,
        )
        return url.render_as_string(hide_password=False)
    if backend == "sqlite":
        database = journal_url.database
        if database in (None, "", ":memory:"):  # one process only: its locks need no shared place
            return "file://" + os.path.join(tempfile.gettempdir(), f"volcopy-locks-{os.getuid()}")
        return "file://" + os.path.abspath(database) + ".locks"
    raise InvalidRequest(
        f"no coordination for a {backend} journal: pass coordination_url (a tooz URL) to the Migrator"
    )


def _coordination():
    """tooz.coordination, imported with its dependencies' deprecation warnings silenced (futurist
    imports eventlet, which warns on stderr: one line per CLI error must stay one line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tooz import coordination
    return coordination


# Imported with this module, not on first use: tooz imports eventlet (through futurist), and eventlet
# imported in a thread other than the main one leaves that thread unjoinable (its join() and the
# interpreter's exit then hang). A Migrator's first lock is often taken in a worker thread.
_coordination()


class Owners:
    """The tooz locks of the migrations this process runs."""

    def __init__(self, url: str, owner: str):
        coordination = _coordination()
        self.url = url
        self._postgres = url.startswith("postgresql:")
        with warnings.catch_warnings():
            # tooz marks its postgresql driver deprecated; it is the one whose lock dies with the
            # owner's connection, which is what a shared journal needs (see the module's docstring).
            warnings.simplefilter("ignore", DeprecationWarning)
            self._coordinator = coordination.get_coordinator(url, owner.encode())
        try:
            self._coordinator.start()
        except coordination.ToozError as exc:
            raise JournalUnreachable(f"coordination {self.where} is unreachable: {_one_line(exc)}") from None
        self._locks: dict = {}
        self._guard = threading.Lock()

    @property
    def where(self) -> str:
        return self.url.split("@", 1)[-1] if "@" in self.url else self.url

    def _new_lock(self, migration_id: str):
        return self._coordinator.get_lock(f"{LOCK_PREFIX}{migration_id}".encode())

    def acquire(self, migration_id: str) -> bool:
        """Takes the migration's lock if nobody holds it (never waits)."""
        from tooz import ToozError

        lock = self._new_lock(migration_id)
        try:
            got = lock.acquire(blocking=False)
        except ToozError as exc:
            raise JournalUnreachable(f"coordination {self.where} is unreachable: {_one_line(exc)}") from None
        if got:
            with self._guard:
                self._locks[migration_id] = lock
        return got

    def release(self, migration_id: str) -> None:
        from tooz import ToozError

        with self._guard:
            lock = self._locks.pop(migration_id, None)
        if lock is None:
            return
        try:
            lock.release()
        except ToozError:
            lock.acquired = False  # its session is gone, and the lock with it
            log.debug("the lock of migration %s was already gone", migration_id)

    def check(self, migration_id: str) -> str:
        """Whether this process still holds the migration's lock: HELD, REGAINED (it had died with its
        session and was free; the caller must check that the journal still names it the owner),
        LOST, or UNREACHABLE."""
        from tooz import ToozError

        with self._guard:
            lock = self._locks.get(migration_id)
        if lock is None:
            return LOST
        if not self._postgres:
            return HELD if lock.acquired else LOST
        import psycopg2

        # tooz has no liveness check for this driver: the advisory lock lives exactly as long as the
        # lock's own connection, so that connection is asked.
        connection = lock._conn
        if lock.acquired and connection is not None:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                    cursor.fetchone()
                return HELD
            except psycopg2.Error as exc:
                log.warning("migration %s: its lock died with its session: %s", migration_id, _one_line(exc))
                lock.acquired = False  # tooz would otherwise refuse to take it again
                connection.close()
        fresh = self._new_lock(migration_id)
        try:
            got = fresh.acquire(blocking=False)
        except ToozError:
            return UNREACHABLE
        if not got:
            return LOST
        with self._guard:
            self._locks[migration_id] = fresh
        return REGAINED

    def stop(self) -> None:
        for migration_id in list(self._locks):
            self.release(migration_id)
        try:
            self._coordinator.stop()
        except Exception:  # noqa: BLE001 - its connection may be gone already
            pass


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
