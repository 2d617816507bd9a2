"""The compute side of the three calls: start (fence), cancel, complete, for the servers the agent owns.

Every step records its intent in the state store before it touches QEMU, and every step that can be
interrupted is written as "converge": look at the node graph, do what is left. The same code serves a
request and a restarted agent's recovery.

A server whose QEMU is not running is fenced in the agent's state alone: nothing can write to its
volume, complete re-points the attachment to dst for the next boot, cancel lifts the fence.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections import defaultdict
from dataclasses import dataclass

from ...attach import Attached, attach, detach
from ...volume import size_of
from ..api import State
from ..errors import ComputeConflict, ComputeForbidden, ComputeNotFound
from . import qemu
from .qemu import QemuError, QemuNotRunning, Qmp
from .state import Attachment, Migration, StateStore

log = logging.getLogger(__name__)

FENCING = "fencing"  # internal: the fence is being set; the API shows it as "none"


@dataclass
class ServerConfig:
    qmp: str
    attachments: dict[str, dict]  # attachment id -> {"qdev", "node", "volume"}


@dataclass
class DstPolicy:
    """What complete may attach: os-brick protocols, and where a "local" device may lie."""

    connectors: list[str]
    device_prefixes: list[str]  # "/dev/disk/by-id/" is a directory; "/dev/loop" any loop device

    def check(self, connection_info: dict) -> None:
        protocol = connection_info.get("driver_volume_type")
        if protocol not in self.connectors:
            raise ComputeForbidden(
                f"connector {protocol!r} is not allowed by this compute agent (allowed: "
                f"{', '.join(self.connectors) or 'none'})"
            )
        if protocol == "local":
            path = os.path.normpath(str(connection_info.get("data", {}).get("device_path", "")))
            if not any(path.startswith(prefix) for prefix in self.device_prefixes):
                raise ComputeForbidden(
                    f"device path {path} lies outside the paths this compute agent may attach "
                    f"({', '.join(self.device_prefixes) or 'none are configured'})"
                )


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _names(m: Migration) -> dict[str, str]:
    return {
        "overlay": qemu.short_name("ovl", m.attachment_id, str(m.generation)),
        "overlay_file": qemu.short_name("ovf", m.attachment_id, str(m.generation)),
        "job": qemu.short_name("cmt", m.attachment_id, str(m.generation)),
        "dst": qemu.short_name("dst", m.new_attachment_id or ""),
    }


def _is_block_device(path: str) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


def _fsync_volume(path: str) -> None:
    """Makes what QEMU wrote to the volume durable, from outside QEMU: a copy may start next."""
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
        self.qmp = {server_id: Qmp(cfg.qmp) for server_id, cfg in servers.items()}
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_lock = threading.Lock()
        for server_id, cfg in servers.items():
            for attachment_id, a in cfg.attachments.items():
                store.add_attachment_if_new(
                    Attachment(attachment_id, server_id, a["qdev"], a["node"], a["volume"])
                )

    # ------------------------------------------------------------------ helpers

    def _lock(self, attachment_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks[attachment_id]

    def _attachment(self, server_id: str, attachment_id: str) -> Attachment:
        if server_id not in self.qmp:
            raise ComputeNotFound(f"server {server_id} is not known to this compute agent")
        a = self.store.attachment(attachment_id)
        if a is None or a.server_id != server_id:
            raise ComputeNotFound(f"attachment {attachment_id} is not attached to server {server_id}")
        return a

    def _background(self, target, *args) -> None:
        threading.Thread(target=target, args=args, daemon=True).start()

    def _fail(self, m: Migration, reason: str) -> None:
        log.error("migration of attachment %s failed: %s", m.attachment_id, reason)
        m.state, m.reason = State.FAILED.value, reason
        self.store.put_migration(m)

    def _written(self, m: Migration) -> int:
        try:
            return qemu.bytes_written(self.qmp[m.server_id], _names(m)["overlay"])
        except QemuError:
            return m.bytes_written

    # ------------------------------------------------------------------ the three calls

    def attachments(self, server_id: str) -> list[dict]:
        if server_id not in self.qmp:
            raise ComputeNotFound(f"server {server_id} is not known to this compute agent")
        return [
            {"id": a.attachment_id, "serverId": a.server_id, "device_path": a.volume_path}
            for a in self.store.attachments_of(server_id)
        ]

    def state(self, server_id: str, attachment_id: str) -> Migration:
        self._attachment(server_id, attachment_id)
        m = self.store.migration(attachment_id) or Migration(attachment_id, server_id)
        if m.state == FENCING:
            m.state = State.NONE.value
        elif m.state == State.FENCED.value and not m.offline:
            m.bytes_written = self._written(m)
        return m

    def start(self, server_id: str, attachment_id: str) -> Migration:
        """Reversion: a fence that could not be set entirely is taken down again (overlay nodes
        deleted, file removed) and the call answers 409; src was never written by it."""
        a = self._attachment(server_id, attachment_id)
        with self._lock(attachment_id):
            m = self.store.migration(attachment_id) or Migration(attachment_id, server_id)
            if m.state == State.FENCED.value:
                return m
            if m.state in (State.COMPLETING.value, State.COMPLETED.value) or a.replaced_by:
                raise ComputeConflict(
                    f"attachment {attachment_id} was already migrated to {m.new_attachment_id}"
                )
            if m.state in (State.CANCELLING.value, FENCING):
                raise ComputeConflict(
                    f"attachment {attachment_id} is still {m.state}; start again once it is done"
                )
            previous = m.state
            m.generation += 1
            m.new_attachment_id = m.dst_path = m.reason = None
            m.bytes_written = 0
            qmp = self.qmp[server_id]
            if not qmp.is_running():
                m.state, m.offline, m.overlay_path = State.FENCED.value, True, None
                self.store.put_migration(m)
                return m
            free = _free_bytes(self.overlay_dir)
            if free < self.overlay_min_free:
                raise ComputeConflict(
                    f"cannot suspend writes: the overlay directory has {free} bytes free, less than the "
                    f"{self.overlay_min_free} configured (overlay_min_free)"
                )
            m.offline = False
            m.overlay_path = os.path.join(
                self.overlay_dir, f"{server_id}-{attachment_id}-{m.generation}.qcow2"
            )
            m.state = FENCING
            self.store.put_migration(m)
            try:
                self._fence(m, a)
            except (QemuError, OSError) as exc:
                left = self._take_down_fence(m, a)
                if left:
                    self._fail(
                        m,
                        f"cannot suspend writes ({exc}), and the fence could not be taken down: {left}; "
                        f"the guest's writes since are in {m.overlay_path}",
                    )
                    raise ComputeConflict(m.reason) from None
                m.state, m.reason = previous, f"cannot suspend writes: {exc}"
                self.store.put_migration(m)
                raise ComputeConflict(m.reason) from None
            return m

    def _fence(self, m: Migration, a: Attachment) -> None:
        qmp, names = self.qmp[m.server_id], _names(m)
        top = qemu.top_node(qmp, a.qdev)
        if top != a.node:
            raise QemuError(f"the disk is on node {top}, not on its volume's node {a.node}")
        size = qemu.nodes(qmp)[a.node]["image"]["virtual-size"]
        qemu.add_overlay(qmp, m.overlay_path, names["overlay_file"], names["overlay"], size)
        qemu.track_writes(qmp, names["overlay"])
        qemu.snapshot(qmp, a.node, names["overlay"])
        _fsync_volume(a.volume_path)
        m.state = State.FENCED.value
        self.store.put_migration(m)

    def _take_down_fence(self, m: Migration, a: Attachment) -> str | None:
        """A fence that failed half-way, taken down from what the node graph shows: an overlay already
        in the disk's chain holds the guest's writes since the snapshot, so it is merged back into src
        before anything of it goes. Returns why it could not be (the overlay then stays), or None."""
        qmp, names = self.qmp[m.server_id], _names(m)
        try:
            if qemu.top_node(qmp, a.qdev) == names["overlay"]:
                qemu.commit_active(qmp, names["job"], names["overlay"])
                top = qemu.top_node(qmp, a.qdev)
                if top != a.node:
                    return f"after the merge the disk is on node {top}, not on src's {a.node}"
        except QemuError as exc:
            return f"merging the overlay back into src failed: {exc}"
        self._unfence_leftovers(m)
        return None

    def _unfence_leftovers(self, m: Migration) -> None:
        """Overlay nodes and file that a fence left behind while not in the disk's chain. The file goes
        only once QEMU has let go of its nodes: while a node uses it, it may hold the guest's writes."""
        names, qmp = _names(m), self.qmp[m.server_id]
        try:
            for node in (names["overlay"], names["overlay_file"]):
                qemu.delete_node(qmp, node)
        except QemuError as exc:
            log.warning(
                "could not delete overlay nodes of %s, so its file %s stays: %s",
                m.attachment_id,
                m.overlay_path,
                exc,
            )
            return
        if m.overlay_path and os.path.exists(m.overlay_path):
            os.unlink(m.overlay_path)

    def cancel(self, server_id: str, attachment_id: str) -> Migration:
        """Answers at once; the overlay is merged back into src in the background. Reversion: none
        needed, cancel is the reversion of start; a merge that fails leaves the state failed with
        QEMU's reason and the guest still running on the overlay, so nothing is lost."""
        self._attachment(server_id, attachment_id)
        with self._lock(attachment_id):
            m = self.store.migration(attachment_id)
            if m is None or m.state not in (State.FENCED.value, FENCING):
                return self.state(server_id, attachment_id)  # not running: a no-op
            if m.offline:
                m.state = State.CANCELLED.value
                self.store.put_migration(m)
                return m
            m.state = State.CANCELLING.value
            self.store.put_migration(m)
        self._background(self._converge_cancel, attachment_id)
        return m

    def _converge_cancel(self, attachment_id: str) -> None:
        self._merge_down(attachment_id, State.CANCELLED, "while fenced", "back into src")

    def _merge_down(self, attachment_id: str, final: State, while_: str, into: str) -> None:
        """Commits the overlay into the node below it, which the device then sits on: src for cancel,
        dst (after the pivot, done again if a restart cut it short) for complete."""
        with self._lock(attachment_id):
            m = self.store.migration(attachment_id)
            disk = self.store.attachment(attachment_id)
            qmp, names = self.qmp[m.server_id], _names(m)
            target = disk.node if final == State.CANCELLED else names["dst"]
            try:
                top = qemu.top_node(qmp, disk.qdev)
                if top == names["overlay"]:
                    if final == State.COMPLETED:
                        self._pivot(m)
                    qemu.commit_active(qmp, names["job"], names["overlay"])
                    top = qemu.top_node(qmp, disk.qdev)
                if top != target:
                    raise QemuError(f"after the merge the disk is on {top}, not on {target}")
                m.bytes_written = self._written(m)
                self._unfence_leftovers(m)
            except QemuNotRunning as exc:
                self._fail(
                    m,
                    f"QEMU stopped {while_} ({exc}); the guest's writes since start are in {m.overlay_path}",
                )
                return
            except QemuError as exc:
                self._fail(m, f"merging the overlay {into} failed: {exc}")
                return
            m.state = final.value
            self.store.put_migration(m)

    def complete(
        self, server_id: str, attachment_id: str, new_attachment_id: str, connection_info: dict
    ) -> Migration:
        """Attaches dst, re-points the overlay onto it and releases src before answering; the overlay
        is merged into dst in the background. Reversion: until the overlay's backing moves to dst the
        migration stays fenced on src (dst is detached again); after that there is no going back, and
        a repeated complete (or a restarted agent) finishes the remaining steps."""
        self._attachment(server_id, attachment_id)
        with self._lock(attachment_id):
            m = self.store.migration(attachment_id)
            state = m.state if m else State.NONE.value
            if state in (State.COMPLETING.value, State.COMPLETED.value):
                if m.new_attachment_id != new_attachment_id:
                    raise ComputeConflict(
                        f"attachment {attachment_id} was completed onto {m.new_attachment_id}"
                    )
                return m
            if state in (State.CANCELLING.value, State.CANCELLED.value):
                raise ComputeConflict(f"the migration of attachment {attachment_id} was cancelled")
            if state != State.FENCED.value:
                raise ComputeConflict(
                    f"the migration of attachment {attachment_id} was not started ({state})"
                )
            if self.store.attachment(new_attachment_id) is not None:
                raise ComputeConflict(f"attachment {new_attachment_id} exists already: choose a new id")
            self.policy.check(connection_info)
            dst = self._attach_dst(connection_info, self.store.attachment(attachment_id))
            m.new_attachment_id, m.dst_path = new_attachment_id, dst.path
            m.state = State.COMPLETING.value
            self.store.put_migration(m)
            if m.offline:
                self._replace_attachment(m)
                m.state = State.COMPLETED.value
                self.store.put_migration(m)
                return m
            try:
                self._pivot(m)
            except QemuError as exc:
                self._fail(m, f"moving the overlay onto the new volume failed: {exc}")
                raise ComputeConflict(m.reason) from None
        self._background(self._converge_complete, attachment_id)
        return m

    def _attach_dst(self, connection_info: dict, src: Attachment) -> Attached:
        """dst, attached, and at least as large as src: a smaller one cannot hold the guest's disk."""
        try:
            dst = attach(connection_info)
        except Exception as exc:  # noqa: BLE001 - os-brick raises many kinds
            raise ComputeConflict(f"cannot attach the new volume: {exc}") from None
        try:
            dst_size, src_size = size_of(dst.path), size_of(src.volume_path)
        except OSError as exc:
            detach(dst)
            raise ComputeConflict(f"cannot open the new volume {dst.path}: {exc.strerror}") from None
        if dst_size < src_size:
            detach(dst)
            raise ComputeConflict(
                f"the new volume holds {dst_size} bytes, fewer than the {src_size} of the volume it replaces"
            )
        return dst

    def _replace_attachment(self, m: Migration) -> None:
        old = self.store.attachment(m.attachment_id)
        node = _names(m)["dst"]
        self.store.put_attachment(Attachment(m.new_attachment_id, m.server_id, old.qdev, node, m.dst_path))
        old.replaced_by = m.new_attachment_id
        self.store.put_attachment(old)

    def _pivot(self, m: Migration) -> None:
        """From here on the guest reads through the overlay from dst; src has no user left."""
        a = self.store.attachment(m.attachment_id)
        qmp, names = self.qmp[m.server_id], _names(m)
        backing = qemu.nodes(qmp).get(names["overlay"], {}).get("backing_file")
        if backing != m.dst_path:
            qemu.add_raw_volume(qmp, names["dst"], m.dst_path, _is_block_device(m.dst_path))
            qemu.repoint_backing(qmp, names["overlay"], names["overlay_file"], names["dst"])
        if a.replaced_by is None:
            qemu.delete_node(qmp, a.node)
            self._replace_attachment(m)

    def _converge_complete(self, attachment_id: str) -> None:
        self._merge_down(attachment_id, State.COMPLETED, "while completing", "into the new volume")

    # ------------------------------------------------------------------ restart

    def recover(self) -> None:
        """Finishes or reports what a previous agent left in flight."""
        for m in self.store.migrations_in([FENCING, State.CANCELLING.value, State.COMPLETING.value]):
            if m.state == State.CANCELLING.value:
                self._background(self._converge_cancel, m.attachment_id)
            elif m.state == State.COMPLETING.value:
                self._background(self._converge_complete, m.attachment_id)
            else:
                self._recover_fencing(m)

    def _recover_fencing(self, m: Migration) -> None:
        """Killed between intent and fence: fenced if the overlay made it into the chain, else not."""
        a = self.store.attachment(m.attachment_id)
        qmp = self.qmp[m.server_id]
        try:
            if qemu.top_node(qmp, a.qdev) == _names(m)["overlay"]:
                _fsync_volume(a.volume_path)
                m.state = State.FENCED.value
            else:
                self._unfence_leftovers(m)
                m.state, m.reason = State.NONE.value, "the agent restarted before the fence was set"
        except QemuError as exc:
            m.state, m.reason = State.NONE.value, f"the agent restarted while fencing: {exc}"
        self.store.put_migration(m)
