"""Inputs that change under a copy or between two runs of it, and volumes that share bytes: each ends in a
clear error or an exact copy, and a checkpoint is resumed only for the same src, in the same state, onto
the same dst."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import threading
import time

import pytest

import volcopy
from conftest import ENGINES, MiB, fill_garbage, needs_root_for_loop, read_all, reference_digest, write_layout
from volcopy._core import checkpoint_resume_offset

RATE = 8 * MiB  # 32 MiB takes 4 s: time to change things under it


def cancelled_with_checkpoint(src, dst, checkpoint, after: float = 0.6, **options) -> int:
    """Runs a throttled copy, cancels it after a while, and returns where its checkpoint resumes."""
    cancel = threading.Event()
    timer = threading.Timer(after, cancel.set)
    timer.start()
    with pytest.raises(volcopy.Cancelled):
        volcopy.copy(src, dst, rate_limit=RATE, cancel=cancel, checkpoint=checkpoint, **options)
    timer.join()
    return checkpoint_resume_offset(str(checkpoint))


@pytest.fixture
def dense(workdir):
    content = write_layout(workdir / "src.img", 32 * MiB, [(0, 32 * MiB)], seed=21)
    return workdir / "src.img", content


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_source_truncated_during_the_copy_is_an_error(engine, layout, workdir):
    """A dense src hits end of file on a read; a sparse one sees no data after SEEK_DATA's ENXIO. Either
    way the copy fails on the source; it never fills the missing part with zeros and succeeds. One slot
    in flight, so that the engine asks for the extents after the truncation."""
    size = 32 * MiB
    extents = [(0, size)] if layout == "dense" else [(0, 4 * MiB), (28 * MiB, 4 * MiB)]
    write_layout(workdir / "src.img", size, extents, seed=22)
    # while the first 4 MiB are read: the dense src ends at 10 MiB, the sparse one has no data after it
    threading.Timer(0.25, os.truncate, (workdir / "src.img", 10 * MiB)).start()

    with pytest.raises(volcopy.CopyIOError) as caught:
        volcopy.copy(workdir / "src.img", workdir / "dst.img", engine=engine, rate_limit=RATE, queue_depth=1)

    error = caught.value
    assert error.errno == errno.EIO
    assert error.operation == "read"
    assert error.filename == str(workdir / "src.img")
    assert error.offset == 10 * MiB
    if layout == "sparse":
        assert "the source shrank to 10485760 bytes" in str(error)
    assert not (workdir / "dst.img").exists()


def test_source_edited_between_runs_is_not_resumed(dense, workdir):
    src, _content = dense
    checkpoint = workdir / "copy.ckpt"
    assert cancelled_with_checkpoint(src, workdir / "dst.img", checkpoint) > 0
    with open(src, "r+b") as f:  # in place: same inode, same size
        f.write(b"edited")

    with pytest.raises(volcopy.CheckpointError, match="the source is another volume, or it changed since"):
        volcopy.copy(src, workdir / "dst.img", checkpoint=checkpoint)


def test_destination_recreated_between_runs_is_not_resumed(dense, workdir):
    """Deleted and created again by someone else, dst may get the same inode number (ext4 reuses it);
    its generation and birth time differ."""
    src, _content = dense
    dst, checkpoint = workdir / "dst.img", workdir / "copy.ckpt"
    assert cancelled_with_checkpoint(src, dst, checkpoint) > 0
    os.unlink(dst)
    fill_garbage(dst, 32 * MiB)

    with pytest.raises(volcopy.CheckpointError, match="the destination is another volume"):
        volcopy.copy(src, dst, checkpoint=checkpoint)


def test_destination_created_anew_is_not_resumed(dense, workdir):
    src, _content = dense
    dst, checkpoint = workdir / "dst.img", workdir / "copy.ckpt"
    assert cancelled_with_checkpoint(src, dst, checkpoint) > 0
    os.unlink(dst)

    with pytest.raises(volcopy.CheckpointError, match="belongs to another copy"):
        volcopy.copy(src, dst, checkpoint=checkpoint)
    assert not dst.exists(), "the file it created for nothing is removed"


def test_resume_with_the_same_inputs_is_exact(dense, workdir):
    src, content = dense
    dst, checkpoint = workdir / "dst.img", workdir / "copy.ckpt"
    mark = cancelled_with_checkpoint(src, dst, checkpoint)

    result = volcopy.copy(src, dst, checkpoint=checkpoint)

    assert result.resumed_from == mark > 0
    assert result.digest == reference_digest(content)
    assert read_all(dst) == content


@needs_root_for_loop
def test_destination_reattached_under_another_name_resumes(dense, workdir, loops):
    """os-brick may attach the same volume under another /dev name: a loop device is known by its
    backing file, a disk by its WWN or serial."""
    src, content = dense
    backing = workdir / "dst-backing.img"
    fill_garbage(backing, 32 * MiB)
    first = loops.attach(backing)
    checkpoint = workdir / "copy.ckpt"
    mark = cancelled_with_checkpoint(src, first, checkpoint)
    subprocess.run(["losetup", "-d", first], check=True)
    loops.devices.remove(first)
    loops.create(MiB)  # takes the free device number, so that dst comes back under another one
    second = loops.attach(backing)
    assert second != first

    result = volcopy.copy(src, second, checkpoint=checkpoint)

    assert result.resumed_from == mark > 0
    assert result.digest == reference_digest(content)
    assert read_all(second, len(content)) == content


def test_an_id_given_by_the_caller_identifies_the_destination(dense, workdir):
    src, content = dense
    dst, checkpoint = workdir / "dst.img", workdir / "copy.ckpt"
    mark = cancelled_with_checkpoint(src, dst, checkpoint, dst_id="volume-1")
    with pytest.raises(volcopy.CheckpointError, match="the destination is another volume"):
        volcopy.copy(src, dst, checkpoint=checkpoint, dst_id="volume-2")

    result = volcopy.copy(src, dst, checkpoint=checkpoint, dst_id="volume-1")

    assert result.resumed_from == mark > 0
    assert read_all(dst) == content


def test_a_checkpoint_taken_at_the_end_keeps_the_last_partial_chunk(workdir):
    """The digest of a partial last chunk must be in the checkpoint: a resume from the very end takes
    every digest from it. A progress function that takes its time makes the engine report (and, 2 s
    after the last save, checkpoint) at the moment everything is done; it then fails the final report,
    so that the copy fails with its checkpoint at the end."""
    size = 3 * MiB + 5000
    content = write_layout(workdir / "src.img", size, [(0, size)], seed=23)
    checkpoint = workdir / "copy.ckpt"
    seen_the_end = []

    def progress(done, total):
        if done == total and seen_the_end:
            raise RuntimeError("the final report")
        if done == total:
            seen_the_end.append(True)
            time.sleep(2.1)
        time.sleep(0.11)  # every turn of the engine now reports: it sees the end in the loop

    with pytest.raises(RuntimeError, match="the final report"):
        volcopy.copy(
            workdir / "src.img",
            workdir / "dst.img",
            checkpoint=checkpoint,
            progress=progress,
            rate_limit=4 * MiB,
        )
    assert checkpoint_resume_offset(str(checkpoint)) == size

    result = volcopy.copy(workdir / "src.img", workdir / "dst.img", checkpoint=checkpoint)

    assert result.resumed_from == size
    assert result.digest == reference_digest(content)


def test_buffers_beyond_1_gib_are_refused(dense, workdir):
    with pytest.raises(volcopy.InvalidRequest, match="at most 1073741824"):
        volcopy.copy(dense[0], workdir / "dst.img", block_size=64 * MiB, queue_depth=32)
    assert not (workdir / "dst.img").exists()


def write_partition_table(path, partitions: list[tuple[int, int]]) -> None:
    """An MBR with primary partitions of (start, size) in bytes, as fdisk would write it."""
    entries = b"".join(
        struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start // 512, size // 512)
        for start, size in partitions
    )
    with open(path, "r+b") as f:
        f.seek(446)
        f.write(entries.ljust(64, b"\0") + b"\x55\xaa")


@pytest.fixture
def partitioned_disk(workdir):
    """A loop device with two partitions (losetup -P). A kernel built without partition table parsers
    (this one) finds none itself: partx reads the table and adds them (BLKPG) where it did not."""
    image = workdir / "disk.img"
    fill_garbage(image, 24 * MiB)
    write_partition_table(image, [(MiB, 8 * MiB), (12 * MiB, 8 * MiB)])
    disk = subprocess.run(
        ["losetup", "--direct-io=on", "-P", "--find", "--show", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not os.path.exists(f"{disk}p2"):
        subprocess.run(["partx", "--add", disk], check=True)
    deadline = time.monotonic() + 5
    while not os.path.exists(f"{disk}p2") and time.monotonic() < deadline:
        time.sleep(0.05)
    yield disk
    subprocess.run(["losetup", "-d", disk], check=False)


@needs_root_for_loop
@pytest.mark.parametrize("direction", ["partition onto its disk", "disk onto its partition"])
def test_a_partition_and_its_disk_overlap(direction, partitioned_disk):
    disk, partition = partitioned_disk, f"{partitioned_disk}p1"
    src, dst = (partition, disk) if direction == "partition onto its disk" else (disk, partition)
    before = read_all(dst)

    with pytest.raises(volcopy.InvalidRequest, match="share bytes"):
        volcopy.copy(src, dst, length=4 * MiB)
    assert read_all(dst) == before


@needs_root_for_loop
def test_two_partitions_of_one_disk_do_not_overlap(partitioned_disk):
    first, second = f"{partitioned_disk}p1", f"{partitioned_disk}p2"
    result = volcopy.copy(first, second)
    assert read_all(second) == read_all(first)
    assert result.size == 8 * MiB


@needs_root_for_loop
def test_the_file_under_a_partitioned_loop_device_overlaps_its_partitions(partitioned_disk, workdir):
    with pytest.raises(volcopy.InvalidRequest, match="share bytes"):
        volcopy.copy(workdir / "disk.img", f"{partitioned_disk}p2", length=4 * MiB)


@needs_root_for_loop
@pytest.mark.parametrize("direction", ["onto the device under it", "onto the loop device over it"])
def test_a_loop_device_over_a_device_overlaps_it(direction, loops):
    under = loops.create(8 * MiB, garbage=True)
    over = loops.attach(under)
    src, dst = (over, under) if direction == "onto the device under it" else (under, over)
    before = read_all(dst)

    with pytest.raises(volcopy.InvalidRequest, match="share bytes"):
        volcopy.copy(src, dst)
    assert read_all(dst) == before
