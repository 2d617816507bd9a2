"""Shared fixtures: real loop devices, volumes with known layouts, and the pure-Python reference."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import xxhash

# The real guests and the compute agent, with their fixtures (volumes, guest, agent, compute), a real
# Keystone (keystone), a real single-node Ceph (ceph, ceph_pool), a real Redis (redis, mover_group), a
# real etcd (etcd) and the movers' journal and Migrator (fleet_journal, fleet_migrator).
pytest_plugins = [
    "compute_harness",
    "keystone_server",
    "ceph_cluster",
    "redis_server",
    "etcd_server",
    "mover_processes",
]

MiB = 1 << 20
LIBVIRT_GROUP = "libvirtd"
ENGINES = ["io_uring", "aio", "sync", "threads"]

IS_ROOT = os.geteuid() == 0
HAS_LOSETUP = shutil.which("losetup") is not None
needs_root_for_loop = pytest.mark.skipif(
    not (IS_ROOT and HAS_LOSETUP and os.path.exists("/dev/loop-control")),
    reason="loop devices need root, losetup (util-linux) and /dev/loop-control",
)
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mounts, sysctl or read-only loop devices)")


def pytest_configure(config):
    """A run started in the background (``&``, nohup) inherits SIGINT ignored, and so would every command
    the tests start: the Ctrl-C tests need it delivered, to this process and to theirs."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_itemcollected(item):
    """With pytest-xdist (``-n``), the tests of libvirt guests run on one worker: there is one libvirtd
    per host, some tests restart it, and the libvirtd fixture stops it when its session ends. Such a
    test has "libvirt" in its id (its name, or its guest's backend as parameter). Marked as each test is
    collected: xdist reads the groups in its own pytest_collection_modifyitems, which runs first."""
    if "libvirt" in item.nodeid.split("::", 1)[1]:
        item.add_marker(pytest.mark.xdist_group(LIBVIRT_GROUP))


def pytest_sessionfinish(session, exitstatus):
    """In CI nothing may be skipped: a skip there means a test that did not run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") and skipped and exitstatus == 0:
        reporter.write_line(f"CI: {skipped} test(s) skipped; every test must run in CI", red=True)
        session.exitstatus = 1


# ---------------------------------------------------------------- the reference


def reference_digest(data: bytes) -> str:
    """The digest definition, written independently with the python xxhash package."""
    chunks = b"".join(xxhash.xxh3_128(data[i : i + MiB]).digest() for i in range(0, len(data), MiB))
    return xxhash.xxh3_128(chunks).hexdigest()


def read_all(path, length: int | None = None) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read() if length is None else f.read(length)


def write_layout(path, size: int, extents: Iterable[tuple[int, int]], seed: int = 0, fill=None) -> bytes:
    """A sparse file of ``size`` bytes with random data in ``extents``; returns its content."""
    rng = np.random.default_rng(seed)
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in extents:
            data = rng.bytes(length) if fill is None else bytes([fill]) * length
            f.seek(offset)
            f.write(data)
            content[offset : offset + length] = data
    return bytes(content)


def fill_garbage(path, size: int, seed: int = 99) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        for at in range(0, size, 4 * MiB):
            f.write(rng.bytes(min(4 * MiB, size - at)))


# ---------------------------------------------------------------- loop devices


class LoopDevices:
    """Creates loop devices with direct I/O (as a cloud volume would be) and removes them after."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.devices: list[str] = []

    def attach(self, backing: Path, read_only: bool = False) -> str:
        args = ["losetup", "--direct-io=on", "--find", "--show"]
        if read_only:
            args.append("--read-only")
        out = subprocess.run(args + [str(backing)], check=True, capture_output=True, text=True)
        device = out.stdout.strip()
        self.devices.append(device)
        return device

    def create(
        self, size: int, name: str | None = None, garbage: bool = False, read_only: bool = False
    ) -> str:
        backing = self.directory / (name or f"loop-backing-{len(self.devices)}.img")
        if garbage:
            fill_garbage(backing, size)
        else:
            with open(backing, "wb") as f:
                f.truncate(size)
        return self.attach(backing, read_only=read_only)

    def detach_all(self) -> None:
        for device in self.devices:
            subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        self.devices.clear()


@pytest.fixture
def loops(tmp_path) -> Iterable[LoopDevices]:
    devices = LoopDevices(tmp_path)
    yield devices
    devices.detach_all()


@pytest.fixture
def ramfs(tmp_path) -> Iterable[Path]:
    """A ramfs mount: a file system that refuses O_DIRECT (tmpfs accepts it on recent kernels)."""
    mountpoint = tmp_path / "ramfs"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mountpoint)], check=True)
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture
def workdir(tmp_path) -> Iterable[Path]:
    """A directory on a disk file system (/tmp is on the root file system here, not tmpfs), outside
    pytest's base directory: QEMU run by libvirt, as another user, must reach into it, and pytest makes
    its base directory 0700 whenever a session starts, another run's too."""
    directory = Path(tempfile.mkdtemp(prefix=f"volcopy-{tmp_path.name}-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


Factory = Callable[..., str]


# ---------------------------------------------------------------- journals


@pytest.fixture(scope="session")
def postgres():
    from postgres_server import BIN, PostgresServer

    if BIN is None:
        pytest.skip("needs the PostgreSQL server binaries (Debian: postgresql)")
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def journal_url(request, tmp_path) -> str:
    """A fresh journal, on SQLite and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/journal.sqlite"
    return request.getfixturevalue("postgres").new_database()
