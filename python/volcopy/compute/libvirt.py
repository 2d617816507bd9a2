"""The handoff's three steps on a libvirt domain, through libvirt's public API only (no monitor
commands, so the domain is never tainted), as functions a Nova libvirt driver could call from its Guest
object. Each takes a ``virDomain`` and a disk's target (``vda``) and returns when done, with the disk's
chain read back from the live domain XML.

- fence: an external disk-only snapshot (``DISK_ONLY | NO_METADATA | ATOMIC | REUSE_EXT``) puts a qcow2
  overlay on top of the disk; every other disk is ``snapshot='no'``. From its return on, nothing writes to
  the volume below.
- cancel (``commit``): an active block commit of the overlay into the volume below (``ACTIVE | SHALLOW |
  DELETE``), the READY event, then the pivot (``virDomainBlockJobAbort(PIVOT)``).
- complete (``copy_onto`` then ``commit``): a new qcow2 (newtop) whose backing is dst; a shallow block copy
  of the overlay into it (``SHALLOW | REUSE_EXT | TRANSIENT_JOB``; only the overlay's clusters move, and
  libvirt opens dst at the pivot), READY, the pivot; then newtop is committed into dst as for cancel.
  The copy may be started early (``start_copy``), while dst is still being written, so that complete is
  the pivot and the commit; ``abandon_copy`` takes it back.
- complete of a read-only disk (``move_read_only``, no overlay): a block copy of the disk onto dst
  (``REUSE_EXT | TRANSIENT_JOB``), READY, the pivot.

Block-job events come from libvirt's event loop: ``start_event_loop()`` registers libvirt's default
implementation and runs it on a thread of its own (call it before opening connections, as Nova does),
and ``BlockJobs(conn)`` follows one connection's block-job events, which every step waits on: no polling.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable

import libvirt

from .rbd import RbdImage, is_rbd_name

READY_TIMEOUT = 600.0  # seconds a block job has to become ready (a copy of a large overlay)
_loop_lock = threading.Lock()
_loop_started = False


class LibvirtHandoffError(Exception):
    """A step of the handoff failed; the message says which and what libvirt answered."""


def start_event_loop() -> None:
    """libvirt's default event loop on a daemon thread, once per process."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error on stderr by default; each one reaches the caller as an exception
        libvirt.registerErrorHandler(lambda ctx, err: None, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


class BlockJobs:
    """One connection's block-job events (READY, COMPLETED, FAILED, CANCELED), per domain, disk and job
    kind. Events arrive on the event loop's thread, late at times: the CANCELED of a copy just aborted
    can come after the commit that follows has started, and must not be taken for the commit's."""

    _NAMES = {
        libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
        libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
        libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "canceled",
        libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
    }

    def __init__(self, conn: libvirt.virConnect, on_event: Callable[[str, str, str], None] | None = None):
        """on_event(domain uuid, target, status) is called on the event loop's thread."""
        self._cond = threading.Condition()
        self._last: dict[tuple[str, str], str] = {}
        self._on_event = on_event
        self._id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._event, None
        )

    def _event(self, conn, dom, target, job_type, status, opaque) -> None:
        name = self._NAMES.get(status, str(status))
        with self._cond:
            self._last[(dom.UUIDString(), target, job_type)] = name
            self._cond.notify_all()
        if self._on_event:
            self._on_event(dom.UUIDString(), target, name)

    def forget(self, dom: libvirt.virDomain, target: str, kind: int) -> None:
        """Before a job of this kind starts: an older job's last event must not be taken for its."""
        with self._cond:
            self._last.pop((dom.UUIDString(), target, kind), None)

    def wait(self, dom: libvirt.virDomain, target: str, kind: int, timeout: float = READY_TIMEOUT) -> str:
        """The next status of the disk's job of this kind (a VIR_DOMAIN_BLOCK_JOB_TYPE_*): "ready",
        "completed", "failed" or "canceled"."""
        key = (dom.UUIDString(), target, kind)
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._last, timeout):
                raise LibvirtHandoffError(f"disk {target}: no block job event in {timeout:.0f} s")
            return self._last.pop(key)


