"""The exceptions of volcopy: everything it raises on purpose is a VolcopyError."""

from __future__ import annotations


class VolcopyError(Exception):
    """Base of every error volcopy raises on purpose."""


class InvalidRequest(VolcopyError, ValueError):
    """The request was refused before any byte of dst was written."""


class EngineUnavailable(InvalidRequest):
    """The engine asked for cannot run here; the message says why."""


class Cancelled(VolcopyError):
    """The copy was cancelled; with a checkpoint it can be resumed."""


class CheckpointError(VolcopyError):
    """The checkpoint cannot be used (another copy's, or unreadable)."""


class CopyIOError(VolcopyError, OSError):
    """An I/O failure: ``errno``, ``filename``, ``offset`` and ``operation`` say where and what."""

    def __init__(self, err: int, message: str, filename: str | None, offset: int, operation: str):
        OSError.__init__(self, err, message, filename)
        self.offset = offset
        self.operation = operation

    def __str__(self) -> str:
        return (
            f"{self.strerror} ({self.filename}, {self.operation} at offset {self.offset}, errno {self.errno})"
        )


class VerifyError(VolcopyError):
    """dst does not read back as src; ``offset`` is the first byte that differs."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


__all__ = [
    "VolcopyError",
    "InvalidRequest",
    "EngineUnavailable",
    "Cancelled",
    "CheckpointError",
    "CopyIOError",
    "VerifyError",
]
