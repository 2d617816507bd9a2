"""The Cinder-side migration orchestrator: start (fence), copy, complete, or cancel, with a journal.

    from volcopy.migration import Migrator
    migrator = Migrator("sqlite:////var/lib/volcopy/journal.sqlite", compute=NovaCompute(...))
    migrator.migrate(src, dst, attachments=[(server_id, src_attachment_id, dst_attachment_id)])
    migrator.recover()   # at service start: finishes or rolls back what a crash interrupted

docs/cinder.md shows it in a driver's migrate_volume.
"""

from .errors import (
    JournalError,
    MigrationCancelled,
    MigrationConflict,
    MigrationError,
    MigrationNotFound,
    VolumeBusy,
)
from .journal import Journal, Migration
from .migrator import Migrator

__all__ = [
    "Migrator",
    "Journal",
    "Migration",
    "MigrationError",
    "MigrationCancelled",
    "MigrationConflict",
    "MigrationNotFound",
    "VolumeBusy",
    "JournalError",
]
