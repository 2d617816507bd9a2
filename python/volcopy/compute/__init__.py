"""The compute handoff: the calls of the migration contract (start, cancel, complete; prepare optional).

``NovaCompute`` is the client the Cinder side uses; ``volcopy.compute.agent`` is the reference
compute side built on QEMU. docs/compute-api.md is the REST reference.
"""

from .api import State
from .client import NovaCompute
from .errors import (
    ComputeBadRequest,
    ComputeConflict,
    ComputeError,
    ComputeForbidden,
    ComputeNotFound,
    ComputeUnauthorized,
)

__all__ = [
    "NovaCompute",
    "State",
    "ComputeError",
    "ComputeBadRequest",
    "ComputeUnauthorized",
    "ComputeNotFound",
    "ComputeConflict",
    "ComputeForbidden",
]
