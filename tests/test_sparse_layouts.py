"""Hypothesis-generated sparse layouts against the pure-Python reference: extents from 512 B to
several MiB, holes at the start and the end, unaligned sizes, data that is partly zero, and a dst
pre-filled with garbage (or promised zero)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import volcopy
from conftest import ENGINES, LoopDevices, MiB, fill_garbage, needs_root_for_loop, read_all, reference_digest

SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def layouts(draw):
    """(size, [(offset, bytes)]) with disjoint extents in offset order."""
    size = draw(st.integers(min_value=1, max_value=12 * MiB + 4095))
    extents, at = [], draw(st.integers(min_value=0, max_value=2 * MiB))
    while at < size and len(extents) < 8:
        length = min(draw(st.sampled_from([512, 4096, 5000, 65536, MiB, 3 * MiB + 512])), size - at)
        kind = draw(st.sampled_from(["random", "zeros", "byte"]))
        if kind == "random":
            data = draw(st.randoms(use_true_random=False)).randbytes(length)
        elif kind == "zeros":  # allocated but zero: zero detection's business
            data = bytes(length)
        else:
            data = bytes([draw(st.integers(1, 255))]) * length
        extents.append((at, data))
        at += length + draw(st.sampled_from([0, 512, 4096, 100_000, 2 * MiB]))
    return size, extents


def write(path, size, extents) -> bytes:
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)
            content[offset : offset + len(data)] = data
    return bytes(content)


@SETTINGS
@given(
    layout=layouts(),
    engine=st.sampled_from(ENGINES),
    direct=st.sampled_from(["auto", False]),
    dst_is_zero=st.booleans(),
)
def test_copy_of_generated_layout_matches_reference(tmp_path, layout, engine, direct, dst_is_zero):
    size, extents = layout
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    content = write(src, size, extents)
    if os.path.exists(dst):
        os.unlink(dst)
    if dst_is_zero:  # the caller's promise must be true: a fresh sparse file
        with open(dst, "wb") as f:
            f.truncate(size)
    else:
        fill_garbage(dst, size + 777)

    result = volcopy.copy(src, dst, engine=engine, direct=direct, dst_is_zero=dst_is_zero)

    assert read_all(dst, size) == content
    assert result.digest == reference_digest(content)
    assert result.bytes_read + result.bytes_skipped == size
    assert volcopy.digest(dst, length=size) == result.digest


@SETTINGS
@given(layout=layouts(), data=st.data())
def test_copy_of_explicit_extents_leaves_the_rest_of_dst_alone(tmp_path, layout, data):
    size, written = layout
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    content = write(src, size, written)
    fill_garbage(dst, size)
    before = read_all(dst)
    # Any disjoint ranges, aligned or not: incremental catch-up passes whatever changed.
    cuts = sorted(set(data.draw(st.lists(st.integers(0, size), max_size=8))))
    ranges = [(a, b - a) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if b > a]

    result = volcopy.copy(src, dst, extents=ranges)

    expected = bytearray(before)
    for offset, length in ranges:
        expected[offset : offset + length] = content[offset : offset + length]
    assert read_all(dst) == bytes(expected)
    assert result.digest is None and result.chunk_digests is None


@needs_root_for_loop
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts(), engine=st.sampled_from(ENGINES))
def test_copy_of_generated_layout_onto_garbage_loop_device(tmp_path, layout, engine):
    size, extents = layout
    content = write(tmp_path / "src.img", size, extents)
    loops = LoopDevices(tmp_path)
    try:
        device = loops.create(size + 512 * 3, name="dst-backing.img", garbage=True)
        result = volcopy.copy(tmp_path / "src.img", device, engine=engine)
        assert read_all(device, size) == content
        assert result.digest == reference_digest(content)
    finally:
        loops.detach_all()


@needs_root_for_loop
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("block_size", [MiB, 4 * MiB])
def test_units_of_every_size_share_the_buffers_without_overlap(tmp_path, engine, block_size):
    """A hundred extents of 4 KiB to 900 KiB, whole chunks of hole between some, through a queue of 3
    blocks onto a loop device (O_DIRECT): each unit takes a buffer as long as its data from one arena
    (csrc/buffers.c), many at once, given back out of order. A piece of buffer handed to two units at once
    would mix their data."""
    rng = np.random.default_rng(7)
    size, extents, at = 96 * MiB, [], 0
    while True:
        at += int(rng.integers(0, MiB // 4096)) * 4096
        length = int(rng.integers(1, 900 * 1024 // 4096 + 1)) * 4096
        if at + length > size:
            break
        extents.append((at, rng.bytes(length)))
        at += length
    content = write(tmp_path / "src.img", size, extents)
    loops = LoopDevices(tmp_path)
    try:
        device = loops.create(size, name="dst-backing.img", garbage=True)
        result = volcopy.copy(
            tmp_path / "src.img", device, engine=engine, block_size=block_size, queue_depth=3
        )
        assert read_all(device, size) == content
        assert result.digest == reference_digest(content)
        assert result.bytes_read + result.bytes_skipped == size
    finally:
        loops.detach_all()
