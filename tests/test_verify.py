"""copy(verify=True) reads dst back while the copy runs, behind what the copy has written, not in a
second pass: an exact copy is verified, a disk that returns wrong bytes is caught at the first of them,
and a copy that fails or is cancelled stops its read-back too (no engine is left reading a volume that
is about to be closed)."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
from nbd_devices import nbd_devices  # noqa: F401 - a fixture

import volcopy
from conftest import ENGINES, MiB, fill_garbage, needs_root_for_loop, read_all, reference_digest, write_layout
from volcopy import _core
from volcopy.migration import MigrationCancelled, Migrator
from volcopy.volume import open_source

SIZE = 16 * MiB + 12345  # an unaligned tail, read and written through the page cache
DEVICE_SIZE = 17 * MiB  # a loop device holds whole sectors: dst devices are larger than src
# Data, holes and a run of zeros: the copy reads, writes and zeroes (dst holds garbage before).
LAYOUT = [(0, 3 * MiB), (5 * MiB, 2 * MiB), (9 * MiB, 4 * MiB), (14 * MiB, SIZE - 14 * MiB)]


@pytest.fixture
def source(workdir):
    content = bytearray(write_layout(workdir / "src.img", SIZE, LAYOUT, seed=5))
    with open(workdir / "src.img", "r+b") as f:
        f.seek(10 * MiB)
        f.write(bytes(2 * MiB))
    content[10 * MiB : 12 * MiB] = bytes(2 * MiB)
    return workdir / "src.img", bytes(content)


@pytest.fixture(params=["file", "loop"])
def destination(request, workdir):
    path = workdir / "dst.img"
    fill_garbage(path, SIZE if request.param == "file" else DEVICE_SIZE)
    if request.param == "file":
        return path
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    return request.getfixturevalue("loops").attach(path)


def engines_left() -> list[str]:
    """The engine threads still running a moment after the call returned."""
    deadline = time.monotonic() + 2.0
    while True:
        left = [t.name for t in threading.enumerate() if t.name == "volcopy-engine"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_copy_verified_while_it_runs_is_exact(engine, source, destination):
    src, content = source

    result = volcopy.copy(src, destination, engine=engine, verify=True)

    assert result.verified
    assert read_all(destination, SIZE) == content


@needs_root_for_loop
@pytest.mark.parametrize("engine", ENGINES)
def test_a_disk_that_returns_wrong_bytes_fails_verification_at_the_first(engine, source, nbd_devices):  # noqa: F811
    src, _ = source
    dst = nbd_devices.faulty(DEVICE_SIZE)
    bad = 9 * MiB + 4096 + 17
    dst.fail(corrupt=[(bad, 100)])

    with pytest.raises(volcopy.VerifyError) as failed:
        volcopy.copy(src, dst.path, engine=engine, verify=True)

    assert failed.value.offset == bad
    assert engines_left() == []


@needs_root_for_loop
def test_a_copy_that_fails_stops_its_read_back(source, nbd_devices, workdir):  # noqa: F811
    _, content = source
    src = nbd_devices.faulty(DEVICE_SIZE)
    with open(src.path, "r+b", buffering=0) as f:
        f.write(content)
    src.fail(read=[(12 * MiB, 4096)])

    with pytest.raises(volcopy.CopyIOError) as failed:
        volcopy.copy(src.path, workdir / "dst.img", verify=True, direct=True)

    failure = failed.value
    assert (failure.operation, failure.errno, failure.filename) == ("read", errno.EIO, src.path)
    assert engines_left() == []
    assert not (workdir / "dst.img").exists()  # a destination it created is removed


@needs_root_for_loop
def test_a_read_back_that_fails_is_reported_against_dst(source, nbd_devices):  # noqa: F811
    src, _ = source
    dst = nbd_devices.faulty(DEVICE_SIZE)
    dst.fail(read=[(5 * MiB, 4096)])

    with pytest.raises(volcopy.CopyIOError) as failed:
        volcopy.copy(src, dst.path, verify=True)

    failure = failed.value
    assert (failure.operation, failure.errno, failure.filename) == ("read", errno.EIO, dst.path)
    assert failure.offset == 5 * MiB
    assert engines_left() == []


@needs_root_for_loop
def test_a_cancelled_verified_copy_stops_both_engines(source, nbd_devices):  # noqa: F811
    src, _ = source
    dst = nbd_devices.faulty(DEVICE_SIZE)
    dst.fail(delay=0.2)  # a slow disk: the copy is still running when it is cancelled
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()

    with pytest.raises(volcopy.Cancelled):
        volcopy.copy(src, dst.path, verify=True, cancel=cancel)

    assert engines_left() == []


@needs_root_for_loop
def test_a_read_back_that_fails_stops_the_copy(source, nbd_devices, workdir):  # noqa: F811
    """The copy does not run on to the end of a volume whose read-back has already failed."""
    src, _ = source
    dst = nbd_devices.faulty(DEVICE_SIZE)
    with open(dst.path, "r+b", buffering=0) as f:
        f.write(b"\xa5" * DEVICE_SIZE)
    dst.fail(read=[(MiB, 4096)], delay=0.05)  # a slow disk, so that the copy is still running

    with pytest.raises(volcopy.CopyIOError) as failed:
        volcopy.copy(src, dst.path, verify=True, queue_depth=2)

    assert (failed.value.operation, failed.value.filename) == ("read", dst.path)
    dst.heal()
    with open(dst.path, "rb", buffering=0) as f:
        assert f.read()[-MiB:] == b"\xa5" * MiB  # the copy stopped before the end
    assert engines_left() == []


def test_the_read_back_asks_for_extents_again_past_where_it_last_could(workdir):
    """An extent map asked for up to the copy's watermark says nothing of what lies past it: once the
    watermark has moved on, the read-back asks again. Throttled on one slot, so that the watermark moves
    while a unit is still being read."""
    path = write_layout(workdir / "dst.img", 4 * MiB, [(0, MiB // 2), (5 * MiB // 2, MiB // 2)], seed=6)
    written = _core.Watermark()
    written.cell[0] = 2 * MiB
    threading.Timer(0.1, written.cell.__setitem__, (0, 4 * MiB)).start()

    with open_source(workdir / "dst.img") as volume:
        readback = _core.run(
            volume.endpoint(),
            None,
            length=4 * MiB,
            engine="auto",
            block_size=MiB,
            queue_depth=1,
            sparse=True,
            dst_is_zero=False,
            digest=True,
            rate_limit=MiB,
            extents=None,
            checkpoint=None,
            fingerprints=None,
            dst_new=False,
            progress=None,
            readable_until=written,
        )

    assert readback.digest == reference_digest(path)


@needs_root_for_loop
def test_a_migration_reading_back_wrong_bytes_is_cancelled(source, nbd_devices, workdir):  # noqa: F811
    """A migration verifies with the same read-back, while it copies: the copy step fails where dst
    returned wrong bytes, and the migration is cancelled."""
    src, _ = source
    dst = nbd_devices.faulty(DEVICE_SIZE)
    dst.fail(corrupt=[(9 * MiB + 100, 10)])
    migrator = Migrator(f"sqlite:///{workdir}/journal.sqlite")

    with pytest.raises(MigrationCancelled, match="dst differs from src") as raised:
        migrator.migrate(str(src), dst.path)

    m = migrator.status(raised.value.migration_id)
    assert m.state == "cancelled" and not m.dst_valid
    copy_step = next(s for s in migrator.steps(m.id) if s.name == "copy")
    assert copy_step.status == "failed" and f"at offset {9 * MiB + 100}" in copy_step.detail
