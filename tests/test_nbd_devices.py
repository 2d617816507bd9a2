"""The devices of nbd_devices.py do what they claim: they fail on demand, and they lose exactly what was
not flushed.

What the stack does (Linux 6.18, nbdkit 1.32, libnbd/nbdfuse 1.14, fuse3 3.14), as these tests pin down:

* An NBD read error reaches an O_DIRECT reader of the loop device as EIO (also when the failed range is
  only part of the request; the block layer may split a 1 MiB request in two NBD requests, and one
  failed half fails the whole read). The same holds for O_DIRECT reads of the FUSE file itself.
* Buffered reads (of the loop device or of the FUSE file) go through the page cache page by page: a
  read that starts before a bad page returns SHORT (the pages before it), one that starts on it EIO.
* The errno travels: ENOSPC from the plugin is ENOSPC at the loop device.
* fsync and fdatasync of the loop device arrive as one NBD flush each (loop -> FUSE fsync -> nbdfuse
  -> NBD_CMD_FLUSH); RWF_DSYNC/O_SYNC writes arrive as a write and flushes, never as FUA (the loop
  queue has fua=0). Attaching the loop device sends one flush too.
"""

from __future__ import annotations

import mmap
import os
import subprocess

import pytest
from nbd_devices import FaultyDevice, MiB, PowerLossDevice, faulty_device, nbd_devices, power_loss_device

__all__ = ["faulty_device", "nbd_devices", "power_loss_device"]  # fixtures, used by name below

BAD = 512 * 1024  # the page the range faults aim at


