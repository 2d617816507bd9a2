"""Every engine x every direction among regular file, sparse file and loop device, against the
pure-Python reference: dst reads back as src and the digest matches the xxhash definition."""

from __future__ import annotations

import os
import subprocess

import pytest

import volcopy
from conftest import (
    ENGINES,
    MiB,
    fill_garbage,
    needs_root,
    needs_root_for_loop,
    read_all,
    reference_digest,
    write_layout,
)

# Odd sizes on purpose: the unaligned tail must copy through the page-cache path.
FILE_SIZE = 9 * MiB + 3333
LOOP_SIZE = 12 * MiB + 5 * 512  # a loop device is a whole number of 512-byte sectors, not of 4 KiB


def make_source(kind: str, workdir, loops):
    """Returns (path, content)."""
    if kind == "file":
        rng_extents = [(0, FILE_SIZE)]
        content = bytearray(write_layout(workdir / "src.img", FILE_SIZE, rng_extents, seed=1))
        # a run of explicit zeros inside the data: zero detection, not hole skipping, must find it
        with open(workdir / "src.img", "r+b") as f:
            f.seek(2 * MiB)
            f.write(bytes(3 * MiB + 4096))
        content[2 * MiB : 5 * MiB + 4096] = bytes(3 * MiB + 4096)
        return workdir / "src.img", bytes(content)
    if kind == "sparse":
        extents = [(MiB + 4096, 100_000), (4 * MiB, 2 * MiB + 512), (FILE_SIZE - 2000, 1000)]
        return workdir / "src.img", write_layout(workdir / "src.img", FILE_SIZE, extents, seed=2)
    if kind == "loop":
        extents = [(0, 8192), (3 * MiB - 4096, MiB), (LOOP_SIZE - 1024, 1024)]
        content = write_layout(workdir / "src-backing.img", LOOP_SIZE, extents, seed=3)
        return loops.attach(workdir / "src-backing.img"), content
    raise AssertionError(kind)


def make_destination(kind: str, workdir, loops, length: int):
    if kind == "new-file":
        return workdir / "dst.img"
    if kind == "garbage-file":
        fill_garbage(workdir / "dst.img", length + 3 * MiB)
        return workdir / "dst.img"
    if kind == "loop":
        return loops.create(length + MiB, name="dst-backing.img", garbage=True)
    raise AssertionError(kind)


