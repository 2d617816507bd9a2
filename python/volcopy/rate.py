"""Rate limits that change while copies run.

``RateLimit``: pass it as ``copy(rate_limit=...)``; a new ``bytes_per_second`` set from any thread takes
effect within 50 ms (the engine follows it, csrc/progress.c).

``BandwidthBudget``: bytes per second shared by the copies running under it (a data mover's
``bandwidth``). Each copy gets an equal part of it, or its own limit when that is lower, and what a
lower limit leaves goes to the others; every part changes as copies start and end, so a copy alone
gets the whole budget and together they never exceed it.
"""

from __future__ import annotations

import threading

from .errors import InvalidRequest

MAX_RATE = 1 << 50


class RateLimit:
    def __init__(self, bytes_per_second: int):
        self.bytes_per_second = bytes_per_second

    @property
    def bytes_per_second(self) -> int:
        return self._value

    @bytes_per_second.setter
    def bytes_per_second(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RATE:
            raise InvalidRequest(f"a rate limit is a whole number of bytes per second, not {value!r}")
        self._value = value

    def __repr__(self) -> str:
        return f"RateLimit({self._value})"


class BandwidthBudget:
    def __init__(self, bytes_per_second: int):
        self.total = bytes_per_second
        self._copies: dict[RateLimit, int | None] = {}  # each copy's limit, and its own cap
        self._lock = threading.Lock()

    def join(self, own_limit: int | None = None) -> RateLimit:
        """A limit for one more copy (at most own_limit), to give back with leave() when it ends."""
        limit = RateLimit(self.total)  # its part is set by _share
        with self._lock:
            self._copies[limit] = own_limit or None
            self._share()
        return limit

    def leave(self, limit: RateLimit) -> None:
        with self._lock:
            self._copies.pop(limit, None)
            self._share()

    def _share(self) -> None:
        """Water-filling: the lowest caps are served first, and each copy after them gets an equal part
        of what is left."""
        left, waiting = self.total, len(self._copies)
        for limit, cap in sorted(self._copies.items(), key=lambda item: item[1] or MAX_RATE):
            part = left // waiting if cap is None else min(cap, left // waiting)
            limit.bytes_per_second = max(1, part)
            left -= part
            waiting -= 1
