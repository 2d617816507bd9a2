"""Every bad input is refused with a clear message before any byte of dst is written; I/O failures
raise CopyIOError with errno, filename, offset and operation."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import subprocess
import sys
from contextlib import contextmanager

import pytest

import volcopy
from conftest import ENGINES, MiB, fill_garbage, needs_root, needs_root_for_loop, read_all, write_layout


@pytest.fixture
def src(workdir):
    write_layout(workdir / "src.img", 4 * MiB, [(0, 4 * MiB)], seed=1)
    return workdir / "src.img"


@pytest.fixture
def garbage_dst(workdir):
    fill_garbage(workdir / "dst.img", 4 * MiB)
    return workdir / "dst.img"


@contextmanager
def refused(match: str, dst=None, error=volcopy.InvalidRequest):
    """Asserts the refusal and that dst (if given) was left exactly as it was."""
    before = read_all(dst) if dst is not None and os.path.exists(dst) else None
    with pytest.raises(error, match=match):
        yield
    if dst is not None:
        assert (read_all(dst) if os.path.exists(dst) else None) == before


def test_missing_source_is_refused(workdir):
    with refused("does not exist"):
        volcopy.copy(workdir / "nope.img", workdir / "dst.img")
    assert not (workdir / "dst.img").exists()


def test_directory_as_source_is_refused(workdir):
    with refused("is a directory, not a volume"):
        volcopy.copy(workdir, workdir / "dst.img")


def test_character_device_as_source_is_refused(workdir):
    with refused("not a regular file or block device"):
        volcopy.copy("/dev/null", workdir / "dst.img")


def test_directory_as_destination_is_refused(src, workdir):
    with refused("is a directory"):
        volcopy.copy(src, workdir)


def test_same_file_is_refused(src):
    with refused("are the same volume", dst=src):
        volcopy.copy(src, src)


def test_same_file_through_a_symlink_is_refused(src, workdir):
    os.symlink(src, workdir / "link.img")
    with refused("are the same volume", dst=src):
        volcopy.copy(src, workdir / "link.img")


def test_same_file_through_a_hard_link_is_refused(src, workdir):
    os.link(src, workdir / "hard.img")
    with refused("are the same volume", dst=src):
        volcopy.copy(workdir / "hard.img", src)


@needs_root_for_loop
def test_same_block_device_through_another_path_is_refused(workdir, loops):
    device = loops.create(4 * MiB, garbage=True)
    os.symlink(device, workdir / "alias")
    with refused("are the same volume", dst=device):
        volcopy.copy(device, workdir / "alias")


@needs_root_for_loop
def test_loop_device_over_the_source_file_is_refused(src, loops):
    device = loops.attach(src)
    with refused("are the same volume", dst=src):
        volcopy.copy(src, device)


@needs_root_for_loop
def test_destination_device_smaller_than_length_is_refused(src, loops):
    device = loops.create(2 * MiB, garbage=True)
    with refused("less than the", dst=device):
        volcopy.copy(src, device)


def test_length_beyond_end_of_source_is_refused(src, workdir):
    with refused("beyond the end of source"):
        volcopy.copy(src, workdir / "dst.img", length=4 * MiB + 1)
    assert not (workdir / "dst.img").exists()


@needs_root_for_loop
def test_read_only_destination_device_is_refused(src, loops):
    device = loops.create(8 * MiB, garbage=True, read_only=True)
    with refused("read-only", dst=device):
        volcopy.copy(src, device)


@needs_root
def test_destination_on_read_only_file_system_is_refused(src, workdir):
    mountpoint = workdir / "ro"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mountpoint)], check=True)
    try:
        fill_garbage(mountpoint / "dst.img", MiB)
        subprocess.run(["mount", "-o", "remount,ro", str(mountpoint)], check=True)
        with refused("read-only", dst=mountpoint / "dst.img"):
            volcopy.copy(src, mountpoint / "dst.img")
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_destination_descriptor_open_read_only_is_refused(src, garbage_dst):
    fd = os.open(garbage_dst, os.O_RDONLY)
    try:
        with refused("open read-only", dst=garbage_dst):
            volcopy.copy(src, fd)
    finally:
        os.close(fd)


def test_destination_in_missing_directory_is_refused(src, workdir):
    with refused("directory does not exist"):
        volcopy.copy(src, workdir / "no" / "such" / "dst.img")


def test_a_checkpoint_path_naming_someone_s_data_is_refused_and_left_alone(src, garbage_dst, workdir):
    """A mistaken --checkpoint (here the source of another copy) is never emptied to start afresh: only
    an empty file or one that is a volcopy checkpoint is."""
    data = workdir / "other-data.img"
    content = write_layout(data, 2 * MiB, [(0, 2 * MiB)], seed=5)

    with refused(
        "is not a volcopy checkpoint: name another file, or remove it", garbage_dst, volcopy.CheckpointError
    ):
        volcopy.copy(src, garbage_dst, checkpoint=data)

    assert read_all(data) == content


@pytest.mark.parametrize(
    "options,match",
    [
        ({"block_size": 3 * 1024}, "block_size must be between"),
        ({"block_size": 3 * MiB // 2}, "multiple of 1 MiB"),
        ({"block_size": 0}, "block_size must be between"),
        ({"block_size": -MiB}, "block_size must be between"),
        ({"block_size": 128 * MiB}, "block_size must be between"),
        ({"block_size": "1M"}, "block_size must be an integer"),
        ({"queue_depth": 0}, "queue_depth must be between"),
        ({"queue_depth": 100_000}, "queue_depth must be between"),
        ({"queue_depth": 2.5}, "queue_depth must be an integer"),
        ({"length": -1}, "length must be between"),
        ({"rate_limit": 0}, "rate_limit must be between"),
        ({"rate_limit": -5}, "rate_limit must be between"),
        ({"engine": "spdk"}, "unknown engine 'spdk'"),
        ({"direct": "yes"}, "direct must be True, False or 'auto'"),
        ({"extents": [(0, 10), (5, 10)]}, "must not overlap"),
        ({"extents": [(MiB, 10), (0, 10)]}, "sorted"),
        ({"extents": [(0, 0)]}, "lengths > 0"),
        ({"extents": [(-1, 10)]}, "offsets >= 0"),
        ({"extents": [(4 * MiB - 1, 2)]}, "beyond the"),
        ({"extents": [(1, 2, 3)]}, "shape"),
        ({"extents": "everything"}, "pairs of integers"),
    ],
)
def test_nonsensical_options_are_refused(options, match, src, garbage_dst):
    with refused(match, dst=garbage_dst):
        volcopy.copy(src, garbage_dst, **options)


def test_source_of_wrong_type_is_refused(garbage_dst):
    with refused("must be a path or an open file descriptor"):
        volcopy.copy(3.5, garbage_dst)


def test_closed_descriptor_is_refused(garbage_dst):
    fd = os.open(garbage_dst, os.O_RDONLY)
    os.close(fd)
    with refused("not an open descriptor"):
        volcopy.copy(fd, garbage_dst)


def _without_io_uring() -> None:
    """In the child, before exec: io_uring_setup(2) fails with EPERM, as where io_uring is switched off
    (kernel.io_uring_disabled, a container's seccomp profile). A seccomp filter of this process alone:
    the sysctl would switch io_uring off for the tests running beside this one too."""
    audit_arch_x86_64, nr_io_uring_setup = 0xC000003E, 425
    load, jump_if_equal, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, fail_with = 0x7FFF0000, 0x00050000  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
    program = [
        (load, 0, 0, 4),  # seccomp_data.arch
        (jump_if_equal, 1, 0, audit_arch_x86_64),
        (ret, 0, 0, allow),
        (load, 0, 0, 0),  # seccomp_data.nr
        (jump_if_equal, 0, 1, nr_io_uring_setup),
        (ret, 0, 0, fail_with | errno.EPERM),
        (ret, 0, 0, allow),
    ]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *f) for f in program))
    fprog = struct.pack("HxxxxxxQ", len(program), ctypes.addressof(filters))  # struct sock_fprog
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_NO_NEW_PRIVS, then PR_SET_SECCOMP with SECCOMP_MODE_FILTER
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0):
        os._exit(99)


_REFUSED_THEN_AUTO = """
import sys, volcopy
src, dst = sys.argv[1:3]
before = open(dst, "rb").read()
try:
    volcopy.copy(src, dst, engine="io_uring")
except volcopy.EngineUnavailable as exc:
    print("refused:", exc, "| dst untouched:", open(dst, "rb").read() == before)
print("auto:", volcopy.copy(src, dst).engine)
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter names x86_64's syscalls")
def test_engine_not_available_here_is_refused_with_the_reason(src, garbage_dst):
    run = subprocess.run(
        [sys.executable, "-c", _REFUSED_THEN_AUTO, str(src), str(garbage_dst)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_without_io_uring,
    )

    assert run.returncode == 0, run.stderr
    refusal, fallback = run.stdout.splitlines()
    assert refusal.startswith("refused: engine io_uring is not available here: io_uring_queue_init: ")
    assert refusal.endswith(
        "(io_uring is switched off here: kernel.io_uring_disabled, or a seccomp profile)"
        " | dst untouched: True"
    )
    assert fallback == "auto: aio"  # the next best
    assert read_all(garbage_dst) == read_all(src)


@needs_root
@pytest.mark.parametrize("engine", ENGINES)
def test_io_failure_raises_copy_io_error_with_where_and_what(engine, workdir):
    """A destination on a full file system: ENOSPC on a write (in a worker thread for the threads
    engine), reported with file and offset."""
    mountpoint = workdir / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)], check=True)
    try:
        write_layout(workdir / "src.img", 8 * MiB, [(0, 8 * MiB)], seed=2)
        dst = mountpoint / "dst.img"
        with pytest.raises(volcopy.CopyIOError) as caught:
            volcopy.copy(workdir / "src.img", dst, engine=engine)
        error = caught.value
        assert isinstance(error, OSError)
        assert error.errno == errno.ENOSPC
        assert error.filename == str(dst)
        assert error.operation == "write"
        assert 0 <= error.offset < 8 * MiB
        assert not dst.exists(), "a half-written file we created is removed"
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
