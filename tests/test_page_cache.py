"""What of a source file the page cache holds is read from it; the rest is read with O_DIRECT
(direct="auto"). Block devices are always read with O_DIRECT: their cache can be stale.

What the copy leaves in the cache is what it found there: a cold source is not pulled in, a half-cached
one stays half-cached. Residency is asked of the kernel with mincore(), as the engine does, and set up
with posix_fadvise (DONTNEED drops a file's clean pages; reads through a descriptor marked RANDOM bring
in only the pages read)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from nbd_devices import BLKFLSBUF, nbd_devices  # noqa: F401 - a fixture

import volcopy
from conftest import ENGINES, MiB, needs_root_for_loop, read_all, reference_digest

SIZE = 8 * MiB
# The benchmark harness's smoke test drops the whole machine's page cache, and these tests assert what it
# holds: one worker runs them all.
pytestmark = pytest.mark.xdist_group("machine-settings")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_bytes(path, size: int = SIZE) -> int:
    """Bytes of the first ``size`` of path that the page cache holds (fincore reads 0 for a device)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            pages = ctypes.create_string_buffer(size // mmap.PAGESIZE)
            if _libc.mincore(address, size, pages) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(byte & 1 for byte in pages.raw) * mmap.PAGESIZE
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def drop_from_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.path.isfile(path):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            fcntl.ioctl(fd, BLKFLSBUF)
    finally:
        os.close(fd)


def read_into_cache(holder: int, pieces) -> None:
    """Reads exactly these (offset, length) pieces through the page cache, without readahead."""
    os.posix_fadvise(holder, 0, 0, os.POSIX_FADV_RANDOM)
    for offset, length in pieces:
        os.pread(holder, length, offset)


@pytest.fixture
def holder(source):
    """A descriptor that reads src into the cache."""
    fd = os.open(source[0], os.O_RDONLY)
    yield fd
    os.close(fd)


@pytest.fixture
def source(tmp_path):
    """A file of SIZE random bytes on the disk's file system (ext4), written and synced, none of it in the
    page cache."""
    content = os.urandom(SIZE)
    path = tmp_path / "src.img"
    with open(path, "wb") as f:
        f.write(content)
        os.fsync(f.fileno())
    drop_from_cache(path)
    assert resident_bytes(path) == 0
    return path, content


@pytest.mark.parametrize("engine", ENGINES)
def test_a_source_the_page_cache_holds_is_read_from_it(engine, source, holder, tmp_path):
    src, content = source
    read_into_cache(holder, [(0, SIZE)])
    assert resident_bytes(src) == SIZE

    result = volcopy.copy(src, tmp_path / "dst.img", engine=engine)

    assert (result.bytes_read, result.bytes_from_cache) == (SIZE, SIZE)
    assert result.digest == reference_digest(content)
    assert read_all(tmp_path / "dst.img") == content


@pytest.mark.parametrize("engine", ENGINES)
def test_a_cold_source_is_read_with_o_direct_and_left_out_of_the_cache(engine, source, holder, tmp_path):
    src, content = source

    result = volcopy.copy(src, tmp_path / "dst.img", engine=engine)

    assert (result.bytes_read, result.bytes_from_cache) == (SIZE, 0)
    assert resident_bytes(src) == 0
    assert read_all(tmp_path / "dst.img") == content


@pytest.mark.parametrize("engine", ENGINES)
def test_a_half_cached_source_is_read_each_part_its_own_way_and_stays_half_cached(
    engine, source, holder, tmp_path
):
    """Every other 512 KiB is cached: requests split at the edges, pieces of both kinds in each slot."""
    src, content = source
    cached = [(offset, 512 * 1024) for offset in range(0, SIZE, MiB)]
    read_into_cache(holder, cached)
    assert resident_bytes(src) == SIZE // 2

    result = volcopy.copy(src, tmp_path / "dst.img", engine=engine)

    assert (result.bytes_read, result.bytes_from_cache) == (SIZE, SIZE // 2)
    assert resident_bytes(src) == SIZE // 2
    assert result.digest == reference_digest(content)
    assert read_all(tmp_path / "dst.img") == content


def test_direct_true_reads_the_disk_even_when_the_cache_holds_src(source, holder, tmp_path):
    src, content = source
    read_into_cache(holder, [(0, SIZE)])

    result = volcopy.copy(src, tmp_path / "dst.img", direct=True)

    assert (result.bytes_read, result.bytes_from_cache) == (SIZE, 0)
    assert read_all(tmp_path / "dst.img") == content


@needs_root_for_loop
def test_a_block_device_is_read_with_o_direct_even_when_its_cache_holds_it(source, loops, tmp_path):
    """Its cache goes stale when the storage is written by another name (here: the loop device's file)."""
    src, content = source
    device = loops.attach(src, read_only=True)
    holder = os.open(device, os.O_RDONLY)
    try:
        read_into_cache(holder, [(0, SIZE)])
        assert resident_bytes(device) == SIZE

        result = volcopy.copy(device, tmp_path / "dst.img")
    finally:
        os.close(holder)

    assert (result.bytes_read, result.bytes_from_cache) == (SIZE, 0)
    assert read_all(tmp_path / "dst.img") == content


@needs_root_for_loop
@pytest.mark.parametrize("engine", ENGINES)
def test_a_read_failing_past_the_cached_half_fails_there(engine, nbd_devices, request, tmp_path):  # noqa: F811
    """A file on ext4 over a disk that fails every read once armed: its first half comes from the page
    cache, and the reads of the second half fail; healed, the copy is exact."""
    device = nbd_devices.faulty(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", device.path], check=True)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", device.path, str(mountpoint)], check=True)
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(mountpoint)], check=False))
    src, content = mountpoint / "src.img", os.urandom(SIZE)
    with open(src, "wb") as f:
        f.write(content)
        os.fsync(f.fileno())
    drop_from_cache(src)
    holder = os.open(src, os.O_RDONLY)
    request.addfinalizer(lambda: os.close(holder))
    read_into_cache(holder, [(0, SIZE // 2)])
    assert resident_bytes(src) == SIZE // 2
    device.fail(read=True)

    with pytest.raises(volcopy.CopyIOError) as failed:
        volcopy.copy(src, tmp_path / "dst.img", engine=engine)

    failure = failed.value
    assert (failure.operation, failure.errno) == ("read", errno.EIO)
    assert SIZE // 2 <= failure.offset < SIZE  # a read of the uncached half (several were in flight)
    assert not (tmp_path / "dst.img").exists()  # a destination it created is removed, not left half-written
    device.heal()
    result = volcopy.copy(src, tmp_path / "dst.img", engine=engine)
    assert result.bytes_from_cache == SIZE // 2
    assert read_all(tmp_path / "dst.img") == content


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run the copy as another user (nobody)")
def test_a_caller_mincore_does_not_answer_reads_with_o_direct_and_leaves_the_cache_alone(tmp_path):
    """To a caller who neither owns nor may write a file, mincore() says every page is cached (Linux
    5.0): such a caller must not take that for the truth, read a cold file through the cache, and fill
    it. The copy runs as nobody, after importing volcopy as root (the interpreter lies under /root)."""
    directory = Path(tempfile.mkdtemp(prefix="volcopy-nobody-"))
    try:
        directory.chmod(0o777)
        src, content = directory / "src.img", os.urandom(SIZE)
        with open(src, "wb") as f:
            f.write(content)
            os.fsync(f.fileno())
        src.chmod(0o644)
        drop_from_cache(src)
        assert resident_bytes(src) == 0
        script = (
            "import json, os, sys, volcopy\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "r = volcopy.copy(sys.argv[1], sys.argv[2])\n"
            "print(json.dumps([r.bytes_read, r.bytes_from_cache]))\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", script, str(src), str(directory / "dst.img")],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(run.stdout) == [SIZE, 0]
        assert resident_bytes(src) == 0
        assert read_all(directory / "dst.img") == content
    finally:
        shutil.rmtree(directory, ignore_errors=True)