# ---------------------------------------------------------------------- reading the live XML


def _disk_element(dom: libvirt.virDomain, target: str, flags: int = 0) -> ET.Element:
    for disk in ET.fromstring(dom.XMLDesc(flags)).iter("disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            return disk
    raise LibvirtHandoffError(f"domain {dom.name()} has no disk {target}")


def _source_path(element: ET.Element) -> str | None:
    """A file's or device's path; an RBD image (a network disk) as rbd:POOL/IMAGE."""
    source = element.find("source")
    if source is None:
        return None
    if element.get("type") == "network" and source.get("protocol") == "rbd":
        return f"rbd:{source.get('name')}"
    return source.get("file") or source.get("dev") or source.get("name")


def rbd_image_of(dom: libvirt.virDomain, target: str, flags: int = 0) -> RbdImage | None:
    """The RBD image on top of the disk (a network disk), with the monitors and user its definition
    gives; None when the disk is not on one."""
    element = _disk_element(dom, target, flags)
    source = element.find("source")
    if element.get("type") != "network" or source is None or source.get("protocol") != "rbd":
        return None
    pool, _, image = source.get("name", "").partition("/")
    servers = tuple((h.get("name"), h.get("port", "6789")) for h in source.findall("host"))
    auth = source.find("auth") if source.find("auth") is not None else element.find("auth")
    user = auth.get("username") if auth is not None else None
    return RbdImage(pool, image, servers=servers, user=user, auth=True if user else None)


def _source_xml(path: str, image: RbdImage | None) -> tuple[str, str]:
    """A disk's type and its <source> element, for an image path or an RBD image (a network disk,
    whose key is the libvirt secret its connection_info names, Nova's way)."""
    if image is None:
        kind, attr = _disk_type(path)
        return kind, f"<source {attr}='{path}'/>"
    hosts = "".join(f"<host name='{host}' port='{port}'/>" for host, port in image.servers)
    auth = ""
    if image.user and image.secret_uuid:
        auth = f"<auth username='{image.user}'><secret type='ceph' uuid='{image.secret_uuid}'/></auth>"
    return "network", f"<source protocol='rbd' name='{image.spec}'>{hosts}{auth}</source>"


def disk_chain(dom: libvirt.virDomain, target: str, flags: int = 0) -> list[str]:
    """The disk's images, top first, from the live domain XML (the persistent definition with
    ``VIR_DOMAIN_XML_INACTIVE``)."""
    chain, element = [], _disk_element(dom, target, flags)
    while element is not None:
        path = _source_path(element)
        if path is None:
            break
        chain.append(path)
        element = element.find("backingStore")
    return chain


def define_disk_on(
    dom: libvirt.virDomain, target: str, path: str, image_format: str, image: RbdImage | None = None
) -> None:
    """The domain's persistent definition redefined with the disk on path alone (its format
    image_format, no backing chain): the domain starts on it next time. libvirt updates the definition
    itself at the snapshot and at the copy's and the commit's pivots; an image merged offline (qemu-img)
    is not its doing. The definition is read with its secrets, so that none is lost. An RBD image
    (path rbd:POOL/IMAGE) keeps the <source> the definition has for it (its monitors, its auth), or gets
    one made from image."""
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
    disk = next(
        (d for d in root.iter("disk") if (t := d.find("target")) is not None and t.get("dev") == target), None
    )
    if disk is None:
        raise LibvirtHandoffError(f"the definition of domain {dom.name()} has no disk {target}")
    kind, source = _kept_source(disk, path)
    if source is None:
        if is_rbd_name(path) and image is None:
            raise LibvirtHandoffError(f"disk {target}: no monitors known for {path}")
        kind, text = _source_xml(path, image)
        source = ET.fromstring(text)
    disk.set("type", kind)
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        disk.insert(0, driver)
    driver.set("type", image_format)
    for element in disk.findall("backingStore") + disk.findall("source"):
        disk.remove(element)
    disk.insert(list(disk).index(driver) + 1, source)
    try:
        dom.connect().defineXML(ET.tostring(root, encoding="unicode"))
    except libvirt.libvirtError as exc:
        raise LibvirtHandoffError(f"disk {target}: redefining the domain on {path} failed: {exc}") from None


def _kept_source(disk: ET.Element, path: str) -> tuple[str, ET.Element | None]:
    """The <source> of an RBD image path in the disk's definition (on top or in its backing chain),
    with the type of the element that holds it: it says how to reach the image, as its author wrote."""
    if not is_rbd_name(path):
        return "", None
    element = disk
    while element is not None:
        if _source_path(element) == path:
            return element.get("type"), element.find("source")
        element = element.find("backingStore")
    return "", None


def disk_flags(dom: libvirt.virDomain, target: str) -> tuple[bool, bool]:
    """(the guest may write the disk, the disk is shareable: another guest may write its volume)."""
    disk = _disk_element(dom, target)
    return disk.find("readonly") is None, disk.find("shareable") is not None


def _disk_type(path: str) -> tuple[str, str]:
    return ("block", "dev") if path.startswith("/dev/") else ("file", "file")


_JOB_KINDS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}