def aligned(length: int, fill: bytes = b"\0") -> mmap.mmap:
    """A page-aligned buffer, as O_DIRECT wants."""
    buf = mmap.mmap(-1, length)
    buf.write(fill * (length // len(fill)))
    return buf


def read_direct(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = aligned(length)
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def write_direct(path: str, offset: int, data: bytes, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = aligned(len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], offset) == len(data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def expect_errno(errno_value: int, call, *args):
    with pytest.raises(OSError) as info:
        call(*args)
    assert info.value.errno == errno_value, info.value
    return info.value


# ------------------------------------------------------------------ FaultyDevice


def test_the_stack_is_a_direct_io_loop_device_over_fuse(faulty_device):
    dev = faulty_device
    assert dev.path.startswith("/dev/loop")
    assert dev.direct_io, "losetup --direct-io=on over the nbdfuse file"
    name = os.path.basename(dev.path)
    with open(f"/sys/block/{name}/loop/backing_file") as f:
        assert f.read().strip() == str(dev.fuse_path)
    assert dev.startup_seconds < 5


def test_read_faults_are_eio_where_armed_and_gone_when_disarmed(faulty_device):
    dev = faulty_device
    with open(dev.backing, "r+b") as f:
        f.write(b"R" * MiB)
    dev.fail(read=[(BAD, 4096)])
    expect_errno(5, read_direct, dev.path, BAD, 4096)
    expect_errno(5, read_direct, dev.path, BAD - 4096, 8192)  # overlaps
    expect_errno(5, read_direct, dev.path, 0, MiB)  # contains
    assert read_direct(dev.path, BAD + 4096, 4096) == b"R" * 4096  # beside it
    assert read_direct(dev.path, 0, 256 * 1024) == b"R" * 256 * 1024
    faults = [r for r in dev.requests() if r.op == "FAULT"]
    assert faults and all(r.failed == "pread" and r.offset <= BAD < r.offset + r.length for r in faults)

    # dd sees it too, and so does the FUSE file itself with O_DIRECT.
    dd = subprocess.run(
        ["dd", f"if={dev.path}", "of=/dev/null", "bs=4096", "count=1", f"skip={BAD // 4096}", "iflag=direct"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert dd.returncode != 0 and "Input/output error" in dd.stderr
    expect_errno(5, read_direct, dev.fuse_path, BAD, 4096)

    dev.heal()
    assert read_direct(dev.path, 0, MiB) == b"R" * MiB


def test_buffered_reads_of_a_bad_page_are_short_then_eio(faulty_device):
    """The page cache turns a failed page into a short read when pages before it were read."""
    dev = faulty_device
    with open(dev.backing, "r+b") as f:
        f.write(b"S" * MiB)
    dev.fail(read=[(BAD, 4096)])
    for path in (dev.path, dev.fuse_path):
        with open(path, "rb", buffering=0) as f:
            got = os.pread(f.fileno(), MiB, 0)
            assert 0 < len(got) <= BAD and got == b"S" * len(got)  # short, never past the bad page
            expect_errno(5, os.pread, f.fileno(), 4096, BAD)
    dev.heal()


def test_write_faults_are_eio_where_armed(faulty_device):
    dev = faulty_device
    dev.fail(write=[(BAD, 4096)])
    expect_errno(5, write_direct, dev.path, BAD, b"W" * 4096)
    write_direct(dev.path, 0, b"W" * 4096)
    assert dev.backing_bytes(0, 4096) == b"W" * 4096
    assert dev.backing_bytes(BAD, 4096) == bytes(4096)
    dev.heal()
    write_direct(dev.path, BAD, b"W" * 4096, fsync=True)
    assert dev.backing_bytes(BAD, 4096) == b"W" * 4096


def test_flush_faults_fail_fsync_and_fdatasync(faulty_device):
    dev = faulty_device
    write_direct(dev.path, 0, b"F" * 4096)
    dev.fail(flush=True)
    fd = os.open(dev.path, os.O_RDWR)
    try:
        expect_errno(5, os.fsync, fd)
        expect_errno(5, os.fdatasync, fd)
        dev.heal()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert [r.failed for r in dev.requests() if r.op == "FAULT"] == ["flush", "flush"]


def test_the_errno_is_the_one_armed(faulty_device):
    dev = faulty_device
    with dev.failing(read=True, write=True, errno="ENOSPC"):
        expect_errno(28, write_direct, dev.path, 0, b"x" * 4096)
        expect_errno(28, read_direct, dev.path, 0, 4096)
    assert read_direct(dev.path, 0, 4096) == bytes(4096)


def test_faults_armed_from_the_start(nbd_devices):
    dev = nbd_devices.faulty(8 * MiB, read=True)
    expect_errno(5, read_direct, dev.path, 0, 4096)
    write_direct(dev.path, 0, b"s" * 4096)  # only reads were armed
    dev.heal()
    assert read_direct(dev.path, 0, 4096) == b"s" * 4096


def test_fsync_reaches_the_device_as_an_nbd_flush(faulty_device):
    dev = faulty_device
    dev.clear_log()
    fd = os.open(dev.path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = aligned(4096, b"f")
        os.pwritev(fd, [buf], 0)
        assert [r.op for r in dev.requests()] == ["pwrite"]
        os.fsync(fd)
        assert [r.op for r in dev.requests()] == ["pwrite", "flush"]
        os.fdatasync(fd)
        assert [r.op for r in dev.requests()] == ["pwrite", "flush", "flush"]
    finally:
        os.close(fd)


# ------------------------------------------------------------------ PowerLossDevice


def test_power_loss_drops_exactly_the_unflushed_writes(power_loss_device):
    dev = power_loss_device
    write_direct(dev.path, 0, b"A" * MiB, fsync=True)  # durable
    assert dev.backing_bytes(0, MiB) == b"A" * MiB
    write_direct(dev.path, MiB, b"B" * MiB)  # pending
    write_direct(dev.path, 0, b"b" * 4096)  # pending, over durable data
    assert dev.pending()
    assert read_direct(dev.path, MiB, MiB) == b"B" * MiB  # the device reads its own cache
    assert dev.backing_bytes(MiB, MiB) == bytes(MiB)
    buffered = os.open(dev.path, os.O_RDWR)
    try:
        os.pwrite(buffered, b"C" * 4096, 4 * MiB)  # in the loop device's page cache only
        assert os.pread(buffered, 4096, MiB) == b"B" * 4096  # and B is cached there now

        dev.crash()

        # Nothing above the dead disk serves what it lost: every request fails.
        expect_errno(5, os.pread, buffered, 4096, MiB)
        expect_errno(5, os.pread, buffered, 4096, 4 * MiB)
        expect_errno(5, read_direct, dev.path, 0, 4096)
        expect_errno(5, write_direct, dev.path, 0, b"x" * 4096)
        expect_errno(5, os.fsync, buffered)
    finally:
        os.close(buffered)

    dev.restart()
    assert not dev.pending()
    assert read_direct(dev.path, 0, MiB) == b"A" * MiB
    assert read_direct(dev.path, MiB, MiB) == bytes(MiB)
    assert read_direct(dev.path, 4 * MiB, 4096) == bytes(4096)
    with open(dev.path, "rb") as f:  # buffered, through a fresh page cache
        assert f.read(2 * MiB) == b"A" * MiB + bytes(MiB)
    assert dev.backing_bytes(0, 2 * MiB) == b"A" * MiB + bytes(MiB)

    # The restarted device is a working disk again, with the same rules.
    write_direct(dev.path, MiB, b"D" * 4096, fsync=True)
    write_direct(dev.path, 2 * MiB, b"E" * 4096)
    dev.restart()
    assert read_direct(dev.path, MiB, 4096) == b"D" * 4096
    assert read_direct(dev.path, 2 * MiB, 4096) == bytes(4096)


def test_buffered_writes_are_durable_only_after_fsync(power_loss_device):
    dev = power_loss_device
    with open(dev.path, "r+b", buffering=0) as f:
        f.seek(0)
        f.write(b"P" * 8192)
        os.fsync(f.fileno())
        f.seek(8192)
        f.write(b"Q" * 8192)
    # Closing wrote Q back to the device, which still holds it in its volatile cache.
    assert [r.op for r in dev.requests()][-1] == "pwrite" and dev.pending()
    dev.crash()
    dev.restart()
    assert read_direct(dev.path, 0, 16384) == b"P" * 8192 + bytes(8192)


def test_everything_is_torn_down(tmp_path, monkeypatch):
    dev = PowerLossDevice(tmp_path, 8 * MiB)
    with dev:
        held = os.open(dev.path, os.O_RDONLY)  # a descriptor left open across restart and stop
        dev.restart()
        dev.crash()
    os.close(held)
    with FaultyDevice(tmp_path / "f", 8 * MiB, read=True):
        pass

    def no_loop(self):
        raise RuntimeError("losetup failed")

    with monkeypatch.context() as m, pytest.raises(RuntimeError):  # a start failing half-way cleans up
        m.setattr(PowerLossDevice, "_attach", no_loop)
        PowerLossDevice(tmp_path / "bad", 8 * MiB).start()

    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in loops
