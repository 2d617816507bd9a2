"""The Cinder-side migration orchestrator: start (fence), copy, complete, or cancel, with a journal.

    from volcopy.migration import Migrator
    migrator = Migrator("sqlite:////var/lib/volcopy/journal.sqlite", compute=NovaCompute(...))
    migrator.migrate(src, dst, attachments=[(server_id, src_attachment_id, dst_attachment_id)])
    migrator.recover()   # at service start: finishes or rolls back what a crash interrupted

docs/cinder.md shows it in a driver's migrate_volume.
"""

import importlib

# Where each public name lives. They are imported on first use: SQLAlchemy takes 0.3 s to import, and
# the volcopy command builds its parser from this package for every command, a plain copy included.
_PUBLIC = {
    "Migrator": "migrator",
    "Journal": "journal",
    "Migration": "journal",
    "MigrationError": "errors",
    "MigrationCancelled": "errors",
    "MigrationConflict": "errors",
    "MigrationNotFound": "errors",
    "VolumeBusy": "errors",
    "JournalError": "errors",
    "JournalUnreachable": "errors",
    "LostOwnership": "errors",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
