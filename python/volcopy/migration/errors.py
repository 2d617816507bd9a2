"""Errors of the migration orchestrator; each is a VolcopyError with a one-line message."""

from __future__ import annotations

from ..errors import InvalidRequest, VolcopyError


class MigrationError(VolcopyError):
    """A migration could not go on; ``migration_id`` names it when it exists."""

    def __init__(self, message: str, migration_id: str | None = None):
        super().__init__(message)
        self.migration_id = migration_id


class MigrationNotFound(MigrationError, InvalidRequest):
    """No migration has this id in the journal."""


class VolumeBusy(MigrationError, InvalidRequest):
    """The volume is already part of a running migration (the journal refused a second one)."""


class MigrationCancelled(MigrationError):
    """The migration ended cancelled: src is in use as before, dst is not a valid copy; ``reason`` is why."""

    def __init__(self, message: str, migration_id: str, reason: str):
        super().__init__(message, migration_id)
        self.reason = reason


class MigrationConflict(MigrationError):
    """The call does not fit the migration's state (e.g. cancelling one that is already completing)."""


class JournalError(MigrationError):
    """The journal cannot be reached or used (wrong URL, server down, unknown schema version)."""


class JournalUnreachable(JournalError):
    """The journal's database did not answer within the journal's retry time (``retry_for``)."""


class LostOwnership(MigrationError):
    """This process no longer owns the migration: its lock died with its database session and another
    process took (or may have taken) the migration over. It stops before any further external effect;
    the journal holds what it did, for the new owner."""
