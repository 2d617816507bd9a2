"""Real QEMU guests, a guest writer, and the compute agent as a subprocess, for the handoff tests.

The guest is a small Linux whose /init writes 4 KiB blocks with O_DIRECT and logs each one on its
console, so every write takes the path a guest's write takes (through the overlay when one is on top),
and the test keeps a model of what the guest's disk must hold. It runs in a QEMU the agent reaches over
QMP (Guest), or in a libvirt domain (LibvirtGuest, the same kernel, initramfs and console writer), as on a
Nova compute host: the ``guest`` fixture takes "qmp" or "libvirt" as its parameter.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from conftest import LIBVIRT_GROUP, MiB, needs_root_for_loop, read_all

BLOCK = 4096
INITIAL = 0xA5  # every block of the volume starts with this byte
TOKEN = "test-token-0123456789abcdef"
REQUEST_TIMEOUT = 3  # seconds a connection may send nothing
QEMU = shutil.which("qemu-system-x86_64")
BUSYBOX = shutil.which("busybox")
KERNELS = sorted(glob.glob("/boot/vmlinuz-*"))
KERNEL = KERNELS[-1] if KERNELS else None
SIZE = 64 * MiB  # of each test volume
# The server's id is a UUID, as Nova's are: a libvirt domain is found by it. A new one for each test
# run, so that two runs on one host (one libvirtd) never take each other's domains.
SERVER, SRC_ATT, DST_ATT = str(uuid.uuid4()), "att-src-1", "att-dst-1"
SERVER_2 = str(uuid.uuid4())  # a second guest's server, for the tests with two
LIBVIRT_URI = "qemu:///system"
LIBVIRTD, VIRTLOGD = (
    shutil.which("libvirtd", path="/usr/sbin:/usr/bin"),
    shutil.which("virtlogd", path="/usr/sbin:/usr/bin"),
)

needs_guest = [
    needs_root_for_loop,
    pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64 (Debian: qemu-system-x86)"),
    pytest.mark.skipif(
        KERNEL is None or BUSYBOX is None,
        reason="the guest needs a kernel in /boot and busybox (Debian: linux-image-cloud-amd64, "
        "busybox-static)",
    ),
]

GUEST_MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
]

# The guest's /init: a writer that puts 4 KiB of one byte at a random block of /dev/vda with O_DIRECT and
# logs "W <block> <byte>" once the write is done, so that the log is the exact order of completed writes.
# Commands come on the console: start, stop (then "STOPPED"), md5 (what the guest reads), discard (the
# first 4 MiB, then "DISCARDED"), flush (the disk's write cache, then "FLUSHED"), "fill <first block>
# <count> <byte>" (count blocks in one O_DIRECT dd, then "F <first> <count> <byte>"; with the writer
# stopped, so that the order of writes stays known), halt.
GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in MODULES; do insmod /modules/$m.ko 2>/dev/null; done
while [ ! -b /dev/vda ]; do sleep 0.05; done
writer() {
  n=0
  while [ ! -e /tmp/stop ]; do
    block=$(( (RANDOM * 32768 + RANDOM) % BLOCKS )); byte=$(( n % 250 + 1 ))
    [ $byte -eq 165 ] && byte=251
    if dd if=/patterns/$byte of=/dev/vda bs=4096 seek=$block count=1 oflag=direct conv=notrunc 2>/dev/null
    then echo "W $block $byte"; else echo "ERROR writing block $block"; fi
    n=$(( n + 1 ))
  done
  echo STOPPED
}
stty -echo  # the console must not echo commands into the middle of the writer's log lines
echo READY
while read -r command; do
  case "$command" in
    start) rm -f /tmp/stop; writer & ;;
    stop) touch /tmp/stop; wait ;;
    md5) echo 3 > /proc/sys/vm/drop_caches; echo "MD5 $(md5sum < /dev/vda | cut -d' ' -f1)" ;;
    discard) blkdiscard -o 0 -l 4194304 /dev/vda && echo DISCARDED ;;
    fill\\ *) set -- $command; octal=$(printf '%03o' $4)
      if dd if=/dev/zero bs=4096 count=$3 2>/dev/null | tr '\\000' "\\\\$octal" |
         dd of=/dev/vda bs=4096 seek=$2 oflag=direct iflag=fullblock conv=notrunc 2>/dev/null
      then echo "F $2 $3 $4"; else echo "ERROR filling from block $2"; fi ;;
    flush) sync /dev/vda && echo FLUSHED ;;
    halt) poweroff -f ;;
  esac
done
"""


