"""The compute side's state machine: start (fence), cancel, prepare, complete, for the servers the agent owns.

Rules that keep every guest write:
- Every step records its intent in the state store before it touches QEMU, and every step that can
  be interrupted is written as "converge": read the node graph, do what is left. The same code serves
  a request and a restarted agent's recovery.
- A state is reported only after it was read back from QEMU: complete answers once the disk's chain
  is overlay -> dst and src's node is gone, and a repeated complete checks that again.
- Nothing the guest's chain references is deleted; a failure is resolved from the graph. An overlay
  that cannot be merged stays, and the migration is "failed" with the reason and the data's place
  (cancel or complete retry from there).
- Whether QEMU runs comes from QEMU (its locked pid file), never from a connection error. A guest
  that stops while fenced keeps its overlay, which cancel or complete merge with qemu-img (then put
  the guest's own configuration, a persistent libvirt domain's, on the merged volume); a QEMU started
  again on src while fenced is reported.

The hypervisor operations are hypervisor.py's interface, implemented over QMP (qemu.py) and libvirt
(libvirt_backend.py); the state machine speaks of images and chains only. The HTTP rules are wsgi.py's
and api.py's.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from oslo_utils.strutils import mask_password

from ...attach import Attached, attach, detach, detach_recorded
from ...migration.failpoints import failpoint
from ...volume import size_of
from ..api import State
from ..errors import ComputeConflict, ComputeForbidden, ComputeNotFound
from ..rbd import RbdImage, from_connection_info, from_name, is_rbd_name
from .hypervisor import Hypervisor, HypervisorError, HypervisorNotRunning
from .policy import DstPolicy, check_not_in_use
from .qemu import disk_size, merge_offline, volume_in_use
from .state import Disk, StateStore, VolumeMigration, connection_json

log = logging.getLogger(__name__)

SHUTDOWN_PATIENCE = 10.0  # seconds a QEMU that announced SHUTDOWN has to exit
# An online merge the hypervisor refused for a passing reason (libvirt still taking in the end of the
# copy prepare started, another block job, a busy monitor) is tried again after 1, then 2 s. A refusal
# comes at once: a try that failed after waiting longer (a job that never became ready) is not repeated,
# so that the attachment's lock is not held for several such waits.
MERGE_TRIES = 3
MERGE_REFUSAL_SECONDS = 30.0


@dataclass
class ServerConfig:
    attachments: dict[str, dict]  # attachment id -> {"qdev", "node", "volume"}
    qmp: str | None = None  # the QMP socket
    pidfile: str | None = None  # QEMU's -pidfile: locked while it runs
    uri: str | None = None  # libvirt's connection URI: the server is the domain of that UUID


def open_hypervisor(server_id: str, cfg: ServerConfig, on_event) -> Hypervisor:
    """The backend a server's configuration chooses: libvirt when it names a URI, QMP otherwise."""
    if cfg.uri:
        from .libvirt_backend import LibvirtServer

        return LibvirtServer(cfg.uri, server_id, on_event)
    from .qemu import QemuServer

    return QemuServer(cfg.qmp, cfg.pidfile, on_event)


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _allocated_bytes(path: str | None) -> int:
    try:
        return os.stat(path).st_blocks * 512 if path else 0
    except FileNotFoundError:
        return 0


