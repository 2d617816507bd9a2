"""``volcopy mover --config-file FILE``: a data mover, one per host that can attach volumes.

At start it finds the transports this host can attach (transports.py, checked through os-brick), joins
the tooz group with them, its copy slots and its bandwidth budget as its capabilities (a MoverInfo),
and then heartbeats: each beat renews its membership and publishes its capabilities again (slots in
use, rate, the time of the beat). It keeps its place in the group through the backend's failures:
while the backend does not answer it retries at each beat; when the group or its entry is gone (a
Redis restarted empty, or its beats lapsed while it was cut off) it joins again. SIGTERM or SIGINT:
it hands back its running migrations, leaves the group and exits 0.

Its conductor (conductor.py) claims the migrations placed on it from the jobboard and runs them.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import uuid

from oslo_log import log as logging

from ..migration.errors import JournalError
from ..units import format_size
from . import membership
from .conductor import Conductor
from .config import ConfigError, MoverConfig, load
from .errors import CoordinationUnreachable, MoverNameInUse
from .membership import MoverInfo
from .metrics import MetricsUnavailable, MoverMetrics

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0  # seconds between heartbeats when the backend reports no membership timeout


class Mover:
    """A member of the movers' group that heartbeats; its conductor runs its copies."""

    def __init__(
        self,
        name: str,
        url: str,
        group: str,
        transports: list[str],
        slots: int,
        bandwidth: int = 0,
        heartbeat_interval: float = 0.0,
        stopping: threading.Event | None = None,
        fences: bool = False,
    ):
        self.name = name
        self.url = url
        self.group = group
        self.transports = tuple(transports)
        self.fences = fences
        self.slots = slots
        self.bandwidth = bandwidth
        self.configured_interval = heartbeat_interval
        self.stopping = stopping or threading.Event()
        self.interval = heartbeat_interval or DEFAULT_INTERVAL
        self.membership_timeout = 0.0
        self._incarnation = uuid.uuid4().hex
        self._started_at = time.time()
        self._beats = 0
        self._slots_in_use = 0
        self._rate = 0.0
        self._coordinator = None
        self._joined = False  # it has been in the group under its name (not only tried)
        self._reachable = True
        self._guard = threading.Lock()  # one write to the group at a time: beats and slot changes

    # ------------------------------------------------------------------ what it publishes

    def info(self) -> MoverInfo:
        return MoverInfo(
            name=self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            incarnation=self._incarnation,
            transports=self.transports,
            fences=self.fences,
            slots=self.slots,
            slots_in_use=self._slots_in_use,
            bandwidth=self.bandwidth,
            rate=self._rate,
            started_at=self._started_at,
            heartbeat_at=time.time(),
            beats=self._beats,
        )

    def live_names(self) -> set[str] | None:
        """The names of the live movers of the group; None while the backend does not answer."""
        try:
            return {m.name for m in membership.members(self._coordinator, self.group)}
        except membership.BACKEND_ERRORS:
            return None

    def lock(self, name: str):
        """A lock of the group's, held by one mover at a time (tooz's, on the coordination backend)."""
        return self._coordinator.get_lock(f"{self.group}:{name}".encode())

    def set_rate(self, rate: float) -> None:
        """What its copies move now, in bytes per second: published at the next beat."""
        self._rate = rate

    def _publish(self) -> None:
        self._coordinator.update_capabilities(self.group.encode(), self.info().as_capabilities()).get()

    # ------------------------------------------------------------------ joining

    def start(self) -> None:
        """Connects and joins the group; CoordinationUnreachable, or MoverNameInUse when another live
        mover has this name."""
        self._coordinator = membership.connect(self.url, self.name)
        # The backend's membership timeout: a member that stops beating is gone that long after its
        # last beat. A third of it between beats leaves room for two beats to be late.
        self.membership_timeout = float(self._coordinator.heartbeat() or 0.0)
        if not self.configured_interval and self.membership_timeout:
            self.interval = self.membership_timeout / 3
        with self._guard:
            self._join()

    def _join(self) -> None:
        coordination = membership._coordination()
        group_id = self.group.encode()
        while not self.stopping.is_set():
            try:
                self._coordinator.create_group(group_id).get()
            except coordination.GroupAlreadyExist:
                pass
            # Looked at before joining: tooz's Redis driver writes the joining member's capabilities
            # over an existing entry of its name before it raises MemberAlreadyExist.
            existing = self._entry()
            if existing is not None and existing.incarnation != self._incarnation:
                if not self._outlived(existing):
                    continue  # it left meanwhile, or this mover is stopping
            # Alive from the moment it is in the group (a watch above outlasts the beat of start()).
            self._coordinator.heartbeat()
            try:
                self._coordinator.join_group(group_id, self.info().as_capabilities()).get()
            except coordination.GroupNotCreated:
                continue  # deleted between the two calls
            except coordination.MemberAlreadyExist:
                self._publish()  # the entry of its name, outlived (or this mover's own): this one's now
            self._joined = True
            log.info("joined group %s at %s", self.group, membership.where(self.url))
            return

    def _entry(self) -> MoverInfo | None:
        coordination = membership._coordination()
        try:
            capabilities = self._coordinator.get_member_capabilities(
                self.group.encode(), self.name.encode()
            ).get()
        except (coordination.MemberNotJoined, coordination.GroupNotCreated):
            return None
        return MoverInfo.from_capabilities(capabilities)

    def _outlived(self, existing: MoverInfo) -> bool:
        """The group has an entry of this mover's name from another start: a mover of this name that
        died (its entry stays until its beats lapse, and this mover's beats, under the same name, keep
        it from lapsing), or another live mover of this name. A live one beats: its entry is watched
        for a membership timeout and a beat. True when it did not beat (the entry may be taken); False
        when it went away or this mover is stopping; MoverNameInUse when it beat."""
        wait = self.membership_timeout + self.interval
        log.warning(
            "group %s already has a mover named %s (pid %s on %s, started at %s): watching it for %.1f s "
            "to see whether it is alive",
            self.group,
            self.name,
            existing.pid,
            existing.host,
            time.strftime("%H:%M:%S", time.localtime(existing.started_at)),
            wait,
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.stopping.wait(min(self.interval, max(0.0, deadline - time.monotonic()))):
                return False
            now = self._entry()
            if now is None:
                return False
            if (now.incarnation, now.beats) != (existing.incarnation, existing.beats):
                raise MoverNameInUse(
                    f"another live mover named {self.name} is in group {self.group} (pid {now.pid} on "
                    f"{now.host}): give each mover its own [mover] name"
                )
        log.info("the mover named %s before this one stopped beating: its entry is taken over", self.name)
        return True

    # ------------------------------------------------------------------ beating

    def beat(self) -> bool:
        """Renews the membership and publishes the capabilities; joins again when the group or this
        mover's entry is gone. False while the backend does not answer."""
        coordination = membership._coordination()
        with self._guard:
            try:
                self._beats += 1
                self._coordinator.heartbeat()
                try:
                    self._publish()
                except (coordination.GroupNotCreated, coordination.MemberNotJoined):
                    log.warning("this mover is no longer in group %s: joining it again", self.group)
                    self._join()
            except membership.BACKEND_ERRORS as exc:
                if self._reachable:
                    log.warning(
                        "coordination %s is unreachable: %s; retrying every %.1f s",
                        membership.where(self.url),
                        membership.one_line(exc),
                        self.interval,
                    )
                self._reachable = False
                return False
        if not self._reachable:
            log.info("coordination %s answers again", membership.where(self.url))
            self._reachable = True
        return True

    def serve(self) -> None:
        """Beats until ``stopping`` is set."""
        while not self.stopping.wait(self.interval):
            self.beat()

    # ------------------------------------------------------------------ slots

    def reserve(self) -> bool:
        """Takes a copy slot (False when all are in use) and publishes it at once, so that placement
        sees the load before the next beat."""
        with self._guard:
            if self._slots_in_use >= self.slots:
                return False
            self._slots_in_use += 1
            self._publish_now()
            return True

    def release(self) -> None:
        with self._guard:
            self._slots_in_use = max(0, self._slots_in_use - 1)
            self._publish_now()

    def _publish_now(self) -> None:
        """The slots are this mover's to count, whether or not the group hears of it now: when the
        backend does not answer (or the entry is gone), the next beat publishes them."""
        try:
            self._publish()
        except membership.BACKEND_ERRORS as exc:
            log.info(
                "slots in use %d/%d not published yet: %s",
                self._slots_in_use,
                self.slots,
                membership.one_line(exc),
            )

    # ------------------------------------------------------------------ leaving

    def stop(self) -> None:
        """Leaves the group (it is gone from it at once) and disconnects."""
        if self._coordinator is None:
            return
        if not self._joined:
            # Refused at start (MoverNameInUse): the entry and the heartbeat key under this name are
            # the live mover's, and tooz's leave and stop would remove both. The connection closes
            # with the process.
            self._coordinator = None
            return
        try:
            self._coordinator.leave_group(self.group.encode()).get()
            log.info("left group %s", self.group)
        except Exception as exc:  # noqa: BLE001 - gone with the backend, or never joined: it lapses
            log.warning("could not leave group %s: %s", self.group, membership.one_line(exc))
        try:
            self._coordinator.stop()
        except Exception:  # noqa: BLE001 - its connection may be gone already
            pass
        self._coordinator = None


def _joined_line(config: MoverConfig) -> str:
    bandwidth = f"{format_size(config.bandwidth)}/s" if config.bandwidth else "unlimited"
    return (
        f"volcopy mover {config.name} joined group {config.group} at "
        f"{membership.where(config.coordination_url)}: transports {', '.join(config.transports)}; "
        f"{config.slots} slots; bandwidth {bandwidth}"
    )


def main(argv: list[str]) -> int:
    """``volcopy mover ARGS``: 2 for a bad configuration (nothing joined), 1 when the coordination
    backend cannot be reached at start or the name is taken, 0 after SIGTERM or SIGINT."""
    try:
        config = load(argv)
    except ConfigError as exc:
        print(f"volcopy mover: error: {exc}", file=sys.stderr)
        return 2
    logging.setup(config.conf, "volcopy")
    for transport, why in config.not_offered.items():
        log.info("not offering %s: %s", transport, why)
    stopping = threading.Event()

    def stop(signum, frame):
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    mover = Mover(
        config.name,
        config.coordination_url,
        config.group,
        config.transports,
        config.slots,
        config.bandwidth,
        config.heartbeat_interval,
        stopping,
        fences=config.compute is not None,
    )
    conductor = None
    try:
        # All a job needs is ready before the mover joins: placement may send it one at once.
        metrics = MoverMetrics(config.name, config.slots)
        if config.metrics_address:
            metrics.serve(config.metrics_address)
        conductor = Conductor(
            mover, config.journal, config.checkpoint_dir, config.claim_expiry, metrics, config.compute
        )
        mover.start()
        if not stopping.is_set():
            conductor.start()
            print(_joined_line(config), flush=True)
            mover.serve()
    except (CoordinationUnreachable, MoverNameInUse, JournalError, MetricsUnavailable) as exc:
        print(f"volcopy mover: error: {exc}", file=sys.stderr)
        if conductor is not None:
            conductor.stop()
        mover.stop()
        return 1
    conductor.stop()
    mover.stop()
    if conductor.failed:
        print(f"volcopy mover: error: {conductor.failed}", file=sys.stderr)
        return 1
    return 0
