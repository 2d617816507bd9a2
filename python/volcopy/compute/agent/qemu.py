"""The hypervisor operations of the handoff on a QEMU the agent reaches over QMP.

The guest's disk is a device whose BlockBackend sits on a node graph. Fencing puts a local qcow2
overlay on top (blockdev-snapshot), so the guest keeps writing while src gets nothing; cancel commits
the overlay back into src; complete re-points the overlay's backing from src to dst (blockdev-reopen)
and commits it into dst. Each operation is idempotent or checks the graph first, so that a restarted
agent can run it again. A QEMU that stopped leaves its overlay file; it is merged with qemu-img.

Whether QEMU runs is read from its pid file, which QEMU keeps locked while it lives: a QMP socket that
cannot be reached is an error, never a sign that QEMU stopped. QemuServer implements hypervisor.py's
interface; the node and job names it gives each migration are derived from its ids (names()).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import struct
import subprocess
import time
from collections.abc import Callable

from ...migration.failpoints import failpoint
from ...volume import size_of
from ..rbd import RbdImage, name_of_node, recorded_image
from .hypervisor import Hypervisor, HypervisorNotRunning
from .qmp import QemuError, QemuGone, Qmp
from .state import Disk, VolumeMigration

JOB_POLL_SECONDS = 0.02
WRITTEN_BITMAP = "volcopy-written"
_FLOCK = "hhqqi4x"  # struct flock on x86-64 and arm64: type, whence, start, len, pid


class QemuNotRunning(HypervisorNotRunning):
    """The server's QEMU is not running (its pid file is not locked)."""


def short_name(prefix: str, *parts: str) -> str:
    """Node and job names (QEMU allows 31 characters) derived from ids that may be long UUIDs."""
    return prefix + hashlib.blake2b("/".join(parts).encode(), digest_size=8).hexdigest()


def names(m: VolumeMigration) -> dict[str, str]:
    """The QMP node and job names of one migration: the same ones for a restarted agent."""
    return {
        "overlay": short_name("ovl", m.attachment_id, str(m.generation)),
        "overlay_file": short_name("ovf", m.attachment_id, str(m.generation)),
        "job": short_name("cmt", m.attachment_id, str(m.generation)),
        "dst": short_name("dst", m.new_attachment_id or ""),
        "dst_file": short_name("dsf", m.new_attachment_id or ""),
    }


