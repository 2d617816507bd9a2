"""The agent's own durable state, in SQLite: which volume each attachment is on, and every migration.

Each change is committed (synchronous=FULL) before the agent acts on it, so a restarted agent knows
which attachments are fenced and which steps may have been under way.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields

from ..api import State

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attachments (
    attachment_id TEXT PRIMARY KEY,
    server_id TEXT NOT NULL,
    qdev TEXT NOT NULL,          -- the guest's disk device
    node TEXT NOT NULL,          -- the block node holding the volume
    volume_path TEXT NOT NULL,
    replaced_by TEXT             -- the attachment that took its place at complete
);
CREATE TABLE IF NOT EXISTS migrations (
    attachment_id TEXT PRIMARY KEY,
    server_id TEXT NOT NULL,
    state TEXT NOT NULL,
    offline INTEGER NOT NULL,    -- fenced while QEMU was not running
    generation INTEGER NOT NULL, -- one more at each start, so overlays never reuse a name
    new_attachment_id TEXT,
    dst_path TEXT,
    overlay_path TEXT,
    bytes_written INTEGER NOT NULL,
    reason TEXT,
    updated_at REAL NOT NULL
);
"""


@dataclass
class Attachment:
    attachment_id: str
    server_id: str
    qdev: str
    node: str
    volume_path: str
    replaced_by: str | None = None


@dataclass
class Migration:
    attachment_id: str
    server_id: str
    state: str = State.NONE.value
    offline: bool = False
    generation: int = 0
    new_attachment_id: str | None = None
    dst_path: str | None = None
    overlay_path: str | None = None
    bytes_written: int = 0
    reason: str | None = None
    updated_at: float = 0.0

    def view(self) -> dict:
        """What the API shows."""
        return {
            "server_id": self.server_id,
            "attachment_id": self.attachment_id,
            "state": self.state,
            "new_attachment_id": self.new_attachment_id,
            "bytes_written_since_start": self.bytes_written,
            "instance_running": not self.offline,
            "reason": self.reason,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.updated_at)),
        }


class StateStore:
    def __init__(self, path: str):
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def _put(self, table: str, row) -> None:
        values = asdict(row)
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})", tuple(values.values())
            )

    def _get(self, table: str, cls, key: str):
        names = [f.name for f in fields(cls)]
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(names)} FROM {table} WHERE attachment_id = ?", (key,)
            ).fetchone()
        return cls(**dict(zip(names, row, strict=True))) if row else None

    def attachment(self, attachment_id: str) -> Attachment | None:
        return self._get("attachments", Attachment, attachment_id)

    def put_attachment(self, attachment: Attachment) -> None:
        self._put("attachments", attachment)

    def add_attachment_if_new(self, attachment: Attachment) -> None:
        """Configuration seeds attachments; what the agent learned since (a complete) wins."""
        if self.attachment(attachment.attachment_id) is None:
            self.put_attachment(attachment)

    def attachments_of(self, server_id: str) -> list[Attachment]:
        """The server's current attachments (not those replaced by a complete)."""
        with self._lock:
            keys = [
                r[0]
                for r in self._db.execute(
                    "SELECT attachment_id FROM attachments WHERE server_id = ? AND replaced_by IS NULL "
                    "ORDER BY attachment_id",
                    (server_id,),
                )
            ]
        return [self.attachment(key) for key in keys]

    def migration(self, attachment_id: str) -> Migration | None:
        migration = self._get("migrations", Migration, attachment_id)
        if migration is not None:
            migration.offline = bool(migration.offline)
        return migration

    def put_migration(self, migration: Migration) -> None:
        migration.updated_at = time.time()
        self._put("migrations", migration)

    def migrations_in(self, states: list[str]) -> list[Migration]:
        marks = ", ".join("?" for _ in states)
        with self._lock:
            keys = [
                r[0]
                for r in self._db.execute(
                    f"SELECT attachment_id FROM migrations WHERE state IN ({marks})", tuple(states)
                )
            ]
        return [self.migration(key) for key in keys]

    def close(self) -> None:
        with self._lock:
            self._db.close()
