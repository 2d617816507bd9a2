"""The hypervisor interface on a domain libvirt owns, as on a Nova compute host: the server's id is the
domain's UUID, and everything goes through libvirt's public API (volcopy.compute.libvirt's steps), so
libvirt's view of the disk (domblklist, the persistent XML) follows every step and the domain is never
tainted.

Whether the guest runs, and which run it is (the domain id), come from libvirt; lifecycle, I/O-error
and block-job events come from libvirt's event loop on its own thread. A libvirtd that cannot be
reached is an error, never a sign that the guest stopped.

complete moves the writes with a shallow block copy into a new overlay over dst ("newtop", next to the
overlay), pivots, then commits newtop into dst; the fence's overlay, out of the chain, is deleted. After
prepare the copy already runs (libvirt opens dst only at the pivot), and complete picks it up.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading

import libvirt

from .. import libvirt as steps
from ..rbd import is_rbd_name, recorded_image
from .hypervisor import EventCallback, Hypervisor, HypervisorError, HypervisorNotRunning
from .state import Disk, VolumeMigration

_LIFECYCLE = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: "STARTED",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "SHUTDOWN",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "STOPPED",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "STOPPED",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "STOPPED",
}


def newtop_path(m: VolumeMigration) -> str:
    """The overlay over dst that complete copies the fence's overlay into: named after it."""
    base = m.overlay_path.removesuffix(".qcow2").removesuffix("-top")
    return f"{base}-top.qcow2"


