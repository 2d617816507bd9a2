"""The engine's checkpoint of a migration's copy, kept in the journal too, so that a copy taken over by
another host (a mover, or recover() anywhere the journal is shared) resumes where it stopped instead of
starting again.

The engine keeps its checkpoint in a local file (csrc/checkpoint.c): two 512-byte header slots, then
from offset 4096 on a record (chunk, digest) for each 1 MiB chunk that holds data. Its records are
appended before the header that counts them, and one the header counts never changes. So ``sync()``
reads the header slots first and then the records it has not sent yet, and writes both to the journal
in one transaction, conditional on the migration's owner: what the journal holds is always a checkpoint
the engine could have saved, never ahead of the file, which is never ahead of what dst durably holds.
``restore()`` puts it back in the local file before a copy, when it is further along than what the file
has.
"""

from __future__ import annotations

import logging
import os

from .._core import checkpoint_resume_offset
from .errors import LostOwnership, MigrationError
from .journal import Journal

log = logging.getLogger(__name__)

HEADERS_SIZE = 1024  # the two header slots
RECORDS_AT = 4096


class SharedCheckpoint:
    def __init__(self, journal: Journal, migration_id: str, path: str, owner: str):
        self.journal = journal
        self.migration_id = migration_id
        self.path = path
        self.owner = owner
        self._sent_to = RECORDS_AT  # the records below this offset are in the journal
        self._seen: tuple[int, int] | None = None  # the file's (mtime, size) at the last sync

    def restore(self) -> None:
        """Makes the local file the journal's copy when that one resumes further."""
        pieces = self.journal.checkpoint_pieces(self.migration_id)
        local = checkpoint_resume_offset(self.path) if os.path.exists(self.path) else 0
        if not pieces:
            return
        staged = f"{self.path}.journal"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            for offset, data in pieces:
                os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        shared = checkpoint_resume_offset(staged)
        if shared <= local:
            os.unlink(staged)
            return
        os.replace(staged, self.path)
        end = max(offset + len(data) for offset, data in pieces)
        self._sent_to = max(RECORDS_AT, end)
        log.info("migration %s: checkpoint taken from the journal: resumes at %d", self.migration_id, shared)

    def forget(self) -> None:
        """Removes the checkpoint, here and in the journal: the copy starts from the beginning."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.journal.drop_checkpoint_pieces(self.migration_id, as_owner=self.owner)
        self._sent_to, self._seen = RECORDS_AT, None

    def sync(self) -> None:
        """Sends what the engine saved since the last call (nothing when the file did not change)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        seen = (st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        with open(self.path, "rb") as f:
            headers = f.read(HEADERS_SIZE)  # first: the records read after them are at least as new
            f.seek(self._sent_to)
            records = f.read()
        pieces = [(0, headers)]
        if records:
            pieces.append((self._sent_to, records))
        # The whole file is sent: what the journal holds of an earlier file (one the engine started
        # afresh, an older version's) goes, or restore() would lay it over this one's records.
        replace_all = self._sent_to == RECORDS_AT
        self._seen = seen  # sent or not: the engine's next save sends this one's records too
        try:
            self.journal.save_checkpoint_pieces(
                self.migration_id, pieces, as_owner=self.owner, replace_all=replace_all
            )
        except LostOwnership:
            raise
        except MigrationError as exc:
            log.warning("migration %s: checkpoint not sent to the journal: %s", self.migration_id, exc)
            return
        self._sent_to += len(records)