SOURCES = ["file", "sparse", pytest.param("loop", marks=needs_root_for_loop)]
DESTINATIONS = ["new-file", "garbage-file", pytest.param("loop", marks=needs_root_for_loop)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("src_kind", SOURCES)
@pytest.mark.parametrize("dst_kind", DESTINATIONS)
def test_copy_reads_back_identical_and_digest_matches_reference(engine, src_kind, dst_kind, workdir, loops):
    src, content = make_source(src_kind, workdir, loops)
    dst = make_destination(dst_kind, workdir, loops, len(content))
    beyond = read_all(dst)[len(content) :] if dst_kind == "garbage-file" else None

    result = volcopy.copy(src, dst, engine=engine)

    assert read_all(dst, len(content)) == content
    assert result.digest == reference_digest(content)
    assert result.engine == engine
    assert result.size == len(content)
    assert result.bytes_read + result.bytes_skipped == len(content)
    if beyond is not None:  # bytes past length are not ours to touch
        assert read_all(dst)[len(content) :] == beyond
    if src_kind == "sparse":
        assert result.bytes_skipped > 0, "holes of a sparse file must be skipped without reading"
    if src_kind in ("file", "loop"):
        assert result.bytes_zero >= MiB, "zero blocks in read data must be detected"


@pytest.mark.parametrize("engine", ENGINES)
def test_copy_sparse_file_gives_sparse_destination(engine, workdir):
    size = 64 * MiB
    content = write_layout(workdir / "src.img", size, [(10 * MiB, MiB), (40 * MiB, 4096)], seed=4)
    fill_garbage(workdir / "dst.img", size)  # fully allocated garbage: holes must be punched back

    volcopy.copy(workdir / "src.img", workdir / "dst.img", engine=engine)

    assert read_all(workdir / "dst.img") == content
    allocated = os.stat(workdir / "dst.img").st_blocks * 512
    assert allocated < 4 * MiB, f"dst should be sparse, {allocated} bytes allocated"


@pytest.mark.parametrize("engine", ENGINES)
def test_copy_without_sparse_writes_every_byte(engine, workdir):
    content = write_layout(workdir / "src.img", 8 * MiB, [(MiB, MiB)], seed=5)

    result = volcopy.copy(workdir / "src.img", workdir / "dst.img", engine=engine, sparse=False)

    assert read_all(workdir / "dst.img") == content
    assert result.bytes_read == len(content) and result.bytes_written == len(content)
    assert result.bytes_skipped == 0 and result.bytes_zero == 0


@pytest.mark.parametrize("direct", [True, False])
def test_copy_honours_direct_option(direct, workdir):
    content = write_layout(workdir / "src.img", 4 * MiB + 100, [(0, 4 * MiB + 100)], seed=6)

    result = volcopy.copy(workdir / "src.img", workdir / "dst.img", direct=direct)

    assert result.direct is direct
    assert read_all(workdir / "dst.img") == content


@needs_root
def test_copy_on_file_system_refusing_o_direct_falls_back_to_page_cache(ramfs):
    content = write_layout(ramfs / "src.img", 3 * MiB + 17, [(0, 3 * MiB + 17)], seed=7)

    result = volcopy.copy(ramfs / "src.img", ramfs / "dst.img")

    assert result.direct is False
    assert read_all(ramfs / "dst.img") == content


@needs_root
def test_copy_with_direct_true_on_file_system_refusing_o_direct_is_refused(ramfs):
    write_layout(ramfs / "src.img", MiB, [(0, MiB)], seed=7)

    with pytest.raises(volcopy.InvalidRequest, match="refuses O_DIRECT"):
        volcopy.copy(ramfs / "src.img", ramfs / "dst.img", direct=True)
    assert not (ramfs / "dst.img").exists()


def test_copy_from_and_to_file_descriptors(workdir):
    content = write_layout(workdir / "src.img", 5 * MiB + 5, [(0, 5 * MiB + 5)], seed=8)
    fill_garbage(workdir / "dst.img", 6 * MiB)
    src_fd = os.open(workdir / "src.img", os.O_RDONLY)
    dst_fd = os.open(workdir / "dst.img", os.O_RDWR)
    try:
        result = volcopy.copy(src_fd, dst_fd)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert read_all(workdir / "dst.img", len(content)) == content
    assert result.digest == reference_digest(content)


def test_copy_of_length_copies_a_prefix(workdir):
    content = write_layout(workdir / "src.img", 6 * MiB, [(0, 6 * MiB)], seed=9)

    result = volcopy.copy(workdir / "src.img", workdir / "dst.img", length=2 * MiB + 7)

    assert read_all(workdir / "dst.img") == content[: 2 * MiB + 7]
    assert result.digest == reference_digest(content[: 2 * MiB + 7])


@pytest.mark.parametrize("block_size,queue_depth", [(MiB, 1), (4 * MiB, 3), (2 * MiB, 64)])
def test_copy_with_block_sizes_and_queue_depths(block_size, queue_depth, workdir):
    content = write_layout(
        workdir / "src.img", 19 * MiB + 512, [(MiB, 3 * MiB), (9 * MiB, 10 * MiB + 512)], seed=10
    )

    result = volcopy.copy(
        workdir / "src.img", workdir / "dst.img", block_size=block_size, queue_depth=queue_depth
    )

    assert read_all(workdir / "dst.img") == content
    assert result.digest == reference_digest(content)


def test_copy_of_an_empty_volume(workdir):
    (workdir / "src.img").touch()

    result = volcopy.copy(workdir / "src.img", workdir / "dst.img")

    assert os.path.getsize(workdir / "dst.img") == 0
    assert result.digest == reference_digest(b"")


@needs_root
def test_auto_queues_requests_for_devices_and_spreads_files_in_memory_over_threads(loops, tmp_path):
    """auto: io_uring (or aio) wherever there is a device to overlap with, the threads engine only for
    files in memory. A device node lives on devtmpfs, which must not count as memory."""
    from volcopy import _core

    queued = next(e for e in ("io_uring", "aio") if not _core.engine_unavailable_reason(e))
    src, dst = loops.create(8 * MiB, garbage=True), loops.create(8 * MiB)
    assert volcopy.copy(src, dst).engine == queued
    assert volcopy.copy(src, tmp_path / "on-disk.img").engine == queued

    memory = tmp_path / "tmpfs"
    memory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(memory)], check=True)
    try:
        write_layout(memory / "src.img", 8 * MiB, [(0, 8 * MiB)], seed=3)
        assert volcopy.copy(memory / "src.img", memory / "dst.img").engine == "threads"
    finally:
        subprocess.run(["umount", str(memory)], check=False)


def test_default_geometry_is_1_mib_x_32_and_what_the_caller_gives_is_kept(workdir):
    content = write_layout(workdir / "src.img", 8 * MiB, [(0, 8 * MiB)], seed=8)

    default = volcopy.copy(workdir / "src.img", workdir / "dst.img")
    asked = volcopy.copy(workdir / "src.img", workdir / "dst2.img", block_size=2 * MiB, queue_depth=3)

    assert (default.block_size, default.queue_depth) == (MiB, 32)
    assert (asked.block_size, asked.queue_depth) == (2 * MiB, 3)
    assert read_all(workdir / "dst.img") == content and read_all(workdir / "dst2.img") == content
