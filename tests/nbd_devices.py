"""Real block devices that fail or lose power, for tests of the engine (O_DIRECT, io_uring, AIO, threads).

The stack, one per device (there is no kernel NBD module here, so FUSE stands in for it):

    /dev/loopN  (losetup --direct-io=on)
      -> a FUSE file served by nbdfuse (one NBD connection)
        -> nbdkit, running the Python plugin tests/nbd_plugin.py over a backing file

``FaultyDevice``      reads, writes and/or flushes fail with EIO (or another errno) while armed,
                      everywhere or only where a request overlaps chosen byte ranges; or reads of
                      chosen ranges succeed with wrong bytes (silent corruption).
``PowerLossDevice``   a disk with a volatile write cache: a write is pending until a flush makes it
                      durable; ``crash()`` cuts the power (nbdkit and nbdfuse are killed: pending
                      writes are lost, every later request on the old device fails with EIO, and the
                      loop device's page cache is dropped); ``restart()`` brings up a new stack
                      (perhaps another /dev/loopN) showing only what was durable.

Both are context managers and come as fixtures (``faulty_device``, ``power_loss_device``,
``nbd_devices``): import them into a test module (``from nbd_devices import faulty_device``).

Why the Python plugin and not nbdkit's error or cache filters: in nbdkit 1.32 the error filter has
no flush errors (only pread, pwrite, trim, zero, extents, cache) and no byte ranges, and the cache
filter (cache=writeback) may write blocks back whenever it evicts them (cache-max-size), so the durable
content after a kill would not be exactly "what was flushed".

What the kernel stack does (Linux 6.18; pinned down by tests/test_nbd_devices.py, see its docstring):
a failed NBD request reaches an O_DIRECT user of /dev/loopN as EIO (the armed errno, in fact), also when
it is only part of a larger request, while a buffered read stops SHORT before a bad page; fsync and
fdatasync of /dev/loopN arrive at the plugin as NBD flushes (loop -> FUSE fsync -> nbdfuse); the kernel
never sends FUA (the loop queue says fua=0: a REQ_FUA write becomes a write and a flush).
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

MiB = 1 << 20
PLUGIN = Path(__file__).with_name("nbd_plugin.py")
BLKFLSBUF = 0x1261  # _IO(0x12, 97): write back and drop a block device's page cache

# A fault range: True (every request of that kind), or (offset, length) pairs.
Ranges = bool | Sequence[tuple[int, int]]

# ------------------------------------------------------------------ availability


@cache
def missing() -> str | None:
    """Why these devices cannot be made here, or None."""
    for binary, package in (
        ("nbdkit", "nbdkit"),
        ("nbdfuse", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
    ):
        if shutil.which(binary) is None:
            return f"needs {binary} (Debian package {package})"
    probe = subprocess.run(["nbdkit", "python", "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "needs nbdkit's Python plugin (Debian package nbdkit-plugin-python)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse (the fuse kernel module)"
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        return "loop devices need root and /dev/loop-control"
    return None


def require() -> None:
    """Skip the calling test when the stack cannot be built."""
    reason = missing()
    if reason:
        pytest.skip(reason)


def _skipif_missing():
    # A marker whose reason names the missing package (evaluated once, at import).
    reason = missing()
    return pytest.mark.skipif(reason is not None, reason=reason or "")


needs_nbd_devices = _skipif_missing()


# ------------------------------------------------------------------ the log


@dataclass(frozen=True)
class Request:
    """One NBD request as the plugin saw it (from its log)."""

    op: str  # pread, pwrite, zero, trim, flush, FAULT, or ready (a stack started: start or restart)
    offset: int = 0
    length: int = 0
    fua: bool = False
    failed: str | None = None  # for op == "FAULT": the failed operation


def _parse(line: str) -> Request | None:
    words = line.split()
    if not words:
        return None
    if words[0] in ("flush", "ready"):
        return Request(words[0])
    if words[0] == "FAULT":
        return Request("FAULT", int(words[2]), int(words[3]), failed=words[1])
    return Request(words[0], int(words[1]), int(words[2]), fua="FUA" in words)


# ------------------------------------------------------------------ the device


class NbdDevice:
    """A loop device over an nbdfuse file over nbdkit running tests/nbd_plugin.py.

    size        the disk's size in bytes (a multiple of 4096); the backing file is created with zeros
                unless ``backing`` names an existing file, which is used as it is.
    directory   where the backing file, the FUSE mount point, the socket and the log go.
    writeback   a volatile write cache (see PowerLossDevice).
    direct_io   ``losetup --direct-io=on`` (the loop device reads and writes the FUSE file with
                O_DIRECT, so no page cache sits between the loop device and nbdkit). With False, or
                if the kernel refuses it, the loop device is buffered (``self.direct_io`` says which).
    read, write, flush, errno
                faults armed from the start (see ``fail``).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        size: int = 16 * MiB,
        *,
        name: str = "nbd",
        backing: str | os.PathLike | None = None,
        writeback: bool = False,
        direct_io: bool = True,
        read: Ranges = False,
        write: Ranges = False,
        flush: bool = False,
        errno: str = "EIO",
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.size = size
        self.backing = Path(backing) if backing is not None else self.directory / f"{name}-backing.img"
        self.fuse_path = self.directory / f"{name}-fuse"  # nbdfuse mounts over this (empty) file
        self.socket = self.directory / f"{name}.sock"
        self.control = self.directory / f"{name}-faults.json"
        self.log_path = self.directory / f"{name}-requests.log"
        self.stderr_path = self.directory / f"{name}-stderr.log"
        self.writeback = writeback
        self.want_direct_io = direct_io
        self.direct_io = False
        self.path: str | None = None  # /dev/loopN while started
        self.startup_seconds = 0.0
        self._nbdkit: subprocess.Popen | None = None
        self._nbdfuse: subprocess.Popen | None = None
        self._mounted = False
        self._stderr = None
        self._initial_faults = dict(read=read, write=write, flush=flush, errno=errno)

    # ---------------------------------------------------------------- life cycle

    def start(self) -> NbdDevice:
        reason = missing()
        if reason:
            pytest.skip(reason)
        if not self.backing.exists():
            with open(self.backing, "wb") as f:
                f.truncate(self.size)
        self.size = self.backing.stat().st_size
        if any(v for k, v in self._initial_faults.items() if k != "errno"):
            self.fail(**self._initial_faults)
        else:
            self.heal()
        self.clear_log()
        try:
            self._start_stack()
        except BaseException:
            self._stop_stack()
            raise
        return self

    def stop(self) -> None:
        self._stop_stack()
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _start_stack(self) -> None:
        t0 = time.monotonic()
        for stale in (self.socket, self.directory / f"{self.name}-nbdkit.pid"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self.fuse_path.touch()
        self._stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - closed in _stop_stack
        nbdkit_pid = self.directory / f"{self.name}-nbdkit.pid"
        self._nbdkit = subprocess.Popen(
            [
                "nbdkit", "--foreground", "--exit-with-parent",
                "--unix", str(self.socket), "--pidfile", str(nbdkit_pid),
                "python", str(PLUGIN),
                f"file={self.backing}", f"control={self.control}",
                f"writeback={int(self.writeback)}", f"log={self.log_path}",
            ],
            stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr, cwd=self.directory,
        )  # fmt: skip
        self._wait_for(nbdkit_pid, self._nbdkit, "nbdkit")

        fuse_pid = self.directory / f"{self.name}-nbdfuse.pid"
        with contextlib.suppress(FileNotFoundError):
            fuse_pid.unlink()
        self._nbdfuse = subprocess.Popen(
            ["nbdfuse", "-C", "1", "-P", str(fuse_pid), str(self.fuse_path), "--unix", str(self.socket)],
            stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr, cwd=self.directory,
        )  # fmt: skip
        self._wait_for(fuse_pid, self._nbdfuse, "nbdfuse")
        self._mounted = True

        self.path, self.direct_io = self._attach()
        self.startup_seconds = time.monotonic() - t0

    def _wait_for(self, pidfile: Path, proc: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not (pidfile.exists() and pidfile.stat().st_size > 0):
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}: {self._stderr_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start in {timeout} s: {self._stderr_tail()}")
            time.sleep(0.002)

    def _stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _attach(self) -> tuple[str, bool]:
        if self.want_direct_io:
            out = subprocess.run(
                ["losetup", "--direct-io=on", "--find", "--show", str(self.fuse_path)],
                capture_output=True, text=True,
            )  # fmt: skip
            if out.returncode == 0:
                device = out.stdout.strip()
                # losetup may attach and then fail to switch direct I/O on: it says so in sysfs.
                dio = Path(f"/sys/block/{os.path.basename(device)}/loop/dio")
                return device, dio.read_text().strip() == "1"
        out = subprocess.run(
            ["losetup", "--find", "--show", str(self.fuse_path)], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"losetup {self.fuse_path}: {out.stderr.strip()}")
        return out.stdout.strip(), False

    def _stop_stack(self) -> None:
        if self.path:
            # Detaching a device that is still open only sets autoclear: it goes on last close.
            subprocess.run(["losetup", "-d", self.path], capture_output=True)
            self.path = None
        lazy = False
        if self._mounted:
            if subprocess.run(["fusermount3", "-u", str(self.fuse_path)], capture_output=True).returncode:
                # Busy (the loop device is still open somewhere) or its daemon is gone: detach lazily.
                subprocess.run(["fusermount3", "-u", "-z", str(self.fuse_path)], capture_output=True)
                lazy = True
            self._mounted = False
        if self._nbdfuse is not None:
            if lazy and self._nbdfuse.poll() is None:
                self._nbdfuse.terminate()
            _reap(self._nbdfuse, timeout=5.0)
            self._nbdfuse = None
        if self._nbdkit is not None:
            if self._nbdkit.poll() is None:
                self._nbdkit.terminate()
            _reap(self._nbdkit, timeout=5.0)
            self._nbdkit = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    # ---------------------------------------------------------------- faults

    def fail(
        self,
        read: Ranges = False,
        write: Ranges = False,
        flush: bool = False,
        errno: str = "EIO",
        delay: float = 0.0,
        corrupt: Sequence[tuple[int, int]] = (),
    ) -> None:
        """Arm faults, replacing any armed before; takes effect with the next NBD request.

        read   NBD reads fail: True for all, or those overlapping any (offset, length).
        write  NBD writes, zeroes and trims fail likewise.
        flush  NBD flushes (fsync/fdatasync of the device) fail.
        errno  the error's name, one the NBD protocol carries: EIO, ENOSPC, EPERM, EINVAL, ENOMEM,
               EOVERFLOW, ESHUTDOWN (others arrive as EINVAL).
        delay  seconds every request takes before it is served: a slow disk.
        corrupt  reads overlapping these (offset, length) succeed with every byte there inverted: a
               disk that silently returns wrong data.
        """
        if not hasattr(errno_module, errno):
            raise ValueError(f"unknown errno {errno}")

        def ranges(value):
            if value is True or value is False:
                return value
            return [[int(o), int(n)] for o, n in value]

        spec = {
            "errno": errno,
            "read": ranges(read),
            "write": ranges(write),
            "flush": bool(flush),
            "delay": float(delay),
            "corrupt": ranges(list(corrupt)),
        }
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec))
        os.replace(tmp, self.control)  # a new inode: the plugin notices at its next request

    def heal(self) -> None:
        """Disarm every fault."""
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()

    disarm = heal

    @contextlib.contextmanager
    def failing(self, **faults) -> Iterator[None]:
        """``with dev.failing(read=[(0, 4096)]): ...`` arms faults for the block, then disarms."""
        self.fail(**faults)
        try:
            yield
        finally:
            self.heal()

    # ---------------------------------------------------------------- inspection

    def requests(self) -> list[Request]:
        """Every NBD request the plugin received since ``start`` (or ``clear_log``), in order, across
        restarts (each stack's first entry is a ``ready``)."""
        try:
            lines = self.log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [r for r in map(_parse, lines) if r is not None]

    def flushes(self) -> int:
        return sum(r.op == "flush" for r in self.requests())

    def clear_log(self) -> None:
        # The plugin appends (O_APPEND), so truncating in place is safe.
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.log_path, 0)

    def backing_bytes(self, offset: int = 0, length: int | None = None) -> bytes:
        """The backing file's content (for PowerLossDevice: what is durable)."""
        with open(self.backing, "rb") as f:
            f.seek(offset)
            return f.read(self.size - offset if length is None else length)

    def __repr__(self):
        return f"<{type(self).__name__} {self.path} over {self.backing}>"


