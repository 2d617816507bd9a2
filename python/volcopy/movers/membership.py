"""What a mover publishes in its tooz group, and reading the group.

Each mover is a member of the group (default ``volcopy-movers``) named after the mover; its tooz
capabilities are a MoverInfo as a dict, written at join and again at each heartbeat. Liveness is
tooz's: a member whose heartbeats stop is dropped from the group once the backend's membership timeout
has passed since its last one (the ``membership_timeout`` option of the URL, 30 s by default): with
Redis by whoever reads the group next, with etcd when its lease expires.
"""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from dataclasses import asdict, dataclass

from .errors import CoordinationUnreachable

FORMAT = 2  # of the capabilities; a member that publishes another is not listed as a mover (1: no fences)


def _coordination():
    """tooz.coordination, imported with its dependencies' deprecation warnings silenced (futurist
    imports eventlet, which warns on stderr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tooz import coordination
    return coordination


# Imported with this module, not on first use: tooz imports eventlet, and eventlet imported in a thread
# other than the main one leaves that thread unjoinable (see migration/owners.py).
_coordination()


def _backend_errors() -> tuple[type[BaseException], ...]:
    """What a call to the backend raises when it fails: tooz's errors, and the clients' own, which
    tooz translates only for some calls (and TaskFlow's jobboards not at all): redis-py's, etcd3gw's."""
    from tooz import ToozError

    errors: list[type[BaseException]] = [ToozError]
    try:
        from redis.exceptions import RedisError

        errors.append(RedisError)
    except ImportError:
        pass
    try:
        from etcd3gw.exceptions import Etcd3Exception

        errors.append(Etcd3Exception)
    except ImportError:
        pass
    return tuple(errors)


BACKEND_ERRORS = _backend_errors()


@dataclass(frozen=True)
class MoverInfo:
    name: str  # its member id in the group: one per host by default (the host name)
    host: str  # the host name it runs on
    pid: int
    incarnation: str  # random, new at each start: tells a restarted mover from the one before
    transports: tuple[str, ...]  # what it can attach (transports.py)
    fences: bool  # it has a compute ([compute]) to fence an attached volume with
    slots: int  # copies it runs at once
    slots_in_use: int
    bandwidth: int  # bytes per second for all its copies together; 0: unlimited
    rate: float  # bytes per second it copies now
    started_at: float  # its clock (time.time()) when it started
    heartbeat_at: float  # its clock at its last heartbeat
    beats: int  # heartbeats since it started

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.slots_in_use)

    def as_capabilities(self) -> dict:
        return asdict(self) | {"format": FORMAT, "transports": list(self.transports)}

    @classmethod
    def from_capabilities(cls, capabilities) -> MoverInfo | None:
        """None for a member that is not a mover of this format."""
        if not isinstance(capabilities, dict) or capabilities.get("format") != FORMAT:
            return None
        fields = {name: capabilities.get(name) for name in cls.__dataclass_fields__}
        if any(value is None for value in fields.values()):
            return None
        return cls(**fields | {"transports": tuple(fields["transports"])})

    def as_dict(self) -> dict:
        return asdict(self) | {"transports": list(self.transports)}


def where(url: str) -> str:
    """The URL fit to show: without a password."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('@', 1)[-1]}" if "@" in rest else url


def connect(url: str, member_id: str):
    """A started tooz coordinator; CoordinationUnreachable when the backend does not answer."""
    coordination = _coordination()
    try:
        # Every call is waited for at once: tooz's default thread pool only adds its shutdown (1 s) to
        # each stop.
        coordinator = coordination.get_coordinator(url, member_id.encode(), executor="synchronous")
        _fail_fast(coordinator)
        coordinator.start(start_heart=False)
    except BACKEND_ERRORS as exc:
        raise CoordinationUnreachable(f"coordination {where(url)} is unreachable: {one_line(exc)}") from None
    return coordinator


def _fail_fast(coordinator) -> None:
    """With Redis: no retries inside redis-py. tooz already tries a call 15 times on a connection
    error, and redis-py's own default (3 retries, exponential backoff from 1 s) inside each made a call
    to a Redis that is down take 55 s to fail (measured): a Fleet could not say "unreachable" in time,
    nor a mover stop on SIGTERM. Without them the 15 tries take milliseconds when the connection is
    refused, and a Redis that does not answer fails a call after the URL's ``timeout`` (a timeout is
    not retried). The mover's next beat is its retry."""
    make_client = getattr(coordinator, "_make_client", None)
    if make_client is None:  # another driver
        return
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    def without_retries(*args, **kwargs):
        client = make_client(*args, **kwargs)
        client.set_retry(Retry(NoBackoff(), 0))
        return client

    coordinator._make_client = without_retries


def reader_id() -> str:
    """The member id of a process that only reads the group (placement, `movers list`)."""
    return f"reader:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def members(coordinator, group: str) -> list[MoverInfo]:
    """The live movers of the group, by name. Asking for the members drops those whose heartbeat has
    lapsed (tooz does, on the backend)."""
    coordination = _coordination()
    group_id = group.encode()
    try:
        names = coordinator.get_members(group_id).get()
    except coordination.GroupNotCreated:
        return []
    found = []
    for name in sorted(names):
        try:
            capabilities = coordinator.get_member_capabilities(group_id, name).get()
        except (coordination.MemberNotJoined, coordination.GroupNotCreated):
            continue  # it left between the two calls
        info = MoverInfo.from_capabilities(capabilities)
        if info is not None:
            found.append(info)
    return found


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
