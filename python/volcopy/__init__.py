"""volcopy: fast, safe copying of block volumes.

volcopy.copy(src, dst, ...)  -> CopyResult
volcopy.extents(path)        -> (N, 2) int64 array of data extents
volcopy.digest(path)         -> hex volume digest
volcopy.verify(src, dst)     -> None, or raises VerifyError
"""

from importlib import metadata as _metadata

from .copier import CopyResult, copy
from .digest import digest, verify
from .errors import (
    Cancelled,
    CheckpointError,
    CopyIOError,
    EngineUnavailable,
    InvalidRequest,
    VerifyError,
    VolcopyError,
)
from .extents import extents

try:
    __version__ = _metadata.version("volcopy")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "copy",
    "extents",
    "digest",
    "verify",
    "CopyResult",
    "VolcopyError",
    "InvalidRequest",
    "EngineUnavailable",
    "Cancelled",
    "CheckpointError",
    "CopyIOError",
    "VerifyError",
    "__version__",
]