class FaultyDevice(NbdDevice):
    """A device that fails with EIO (or another errno) while armed; writes go straight to the backing.

    ``fail(read=..., write=..., flush=..., errno=...)`` arms, ``heal()`` (or ``disarm()``) disarms,
    ``failing(...)`` does both around a block; the same keyword arguments to the constructor arm it
    from the start.
    """


class PowerLossDevice(NbdDevice):
    """A device with a volatile write cache that can lose power.

    Writes stay pending in nbdkit's memory (reads see them) until a flush (fsync/fdatasync of
    the loop device) copies them into the backing file; ``crash()`` kills nbdkit (and nbdfuse), so every
    pending write is lost and every later request on ``path`` fails (EIO); ``restart()`` builds a new
    stack over the same backing file and returns the new ``path`` (re-read ``path`` after it: the loop
    device number may change); it shows only durable content. ``restart()`` without ``crash()`` first
    crashes first. Faults can be armed as on FaultyDevice.
    """

    def __init__(self, directory, size: int = 16 * MiB, **kwargs):
        kwargs.setdefault("writeback", True)
        super().__init__(directory, size, **kwargs)
        self.crashed = False

    def crash(self) -> None:
        """Power cut: pending writes are gone; I/O on ``path`` fails from now on."""
        # The moment of the cut: nbdkit stops dead (what it has not written to the backing file is
        # lost). Then nbdfuse goes, so that the FUSE connection is aborted and every request, in flight
        # or later, fails with EIO at the loop device. (Killing nbdkit alone leaves nbdfuse 1.14 on a
        # dead connection: it answers some requests EINVAL, then aborts on an assertion.)
        if self._nbdkit is not None and self._nbdkit.poll() is None:
            self._nbdkit.send_signal(signal.SIGSTOP)
        if self._nbdfuse is not None and self._nbdfuse.poll() is None:
            self._nbdfuse.send_signal(signal.SIGKILL)
            self._nbdfuse.wait()
        if self._nbdkit is not None and self._nbdkit.poll() is None:
            self._nbdkit.send_signal(signal.SIGKILL)
            self._nbdkit.wait()
        self.crashed = True
        # Nothing cached above the dead device may serve data the disk never kept: drop the loop
        # device's page cache (buffered writes in it fail to write back, then the pages go).
        if self.path:
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    fcntl.ioctl(fd, BLKFLSBUF)
                except OSError:
                    pass
                finally:
                    os.close(fd)

    def restart(self) -> str:
        """Power back on: a new nbdkit, nbdfuse and loop device over the durable content."""
        if not self.crashed:
            self.crash()
        self._stop_stack()
        self._start_stack()
        self.crashed = False
        return self.path

    def pending(self) -> bool:
        """Whether the device holds writes not yet flushed (judged from the request log)."""
        for r in reversed(self.requests()):
            if r.op in ("flush", "ready"):
                return False
            if r.op in ("pwrite", "zero", "trim") and not r.fua:
                return True
        return False


