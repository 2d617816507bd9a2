"""Errors of the data movers; each is a VolcopyError with a one-line message."""

from __future__ import annotations

from ..errors import VolcopyError


class MoverError(VolcopyError):
    """A mover, or the fleet of movers, cannot do what was asked."""


class CoordinationUnreachable(MoverError):
    """The coordination backend (the tooz URL) does not answer."""


class MoverNameInUse(MoverError):
    """Another live mover has joined the group under this mover's name."""


class NoMoverFits(MoverError):
    """No live mover reaches both transports with a free slot; ``needed`` names the transports and
    ``seen`` holds the movers that were in the group (MoverInfo)."""

    def __init__(self, message: str, needed: tuple[str, str], seen: list):
        super().__init__(message)
        self.needed = needed
        self.seen = seen
