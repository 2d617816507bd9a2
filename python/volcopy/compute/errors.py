"""Errors of the compute handoff, one per HTTP status: the agent raises them, the client raises them again."""

from __future__ import annotations

from ..errors import VolcopyError


class ComputeError(VolcopyError):
    """The compute service failed or could not be reached; ``status`` is the HTTP status, if any."""

    status: int | None = None

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class ComputeBadRequest(ComputeError):
    status = 400


class ComputeUnauthorized(ComputeError):
    status = 401


class ComputeForbidden(ComputeError):
    """403: the agent's configuration does not allow it (a connector, a device path)."""

    status = 403


class ComputeNotFound(ComputeError):
    status = 404


class ComputeConflict(ComputeError):
    """409: the fence cannot be set (writes cannot be suspended), or the call does not fit the state."""

    status = 409


BY_STATUS = {
    cls.status: cls
    for cls in (ComputeBadRequest, ComputeUnauthorized, ComputeForbidden, ComputeNotFound, ComputeConflict)
}
