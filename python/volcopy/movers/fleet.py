"""The movers as a client sees them: the live members of the group, and placement among them.

    with Fleet("redis://coordination:6379") as fleet:
        fleet.movers()                  # every live mover, by name
        fleet.place(src, dst)           # the mover to run a migration from src to dst, or NoMoverFits

``src`` and ``dst`` are what the Migrator takes: paths (``rbd:`` ones too) or Cinder's connection_info.
"""

from __future__ import annotations

from . import membership
from .defaults import DEFAULT_GROUP
from .errors import CoordinationUnreachable
from .membership import MoverInfo
from .placement import choose
from .transports import transport_of


class Fleet:
    def __init__(self, url: str, group: str = DEFAULT_GROUP):
        self.url = url
        self.group = group
        self._coordinator = membership.connect(url, membership.reader_id())

    def movers(self) -> list[MoverInfo]:
        try:
            return membership.members(self._coordinator, self.group)
        except membership.BACKEND_ERRORS as exc:
            raise CoordinationUnreachable(
                f"coordination {membership.where(self.url)} is unreachable: {membership.one_line(exc)}"
            ) from None

    def place(self, src, dst) -> MoverInfo:
        """The live mover with a free slot whose transports include src's and dst's, least loaded first;
        NoMoverFits names the transports and the movers seen when none does."""
        return self.place_between(transport_of(src), transport_of(dst))

    def place_between(
        self,
        src_transport: str,
        dst_transport: str,
        fences: bool = False,
        queue: bool = False,
        waiting: dict[str, int] | None = None,
    ) -> MoverInfo | None:
        """place() for volumes known by their transports. fences: only a mover with a compute to fence
        an attached volume. queue: None rather than NoMoverFits when the movers that fit are all full
        (the job then waits for the first free slot among them). waiting: jobs posted for each mover and
        not claimed yet, counted as its slots in use."""
        return choose(self.movers(), src_transport, dst_transport, self.group, fences, queue, waiting)

    def close(self) -> None:
        try:
            self._coordinator.stop()
        except Exception:  # noqa: BLE001 - its backend may be gone already
            pass

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
