"""volcopy.cinder.copy_volume on Ceph RBD volumes, on the real single-node cluster (ceph_cluster.py):
os-brick's real RBD connector's file wrappers and Cinder's RBD connection_info are opened by the native
endpoint (holes not read, a dirty dst made equal), never moved 4 MiB at a time through Python."""

from __future__ import annotations

import io
import os

import pytest

import volcopy
from conftest import MiB, read_all, write_layout
from volcopy import InvalidRequest
from volcopy.cinder import copy_volume, rbd_spec_of_wrapper
from volcopy.rbd_volume import RBDSpec

SIZE = 32 * MiB
OBJECT = 4 * MiB  # librbd's default object size
DATA = [(0, 2 * MiB), (17 * MiB, 3 * MiB + 4096)]  # the rest of the image is never written: thin
ALLOCATED = {  # the objects holding data
    n for offset, length in DATA for n in range(offset // OBJECT, (offset + length - 1) // OBJECT + 1)
}


@pytest.fixture
def brick():
    """os-brick's real RBD connector, as Cinder builds it (no local attach: the wrapper, no krbd)."""
    from os_brick.initiator import connector

    return connector.InitiatorConnector.factory("rbd", root_helper=None, use_multipath=False)


@pytest.fixture
def images(ceph, ceph_pool):
    """A thin src with two data extents and a dst of the same size full of garbage."""
    content = bytearray(SIZE)
    ceph.create_image(ceph_pool, "src", SIZE)
    for offset, length in DATA:
        data = os.urandom(length)
        ceph.write(ceph_pool, "src", offset, data)
        content[offset : offset + length] = data
    ceph.create_image(ceph_pool, "dst", SIZE)
    ceph.write(ceph_pool, "dst", 0, os.urandom(SIZE))
    return ceph_pool, bytes(content)


def test_os_brick_rbd_wrappers_are_copied_by_the_native_endpoint(ceph, images, brick):
    pool, content = images
    src_info, dst_info = ceph.connection_info(pool, "src"), ceph.connection_info(pool, "dst")
    src_device = brick.connect_volume(src_info["data"])
    dst_device = brick.connect_volume(dst_info["data"])
    try:
        src, dst = src_device["path"], dst_device["path"]
        assert type(src).__name__ == "RBDVolumeIOWrapper", "os-brick's wrapper, without a descriptor"
        assert rbd_spec_of_wrapper(src) == RBDSpec(pool, "", "src", conf=src.rbd_conf)

        result = copy_volume(src, dst, SIZE // MiB, "4M", sparse=True)

        assert result is not None, "the 4 MiB Python loop returns None; the engine a CopyResult"
        assert result.bytes_read == len(ALLOCATED) * OBJECT, "the allocated objects, whole"
        assert result.bytes_skipped == SIZE - len(ALLOCATED) * OBJECT, "unallocated objects were not read"
    finally:
        brick.disconnect_volume(src_info["data"], src_device)
        brick.disconnect_volume(dst_info["data"], dst_device)
    assert not os.path.exists(src.rbd_conf), "os-brick's disconnect removed the conf it wrote"
    assert ceph.read(pool, "dst", 0, SIZE) == content, "the garbage where src is zero is gone"
    assert volcopy.digest(ceph.spec(pool, "dst")) == volcopy.digest(ceph.spec(pool, "src")) == result.digest


def test_wrapper_and_connection_info_to_and_from_a_file(ceph, images, brick, workdir):
    pool, content = images
    src_info = ceph.connection_info(pool, "src")
    src_device = brick.connect_volume(src_info["data"])
    try:
        exported = copy_volume(src_device["path"], workdir / "exported.img", SIZE // MiB, "1M", sparse=True)
    finally:
        brick.disconnect_volume(src_info["data"], src_device)
    assert exported.bytes_skipped > 0 and read_all(workdir / "exported.img") == content

    local = write_layout(workdir / "local.img", SIZE, [(MiB, 5 * MiB)], seed=31)
    imported = copy_volume(str(workdir / "local.img"), ceph.connection_info(pool, "dst"), SIZE // MiB, "1M")
    assert ceph.read(pool, "dst", 0, SIZE) == local
    assert volcopy.digest(ceph.spec(pool, "dst")) == imported.digest == volcopy.digest(workdir / "local.img")

    from_info = copy_volume(ceph.connection_info(pool, "src"), str(workdir / "again.img"), SIZE // MiB, "1M")
    assert from_info.digest == exported.digest == volcopy.digest(ceph.spec(pool, "src"))


def test_what_cannot_be_opened_directly_is_refused(ceph, images, workdir):
    pool, _ = images
    iscsi = {"driver_volume_type": "iscsi", "data": {"target_iqn": "iqn.2010-10.org.openstack:x"}}
    with pytest.raises(InvalidRequest, match="iscsi connection_info cannot be opened directly"):
        copy_volume(iscsi, str(workdir / "dst.img"), 1, "1M")
    with pytest.raises(InvalidRequest, match="is an RBD volume and the other side a handle without"):
        copy_volume(ceph.connection_info(pool, "src"), io.BytesIO(), 1, "1M")
    missing = ceph.connection_info(pool, "nosuch")
    with pytest.raises(InvalidRequest, match="the image does not exist"):
        copy_volume(missing, str(workdir / "dst.img"), 1, "1M")
    assert not os.path.exists(workdir / "dst.img")
