"""volcopy.extents(): where a volume holds data."""

from __future__ import annotations

from . import _core
from .volume import VolumeSpec, open_source

TYPE_CHECKING = False  # as typing's, without importing typing (copier.py says why)
if TYPE_CHECKING:
    import numpy as np


def extents(path: VolumeSpec) -> np.ndarray:
    """The data extents as an (N, 2) int64 array of (offset, length): SEEK_DATA for files, one extent
    covering a block device, the allocated objects of an RBD image."""
    with open_source(path, direct=False) as volume:
        return _core.extents_of(volume.endpoint(), volume.size)