# The guest's kernel command line. The crypto self-tests take a tenth of a TCG boot, and nothing here
# uses the kernel's crypto.
CMDLINE = "console=ttyS0 quiet loglevel=0 panic=-1 cryptomgr.notests"
# The compressed payload of a bzImage, by its format's magic: (magic, the command that decompresses it).
_PAYLOADS = [
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\xfd7zXZ\x00", ["xz", "-dc"]),
    (b"\x1f\x8b\x08", ["gzip", "-dc"]),
]
# Where the unpacked kernel is kept: root's, not /tmp, where another user could take its name first.
CACHE = Path("/var/cache/volcopy-tests")


def guest_kernel() -> str:
    """KERNEL as an uncompressed ELF (vmlinux), which QEMU starts at its PVH entry: a TCG guest then skips
    the bzImage's decompression and real-mode setup (about 1 s of its 3 s boot here). Made once per
    kernel and kept in CACHE (readable by libvirt's QEMU user); KERNEL itself if it cannot be unpacked."""
    stat = os.stat(KERNEL)
    unpacked = CACHE / f"{os.path.basename(KERNEL)}-{stat.st_mtime_ns}.vmlinux"
    if unpacked.exists():
        return str(unpacked)
    data = Path(KERNEL).read_bytes()
    for magic, command in _PAYLOADS:
        at = data.find(magic)
        if at < 0 or shutil.which(command[0]) is None:
            continue
        # a decompressor stops at the payload's end and complains of what follows: its status is no guide
        run = subprocess.run(command, input=data[at:], capture_output=True)
        if run.stdout[:4] == b"\x7fELF":
            unpacked.parent.mkdir(parents=True, exist_ok=True)
            unpacked.parent.chmod(0o755)  # whatever the umask: libvirt's QEMU user reads the kernel
            partial = unpacked.with_suffix(f".{os.getpid()}")  # two test workers may unpack at once
            partial.write_bytes(run.stdout)
            partial.chmod(0o644)
            partial.rename(unpacked)
            return str(unpacked)
    return KERNEL


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An initramfs archive (cpio "newc"): (name, mode, data) entries; data of a symlink is its target."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.extend(b"\0" * (-len(out) % 4))  # the name, then the data, each padded to 4 bytes
        out.extend(data + b"\0" * (-len(data) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def build_initramfs(path: Path, size: int) -> None:
    version = os.path.basename(KERNEL).removeprefix("vmlinuz-")
    entries = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "tmp", "modules", "patterns")]
    entries.append(("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes()))
    init = GUEST_INIT.replace("MODULES", " ".join(GUEST_MODULES)).replace("BLOCKS", str(size // BLOCK))
    entries.append(("init", 0o100755, init.encode()))
    for module in GUEST_MODULES:
        found = glob.glob(f"/lib/modules/{version}/kernel/**/{module}.ko", recursive=True)
        if found:  # absent when built into the kernel
            entries.append((f"modules/{module}.ko", 0o100644, Path(found[0]).read_bytes()))
    for byte in range(1, 256):
        entries.append((f"patterns/{byte}", 0o100644, bytes([byte]) * BLOCK))
    path.write_bytes(_cpio_newc(entries))


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class Guest:
    """A real Linux guest in QEMU with one virtio-blk disk on a raw volume: a file, a device, or a Ceph
    RBD image (``rbd:POOL/IMAGE:conf=PATH``, opened by QEMU's rbd driver). Its writes go through the
    disk's BlockBackend as any guest's do; the test reads them back from its console log."""

    def __init__(
        self, workdir: Path, name: str, volume: str, size: int, shared: bool = False, read_only: bool = False
    ):
        """shared: the volume is multi-attached (another guest writes it too), as Nova sets it up.
        read_only: a read-only attachment (which another guest may write)."""
        self.workdir, self.name, self.volume, self.size, self.shared = workdir, name, volume, size, shared
        self.read_only = read_only
        self.node, self.qdev = f"vol-{name}", f"disk-{name}"
        self.agent_socket = str(workdir / f"{name}-agent.qmp")
        self.pidfile = str(workdir / f"{name}-qemu.pid")
        self.test_socket = str(workdir / f"{name}-test.qmp")
        self.console_socket = str(workdir / f"{name}-console.sock")
        self.log = workdir / f"{name}-qemu.log"
        self.process: subprocess.Popen | None = None
        self.monitor: QEMUMonitorProtocol | None = None
        self.console: socket.socket | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        initramfs = self.workdir / f"{self.name}-initramfs.cpio"
        build_initramfs(initramfs, self.size)
        if self.volume.startswith("rbd:"):
            from volcopy.compute.rbd import from_name

            file = {"driver": "rbd", **from_name(self.volume).blockdev()}
        else:
            driver = "host_device" if self.volume.startswith("/dev/") else "file"
            file = {"driver": driver, "filename": self.volume}
        blockdev = {"driver": "raw", "node-name": self.node, "file": file | {"cache": {"direct": True}}}
        device = f"virtio-blk-pci,drive={self.node},id={self.qdev}"
        if self.shared:
            blockdev["file"]["locking"] = "off"
            device += ",share-rw=on"
        if self.read_only:  # as Nova attaches a multi-attached volume: sharing it with its writer
            blockdev["read-only"] = True
            device += ",share-rw=on"
        # TCG, not KVM: under nested KVM (as on this project's machines) the guest kernel hangs early
        # in boot, and a guest this small boots in seconds without it.
        args = [
            QEMU,
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "256",
            "-no-reboot",
            "-pidfile",
            self.pidfile,
            "-kernel",
            guest_kernel(),
            "-initrd",
            str(initramfs),
            "-append",
            CMDLINE,
            "-chardev",
            f"socket,id=console,path={self.console_socket},server=on,wait=off",
            "-serial",
            "chardev:console",
            "-qmp",
            f"unix:{self.agent_socket},server=on,wait=off",
            "-qmp",
            f"unix:{self.test_socket},server=on,wait=off",
            "-blockdev",
            json.dumps(blockdev),
            "-device",
            device,
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        try:
            # A socket's file appears when QEMU binds it, a moment before it listens: retry until up.
            self.console = wait_for(self._connect_console, what="QEMU's console socket")
            self._reader = threading.Thread(target=self._read_console, daemon=True)
            self._reader.start()
            self.monitor = wait_for(self._connect_monitor, what="QEMU's monitor socket")
            self.wait_line("READY", timeout=120)
        except BaseException:
            self.stop()  # a guest that did not come up must not outlive the test
            raise

    def _exited(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"QEMU failed: {self.log.read_text()}")

    def _connect_console(self) -> socket.socket | None:
        self._exited()
        console = socket.socket(socket.AF_UNIX)
        try:
            console.connect(self.console_socket)
            return console
        except (FileNotFoundError, ConnectionRefusedError):
            console.close()
            return None

    def _connect_monitor(self) -> QEMUMonitorProtocol | None:
        self._exited()
        monitor = QEMUMonitorProtocol(self.test_socket)
        try:
            monitor.connect()
            return monitor
        except (OSError, QMPError):
            return None

    def _read_console(self) -> None:
        buffer = b""
        while True:
            try:
                data = self.console.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            self.lines.extend(line.decode(errors="replace").strip("\r") for line in complete)

    def send(self, command: str) -> None:
        self.console.sendall(command.encode() + b"\n")

    def wait_line(self, prefix: str, timeout: float = 60, after: int = 0) -> str:
        def found():
            return next((line for line in self.lines[after:] if line.startswith(prefix)), None)

        return wait_for(found, timeout=timeout, what=f"guest console line {prefix!r}")

    def start_writer(self) -> None:
        self.send("start")
        mark = len(self.lines)
        self.wait_line("W ", after=mark)

    def stop_writer(self) -> None:
        mark = len(self.lines)
        self.send("stop")
        self.wait_line("STOPPED", after=mark)

    def fill(self, first: int, count: int, byte: int) -> None:
        """count blocks from block first written with byte, in one go (the writer must be stopped)."""
        mark = len(self.lines)
        self.send(f"fill {first} {count} {byte}")
        self.wait_line("F ", after=mark, timeout=120)

    @property
    def writes(self) -> list[tuple[int, int]]:
        """Every completed write of one block, in order (a fill is its blocks)."""
        done = []
        for line in list(self.lines):
            if line.startswith("W "):
                _, block, byte = line.split()
                done.append((int(block), int(byte)))
            elif line.startswith("F "):
                first, count, byte = map(int, line.split()[1:])
                done.extend((block, byte) for block in range(first, first + count))
        return done

    @property
    def errors(self) -> list[str]:
        return [line for line in self.lines if "ERROR" in line or "I/O error" in line]

    @property
    def model(self) -> bytes:
        """What the disk must hold: INITIAL everywhere, then every completed write in order."""
        content = bytearray([INITIAL]) * self.size
        for block, byte in self.writes:
            content[block * BLOCK : (block + 1) * BLOCK] = bytes([byte]) * BLOCK
        return bytes(content)

    def check_guest_reads_model(self) -> None:
        """The guest reads its whole disk (its cache dropped) and must see the model."""
        mark = len(self.lines)
        self.send("md5")
        line = self.wait_line("MD5 ", after=mark)
        assert line.split()[1] == hashlib.md5(self.model).hexdigest(), "the guest reads other data"

    def io_status_ok(self) -> bool:
        blocks = self.monitor.cmd("query-block")
        return all(b.get("io-status", "ok") == "ok" for b in blocks)

    def paused(self) -> bool:
        return self.monitor.cmd("query-status")["status"] != "running"

    def flush(self) -> None:
        """The guest flushes its disk's write cache: what it wrote is then on the disk's images."""
        mark = len(self.lines)
        self.send("flush")
        self.wait_line("FLUSHED", after=mark)

    def destroy(self) -> None:
        """QEMU killed (SIGKILL), as a host's OOM killer or an operator would: no clean shutdown."""
        self.process.kill()
        self.process.wait()

    def start_other_job(self) -> None:
        """Something else runs a block job on the disk until end_other_job(): a stream into its top image
        (from src below it), throttled to 1 MiB/s so that it outlasts the test's wait."""
        [top] = [
            b["inserted"]["node-name"]
            for b in self.monitor.cmd("query-block")
            if b.get("qdev") == self.qdev or b.get("qdev", "").startswith(f"/machine/peripheral/{self.qdev}/")
        ]
        self.monitor.cmd("block-stream", **{"job-id": "other", "device": top, "speed": MiB})

    def end_other_job(self) -> None:
        self.monitor.cmd("block-job-cancel", device="other")
        wait_for(lambda: not self.monitor.cmd("query-block-jobs"), what="the other block job to go")

    def snapshot_onto(self, overlay: str) -> None:
        """Something other than the agent (a backup, another snapshot) puts a qcow2 overlay on the disk."""
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", overlay, str(self.size)], check=True)
        file = {"driver": "file", "filename": overlay}
        self.monitor.cmd("blockdev-add", driver="qcow2", backing=None, file=file, **{"node-name": "other"})
        self.monitor.cmd("blockdev-snapshot", node=self.node, overlay="other")

    def export_disk(self) -> None:
        """Something else uses src: an NBD export of its node, in the guest's QEMU. end_export() ends it."""
        socket_path = str(self.workdir / f"{self.name}-export.sock")
        self.monitor.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": socket_path}})
        self.monitor.cmd("block-export-add", type="nbd", id="holder", **{"node-name": self.node})

    def end_export(self) -> None:
        self.monitor.cmd("block-export-del", id="holder")
        wait_for(lambda: not self.monitor.cmd("query-block-exports"), what="the export to go")

    def wait_stopped(self, timeout: float = 30) -> None:
        self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            try:
                self.monitor.cmd("quit")
            except Exception:  # noqa: BLE001 - it is going away, or never answered: killed below
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for closable in (self.monitor, self.console):
            if closable is not None:
                try:
                    closable.close()
                except (OSError, EOFError):  # QEMU closed its end first
                    pass
        self.monitor = self.console = None


class LibvirtGuest(Guest):
    """The same guest as a libvirt domain whose UUID is the server's id; its console is a unix socket
    serial port. QEMU runs as libvirt's user (libvirt-qemu), so the test's directory is made traversable
    for it. Nothing here talks to QEMU's monitor: libvirt's API only.

    The domain is transient (createXML: gone once it stops) unless persistent, as Nova's are (defineXML
    and create: it can be started again from its definition, boot(); undefined by stop())."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        volume: str,
        size: int,
        uuid: str = SERVER,
        persistent: bool = False,
        **flags,
    ):
        super().__init__(workdir, name, volume, size, **flags)
        self.uuid, self.qdev, self.node, self.persistent = uuid, "vda", "", persistent
        self.domain = None
        self._conn = None

    def _xml(self, initramfs: Path) -> str:
        kind, attr = ("block", "dev") if self.volume.startswith("/dev/") else ("file", "file")
        source = f"<source {attr}='{self.volume}'/>"
        if self.volume.startswith("rbd:"):  # a network disk: QEMU opens the image through librbd
            from volcopy.compute.rbd import from_name

            image = from_name(self.volume)
            hosts = "".join(f"<host name='{host}' port='{port}'/>" for host, port in image.servers)
            kind, source = "network", f"<source protocol='rbd' name='{image.spec}'>{hosts}</source>"
        flags = "<shareable/>" if self.shared else ""
        flags += "<readonly/><shareable/>" if self.read_only else ""
        return f"""<domain type='qemu'>
  <name>volcopy-test-{self.name}-{self.uuid[:8]}</name><uuid>{self.uuid}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{guest_kernel()}</kernel>
    <initrd>{initramfs}</initrd><cmdline>{CMDLINE}</cmdline></os>
  <cpu mode='maximum' check='none'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices><emulator>{QEMU}</emulator>
    <disk type='{kind}' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/>
      {source}<target dev='vda' bus='virtio'/>{flags}</disk>
    <serial type='unix'><source mode='bind' path='{self.console_socket}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""

    def start(self) -> None:
        import libvirt

        for directory in (self.workdir, *self.workdir.parents):  # QEMU, as libvirt-qemu, must reach in
            if str(directory).startswith("/tmp/"):
                directory.chmod(directory.stat().st_mode | 0o011)
        initramfs = self.workdir / f"{self.name}-initramfs.cpio"
        build_initramfs(initramfs, self.size)
        libvirt.registerErrorHandler(lambda ctx, err: None, None)  # errors are exceptions: no stderr
        self._conn = libvirt.open(LIBVIRT_URI)
        try:  # a domain a killed run left
            self._remove(self._conn.lookupByUUIDString(self.uuid))
        except libvirt.libvirtError:
            pass
        if self.persistent:
            self.domain = self._conn.defineXML(self._xml(initramfs))
            self.boot()
        else:
            self.domain = self._conn.createXML(self._xml(initramfs), 0)
            self._wait_ready()

    def boot(self) -> None:
        """Starts the persistent domain (again) from its definition; its writes add to the model."""
        if self.console is not None:  # a console of the previous run
            self.console.close()
        if os.path.exists(self.console_socket):
            os.unlink(self.console_socket)
        self.domain.create()
        self._wait_ready()

    def chain(self, flags: int = 0) -> list[str]:
        """The disk's images, top first: the running domain's (the persistent definition's with
        VIR_DOMAIN_XML_INACTIVE)."""
        from volcopy.compute.libvirt import disk_chain

        return disk_chain(self._live_domain(), self.qdev, flags)

    def _wait_ready(self) -> None:
        mark = len(self.lines)
        try:
            self.console = wait_for(self._connect_console, what="the domain's console socket")
            self._reader = threading.Thread(target=self._read_console, daemon=True)
            self._reader.start()
            self.wait_line("READY", timeout=120, after=mark)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _remove(domain) -> None:
        if domain.isActive():
            domain.destroy()
        if domain.isPersistent():
            domain.undefine()

    def _exited(self) -> None:
        if not self.domain.isActive():
            raise RuntimeError(f"the domain {self.uuid} stopped")

    def _live_domain(self):
        """The domain, through a new connection if libvirtd was restarted since."""
        import libvirt

        try:
            self.domain.isActive()  # a call to libvirtd: the old connection fails after its restart
        except libvirt.libvirtError:
            self._conn = libvirt.open(LIBVIRT_URI)
            self.domain = self._conn.lookupByUUIDString(self.uuid)
        return self.domain

    def running(self) -> bool:
        try:
            return bool(self._live_domain().isActive())
        except Exception:  # noqa: BLE001 - a transient domain that stopped is gone
            return False

    def wait_stopped(self, timeout: float = 30) -> None:
        wait_for(lambda: not self.running(), timeout=timeout, what="the domain to stop")

    def io_status_ok(self) -> bool:
        return self.running() and not self._live_domain().diskErrors()

    def paused(self) -> bool:
        import libvirt

        return self._live_domain().state()[0] != libvirt.VIR_DOMAIN_RUNNING

    def destroy(self) -> None:
        """virDomainDestroy, as Nova's hard stop: QEMU is killed, not shut down by its guest."""
        self._live_domain().destroy()

    def export_disk(self) -> None:
        """Something else uses the disk: a pull-mode backup job, which exports it over NBD (on a socket
        in a directory of libvirt's QEMU user). end_export() ends it."""
        exports = self.workdir / f"{self.name}-exports"
        exports.mkdir()
        shutil.chown(exports, "libvirt-qemu")
        xml = (
            f"<domainbackup mode='pull'><server transport='unix' socket='{exports}/export.sock'/><disks>"
            f"<disk name='{self.qdev}' backup='yes' type='file'><scratch file='{exports}/scratch.qcow2'/>"
            "</disk></disks></domainbackup>"
        )
        self._live_domain().backupBegin(xml, None, 0)

    def end_export(self) -> None:
        self._live_domain().abortJob()
        wait_for(lambda: not self._live_domain().blockJobInfo(self.qdev, 0), what="the backup job to go")

    def start_other_job(self) -> None:
        """Something else runs a block job on the disk until end_other_job(): a pull into its top image
        (from src below it), throttled to 1 MiB/s so that it outlasts the test's wait."""
        self._live_domain().blockPull(self.qdev, 1, 0)

    def end_other_job(self) -> None:
        self._live_domain().blockJobAbort(self.qdev, 0)
        wait_for(lambda: not self._live_domain().blockJobInfo(self.qdev, 0), what="the other block job to go")

    def snapshot_onto(self, overlay: str) -> None:
        """Something other than the agent (a backup, another snapshot) puts a qcow2 overlay on the disk:
        an external disk-only snapshot, through libvirt."""
        import libvirt

        xml = (
            f"<domainsnapshot><disks><disk name='{self.qdev}' snapshot='external' type='file'>"
            f"<driver type='qcow2'/><source file='{overlay}'/></disk></disks></domainsnapshot>"
        )
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        self._live_domain().snapshotCreateXML(xml, flags)

    def stop(self) -> None:
        if self.domain is not None:
            try:
                self._remove(self._live_domain())
            except Exception:  # noqa: BLE001 - it went away by itself meanwhile
                pass
        if self.console is not None:
            try:
                self.console.close()
            except OSError:
                pass
        self.console = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Agent:
    """``volcopy compute-agent`` in a subprocess, on a free port of 127.0.0.1.

    servers: {server_id: {"qmp": ..., "attachments": {attachment_id: {"qdev", "node", "volume"}}}}.
    settings: options of the agent's [agent] group (a list is written comma-separated); a dict is a
    whole section, e.g. ssl={"cert_file": ..., "key_file": ...}."""

    def __init__(self, workdir: Path, servers: dict, **settings):
        self.workdir = workdir
        self.config = workdir / "agent.conf"
        agent = {
            "listen": "127.0.0.1",
            "listen_port": 0,
            "auth_strategy": "static",
            "tokens": [TOKEN],
            "state_db": str(workdir / "agent.sqlite"),
            "overlay_dir": str(workdir / "overlays"),
            "allowed_connectors": ["local"],
            "allowed_device_prefixes": ["/dev/loop"],
            "request_timeout": REQUEST_TIMEOUT,
            "overlay_min_free": 16 * MiB,
        }
        sections = {"agent": agent}
        for name, value in settings.items():
            if isinstance(value, dict):
                sections.setdefault(name, {}).update(value)
            else:
                agent[name] = value
        for server_id, server in servers.items():
            sections[f"server:{server_id}"] = {k: v for k, v in server.items() if k != "attachments"}
            for attachment_id, a in server["attachments"].items():
                sections[f"attachment:{attachment_id}"] = {"server": server_id} | a
        lines = []
        for section, options in sections.items():
            lines.append(f"[{section}]")
            for key, value in options.items():
                lines.append(f"{key} = {','.join(map(str, value)) if isinstance(value, list) else value}")
            lines.append("")
        self.config.write_text("\n".join(lines))
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.log = workdir / "agent.log"

    def start(self, env: dict | None = None) -> None:
        """env: the agent's environment (a fault shim's, for one)."""
        log = open(self.log, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "volcopy.cli", "compute-agent", "--config-file", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        line = self.process.stdout.readline()
        match = re.search(r"listening on (https?://\S+)", line)
        if not match:
            raise RuntimeError(f"the agent did not start: {line!r}; log: {self.log.read_text()}")
        self.url = match.group(1)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.log.exists():  # shown by pytest when the test failed
            print(f"--- compute agent log ---\n{collapse_repeats(self.log.read_text())}")
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def collapse_repeats(log: str) -> str:
    """A log with each run of lines that differ only in their time stamp (a state polled for a minute)
    shown once with its count: a failed test's output ends in the lines that say what happened."""
    out, last, count = [], None, 0
    for line in log.splitlines():
        key = line[24:]  # past "YYYY-MM-DD HH:MM:SS.mmm "
        if key == last:
            count += 1
            continue
        if count:
            out.append(f"    ... and {count} more like it")
        out.append(line)
        last, count = key, 0
    if count:
        out.append(f"    ... and {count} more like it")
    return "\n".join(out)


def server_entry(guest: Guest, attachment_id: str) -> dict:
    if isinstance(guest, LibvirtGuest):
        return {
            "uri": LIBVIRT_URI,
            "attachments": {attachment_id: {"qdev": guest.qdev, "volume": guest.volume}},
        }
    return {
        "qmp": guest.agent_socket,
        "pidfile": guest.pidfile,
        "attachments": {attachment_id: {"qdev": guest.qdev, "node": guest.node, "volume": guest.volume}},
    }


def overlay_files(directory: Path) -> list[Path]:
    """The files in an overlay directory (each in its instance's directory), wherever they are."""
    return sorted(p for p in directory.rglob("*") if p.is_file())


def check_overlay_placement(workdir: Path, guest: Guest, generation: int, moved: bool = False) -> None:
    """The fence's overlay alone in the instance's directory of the overlay directory, 0600 (moved onto
    dst: with libvirt, complete's newtop). It stays root's with QMP; libvirt's DAC driver makes an image
    in the chain its QEMU's (libvirt-qemu:libvirt-qemu) and leaves the mode. The directories the agent
    made are 0700, 0711 with libvirt: libvirt-qemu must reach the file, and may not list them."""
    import grp
    import pwd

    libvirt_backend = isinstance(guest, LibvirtGuest)
    name = f"volcopy-{SRC_ATT}-{generation}{'-top' if moved and libvirt_backend else ''}.qcow2"
    directory = workdir / "overlays" / SERVER
    assert overlay_files(workdir / "overlays") == [directory / name]
    owner = (0, 0)
    if libvirt_backend:
        owner = (pwd.getpwnam("libvirt-qemu").pw_uid, grp.getgrnam("libvirt-qemu").gr_gid)
    st = (directory / name).stat()
    assert (st.st_mode & 0o777, (st.st_uid, st.st_gid)) == (0o600, owner)
    mode = 0o711 if libvirt_backend else 0o700
    assert [d.stat().st_mode & 0o777 for d in (workdir / "overlays", directory)] == [mode, mode]


def boot_again_on(guest: LibvirtGuest, volume: str) -> None:
    """A persistent domain, shut down and started again from its definition, boots on volume alone
    and reads every write it ever made (those made while fenced too); a write then lands on volume. The
    guest is stopped at the end."""
    import libvirt

    assert guest.chain(libvirt.VIR_DOMAIN_XML_INACTIVE) == [volume]
    if guest.running():
        guest.send("halt")
        guest.wait_stopped()
    guest.boot()
    assert guest.chain() == [volume]
    guest.check_guest_reads_model()
    guest.start_writer()
    time.sleep(0.2)
    guest.stop_writer()
    assert guest.errors == []
    guest.check_guest_reads_model()
    guest.stop()
    assert read_all(volume) == guest.model, f"{volume} lacks some of the guest's writes"


def local(path: str) -> dict:
    """Cinder's connection_info for a volume that is a local device."""
    return {"driver_volume_type": "local", "data": {"device_path": path}}


def wait_state(compute, state: str, attachment=SRC_ATT, timeout=60, server=SERVER) -> dict:
    """The attachment's migration once in state; on a timeout, the error names the state it is in."""
    seen = {}

    def reached():
        seen.update(compute.migration_state(server, attachment))
        return seen["state"] == state and dict(seen)

    try:
        return wait_for(reached, timeout=timeout, what=f"state {state}")
    except AssertionError:
        raise AssertionError(
            f"timed out waiting for state {state}: it is {seen.get('state')}, reason {seen.get('reason')!r}"
        ) from None


def fill(path, size: int, byte: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(bytes([byte]) * MiB)


# ---------------------------------------------------------------- fixtures (a pytest plugin of conftest)


@pytest.fixture
def volumes(workdir, loops):
    """src, every block INITIAL, and dst, garbage until the copy: two loop devices."""
    fill(workdir / "src-backing.img", SIZE, INITIAL)
    fill(workdir / "dst-backing.img", SIZE, 0x3C)
    return loops.attach(workdir / "src-backing.img"), loops.attach(workdir / "dst-backing.img")


@pytest.fixture
def small_overlays(request, workdir):
    """A directory for the overlays on a tmpfs of request.param bytes (8 MiB unless parametrized), for a
    guest to fill. Ask for it before the guest: libvirt starts QEMU in a mount namespace of its own, which
    sees a mount made later only where the host's mounts propagate (on this project's machines they do
    not)."""
    small = workdir / "small"
    small.mkdir()
    size = getattr(request, "param", 8 * MiB)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)], check=True)
    yield small
    subprocess.run(["umount", "-l", str(small)], check=False)


def _daemon_pid(pidfile: str) -> int | None:
    try:
        pid = int(Path(pidfile).read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start_libvirt_daemons() -> list[str]:
    """virtlogd and libvirtd (with no systemd: -d) unless they run; the pid files of those started here."""
    started = []
    for daemon, pidfile in ((VIRTLOGD, "/run/virtlogd.pid"), (LIBVIRTD, "/run/libvirtd.pid")):
        if _daemon_pid(pidfile) is None:
            subprocess.run([daemon, "-d"], check=True)
            started.append(pidfile)
    wait_for(_libvirtd_answers, timeout=60, interval=0.1, what="libvirtd to answer")
    return started


def _libvirtd_answers() -> bool:
    """libvirtd takes connections: its socket appears only once its drivers have started, and a busy
    host may take seconds for that (reconnecting to the domains it runs)."""
    import libvirt

    libvirt.registerErrorHandler(lambda ctx, err: None, None)  # a refusal here is an answer: no stderr
    try:
        libvirt.open(LIBVIRT_URI).close()
        return True
    except libvirt.libvirtError:
        return False


def stop_daemons(pidfiles: list[str]) -> None:
    for pidfile in reversed(pidfiles):
        pid = _daemon_pid(pidfile)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda p=pid: not os.path.exists(f"/proc/{p}"), what="the daemon to stop")


@pytest.fixture(scope="session")
def libvirtd():
    """virtlogd and libvirtd for the session, stopped at its end if started here."""
    if LIBVIRTD is None or VIRTLOGD is None:
        pytest.skip("needs libvirtd and virtlogd (Debian: libvirt-daemon-system)")
    started = start_libvirt_daemons()
    yield
    stop_daemons(started)


def restart_libvirtd() -> None:
    """libvirtd stopped and started again: the domains it runs keep running."""
    pid = _daemon_pid("/run/libvirtd.pid")
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="libvirtd to stop")
    subprocess.run([LIBVIRTD, "-d"], check=True)
    wait_for(_libvirtd_answers, timeout=60, interval=0.1, what="libvirtd to answer after its restart")


# Parametrize a test's guest over both backends: @pytest.mark.parametrize("guest", BACKENDS, indirect=True)
# ("libvirt-persistent": a defined domain, as Nova's are; "libvirt" is a transient one)
BACKENDS = ["qmp", "libvirt"]


@pytest.fixture
def guest(request, make_guest, volumes):
    return make_guest(getattr(request, "param", "qmp"), "a", volumes[0])


@pytest.fixture
def make_guest(request, workdir):
    """For a test that makes its guests: make_guest(backend, name, volume, server=SERVER, size=SIZE,
    **flags) is a started guest of that backend (for libvirt, the domain whose UUID is server), stopped
    at the end."""
    made = []

    def make(backend: str, name: str, volume: str, server: str = SERVER, size: int = SIZE, **flags) -> Guest:
        if backend.startswith("libvirt"):
            group = request.node.get_closest_marker("xdist_group")
            if os.environ.get("PYTEST_XDIST_WORKER") and (group is None or group.args != (LIBVIRT_GROUP,)):
                pytest.fail(
                    f"{request.node.nodeid} runs a libvirt guest: its id must name libvirt (conftest)"
                )
            request.getfixturevalue("libvirtd")
            persistent = backend == "libvirt-persistent"
            g = LibvirtGuest(workdir, name, volume, size, uuid=server, persistent=persistent, **flags)
        else:
            g = Guest(workdir, name, volume, size, **flags)
        made.append(g)
        g.start()
        return g

    yield make
    for g in made:
        g.stop()


@pytest.fixture
def agent(workdir, guest):
    a = Agent(workdir, {SERVER: server_entry(guest, SRC_ATT)})
    a.start()
    yield a
    a.stop()


@pytest.fixture
def compute(agent):
    from volcopy.compute import NovaCompute

    return NovaCompute(endpoint=agent.url, token=TOKEN)
