"""volcopy.cinder.copy_volume as a Cinder driver calls it: paths, file handles (with and without a
descriptor), sparse on a dirty destination, a bytes-per-second throttle, ionice."""

from __future__ import annotations

import io
import time

import pytest

from conftest import MiB, fill_garbage, needs_root, read_all, write_layout
from volcopy import InvalidRequest
from volcopy.cinder import copy_volume, io_priority, io_priority_of_this_thread, parse_ionice


@pytest.fixture
def volumes(workdir):
    content = write_layout(workdir / "src.img", 8 * MiB, [(0, 3 * MiB), (6 * MiB, MiB)], seed=21)
    fill_garbage(workdir / "dst.img", 10 * MiB)
    return str(workdir / "src.img"), str(workdir / "dst.img"), content


def test_copy_volume_sparse_is_correct_on_a_dirty_destination(volumes):
    src, dst, content = volumes
    beyond = read_all(dst)[8 * MiB :]

    result = copy_volume(src, dst, 8, "1M", sparse=True)

    assert read_all(dst, 8 * MiB) == content, "dd conv=sparse would leave garbage where src is zero"
    assert read_all(dst)[8 * MiB :] == beyond
    assert result.bytes_skipped > 0


def test_copy_volume_without_sparse_writes_every_byte(volumes):
    src, dst, content = volumes

    result = copy_volume(src, dst, 8, "4M", sparse=False)

    assert read_all(dst, 8 * MiB) == content
    assert result.bytes_written == 8 * MiB and result.block_size == 4 * MiB


def test_copy_volume_raises_small_block_sizes_to_the_engine_unit(volumes):
    src, dst, content = volumes

    result = copy_volume(src, dst, 8, "64K")

    assert result.block_size == MiB
    assert read_all(dst, 8 * MiB) == content


def test_copy_volume_with_handles_without_descriptors(volumes):
    """What an os-brick connector such as RBD returns: an object that reads and writes, no fileno."""
    _, _, content = volumes
    src, dst = io.BytesIO(content), io.BytesIO(b"\xff" * (9 * MiB))

    assert copy_volume(src, dst, 8, "1M") is None

    assert dst.getvalue()[: 8 * MiB] == content
    assert dst.getvalue()[8 * MiB :] == b"\xff" * MiB


def test_copy_volume_with_file_handles_uses_the_engine(volumes):
    src, dst, content = volumes
    with open(src, "rb") as s, open(dst, "r+b") as d:
        result = copy_volume(s, d, 8, "1M", sparse=True)

    assert result is not None and result.digest
    assert read_all(dst, 8 * MiB) == content


class BlkioThrottle:
    """The shape of Cinder's cinder.volume.throttling.BlkioCgroup: it carries bps_limit."""

    bps_limit = 8 * MiB


@pytest.mark.parametrize("handles", [False, True])
def test_copy_volume_honours_the_throttle(volumes, handles):
    src, dst, content = volumes
    if handles:
        src, dst = io.BytesIO(content), io.BytesIO(bytes(8 * MiB))
    started = time.monotonic()

    copy_volume(src, dst, 8, "1M", throttle=BlkioThrottle())

    elapsed = time.monotonic() - started
    assert elapsed >= 0.9 * (8 * MiB) / BlkioThrottle.bps_limit - 0.1, (
        f"8 MiB at 8 MiB/s took {elapsed:.2f} s"
    )


@pytest.mark.parametrize("text,value", [("-c3", 3 << 13), ("-c2 -n7", 2 << 13 | 7), ("-c 1 -n 0", 1 << 13)])
def test_parse_ionice(text, value):
    assert parse_ionice(text) == value


def test_bad_ionice_is_refused(volumes):
    src, dst, _ = volumes
    with pytest.raises(InvalidRequest, match="ionice"):
        copy_volume(src, dst, 8, "1M", ionice="--fast")


@needs_root  # the idle and realtime classes need CAP_SYS_ADMIN / CAP_SYS_NICE
def test_ionice_applies_to_the_copying_thread_and_is_restored(volumes):
    before = io_priority_of_this_thread()
    with io_priority("-c3"):
        during = io_priority_of_this_thread()
    assert during == 3 << 13
    assert io_priority_of_this_thread() == before
    src, dst, content = volumes
    copy_volume(src, dst, 8, "1M", ionice="-c3")
    assert read_all(dst, 8 * MiB) == content