def _process_identity(pid: int) -> str | None:
    """pid and start time: tells a QEMU from a later one that got the same pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid}:{f.read().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def volume_in_use(path: str | RbdImage) -> bool:
    """Whether a process holds QEMU's image lock on the volume (QEMU locks bytes 100-299 of every image
    and device it opens, with open file description locks), or a QEMU has the volume's block device
    open: the proof that a QEMU whose pid file is not locked (or that libvirt does not show) really has
    stopped, and not that the agent's server setting is wrong. An RBD image is in use while a client
    (a QEMU, wherever it runs) watches its header, as every librbd client that opens it does."""
    if isinstance(path, RbdImage):
        return rbd_watched(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 100, 200, 0)
        kind = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query))[0]
    finally:
        os.close(fd)
    return kind != fcntl.F_UNLCK or _qemu_has_open(path)


def _qemu_has_open(path: str) -> bool:
    """Whether a QEMU process has the block device open. A lock is on a device node, and libvirt gives
    its QEMU a /dev of its own (a mount namespace) whose nodes are not the host's: the lock is not seen
    from here, the open device is."""
    device = os.stat(path)
    if not stat.S_ISBLK(device.st_mode):
        return False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if not os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu"):
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                opened = os.stat(f"/proc/{pid}/fd/{fd}")
                if stat.S_ISBLK(opened.st_mode) and opened.st_rdev == device.st_rdev:
                    return True
        except OSError:  # the process, or the descriptor, went away meanwhile
            continue
    return False


def rbd_watched(image: RbdImage) -> bool:
    """Whether any client has the image open (``rbd status``: its header's watchers)."""
    done = subprocess.run(
        ["rbd", "status", "--format", "json", *image.cli_args(), image.spec],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise QemuError(f"rbd status {image.spec}: {done.stderr.strip()}")
    return bool(json.loads(done.stdout).get("watchers"))


def pid_holding(pidfile: str) -> int | None:
    """The pid of the process that holds the pid file's lock (QEMU's -pidfile), or None."""
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    finally:
        os.close(fd)
    return None if kind == fcntl.F_UNLCK else pid


class QemuServer(Hypervisor):
    """One server's QEMU: its pid file says whether it runs, its QMP socket does the rest."""

    def __init__(self, qmp_path: str, pidfile: str, on_event: Callable[[str, dict], None] | None = None):
        self.pidfile = pidfile
        self.liveness = f"the pid file {pidfile}"
        self.qmp = Qmp(qmp_path, on_event)
        self._pid: int | None = None

    # ------------------------------------------------------------------ liveness

    def pid(self) -> int | None:
        """QEMU's pid while it runs. A new pid means a new QEMU: the old connection is dropped."""
        pid = pid_holding(self.pidfile)
        if pid != self._pid:
            self.qmp.drop()
            self._pid = pid
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def identity(self) -> str | None:
        """Which QEMU runs now (pid and start time), or None: a different one means QEMU was started
        again, from its own configuration, on the volumes that configuration names."""
        pid = self.pid()
        return _process_identity(pid) if pid is not None else None

    def cmd(self, command: str, /, **args):
        if not self.running():
            raise QemuNotRunning(f"QEMU is not running (its pid file {self.pidfile} is not locked)")
        return self.qmp.cmd(command, **args)

    def run_state(self) -> str:
        """QEMU's run state: "running", "paused", "io-error" (paused by a failed write), ..."""
        return self.cmd("query-status")["status"]

    def resume_after_io_error(self) -> None:
        """Resumes a guest that QEMU paused on a write error (ENOSPC), once its cause is gone; QEMU
        retries the failed requests. A guest paused for another reason stays paused."""
        if self.run_state() == "io-error":
            self.cmd("cont")

    # ------------------------------------------------------------------ the block graph

    def _device(self, qdev: str) -> dict:
        for block in self.cmd("query-block"):
            path = block.get("qdev", "")
            if path == qdev or path.startswith(f"/machine/peripheral/{qdev}/"):
                return block
        raise QemuError(f"no disk device {qdev!r} in this QEMU")

    def top_node(self, qdev: str) -> str:
        """The node the device's BlockBackend sits on."""
        inserted = self._device(qdev).get("inserted")
        if not inserted:
            raise QemuError(f"disk device {qdev!r} has no medium")
        return inserted["node-name"]

    def io_status(self, qdev: str) -> str:
        """ "ok", "nospace" (a write failed for lack of space) or "failed"."""
        return self._device(qdev).get("io-status", "ok")

    def nodes(self) -> dict[str, dict]:
        return {n["node-name"]: n for n in self.cmd("query-named-block-nodes")}

    def backing_file(self, node: str) -> str | None:
        return self.nodes().get(node, {}).get("backing_file")

    def track_writes(self, overlay: str) -> None:
        """A dirty bitmap on the overlay counts what the guest writes while fenced, whatever path the
        write takes (the device's own statistics miss writes that do not come from the device model)."""
        existing = {b["name"] for b in self.nodes().get(overlay, {}).get("dirty-bitmaps", [])}
        if WRITTEN_BITMAP not in existing:
            self.cmd("block-dirty-bitmap-add", node=overlay, name=WRITTEN_BITMAP)

    def add_overlay(self, overlay_path: str, file_node: str, node: str, size: int) -> None:
        """A fresh qcow2 file and its two nodes, not yet in the device's chain."""
        existing = self.nodes()
        if node in existing:
            return
        if file_node not in existing:
            # The guest's writes land here: readable by root alone (qemu-img keeps an existing file's mode).
            os.close(os.open(overlay_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.chmod(overlay_path, 0o600)
            made = subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", overlay_path, str(size)],
                capture_output=True,
                text=True,
            )
            if made.returncode != 0:
                raise QemuError(f"qemu-img create {overlay_path}: {made.stderr.strip()}")
            self.cmd("blockdev-add", driver="file", **{"node-name": file_node, "filename": overlay_path})
        self.cmd("blockdev-add", driver="qcow2", file=file_node, backing=None, **{"node-name": node})

    def snapshot(self, base: str, overlay: str) -> None:
        """Moves the device onto the overlay; from its return on, nothing writes to base. QEMU drains
        base's in-flight requests before it switches."""
        self.cmd("blockdev-snapshot", node=base, overlay=overlay)

    def repoint_backing(self, overlay: str, overlay_file: str, backing: str) -> None:
        """blockdev-reopen takes the node's whole option set; these are the ones add_overlay used."""
        self.cmd(
            "blockdev-reopen",
            options=[{"driver": "qcow2", "node-name": overlay, "file": overlay_file, "backing": backing}],
        )

    def add_volume(
        self, node: str, path: str, image_format: str, discard: bool, image: RbdImage | None = None
    ) -> None:
        """A volume as a node: its format (raw or qcow2) over the device or file, O_DIRECT, with the
        guest's discards passed down when the volume's connection allows them. An RBD image is QEMU's
        rbd node (librbd in QEMU, its cache off as O_DIRECT is for a device)."""
        if node in self.nodes():
            return
        self.cmd(
            "blockdev-add",
            driver=image_format,
            discard="unmap" if discard else "ignore",
            file=_protocol_node(path, image) | {"discard": "unmap" if discard else "ignore"},
            **{"node-name": node},
        )

    def move_read_only_disk(
        self, node: str, file_node: str, path: str, image: RbdImage | None = None
    ) -> None:
        """A read-only disk writes nothing, so it needs no overlay: its raw node is re-opened onto the
        new volume's file (blockdev-reopen of the node's "file" child); src's file node, unreferenced,
        goes with it."""
        if _plain_filename(self.nodes()[node].get("file", "")) == path:
            return
        if file_node not in self.nodes():
            self.cmd(
                "blockdev-add",
                **_protocol_node(path, image),
                **{"node-name": file_node, "read-only": True},
            )
        self.cmd(
            "blockdev-reopen",
            options=[{"driver": "raw", "node-name": node, "read-only": True, "file": file_node}],
        )

    def delete_node(self, node: str) -> None:
        if node in self.nodes():
            self.cmd("blockdev-del", **{"node-name": node})

    def _job(self, job_id: str) -> dict | None:
        for job in self.cmd("query-jobs"):
            if job["id"] == job_id:
                return job
        return None

    def commit_active(self, job_id: str, overlay: str, before_switch: Callable[[], None]) -> None:
        """Merges the overlay into its backing node and moves the device down onto that node: an active
        block-commit, completed once it is ready. The job waits (pending, the disk drained, the backing
        node holding everything) until before_switch() has recorded that the device is about to move:
        from then on the guest writes to the backing node, and the overlay must never be merged again.
        Picks up a job a previous agent left running; a job that failed is dismissed, so that a retry
        starts a new one."""
        if self._job(job_id) is None:
            self.cmd(
                "block-commit",
                device=overlay,
                **{"job-id": job_id, "auto-dismiss": False, "auto-finalize": False},
            )
        completed = False
        while True:
            job = self._job(job_id)
            if job is None:
                return  # dismissed by an earlier run of this step
            status = job["status"]
            if status == "ready" and not completed:
                self.cmd("job-complete", id=job_id)
                completed = True
            elif status == "pending":
                before_switch()
                self.cmd("job-finalize", id=job_id)
            elif status == "concluded":
                self.cmd("job-dismiss", id=job_id)
                if job.get("error"):
                    raise QemuError(f"block-commit {job_id} failed: {job['error']}")
                return
            time.sleep(JOB_POLL_SECONDS)

    # ------------------------------------------------------------------ the hypervisor interface

    def chain(self, disk: Disk) -> list[str]:
        inserted = self._device(disk.qdev).get("inserted")
        if not inserted:
            raise QemuError(f"disk device {disk.qdev!r} has no medium")
        paths, image = [], inserted.get("image")
        while image:
            paths.append(_plain_filename(image["filename"]))
            image = image.get("backing-image")
        return paths

    def writable_and_shared(self, disk: Disk) -> tuple[bool, bool]:
        inserted = self._device(disk.qdev).get("inserted", {})
        shared = self.cmd("qom-get", path=f"/machine/peripheral/{disk.qdev}", property="share-rw")
        return not inserted.get("ro", False), bool(shared)

    def prepare_fence(self, disk: Disk, m: VolumeMigration) -> None:
        top = self.top_node(disk.qdev)
        if top != disk.node:
            raise QemuError(f"the disk is on node {top}, not on its volume's node {disk.node}")
        n = names(m)
        size = self.nodes()[disk.node]["image"]["virtual-size"]
        self.add_overlay(m.overlay_path, n["overlay_file"], n["overlay"], size)
        self.track_writes(n["overlay"])

    def fence(self, disk: Disk, m: VolumeMigration) -> None:
        self.snapshot(disk.node, names(m)["overlay"])

    def release_overlay(self, disk: Disk, m: VolumeMigration) -> None:
        n = names(m)
        for node in (n["overlay"], n["overlay_file"]):
            self.delete_node(node)

    def merge_down(self, disk: Disk, m: VolumeMigration, before_switch: Callable[[], None]) -> None:
        n = names(m)
        self.commit_active(n["job"], n["overlay"], before_switch)

    def move_onto_dst(self, disk: Disk, m: VolumeMigration) -> str:
        n = names(m)
        nodes = self.nodes()
        if not m.pivoted and self.top_node(disk.qdev) != n["overlay"]:
            raise QemuError(f"the overlay is not on top of the disk (it is on {self.top_node(disk.qdev)})")
        backing = nodes.get(n["overlay"], {}).get("backing_file")
        if n["overlay"] in nodes and (backing is None or _plain_filename(backing) != m.dst_path):
            dst_image = recorded_image(m.dst_path, m.dst_connection)
            self.add_volume(n["dst"], m.dst_path, m.dst_format, m.dst_discard, dst_image)
            failpoint("agent-before-repoint")
            self.repoint_backing(n["overlay"], n["overlay_file"], n["dst"])
        return m.overlay_path

    def dst_node(self, m: VolumeMigration) -> str:
        return names(m)["dst"]

    def release_src(self, disk: Disk, m: VolumeMigration) -> None:
        self.delete_node(disk.node)
        if disk.node in self.nodes():
            raise QemuError(f"src's node {disk.node} is still there")

    def move_read_only(self, disk: Disk, m: VolumeMigration) -> None:
        if m.dst_format != "raw":
            raise QemuError("a read-only disk moves onto a raw volume only")
        dst_image = recorded_image(m.dst_path, m.dst_connection)
        self.move_read_only_disk(disk.node, names(m)["dst_file"], m.dst_path, dst_image)
        if _plain_filename(self.nodes()[disk.node].get("file", "")) != m.dst_path:
            raise QemuError(f"node {disk.node} does not read {m.dst_path} after the switch")

    def bytes_written(self, disk: Disk, m: VolumeMigration) -> int:
        """Bytes of the disk the guest changed since the fence (in the bitmap's 64 KiB granules)."""
        overlay = names(m)["overlay"]
        for bitmap in self.nodes().get(overlay, {}).get("dirty-bitmaps", []):
            if bitmap["name"] == WRITTEN_BITMAP:
                return bitmap["count"]
        raise QemuError(f"overlay {overlay} has no write tracking")

    def paused_on_enospc(self, disk: Disk) -> bool:
        return self.run_state() == "io-error" and self.io_status(disk.qdev) == "nospace"

    def close(self) -> None:
        self.qmp.drop()


def _protocol_node(path: str, image: RbdImage | None) -> dict:
    """blockdev-add's options of the node that reaches the volume: a device, a file, or an RBD image."""
    if image is not None:
        return {"driver": "rbd", **image.blockdev(), "cache": {"direct": True}}
    driver = "host_device" if path.startswith("/dev/") else "file"
    return {"driver": driver, "filename": path, "cache": {"direct": True}}


def _plain_filename(filename: str) -> str:
    """The image's file: QEMU describes a node whose options changed (a re-pointed backing) as
    json:{"driver": "qcow2", "file": {"filename": ...}, "backing": ...}, and an RBD image (which has no
    file) as json:{"driver": "rbd", "pool": ..., "image": ..., ...}: that one is named rbd:POOL/IMAGE."""
    if not filename.startswith("json:"):
        return filename
    options = json.loads(filename.removeprefix("json:"))
    rbd_name = name_of_node(options)
    if rbd_name is not None:
        return rbd_name
    while isinstance(options.get("file"), dict):
        options = options["file"]
    return options.get("filename", filename)


def disk_size(path: str | RbdImage, image_format: str) -> int:
    """The size the guest sees: the device's or file's, a qcow2 image's virtual size, an RBD image's."""
    if isinstance(path, RbdImage):  # qemu-img reads its size through librbd; the format is in the name
        args = [path.qemu_filename()]
    elif image_format == "raw":
        return size_of(path)
    else:
        args = ["-f", image_format, path]
    done = subprocess.run(["qemu-img", "info", "--output=json", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise QemuError(f"qemu-img info: {done.stderr.strip()}")
    return json.loads(done.stdout)["virtual-size"]


def merge_offline(overlay_path: str, volume_path: str | RbdImage, volume_format: str) -> None:
    """Merges a stopped guest's overlay into a volume with qemu-img: the overlay is first pointed at
    the volume (an unsafe rebase changes only its header: the volume holds what the overlay's
    backing held at the fence), then committed into it. An RBD image is the backing by QEMU's json:
    name, which qemu-img commit opens through librbd."""
    if isinstance(volume_path, RbdImage):
        volume_path = volume_path.qemu_filename()
    for args in (
        ["rebase", "-u", "-f", "qcow2", "-b", volume_path, "-F", volume_format, overlay_path],
        ["commit", "-q", "-f", "qcow2", overlay_path],
    ):
        done = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise QemuError(f"qemu-img {args[0]} of {overlay_path}: {done.stderr.strip()}")


__all__ = [
    "QemuError",
    "QemuGone",
    "QemuNotRunning",
    "QemuServer",
    "disk_size",
    "merge_offline",
    "names",
    "short_name",
    "volume_in_use",
]