def _reap(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ fixtures


class NbdDevices:
    """Makes devices and stops them all after the test."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.devices: list[NbdDevice] = []

    def faulty(self, size: int = 16 * MiB, **kwargs) -> FaultyDevice:
        return self._add(FaultyDevice(self.directory, size, name=f"faulty{len(self.devices)}", **kwargs))

    def power_loss(self, size: int = 16 * MiB, **kwargs) -> PowerLossDevice:
        return self._add(PowerLossDevice(self.directory, size, name=f"plp{len(self.devices)}", **kwargs))

    def _add(self, device):
        self.devices.append(device)
        return device.start()

    def stop_all(self) -> None:
        for device in reversed(self.devices):
            device.stop()
        self.devices.clear()


@pytest.fixture
def nbd_devices(tmp_path) -> Iterable[NbdDevices]:
    require()
    devices = NbdDevices(tmp_path / "nbd")
    yield devices
    devices.stop_all()


@pytest.fixture
def faulty_device(nbd_devices) -> FaultyDevice:
    """A 16 MiB FaultyDevice, disarmed."""
    return nbd_devices.faulty()


@pytest.fixture
def power_loss_device(nbd_devices) -> PowerLossDevice:
    """A 16 MiB PowerLossDevice, zeroed."""
    return nbd_devices.power_loss()
