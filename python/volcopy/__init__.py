"""volcopy: fast, safe copying of block volumes.

volcopy.copy(src, dst, ...)  -> CopyResult
volcopy.extents(path)        -> (N, 2) int64 array of data extents
volcopy.digest(path)         -> hex volume digest
volcopy.verify(src, dst)     -> None, or raises VerifyError
"""

from ._version import version as __version__
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
from .rate import RateLimit

__all__ = [
    "copy",
    "extents",
    "digest",
    "verify",
    "CopyResult",
    "RateLimit",
    "VolcopyError",
    "InvalidRequest",
    "EngineUnavailable",
    "Cancelled",
    "CheckpointError",
    "CopyIOError",
    "VerifyError",
    "__version__",
]