def _job_running(dom: libvirt.virDomain, target: str, kind: int) -> bool:
    """Whether a job of this kind runs on the disk: one a previous caller left, picked up. A job of
    another kind (a backup, someone's pull) is not ours to wait for or pivot: an error."""
    info = dom.blockJobInfo(target, 0)
    if not info:
        return False
    if info["type"] != kind:
        running = _JOB_KINDS.get(info["type"], f"type {info['type']}")
        raise LibvirtHandoffError(f"disk {target}: another block job runs on it (a {running} job)")
    return True


def abort_copy(dom: libvirt.virDomain, target: str) -> None:
    """Aborts a copy job left on the disk (it would block the next try); another job is left alone."""
    try:
        info = dom.blockJobInfo(target, 0)
        if info and info["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
            dom.blockJobAbort(target, 0)
    except libvirt.libvirtError:
        pass


def _check(condition: bool, what: str, dom: libvirt.virDomain, target: str) -> None:
    if not condition:
        chain = " -> ".join(disk_chain(dom, target))
        raise LibvirtHandoffError(f"disk {target}: {what} (its chain is {chain})")


# ---------------------------------------------------------------------- the steps


def create_overlay(path: str, backing: str, backing_format: str, size: int | None = None) -> None:
    """A qcow2 image over backing, 0600: the guest's writes will land in it. With size, the backing is
    written into the header without being opened (an RBD image named by QEMU's json: form, which
    libvirt reads back from the header to know how to reach it)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
    os.chmod(path, 0o600)
    unopened = ["-u", path, str(size)] if size is not None else [path]
    made = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format, *unopened],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise LibvirtHandoffError(f"qemu-img create {path}: {made.stderr.strip()}")


def fence(dom: libvirt.virDomain, target: str, overlay: str) -> None:
    """Puts overlay (made by create_overlay over the disk's image) on top of the disk; the other disks
    are left alone. Reversion: commit()."""
    if disk_chain(dom, target)[:1] == [overlay]:
        return
    others = "".join(
        f"<disk name='{t.get('dev')}' snapshot='no'/>"
        for t in ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk/target")
        if t.get("dev") != target
    )
    xml = (
        "<domainsnapshot><disks>"
        f"<disk name='{target}' snapshot='external' type='file'>"
        f"<driver type='qcow2'/><source file='{overlay}'/></disk>{others}"
        "</disks></domainsnapshot>"
    )
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    )
    try:
        dom.snapshotCreateXML(xml, flags)
    except libvirt.libvirtError as exc:
        raise LibvirtHandoffError(f"disk {target}: the external snapshot failed: {exc}") from None
    _check(
        disk_chain(dom, target)[:1] == [overlay], f"{overlay} is not on top after the snapshot", dom, target
    )


def _pivot_when_ready(
    dom: libvirt.virDomain, target: str, jobs: BlockJobs, kind: int, before_pivot: Callable[[], None]
) -> None:
    """Waits for the READY event of the disk's job of this kind, calls before_pivot(), pivots. A job a
    previous caller left running may have been ready before we listened: its pivot is tried first."""
    what = _JOB_KINDS[kind]
    status = jobs.wait(dom, target, kind) if not _ready_already(dom, target) else "ready"
    if status != "ready":
        raise LibvirtHandoffError(f"disk {target}: the {what} job ended {status} before it was ready")
    before_pivot()
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            return
        except libvirt.libvirtError as exc:
            # A job whose cur reached end (_ready_already) before libvirt took in QEMU's READY: "not
            # ready for pivot yet", for a moment (seen on a busy host). Anything else is final.
            if exc.get_error_code() != libvirt.VIR_ERR_BLOCK_COPY_ACTIVE or time.monotonic() > deadline:
                raise LibvirtHandoffError(f"disk {target}: the pivot of the {what} failed: {exc}") from None
        time.sleep(0.05)


def _ready_already(dom: libvirt.virDomain, target: str) -> bool:
    """The live XML's <mirror ready='yes'> says so even while new writes keep cur below end, as when
    the copy was started by a caller (an agent since restarted) that got the READY event."""
    mirror = _disk_element(dom, target).find("mirror")
    if mirror is not None and mirror.get("ready") == "yes":
        return True
    info = dom.blockJobInfo(target, 0)
    return bool(info) and info.get("end", 0) > 0 and info.get("cur") == info.get("end")


def commit(
    dom: libvirt.virDomain, target: str, jobs: BlockJobs, before_pivot: Callable[[], None] = lambda: None
) -> None:
    """Merges the overlay on top into the image below it and moves the disk down onto that image; the
    overlay's file is deleted by libvirt. before_pivot() runs once the image below holds everything.
    Picks up a commit a previous caller left running."""
    chain = disk_chain(dom, target)
    _check(len(chain) >= 2, "there is no overlay to merge", dom, target)
    below = chain[1]
    if not _job_running(dom, target, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT):
        jobs.forget(dom, target, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT)
        flags = (
            libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
            | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
            | libvirt.VIR_DOMAIN_BLOCK_COMMIT_DELETE
        )
        try:
            dom.blockCommit(target, None, None, 0, flags)
        except libvirt.libvirtError as exc:
            raise LibvirtHandoffError(f"disk {target}: the block commit failed to start: {exc}") from None
    _pivot_when_ready(dom, target, jobs, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT, before_pivot)
    _check(
        disk_chain(dom, target)[:1] == [below], f"the disk is not on {below} after the commit", dom, target
    )


def start_copy(
    dom: libvirt.virDomain,
    target: str,
    jobs: BlockJobs,
    newtop: str,
    dst: str,
    dst_format: str = "raw",
    dst_image: RbdImage | None = None,
) -> None:
    """Starts the shallow copy of the overlay into newtop (made here, backed by dst) and returns
    without waiting for it: libvirt opens dst only at the pivot, so dst may still be written until
    copy_onto pivots. A copy already running (or a disk already on newtop -> dst) is left alone.
    dst_image: dst is that RBD image (dst its rbd: name); libvirt learns how to reach it from newtop's
    header."""
    chain = disk_chain(dom, target)
    if chain[:2] == [newtop, dst] or _job_running(dom, target, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY):
        return
    _check(len(chain) >= 2, "there is no overlay on top", dom, target)
    # afresh: a newtop of an earlier try may hold stale data
    if dst_image is not None:
        create_overlay(newtop, dst_image.qemu_filename(), "raw", dom.blockInfo(target, 0)[0])
    else:
        create_overlay(newtop, dst, dst_format)
    kind, attr = _disk_type(newtop)
    xml = f"<disk type='{kind}'><driver type='qcow2'/><source {attr}='{newtop}'/></disk>"
    flags = (
        libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
        | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
        | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
    )
    jobs.forget(dom, target, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY)
    try:
        dom.blockCopy(target, xml, None, flags)
    except libvirt.libvirtError as exc:
        raise LibvirtHandoffError(f"disk {target}: the block copy failed to start: {exc}") from None


def copy_onto(
    dom: libvirt.virDomain,
    target: str,
    jobs: BlockJobs,
    newtop: str,
    dst: str,
    dst_format: str = "raw",
    before_pivot: Callable[[], None] = lambda: None,
    dst_image: RbdImage | None = None,
) -> None:
    """Moves the disk from overlay -> src onto newtop -> dst: the copy start_copy started (or starts
    now), then the pivot once it is ready. dst must hold src as of the fence by then."""
    if disk_chain(dom, target)[:2] == [newtop, dst]:
        return
    start_copy(dom, target, jobs, newtop, dst, dst_format, dst_image)
    _pivot_when_ready(dom, target, jobs, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, before_pivot)
    _check(disk_chain(dom, target)[:2] == [newtop, dst], f"the disk is not on {newtop} -> {dst}", dom, target)


def abandon_copy(dom: libvirt.virDomain, target: str, newtop: str) -> None:
    """Reversion of start_copy: the copy job aborted without a pivot (the disk stays on the overlay),
    then newtop deleted, once the chain shows it is not in it."""
    if dom.isActive() and _job_running(dom, target, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY):
        try:
            dom.blockJobAbort(target, 0)  # synchronous: the job has ended on return
        except libvirt.libvirtError as exc:
            # A copy that QEMU ended on its own (its target full) before libvirt took the end in cannot
            # be cancelled; libvirt takes the end in before answering, so a second look sees no job.
            if _job_running(dom, target, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY):
                raise LibvirtHandoffError(f"disk {target}: aborting the block copy failed: {exc}") from None
    _check(newtop not in disk_chain(dom, target), f"{newtop} is in the chain", dom, target)
    if os.path.exists(newtop):
        os.unlink(newtop)


def move_read_only(
    dom: libvirt.virDomain, target: str, jobs: BlockJobs, dst: str, dst_image: RbdImage | None = None
) -> None:
    """Moves a read-only disk (no overlay: its guest writes nothing) onto dst, a raw volume: a block copy
    of the disk onto dst as it is (``REUSE_EXT | TRANSIENT_JOB``), READY, the pivot. The copy writes the
    disk's data onto dst, so dst must hold that data already (the copy of the fenced src) and no guest
    may write dst until the pivot: libvirt's block copy cannot skip the data (QEMU's sync=none)."""
    if disk_chain(dom, target) == [dst]:
        return
    if not _job_running(dom, target, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY):
        kind, source = _source_xml(dst, dst_image)
        xml = f"<disk type='{kind}'><driver type='raw'/>{source}</disk>"
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        jobs.forget(dom, target, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY)
        try:
            dom.blockCopy(target, xml, None, flags)
        except libvirt.libvirtError as exc:
            raise LibvirtHandoffError(f"disk {target}: the block copy failed to start: {exc}") from None
    _pivot_when_ready(dom, target, jobs, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, lambda: None)
    _check(disk_chain(dom, target) == [dst], f"the disk is not on {dst}", dom, target)


def complete(
    dom: libvirt.virDomain,
    target: str,
    jobs: BlockJobs,
    newtop: str,
    dst: str,
    dst_format: str = "raw",
) -> None:
    """The whole of complete: the disk onto newtop -> dst, then newtop merged into dst."""
    copy_onto(dom, target, jobs, newtop, dst, dst_format)
    commit(dom, target, jobs)


def cancel(dom: libvirt.virDomain, target: str, jobs: BlockJobs) -> None:
    """The whole of cancel: the overlay merged back into the volume below it."""
    commit(dom, target, jobs)


__all__ = [
    "BlockJobs",
    "LibvirtHandoffError",
    "abandon_copy",
    "abort_copy",
    "cancel",
    "commit",
    "complete",
    "copy_onto",
    "create_overlay",
    "define_disk_on",
    "disk_chain",
    "disk_flags",
    "fence",
    "move_read_only",
    "rbd_image_of",
    "start_copy",
    "start_event_loop",
]