def _make_directory_like(path: str, parent: str) -> None:
    """The instance's directory in the overlay directory (as Nova keeps each instance's disks in one),
    made with the parent's mode if missing: one that exists (Nova's) keeps its own."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, stat.S_IMODE(os.stat(parent).st_mode))


def _fsync_volume(path: str) -> None:
    """Makes what QEMU wrote to the volume durable, from outside QEMU: a copy may start next. An RBD
    image has no host path: QEMU flushed it itself before the snapshot put the overlay on top (an
    external snapshot flushes the node it covers)."""
    if is_rbd_name(path):
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Handoff:
    def __init__(
        self,
        servers: dict[str, ServerConfig],
        store: StateStore,
        overlay_dir: str,
        policy: DstPolicy,
        overlay_min_free: int,
    ):
        self.store = store
        self.overlay_dir = overlay_dir
        self.policy = policy
        self.overlay_min_free = overlay_min_free
        self.servers: dict[str, Hypervisor] = {
            server_id: open_hypervisor(server_id, cfg, self._event_handler(server_id))
            for server_id, cfg in servers.items()
        }
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_lock = threading.Lock()
        self._growth: dict[str, tuple[float, int]] = {}  # attachment -> (when, overlay bytes) last seen
        self._merging: set[str] = set()  # attachments with a merge thread: one at a time
        self._observing: set[str] = set()  # servers with a look at QEMU pending after an event
        # RBD images of the configuration (rbd:POOL/IMAGE[:conf=PATH][:id=USER]), by name: how the agent
        # reaches them itself, to read their size or whether a QEMU still has them open
        self._configured_rbd: dict[str, RbdImage] = {}
        for server_id, cfg in servers.items():
            for attachment_id, a in cfg.attachments.items():
                volume = a["volume"]
                if is_rbd_name(volume):
                    image = from_name(volume)
                    self._configured_rbd[image.name] = image
                    volume = image.name
                store.add_disk_if_new(Disk(attachment_id, server_id, a["qdev"], a["node"], volume))

    # ------------------------------------------------------------------ helpers

    def _volume(self, path: str, m: VolumeMigration | None = None) -> str | RbdImage:
        """A volume as the agent reaches it: a host path, or an RBD image with its cluster's address
        (from the connection_info that named it, or from the configuration)."""
        if not is_rbd_name(path):
            return path
        recorded = [m.dst_connection] if m is not None and m.dst_path == path else []
        recorded += [d.connection for d in self.store.all_disks() if d.volume_path == path]
        for connection in filter(None, recorded):
            return from_connection_info(json.loads(connection)["connection_info"])
        return self._configured_rbd.get(path) or from_name(path)

    def _lock(self, attachment_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks[attachment_id]

    def _disk(self, server_id: str, attachment_id: str) -> Disk:
        if server_id not in self.servers:
            raise ComputeNotFound(f"server {server_id} is not known to this compute agent")
        disk = self.store.disk(attachment_id)
        if disk is None or disk.server_id != server_id:
            raise ComputeNotFound(f"attachment {attachment_id} is not attached to server {server_id}")
        return disk

    def _migration(self, disk: Disk) -> VolumeMigration:
        return self.store.migration(disk.attachment_id) or VolumeMigration(disk.attachment_id, disk.server_id)

    def _background(self, target, *args) -> None:
        threading.Thread(target=target, args=args, daemon=True).start()

    def _set(self, m: VolumeMigration, state: State, reason: str | None = None) -> None:
        m.state, m.reason = state.value, reason
        self.store.put_migration(m)

    def _fail(self, m: VolumeMigration, reason: str) -> None:
        log.error("migration of attachment %s failed: %s", m.attachment_id, reason)
        self._set(m, State.FAILED, f"{reason}; the guest's data is in {self.data_location(m)}")

    def _check_generation(self, m: VolumeMigration, generation: int) -> None:
        if generation != m.generation:
            raise ComputeConflict(
                f"generation {generation} is stale: the current fence of attachment {m.attachment_id} "
                f"is generation {m.generation}"
            )

    def data_location(self, m: VolumeMigration) -> str:
        """Where the guest's newest data is, in words an operator can act on."""
        disk = self.store.disk(m.attachment_id)
        src = disk.volume_path
        overlay = m.overlay_path if m.overlay_path and os.path.exists(m.overlay_path) else None
        stopped = " (the instance is stopped)" if m.offline else ""
        if m.state == State.COMPLETED.value:
            return f"the new volume {m.dst_path}"
        if m.restarted:
            kept = f"; overlay {overlay} holds the writes made while fenced" if overlay else ""
            return f"src {src}, which QEMU uses again{kept}"
        if overlay is None:
            return f"src {src}{stopped}"
        below = f"the new volume {m.dst_path}" if m.pivoted else f"src {src}"
        if m.switching and m.offline:
            return f"{below} or overlay {overlay} over it, whichever QEMU wrote last{stopped}"
        if m.merged and m.offline:  # the overlay stays until the guest's configuration is off it
            return f"{below}, into which overlay {overlay} was merged{stopped}"
        return f"overlay {overlay} over {below}{stopped}"

    # ------------------------------------------------------------------ what QEMU says

    def _event_handler(self, server_id: str):
        def handle(name: str, data: dict) -> None:
            # Called on the backend's event thread, which must not wait for the backend: look from another.
            if name == "BLOCK_IO_ERROR" and data.get("nospace"):
                log.warning(
                    "server %s: the guest is paused: a write found no space (a full overlay?)", server_id
                )
            with self._locks_lock:  # one look at a time per server, however many events come
                if server_id in self._observing:
                    return
                self._observing.add(server_id)
            self._background(self._observe_server, server_id, name)

        return handle

    def _observe_server(self, server_id: str, event: str) -> None:
        server = self.servers[server_id]
        try:
            if event == "SHUTDOWN":  # QEMU announces it, then exits: its pid file says when
                deadline = time.monotonic() + SHUTDOWN_PATIENCE
                while server.running() and time.monotonic() < deadline:
                    time.sleep(0.1)
            for m in self.store.migrations_of(server_id):
                lock = self._lock(m.attachment_id)
                if m.active and lock.acquire(blocking=False):  # a running step reads QEMU itself
                    try:
                        self._observe(self.store.migration(m.attachment_id))
                    finally:
                        lock.release()
        except Exception:  # noqa: BLE001 - the next call looks again
            log.exception("looking at server %s after QEMU's %s event failed", server_id, event)
        finally:
            with self._locks_lock:
                self._observing.discard(server_id)

    def _runs(self, m: VolumeMigration) -> bool:
        """Whether the server's QEMU runs. An unlocked pid file is believed only when no process holds
        QEMU's lock on the disk's volumes: otherwise the pid file setting is wrong, and calling the
        instance stopped would let it write to a volume that is being copied."""
        if self.servers[m.server_id].running():
            return True
        for path in (self.store.disk(m.attachment_id).volume_path, m.dst_path):
            try:
                in_use = path is not None and volume_in_use(self._volume(path, m))
            except FileNotFoundError:
                in_use = False
            if in_use:
                raise HypervisorError(
                    f"{path} is in use although {self.servers[m.server_id].liveness} says "
                    "QEMU is not running: check the agent's server settings"
                )
        return False

    def _observe(self, m: VolumeMigration) -> None:
        """Brings the record in line with QEMU: a QEMU that stopped while fenced leaves its overlay for
        an offline merge; one that was started again (on src, from its own configuration) breaks the
        fence, which is reported. Called with the attachment's lock held."""
        if not m.active or m.state == State.FENCING.value or m.restarted or m.read_only:
            return
        running = self._runs(m)
        if m.offline:
            if running:
                m.restarted = True
                what = (
                    "the writes made while fenced stay in its overlay"
                    if m.overlay_path
                    else "src may hold writes the copy missed"
                )
                self._fail(m, f"QEMU was started again while fenced, on src: {what}")
            return
        if not running:
            if m.state in (State.FENCED.value, State.FAILED.value):  # a merge under way sees it itself
                m.offline = True
                m.reason = "QEMU stopped while fenced; cancel or complete merge its overlay offline"
                log.warning("attachment %s: %s", m.attachment_id, m.reason)
                self.store.put_migration(m)
            return
        if m.qemu is not None and self.servers[m.server_id].identity() != m.qemu:
            m.restarted = True
            self._fail(m, "QEMU was started again while fenced, on src: its overlay is no longer in use")
        elif m.prepared and m.state == State.FENCED.value and m.reason is None:
            stopped = self.servers[m.server_id].move_stopped(self.store.disk(m.attachment_id), m)
            if stopped:
                log.warning("attachment %s: %s; complete moves instead", m.attachment_id, stopped)
                self._set(m, State.FENCED, f"{stopped}; complete moves instead")

    # ------------------------------------------------------------------ the calls

    def attachments(self, server_id: str) -> list[dict]:
        if server_id not in self.servers:
            raise ComputeNotFound(f"server {server_id} is not known to this compute agent")
        return [
            {"id": d.attachment_id, "serverId": d.server_id, "device_path": d.volume_path}
            for d in self.store.disks_of(server_id)
        ]

    def view(self, server_id: str, attachment_id: str) -> dict:
        """The API's volume_migration, with what QEMU says now: bytes written, a paused guest."""
        disk = self._disk(server_id, attachment_id)
        lock = self._lock(attachment_id)
        if lock.acquire(blocking=False):  # else a step is running: the record is what it wrote
            try:
                self._observe(self._migration(disk))
            except (HypervisorError, OSError) as exc:
                log.warning("attachment %s: cannot look at QEMU: %s", attachment_id, exc)
            finally:
                lock.release()
        m = self._migration(disk)
        state = m.state
        server = self.servers[server_id]
        if m.state == State.FENCED.value and not m.offline:
            try:
                m.bytes_written = server.bytes_written(disk, m)
                if server.paused_on_enospc(disk):
                    state = State.OVERLAY_FULL.value
            except HypervisorError:
                pass  # the record's values stand
        overlay_bytes = _allocated_bytes(m.overlay_path) if m.active else 0
        now = time.monotonic()
        then, before = self._growth.get(attachment_id, (now, overlay_bytes))
        self._growth[attachment_id] = (now, overlay_bytes)
        return {
            "server_id": m.server_id,
            "attachment_id": m.attachment_id,
            "state": state,
            "generation": m.generation,
            "new_attachment_id": m.new_attachment_id,
            "bytes_written_since_start": m.bytes_written,
            "overlay_bytes": overlay_bytes,
            "overlay_bytes_per_second": round((overlay_bytes - before) / (now - then)) if now > then else 0,
            "instance_running": not m.offline,
            "data_location": self.data_location(m),
            "reason": m.reason,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.updated_at)),
        }

    def start(self, server_id: str, attachment_id: str) -> dict:
        """Reversion: a fence that could not be set entirely is taken down again from what the graph
        shows (an overlay in the chain is merged back first) and the call answers 409; src was never
        written by it."""
        disk = self._disk(server_id, attachment_id)
        with self._lock(attachment_id):
            m = self._migration(disk)
            self._settle(m)
            if m.state == State.FENCED.value:
                return self._answer(m)
            if m.state == State.COMPLETING.value or disk.replaced_by:
                raise ComputeConflict(f"attachment {attachment_id} was migrated to {m.new_attachment_id}")
            if m.state != State.NONE.value and m.state != State.CANCELLED.value:
                raise ComputeConflict(
                    f"the migration of attachment {attachment_id} is {m.state}"
                    f"{': ' + m.reason if m.reason else ''}; cancel or complete it first"
                )
            server = self.servers[server_id]
            previous = State(m.state)
            m = VolumeMigration(attachment_id, server_id, generation=m.generation + 1)
            try:
                running = self._runs(m)
            except HypervisorError as exc:
                raise ComputeConflict(f"cannot suspend writes: {exc}") from None
            writable = running and self._check_can_fence(server, disk)
            if not running:
                m.offline = True
                self._set(m, State.FENCED)
                return self._answer(m)
            if not writable:  # nothing to suspend; complete moves it without an overlay
                m.read_only = True
                self._set(m, State.FENCED)
                return self._answer(m)
            m.overlay_path = os.path.join(
                self.overlay_dir, server_id, f"volcopy-{attachment_id}-{m.generation}.qcow2"
            )
            m.qemu = server.identity()
            self._set(m, State.FENCING)
            try:
                self._fence(m, disk)
            except Exception as exc:  # noqa: BLE001 - whatever stopped it, the fence is taken down
                left = self._take_down_fence(m, disk)
                if left:
                    self._fail(
                        m, f"cannot suspend writes ({exc}), and the fence could not be taken down: {left}"
                    )
                    raise ComputeConflict(m.reason) from None
                m.overlay_path = None
                self._set(m, previous, f"cannot suspend writes: {exc}")
                raise ComputeConflict(m.reason) from None
            return self._answer(m)

    def _answer(self, m: VolumeMigration) -> dict:
        return self.view(m.server_id, m.attachment_id)

    def _settle(self, m: VolumeMigration) -> None:
        """Before a call acts: the record brought in line with QEMU, and a fence a killed agent left
        half-set resolved (holding the lock proves no step runs)."""
        try:
            if m.state == State.FENCING.value:
                self._recover_fencing(m)
            self._observe(m)
        except (HypervisorError, OSError) as exc:
            raise ComputeConflict(
                f"cannot tell what QEMU does with attachment {m.attachment_id}: {exc}"
            ) from None

    def _mark_merged(self, m: VolumeMigration) -> None:
        m.merged, m.switching = True, False
        self.store.put_migration(m)

    def _before_switch(self, m: VolumeMigration) -> None:
        """Recorded just before the disk moves down onto the merged volume: merged, if the volume then
        holds every write whatever becomes of the switch; else switching, until the switch is seen."""
        if self.servers[m.server_id].switch_drains_disk:
            self._mark_merged(m)
        else:
            m.switching = True
            self.store.put_migration(m)
        failpoint("agent-before-switch")

    def _merge_down(self, m: VolumeMigration, disk: Disk) -> None:
        """The overlay merged into the volume below it and the disk moved down onto that volume, recorded
        as merged. If the move fails with the disk still on the overlay, the record says so again."""
        server = self.servers[m.server_id]
        try:
            server.merge_down(disk, m, lambda: self._before_switch(m))
        except HypervisorError:
            if (m.merged or m.switching) and server.chain(disk)[0] == m.overlay_path:
                m.merged = m.switching = False
                self.store.put_migration(m)
            raise
        self._mark_merged(m)

    def _check_can_fence(self, server: Hypervisor, disk: Disk) -> bool:
        """Whether the guest may write the disk; 409 if it cannot be fenced."""
        try:
            writable, shared = server.writable_and_shared(disk)
        except HypervisorError as exc:
            raise ComputeConflict(f"cannot suspend writes: {exc}") from None
        if writable and shared:
            raise ComputeConflict(
                f"attachment {disk.attachment_id} is a writable multi-attachment (share-rw): with one "
                "overlay per guest the writers would stop seeing each other's writes, so it cannot be "
                "migrated live"
            )
        free = _free_bytes(self.overlay_dir)
        if free < self.overlay_min_free:
            raise ComputeConflict(
                f"cannot suspend writes: the overlay directory has {free} bytes free, less than the "
                f"{self.overlay_min_free} configured (overlay_min_free)"
            )
        return writable

    def _fence(self, m: VolumeMigration, disk: Disk) -> None:
        server = self.servers[m.server_id]
        top = server.chain(disk)[0]
        if top != disk.volume_path:
            raise HypervisorError(f"the disk is on {top}, not on its volume {disk.volume_path}")
        _make_directory_like(os.path.dirname(m.overlay_path), self.overlay_dir)
        server.prepare_fence(disk, m)
        failpoint("agent-before-snapshot")
        server.fence(disk, m)
        failpoint("agent-after-snapshot")
        _fsync_volume(disk.volume_path)
        self._set(m, State.FENCED)

    def _take_down_fence(self, m: VolumeMigration, disk: Disk) -> str | None:
        """A fence that failed half-way, taken down from what the node graph shows: an overlay already
        in the disk's chain holds the guest's writes since the snapshot, so it is merged back into src
        before anything of it goes. Returns why it could not be (the overlay then stays), or None."""
        server = self.servers[m.server_id]
        try:
            if server.chain(disk)[0] == m.overlay_path:
                self._merge_down(m, disk)
                top = server.chain(disk)[0]
                if top != disk.volume_path:
                    return f"after the merge the disk is on {top}, not on src {disk.volume_path}"
        except Exception as exc:  # noqa: BLE001 - the overlay stays, and the reason is reported
            return f"merging the overlay back into src failed: {exc}"
        self._remove_overlay(m)
        return None

    def _remove_overlay(self, m: VolumeMigration) -> None:
        """Overlay nodes and file once out of the disk's chain. The file goes only once QEMU has let go
        of its nodes: while a node uses it, it may hold the guest's writes."""
        server = self.servers[m.server_id]
        if not m.offline:
            try:
                server.release_overlay(self.store.disk(m.attachment_id), m)
            except HypervisorError as exc:
                log.warning(
                    "could not delete the overlay nodes of %s, so its file %s stays: %s",
                    m.attachment_id,
                    m.overlay_path,
                    exc,
                )
                return
        if m.overlay_path and os.path.exists(m.overlay_path):
            os.unlink(m.overlay_path)

    def cancel(self, server_id: str, attachment_id: str, generation: int) -> dict:
        """Answers at once; the overlay is merged back into src in the background. Reversion: none
        needed, cancel is the reversion of start; a merge that fails leaves the state failed with
        QEMU's reason and the guest still running on the overlay, so nothing is lost, and a repeated
        cancel retries it."""
        disk = self._disk(server_id, attachment_id)
        with self._lock(attachment_id):
            m = self._migration(disk)
            if m.active:
                self._check_generation(m, generation)
            self._settle(m)
            if not m.active:
                return self._answer(m)  # nothing to take down
            if m.pivoted or m.state == State.COMPLETING.value:
                raise ComputeConflict(
                    f"the guest of attachment {attachment_id} already runs on the new volume: complete "
                    "again to finish the migration"
                )
            if m.prepared:
                self._unprepare(m, disk)
            if m.restarted or m.read_only:  # nothing to merge (restarted: not on a guess)
                self._set(m, State.CANCELLED, m.reason)
                return self._answer(m)
            self._set(m, State.CANCELLING)
            self._start_merge(m)
        return self._answer(m)

    def _unprepare(self, m: VolumeMigration, disk: Disk) -> None:
        """For cancel: the move prepare started is stopped (never switched) and what it made deleted
        once out of the chain, then dst is detached. 409 if the move cannot be stopped: nothing merges
        then, the guest stays on its overlay over src."""
        if m.overlay_path:
            try:
                self.servers[m.server_id].abandon_move(disk, m)
            except HypervisorError as exc:
                m.reason = f"cannot stop moving onto the new volume: {exc}"
                self.store.put_migration(m)
                raise ComputeConflict(m.reason) from None
        self._detach_new_volume(m)
        self.store.put_migration(m)

    def complete(
        self,
        server_id: str,
        attachment_id: str,
        new_attachment_id: str,
        connection_info: dict,
        generation: int,
    ) -> dict:
        """Attaches dst (unless prepare did), re-points the overlay onto it (picking up a move prepare
        started) and releases src before answering; the overlay is merged into dst in the background.
        Reversion: until the overlay's backing moves to dst the migration stays fenced on src (dst is
        detached again, unless prepare attached it); after that there is no going back, and a repeated
        complete (or a restarted agent) finishes the remaining steps."""
        disk = self._disk(server_id, attachment_id)
        with self._lock(attachment_id):
            m = self._migration(disk)
            self._settle(m)
            if m.state == State.COMPLETED.value or m.pivoted or m.state == State.COMPLETING.value:
                if m.new_attachment_id != new_attachment_id:
                    raise ComputeConflict(
                        f"attachment {attachment_id} was completed onto {m.new_attachment_id}"
                    )
                self._check_generation(m, generation)
                if m.restarted:
                    raise ComputeConflict(f"{m.reason}; the operator must decide what to keep")
                if m.state != State.COMPLETED.value:
                    self._repeat_complete(m)
                return self._answer(m)
            if m.state in (State.CANCELLING.value, State.CANCELLED.value):
                raise ComputeConflict(f"the migration of attachment {attachment_id} was cancelled")
            if m.switching and not m.pivoted:  # a cancel's move back onto src, cut short by QEMU's stop
                raise ComputeConflict(f"{m.reason}; the operator must decide what to keep")
            if m.merged and not m.pivoted:  # a cancel that failed after its merge: src holds the writes
                raise ComputeConflict(
                    f"the overlay of attachment {attachment_id} was merged back into src: cancel again "
                    "to finish"
                )
            if m.state not in (State.FENCED.value, State.FAILED.value):
                raise ComputeConflict(
                    f"the migration of attachment {attachment_id} was not started ({m.state})"
                )
            self._check_generation(m, generation)
            if m.restarted:
                raise ComputeConflict(f"{m.reason}; cancel it, and migrate again")
            if m.prepared:
                self._check_prepared(m, new_attachment_id, connection_info)
            else:
                self._attach_new_volume(m, disk, new_attachment_id, connection_info)
            self._set(m, State.COMPLETING)
            failpoint("agent-after-attach")
            if m.offline and not m.overlay_path:  # fenced while stopped: the record and configuration move
                self._converge_locked(m)
                return self._answer(m)
            if m.read_only:
                self._move_read_only(m)
                return self._answer(m)
            if not m.offline:
                try:
                    self._switch(m)
                except HypervisorError as exc:
                    if not m.pivoted:  # the guest is still on overlay -> src: stay fenced there
                        self._stay_fenced(m, f"moving the overlay onto the new volume failed: {exc}")
                    else:
                        self._fail(m, f"releasing src after the switch failed: {exc}")
                    raise ComputeConflict(m.reason) from None
            self._start_merge(m)
        return self._answer(m)

    def _move_read_only(self, m: VolumeMigration) -> None:
        disk, server = self.store.disk(m.attachment_id), self.servers[m.server_id]
        try:
            if server.read_only_move_writes_dst:
                self._check_no_writer_on(m.dst_path, disk)
            server.move_read_only(disk, m)
        except HypervisorError as exc:
            self._stay_fenced(m, f"moving the read-only disk onto the new volume failed: {exc}")
            raise ComputeConflict(m.reason) from None
        m.pivoted = True
        self._replace_disk(m, node=disk.node)
        self._set(m, State.COMPLETED)

    def _check_no_writer_on(self, dst: str, disk: Disk) -> None:
        """A move that writes src's data onto dst would undo the writes of a guest of the same volume that
        already runs on dst: the read-only attachments of a volume must move before its writer."""
        for other in self.store.all_disks():
            om = self.store.migration(other.attachment_id)
            writer = om is not None and not om.read_only
            if other.volume_path == disk.volume_path and writer and om.pivoted and om.dst_path == dst:
                raise HypervisorError(
                    f"attachment {other.attachment_id} already writes to {dst}, and this backend moves a "
                    "read-only disk by copying src onto it: complete the read-only attachments first"
                )

    def _repeat_complete(self, m: VolumeMigration) -> None:
        """The switch, checked again from the graph; a failed merge is retried."""
        if not m.offline:
            try:
                self._switch(m)
            except HypervisorError as exc:
                self._fail(m, f"the switch to the new volume is not done: {exc}")
                raise ComputeConflict(m.reason) from None
        if m.state == State.FAILED.value:
            self._set(m, State.COMPLETING)
        self._start_merge(m)  # none runs: a completing whose merge thread died goes on too

    def prepare(
        self,
        server_id: str,
        attachment_id: str,
        new_attachment_id: str,
        connection_info: dict,
        generation: int,
    ) -> dict:
        """While fenced: checks and attaches dst as complete would, records it, and lets the backend
        start moving the overlay's writes onto it (libvirt's block copy, which opens dst only at the
        pivot, so the copy onto dst may still run); complete with the same new volume then only
        switches. A move that fails or stops is not an error: complete moves at complete time, and the
        reason is shown. Reversion: cancel detaches dst."""
        disk = self._disk(server_id, attachment_id)
        with self._lock(attachment_id):
            m = self._migration(disk)
            self._settle(m)
            if m.state != State.FENCED.value:
                raise ComputeConflict(
                    f"the migration of attachment {attachment_id} is {m.state}: prepare needs it fenced"
                )
            self._check_generation(m, generation)
            if m.prepared:
                self._check_prepared(m, new_attachment_id, connection_info)
            else:
                self._attach_new_volume(m, disk, new_attachment_id, connection_info)
                m.prepared = True
                self.store.put_migration(m)
            if not m.offline and not m.read_only:
                try:
                    self.servers[server_id].prepare_move(disk, m)
                    m.reason = None
                except HypervisorError as exc:
                    m.reason = f"moving early onto the new volume failed, complete moves instead: {exc}"
                    log.warning("attachment %s: %s", attachment_id, m.reason)
                self.store.put_migration(m)
            failpoint("agent-after-prepare")
        return self._answer(m)

    def _check_prepared(self, m: VolumeMigration, new_attachment_id: str, connection_info: dict) -> None:
        """A migration prepared onto a new volume goes on with that one only."""
        prepared_info = json.loads(m.dst_connection)["connection_info"]
        if new_attachment_id != m.new_attachment_id or connection_info != prepared_info:
            raise ComputeConflict(
                f"attachment {m.attachment_id} is prepared onto attachment {m.new_attachment_id} and its "
                "connection_info: complete with the same, or cancel the migration"
            )

    def _attach_new_volume(
        self, m: VolumeMigration, disk: Disk, new_attachment_id: str, connection_info: dict
    ) -> None:
        """Every check of the new volume before anything runs, then dst attached and named in the
        record (which the caller stores)."""
        if self.store.disk(new_attachment_id) is not None:
            raise ComputeConflict(f"attachment {new_attachment_id} exists already: choose a new id")
        self.policy.check(connection_info)
        dst = self._attach_dst(connection_info, disk)
        data = connection_info["data"]
        m.new_attachment_id, m.dst_path = new_attachment_id, dst.path
        m.dst_format, m.dst_discard = data.get("format", "raw"), bool(data.get("discard", False))
        m.dst_connection = connection_json(connection_info, dst.device_info)

    def _stay_fenced(self, m: VolumeMigration, reason: str) -> None:
        """complete could not move the guest: it stays fenced on src. A new volume that prepare attached
        stays for the next complete (cancel detaches it); one this complete attached is detached."""
        if not m.prepared:
            self._detach_new_volume(m)
        self._set(m, State.FENCED, reason)

    def _detach_new_volume(self, m: VolumeMigration) -> None:
        """dst detached (quietly: a refusal or a cancel stands either way) and no longer in the record."""
        recorded = json.loads(m.dst_connection)
        try:
            _detach_recorded(recorded["connection_info"], recorded["device_info"])
        except Exception as exc:  # noqa: BLE001 - os-brick raises many kinds
            log.warning("could not detach the new volume %s: %s", m.dst_path, mask_password(str(exc)))
        m.prepared = False
        m.new_attachment_id = m.dst_path = m.dst_format = m.dst_connection = None

    def _attach_dst(self, connection_info: dict, src: Disk) -> Attached:
        """dst, attached, and at least as large as src: a smaller one cannot hold the guest's disk."""
        try:
            dst = _attach(connection_info)
        except Exception as exc:  # noqa: BLE001 - os-brick raises many kinds
            # Its text may quote connection properties: never a password in a reason or a log line.
            raise ComputeConflict(f"cannot attach the new volume: {mask_password(str(exc))}") from None
        try:
            disks = self.store.all_disks()
            # A multi-attached volume moves to one new volume: where another attachment of src went is
            # not another volume's. A replaced attachment's volume was released by its complete.
            moved_with = {d.replaced_by for d in disks if d.replaced_by and d.volume_path == src.volume_path}
            in_use = {
                d.volume_path for d in disks if d.replaced_by is None and d.attachment_id not in moved_with
            }
            check_not_in_use(dst.path, in_use)
        except ComputeForbidden:
            _detach_quietly(dst)
            raise
        image_format = connection_info["data"].get("format", "raw")
        try:
            dst_size = disk_size(_rbd_of(dst) or dst.path, image_format)
            src_volume = self._volume(src.volume_path)
            if isinstance(src_volume, RbdImage):
                src_size = disk_size(src_volume, "raw")
            else:
                src_size = size_of(src_volume)
        except (OSError, HypervisorError) as exc:
            _detach_quietly(dst)
            raise ComputeConflict(f"cannot open the new volume {dst.path}: {exc}") from None
        if dst_size < src_size:
            _detach_quietly(dst)
            raise ComputeConflict(
                f"the new volume holds {dst_size} bytes, fewer than the {src_size} of the volume it replaces"
            )
        return dst

    def _switch(self, m: VolumeMigration) -> None:
        """Moves the overlay's writes onto dst and releases src, each step only if the chain shows it
        is not done; then reads the chain back: it must be overlay -> dst (or dst, once merged), and
        src released. From the move on, the guest reads through the overlay from dst. A backend that
        moves the writes into a new overlay over dst (libvirt's shallow copy) names it: the record
        follows, and the old overlay, out of the chain, goes."""
        disk = self.store.disk(m.attachment_id)
        server = self.servers[m.server_id]
        top = server.move_onto_dst(disk, m)
        if top != m.overlay_path:  # the old overlay is out of the chain (read back): its writes are in top
            if server.chain(disk)[0] != top:
                raise HypervisorError(f"the disk is not on {top} after the move onto the new volume")
            if m.overlay_path and os.path.exists(m.overlay_path):
                os.unlink(m.overlay_path)  # before the record moves on: a restart finds it gone or named
        m.pivoted, m.overlay_path = True, top
        self.store.put_migration(m)
        failpoint("agent-after-repoint")
        server.release_src(disk, m)
        if disk.replaced_by is None:
            self._replace_disk(m)
        chain = server.chain(disk)
        if chain[:1] != [m.dst_path] and chain[:2] != [m.overlay_path, m.dst_path]:
            raise HypervisorError(f"the disk's chain is not overlay -> new volume: {' -> '.join(chain)}")

    def _replace_disk(self, m: VolumeMigration, node: str | None = None) -> None:
        old = self.store.disk(m.attachment_id)
        self.store.put_disk(
            Disk(
                m.new_attachment_id,
                m.server_id,
                old.qdev,
                node or self.servers[m.server_id].dst_node(m),
                m.dst_path,
                m.dst_format or "raw",
                m.dst_connection,
            )
        )
        old.replaced_by = m.new_attachment_id
        self.store.put_disk(old)

    # ------------------------------------------------------------------ merging, in the background

    def _start_merge(self, m: VolumeMigration) -> None:
        """One merge thread per attachment, bound to this fence: a thread that finds a later fence
        (or another state) when it gets the lock does nothing."""
        with self._locks_lock:
            if m.attachment_id in self._merging:
                return
            self._merging.add(m.attachment_id)
        self._background(self._converge, m.attachment_id, m.generation, m.state)

    def _converge(self, attachment_id: str, generation: int, state: str) -> None:
        """Merges the overlay into the volume below it: src for a cancel, dst (after the switch, done
        again if a restart cut it short) for a complete. Online with an active block-commit that moves
        the device down; a QEMU that stopped meanwhile is merged offline, unless the disk had already
        moved down (then the volume holds everything, and newer writes than the overlay's)."""
        try:
            with self._lock(attachment_id):
                m = self.store.migration(attachment_id)
                if m.generation != generation or m.state != state:
                    return
                self._converge_locked(m)
        finally:
            with self._locks_lock:
                self._merging.discard(attachment_id)

    def _converge_locked(self, m: VolumeMigration) -> None:
        completing = m.state == State.COMPLETING.value
        into = "into the new volume" if completing else "back into src"
        try:
            if not m.offline:
                try:
                    self._merge_online_tried(m, completing)
                except HypervisorNotRunning:
                    m.offline = True
                    self.store.put_migration(m)
            if m.offline:
                self._merge_offline(m, completing)
        except _Restarted as exc:
            m.restarted = True
            self._fail(m, str(exc))
            return
        except _SwitchUnknown as exc:
            self._fail(m, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - whatever it was, the data stays where the reason says
            self._fail(m, f"merging the overlay {into} failed: {exc}")
            return
        if completing:
            self._release_old_connection(m)
        self._set(m, State.COMPLETED if completing else State.CANCELLED)

    def _merge_online_tried(self, m: VolumeMigration, completing: bool) -> None:
        for attempt in range(1, MERGE_TRIES + 1):
            began = time.monotonic()
            try:
                self._merge_online(m, completing)
                return
            except HypervisorNotRunning:
                raise
            except HypervisorError as exc:
                if attempt == MERGE_TRIES or time.monotonic() - began > MERGE_REFUSAL_SECONDS:
                    raise
                refusal = str(exc)
            # logged outside the except block: oslo.log would add the exception to the line again
            log.warning(
                "attachment %s: merging the overlay failed (try %d of %d), trying again: %s",
                m.attachment_id,
                attempt,
                MERGE_TRIES,
                refusal,
            )
            time.sleep(attempt)

    def _merge_online(self, m: VolumeMigration, completing: bool) -> None:
        disk, server = self.store.disk(m.attachment_id), self.servers[m.server_id]
        target = m.dst_path if completing else disk.volume_path
        if m.qemu is not None and server.identity() not in (None, m.qemu):
            raise _Restarted("QEMU was started again while fenced, on src: the overlay is not in use")
        top = server.chain(disk)[0]
        if completing and (top == m.overlay_path or not (m.merged or m.switching)):
            self._switch(m)  # done again if a restart cut it short: it reads the chain first
            top = server.chain(disk)[0]
        if top == m.overlay_path:
            m.bytes_written = server.bytes_written(disk, m)
            self._merge_down(m, disk)
            failpoint("agent-after-merge")
            top = server.chain(disk)[0]
        elif m.switching and top == target:  # it moved down; the agent stopped before it recorded that
            self._mark_merged(m)
        elif not m.merged:
            raise _Restarted(f"the overlay was never merged, yet the disk is on {top}: the overlay is kept")
        if top != target:
            raise HypervisorError(f"after the merge the disk is on {top}, not on {target}")
        self._remove_overlay(m)
        server.resume_after_io_error()

    def _merge_offline(self, m: VolumeMigration, completing: bool) -> None:
        disk = self.store.disk(m.attachment_id)
        if self._runs(m):
            raise _Restarted("QEMU was started again while fenced, on src: the overlay is not merged")
        if completing:
            volume, volume_format = m.dst_path, m.dst_format or "raw"
        else:
            volume, volume_format = disk.volume_path, disk.volume_format
        overlay = m.overlay_path if m.overlay_path and os.path.exists(m.overlay_path) else None
        if overlay and m.switching:
            raise _SwitchUnknown(
                f"QEMU stopped while the disk moved down from overlay {overlay} onto {volume}: whether it "
                "moved is unknown, so neither is known to hold the newest writes, and neither is merged "
                "into the other nor deleted"
            )
        if completing and not m.pivoted:  # before the merge: from then on dst alone may hold the writes
            m.pivoted = True
            self.store.put_migration(m)
        if overlay and not m.merged:  # merged: the volume holds all of it, and writes made since
            merge_offline(overlay, self._volume(volume, m), volume_format)
            self._mark_merged(m)
            failpoint("agent-after-offline-merge")
        # The guest's configuration may name the overlay: it goes onto the volume before the overlay goes.
        self.servers[m.server_id].repoint_stopped(disk, m, volume, volume_format)
        if overlay:
            os.unlink(overlay)
        if completing and disk.replaced_by is None:
            self._replace_disk(m)

    def _release_old_connection(self, m: VolumeMigration) -> None:
        """src's os-brick connection, once nothing uses src: only when the agent made it (a volume
        it attached at an earlier complete); a volume of the configuration is the operator's."""
        old = self.store.disk(m.attachment_id)
        if not old.connection:
            return
        recorded = json.loads(old.connection)
        try:
            _detach_recorded(recorded["connection_info"], recorded["device_info"])
        except Exception as exc:  # noqa: BLE001 - os-brick raises many kinds; the guest is fine either way
            log.warning(
                "could not disconnect the old volume of attachment %s: %s",
                m.attachment_id,
                mask_password(str(exc)),
            )
            return
        old.connection = None
        self.store.put_disk(old)

    # ------------------------------------------------------------------ restart

    def recover(self) -> None:
        """Finishes or reports what a previous agent left in flight, from what QEMU shows."""
        for m in self.store.migrations_in(
            [State.FENCING.value, State.FENCED.value, State.FAILED.value]
            + [State.CANCELLING.value, State.COMPLETING.value]
        ):
            try:
                with self._lock(m.attachment_id):
                    if m.state == State.FENCING.value:
                        self._recover_fencing(m)
                    else:
                        self._observe(m)
                if m.state in (State.CANCELLING.value, State.COMPLETING.value):
                    self._start_merge(m)
            except Exception:  # noqa: BLE001 - one server's trouble must not stop the others' recovery
                log.exception("recovering the migration of attachment %s failed", m.attachment_id)

    def _recover_fencing(self, m: VolumeMigration) -> None:
        """Killed between intent and fence: fenced if the overlay made it into the chain of the same
        QEMU, not fenced if it did not. Anything else (QEMU stopped, or started again) keeps the
        overlay, which may hold the guest's writes, and is reported."""
        disk, server = self.store.disk(m.attachment_id), self.servers[m.server_id]
        try:
            if not server.running():
                m.offline = True
                self._fail(m, "the agent restarted while fencing, and QEMU has stopped")
            elif server.identity() != m.qemu:
                m.restarted = True
                self._fail(m, "the agent restarted while fencing, and QEMU was started again")
            elif server.chain(disk)[0] == m.overlay_path:
                _fsync_volume(disk.volume_path)
                self._set(m, State.FENCED)
            else:  # the same QEMU never had it in the chain: the guest never wrote to it
                self._remove_overlay(m)
                m.overlay_path = None
                self._set(m, State.NONE, "the agent restarted before the fence was set")
        except (HypervisorError, OSError) as exc:
            self._fail(m, f"the agent restarted while fencing: {exc}")


class _SwitchUnknown(Exception):
    """QEMU stopped during a move down that does not drain the disk: the operator must decide."""


class _Restarted(Exception):
    """QEMU was started again while fenced: the overlay holds writes that are not merged on a guess."""


def _attach(connection_info: dict) -> Attached:
    """dst on this host: through os-brick, or, for an RBD image, nothing to do here: QEMU opens it
    through librbd itself (its rbd block driver), so it is named, never mapped to a host path."""
    if connection_info["driver_volume_type"] == "rbd":
        image = from_connection_info(connection_info)
        return Attached(path=image.name, connection_info=connection_info, device_info={}, connector=None)
    return attach(connection_info)


def _rbd_of(dst: Attached) -> RbdImage | None:
    if dst.connection_info["driver_volume_type"] != "rbd":
        return None
    return from_connection_info(dst.connection_info)


def _detach_recorded(connection_info: dict, device_info: dict) -> None:
    """An RBD image was never attached to the host (QEMU opened it): nothing to disconnect."""
    if connection_info["driver_volume_type"] != "rbd":
        detach_recorded(connection_info, device_info)


def _detach_quietly(dst: Attached) -> None:
    if dst.connector is None:  # an RBD image: QEMU opens it, nothing was attached to the host
        return
    try:
        detach(dst)
    except Exception as exc:  # noqa: BLE001 - os-brick raises many kinds; the refusal stands
        log.warning("could not detach the new volume %s again: %s", dst.path, mask_password(str(exc)))
