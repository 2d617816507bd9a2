"""The agent's own durable state, in SQLite: which volume each attachment's disk is on, and the volume
migration of each attachment.

Each change is committed (synchronous=FULL) before the agent acts on it, so a restarted agent knows
which disks are fenced and which steps may have been under way. The file is readable by root alone:
it holds the connection_info of volumes the agent attached.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields

from ..api import State

_SCHEMA = """
CREATE TABLE IF NOT EXISTS disks (
    attachment_id TEXT PRIMARY KEY,
    server_id TEXT NOT NULL,
    qdev TEXT NOT NULL,          -- the guest's disk device
    node TEXT NOT NULL,          -- the block node holding the volume
    volume_path TEXT NOT NULL,
    volume_format TEXT NOT NULL, -- raw or qcow2
    connection TEXT,             -- JSON: how os-brick attached the volume (null: not by the agent)
    replaced_by TEXT             -- the attachment that took its place at complete
);
CREATE TABLE IF NOT EXISTS volume_migrations (
    attachment_id TEXT PRIMARY KEY,
    server_id TEXT NOT NULL,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL, -- the fencing token: one more at each start
    offline INTEGER NOT NULL,    -- QEMU was not running (at start, or it stopped since)
    read_only INTEGER NOT NULL,  -- a read-only disk: fenced without an overlay
    pivoted INTEGER NOT NULL,    -- the overlay's backing is dst: there is no way back to src
    merged INTEGER NOT NULL,     -- the overlay was merged, the disk moved down: never merge it again
    switching INTEGER NOT NULL DEFAULT 0, -- the move down onto the merged volume was asked, not yet seen
    qemu TEXT,                   -- the QEMU fenced (pid:start time): another one means a restart
    restarted INTEGER NOT NULL,  -- QEMU was started again on src while fenced
    prepared INTEGER NOT NULL DEFAULT 0, -- prepare attached dst while fenced (new_attachment_id, dst_*)
    new_attachment_id TEXT,
    dst_path TEXT,
    dst_format TEXT,
    dst_discard INTEGER NOT NULL,
    dst_connection TEXT,         -- JSON: connection_info and os-brick's device_info of dst
    overlay_path TEXT,
    bytes_written INTEGER NOT NULL,
    reason TEXT,
    updated_at REAL NOT NULL
);
"""

# Columns added after the first release, with their declarations: a database an older agent made gets
# them (CREATE TABLE IF NOT EXISTS leaves an existing table as it is).
_ADDED_COLUMNS = {
    "volume_migrations": {"prepared": "INTEGER NOT NULL DEFAULT 0", "switching": "INTEGER NOT NULL DEFAULT 0"}
}


@dataclass
class Disk:
    """An attachment's disk in its server's QEMU."""

    attachment_id: str
    server_id: str
    qdev: str
    node: str
    volume_path: str
    volume_format: str = "raw"
    connection: str | None = None
    replaced_by: str | None = None


@dataclass
class VolumeMigration:
    """The compute side of one attachment's migration: the API's volume_migration object."""

    attachment_id: str
    server_id: str
    state: str = State.NONE.value
    generation: int = 0
    offline: bool = False
    read_only: bool = False
    pivoted: bool = False
    merged: bool = False
    switching: bool = False
    qemu: str | None = None
    restarted: bool = False
    prepared: bool = False
    new_attachment_id: str | None = None
    dst_path: str | None = None
    dst_format: str | None = None
    dst_discard: bool = False
    dst_connection: str | None = None
    overlay_path: str | None = None
    bytes_written: int = 0
    reason: str | None = None
    updated_at: float = 0.0

    @property
    def active(self) -> bool:
        """A fence is set, being set, or being taken down: the volume is not the guest's alone."""
        return self.state not in (State.NONE.value, State.CANCELLED.value, State.COMPLETED.value)


def connection_json(connection_info: dict, device_info: dict) -> str:
    return json.dumps({"connection_info": connection_info, "device_info": device_info})


_BOOLEANS = {f.name for f in fields(VolumeMigration) if f.type == "bool"}


class StateStore:
    def __init__(self, path: str):
        self._lock = threading.Lock()
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

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
        if not row:
            return None
        values = dict(zip(names, row, strict=True))
        for name in _BOOLEANS & values.keys():
            values[name] = bool(values[name])
        return cls(**values)

    def _keys(self, query: str, args: tuple) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(query, args)]

    def disk(self, attachment_id: str) -> Disk | None:
        return self._get("disks", Disk, attachment_id)

    def put_disk(self, disk: Disk) -> None:
        self._put("disks", disk)

    def add_disk_if_new(self, disk: Disk) -> None:
        """Configuration seeds disks; what the agent learned since (a complete) wins."""
        if self.disk(disk.attachment_id) is None:
            self.put_disk(disk)

    def disks_of(self, server_id: str) -> list[Disk]:
        """The server's current disks (not those replaced by a complete)."""
        keys = self._keys(
            "SELECT attachment_id FROM disks WHERE server_id = ? AND replaced_by IS NULL "
            "ORDER BY attachment_id",
            (server_id,),
        )
        return [self.disk(key) for key in keys]

    def all_disks(self) -> list[Disk]:
        keys = self._keys("SELECT attachment_id FROM disks", ())
        return [self.disk(key) for key in keys]

    def migration(self, attachment_id: str) -> VolumeMigration | None:
        return self._get("volume_migrations", VolumeMigration, attachment_id)

    def put_migration(self, migration: VolumeMigration) -> None:
        migration.updated_at = time.time()
        self._put("volume_migrations", migration)

    def migrations_of(self, server_id: str) -> list[VolumeMigration]:
        keys = self._keys("SELECT attachment_id FROM volume_migrations WHERE server_id = ?", (server_id,))
        return [self.migration(key) for key in keys]

    def migrations_in(self, states: list[str]) -> list[VolumeMigration]:
        marks = ", ".join("?" for _ in states)
        keys = self._keys(
            f"SELECT attachment_id FROM volume_migrations WHERE state IN ({marks})", tuple(states)
        )
        return [self.migration(key) for key in keys]

    def close(self) -> None:
        with self._lock:
            self._db.close()