class LibvirtServer(Hypervisor):
    """One libvirt domain, found by UUID on one libvirt connection."""

    read_only_move_writes_dst = True
    switch_drains_disk = False

    def __init__(self, uri: str, uuid: str, on_event: EventCallback | None = None):
        steps.start_event_loop()
        self.uri, self.uuid, self.on_event = uri, uuid, on_event
        self.liveness = f"libvirt ({uri}, domain {uuid})"
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None
        self._jobs: steps.BlockJobs | None = None
        self._empty: dict[int, int] = {}  # virtual size -> an empty overlay's file size

    # ------------------------------------------------------------------ the connection and its events

    def _connection(self) -> tuple[libvirt.virConnect, steps.BlockJobs]:
        with self._lock:
            if self._conn is not None and self._conn.isAlive():
                return self._conn, self._jobs
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"cannot connect to libvirt at {self.uri}: {exc}") from None
            try:
                self._keep_alive(conn)
                conn.registerCloseCallback(self._closed, None)
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
                )
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, self._io_error, None
                )
                jobs = steps.BlockJobs(conn, self._block_job)
            except libvirt.libvirtError as exc:
                conn.close()
                raise HypervisorError(f"libvirt at {self.uri}: {exc}") from None
            self._conn, self._jobs = conn, jobs
            return conn, self._jobs

    @staticmethod
    def _keep_alive(conn: libvirt.virConnect) -> None:
        """Keepalive messages, so that a libvirtd gone silent is noticed; a driver that runs in this
        process (no libvirtd to lose) has none."""
        try:
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise

    def _closed(self, conn, reason, opaque) -> None:  # libvirtd went away: reconnect at the next call
        with self._lock:
            if self._conn is conn:
                self._conn = None
        self._emit("DISCONNECTED", {"reason": reason})

    def _emit(self, name: str, data: dict) -> None:
        if self.on_event:
            self.on_event(name, data)

    def _lifecycle(self, conn, dom, event, detail, opaque) -> None:
        if dom.UUIDString() == self.uuid and event in _LIFECYCLE:
            self._emit(_LIFECYCLE[event], {"detail": detail})

    def _io_error(self, conn, dom, src_path, dev_alias, action, reason, opaque) -> None:
        if dom.UUIDString() == self.uuid:
            self._emit("BLOCK_IO_ERROR", {"nospace": reason == "enospc", "device": dev_alias})

    def _block_job(self, uuid: str, target: str, status: str) -> None:
        if uuid == self.uuid:
            self._emit("BLOCK_JOB", {"disk": target, "status": status})

    def _domain(self) -> libvirt.virDomain | None:
        conn, _ = self._connection()
        try:
            return conn.lookupByUUIDString(self.uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"libvirt: domain {self.uuid}: {exc}") from None

    def _running_domain(self) -> libvirt.virDomain:
        dom = self._domain()
        if dom is None or not dom.isActive():
            raise HypervisorNotRunning(f"domain {self.uuid} is not running ({self.uri})")
        return dom

    def _do(self, step, *args):
        """A step of volcopy.compute.libvirt on the running domain, its failures as HypervisorError."""
        dom = self._running_domain()
        try:
            return step(dom, *args)
        except (steps.LibvirtHandoffError, libvirt.libvirtError) as exc:
            raise HypervisorError(str(exc)) from None

    # ------------------------------------------------------------------ the interface

    def running(self) -> bool:
        dom = self._domain()
        try:
            return dom is not None and bool(dom.isActive())
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt: domain {self.uuid}: {exc}") from None

    def identity(self) -> str | None:
        """The domain's id: libvirt gives each start a new one, and keeps it over a libvirtd restart."""
        dom = self._domain()
        if dom is None or not dom.isActive():
            return None
        return f"{self.uuid}:{dom.ID()}"

    def chain(self, disk: Disk) -> list[str]:
        return self._do(steps.disk_chain, disk.qdev)

    def writable_and_shared(self, disk: Disk) -> tuple[bool, bool]:
        return self._do(steps.disk_flags, disk.qdev)

    def prepare_fence(self, disk: Disk, m: VolumeMigration) -> None:
        """An RBD src (a network disk) goes into the overlay's header by QEMU's json: name, with the
        monitors the domain's definition gives, unopened: libvirt reads how to reach it from there."""
        try:
            if is_rbd_name(disk.volume_path):
                src = self._do(steps.rbd_image_of, disk.qdev)
                size = self._running_domain().blockInfo(disk.qdev, 0)[0]
                steps.create_overlay(m.overlay_path, src.qemu_filename(), "raw", size)
            else:
                steps.create_overlay(m.overlay_path, disk.volume_path, disk.volume_format)
        except (steps.LibvirtHandoffError, libvirt.libvirtError) as exc:
            raise HypervisorError(str(exc)) from None

    def fence(self, disk: Disk, m: VolumeMigration) -> None:
        self._do(steps.fence, disk.qdev, m.overlay_path)

    def release_overlay(self, disk: Disk, m: VolumeMigration) -> None:
        """libvirt holds an image only while it is in the chain."""

    def merge_down(self, disk: Disk, m: VolumeMigration, before_switch) -> None:
        dom = self._running_domain()
        _, jobs = self._connection()
        try:
            steps.commit(dom, disk.qdev, jobs, before_switch)
        except (steps.LibvirtHandoffError, libvirt.libvirtError) as exc:
            raise HypervisorError(str(exc)) from None

    def move_onto_dst(self, disk: Disk, m: VolumeMigration) -> str:
        from ...migration.failpoints import failpoint

        newtop = newtop_path(m)
        chain = self.chain(disk)
        if chain[:1] == [m.dst_path] or chain[:2] == [newtop, m.dst_path]:
            return newtop if chain[0] == newtop else m.overlay_path
        if chain[:1] != [m.overlay_path]:
            raise HypervisorError(f"the overlay is not on top of the disk (it is on {chain[0]})")
        dom = self._running_domain()
        _, jobs = self._connection()
        try:
            steps.copy_onto(
                dom,
                disk.qdev,
                jobs,
                newtop,
                m.dst_path,
                m.dst_format or "raw",
                lambda: failpoint("agent-before-repoint"),
                recorded_image(m.dst_path, m.dst_connection),
            )
        except (steps.LibvirtHandoffError, libvirt.libvirtError) as exc:
            steps.abort_copy(dom, disk.qdev)  # the disk stays on overlay -> src
            raise HypervisorError(str(exc)) from None
        return newtop

    def prepare_move(self, disk: Disk, m: VolumeMigration) -> None:
        chain = self.chain(disk)
        if chain[:1] != [m.overlay_path]:
            raise HypervisorError(f"the overlay is not on top of the disk (it is on {chain[0]})")
        _, jobs = self._connection()
        dst_image = recorded_image(m.dst_path, m.dst_connection)
        self._do(
            steps.start_copy, disk.qdev, jobs, newtop_path(m), m.dst_path, m.dst_format or "raw", dst_image
        )

    def move_stopped(self, disk: Disk, m: VolumeMigration) -> str | None:
        dom = self._running_domain()
        if self.chain(disk)[:1] != [m.overlay_path]:
            return None
        try:
            copying = dom.blockJobInfo(disk.qdev, 0)
        except libvirt.libvirtError as exc:  # the domain stopped meanwhile, for one
            raise HypervisorError(f"libvirt: block job of {disk.qdev}: {exc}") from None
        if not copying:
            return "the block copy onto the new volume stopped before complete (failed or aborted)"
        return None

    def abandon_move(self, disk: Disk, m: VolumeMigration) -> None:
        """A domain that does not run has no job; a persistent one's definition is read for newtop
        (abandon_copy), and a transient one that stopped is gone: nothing names newtop any more."""
        dom = self._domain()
        if dom is None:
            if os.path.exists(newtop_path(m)):
                os.unlink(newtop_path(m))
            return
        try:
            steps.abandon_copy(dom, disk.qdev, newtop_path(m))
        except (steps.LibvirtHandoffError, libvirt.libvirtError) as exc:
            raise HypervisorError(str(exc)) from None

    def dst_node(self, m: VolumeMigration) -> str:
        return ""

    def release_src(self, disk: Disk, m: VolumeMigration) -> None:
        """The pivot released src: it must not be in the chain."""
        if disk.volume_path in self.chain(disk):
            raise HypervisorError(f"src {disk.volume_path} is still in the disk's chain")

    def repoint_stopped(self, disk: Disk, m: VolumeMigration, path: str, image_format: str) -> None:
        """The persistent definition of a domain that is shut off, on path alone; then newtop of a block
        copy prepare started (which ended with QEMU) is deleted: no definition names it any more. A
        transient domain that stopped is gone (nothing starts it again); a definition on an image that is
        none of this migration's is the operator's, and left as it is."""
        dom = self._domain()
        try:
            if dom is not None and not dom.isPersistent():
                return  # a transient domain that exists runs: nothing of it is touched
            if dom is not None:
                self._define_on(dom, disk, m, path, image_format)
        except (steps.LibvirtHandoffError, libvirt.libvirtError) as exc:
            raise HypervisorError(str(exc)) from None
        newtop = newtop_path(m) if m.overlay_path else None
        if newtop and newtop != m.overlay_path and os.path.exists(newtop):  # after a switch: the overlay
            os.unlink(newtop)

    def _define_on(
        self, dom: libvirt.virDomain, disk: Disk, m: VolumeMigration, path: str, image_format: str
    ) -> None:
        if dom.isActive():
            raise HypervisorError(f"domain {self.uuid} runs: its definition is not changed under it")
        chain = steps.disk_chain(dom, disk.qdev, libvirt.VIR_DOMAIN_XML_INACTIVE)
        if chain == [path]:
            return
        ours = {disk.volume_path, m.dst_path, m.overlay_path}
        if m.overlay_path:
            ours.add(newtop_path(m))
        if chain[0] not in ours:
            raise HypervisorError(
                f"the definition of domain {self.uuid} has {disk.qdev} on {chain[0]}, no image of "
                "this migration: it is left as it is"
            )
        image = recorded_image(path, m.dst_connection) if path == m.dst_path else None
        steps.define_disk_on(dom, disk.qdev, path, image_format, image)
        chain = steps.disk_chain(dom, disk.qdev, libvirt.VIR_DOMAIN_XML_INACTIVE)
        if chain != [path]:
            raise HypervisorError(f"the definition of {disk.qdev} is {' -> '.join(chain)}, not {path}")

    def move_read_only(self, disk: Disk, m: VolumeMigration) -> None:
        """A block copy of the disk onto dst and its pivot (libvirt has no re-open of a disk's image)."""
        if (m.dst_format or "raw") != "raw":
            raise HypervisorError("a read-only disk moves onto a raw volume only")
        dom = self._running_domain()
        _, jobs = self._connection()
        dst_image = recorded_image(m.dst_path, m.dst_connection)
        try:
            steps.move_read_only(dom, disk.qdev, jobs, m.dst_path, dst_image)
        except (steps.LibvirtHandoffError, libvirt.libvirtError) as exc:
            steps.abort_copy(dom, disk.qdev)  # the disk stays on src
            raise HypervisorError(str(exc)) from None

    def bytes_written(self, disk: Disk, m: VolumeMigration) -> int:
        """What the guest wrote into the overlay since the fence: the highest offset QEMU wrote in the
        overlay's file (libvirt's block info), less an empty overlay's size. QEMU appends each newly
        written 64 KiB cluster (and, now and then, a metadata cluster), so this is the data in cluster
        granules, a little over; the overlay's own table is cached in QEMU, so reading the file would not
        tell."""
        dom = self._running_domain()
        try:
            capacity, allocation, _ = dom.blockInfo(disk.qdev, 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt: block info of {disk.qdev}: {exc}") from None
        return max(0, allocation - self._empty_overlay_size(capacity))

    def _empty_overlay_size(self, capacity: int) -> int:
        if capacity not in self._empty:
            with tempfile.TemporaryDirectory() as scratch:
                path = f"{scratch}/empty.qcow2"
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(capacity)], check=True)
                self._empty[capacity] = os.stat(path).st_size
        return self._empty[capacity]

    def paused_on_enospc(self, disk: Disk) -> bool:
        dom = self._running_domain()
        state, reason = dom.state()
        if state != libvirt.VIR_DOMAIN_PAUSED or reason != libvirt.VIR_DOMAIN_PAUSED_IOERROR:
            return False
        return any(e == libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE for e in dom.diskErrors().values())

    def resume_after_io_error(self) -> None:
        dom = self._running_domain()
        if dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR]:
            dom.resume()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None


__all__ = ["LibvirtServer", "newtop_path"]
