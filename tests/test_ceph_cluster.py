"""The single-node Ceph the RBD tests run against (tests/ceph_cluster.py): pools, images, snapshots,
a client of its own through ``conf``, and the OSD stopped and started again with its data kept."""

from __future__ import annotations

import errno
import os
import time

import pytest

from ceph_cluster import CephCluster, missing_requirements

MiB = 1 << 20


def open_client(conf: str):
    """A client of its own, as the engine or QEMU would be: only the conf file in common."""
    import rados

    cluster = rados.Rados(conffile=conf)
    cluster.connect(timeout=30)
    return cluster


def test_healthy_without_a_mgr(ceph):
    assert ceph.health() == "HEALTH_OK"


def test_image_round_trip_through_a_separate_client(ceph, ceph_pool):
    import rbd

    data = os.urandom(3 * MiB)
    ceph.create_image(ceph_pool, "disk", 8 * MiB)
    ceph.write(ceph_pool, "disk", 1 * MiB + 512, data)
    assert ceph.size(ceph_pool, "disk") == 8 * MiB
    assert ceph.read(ceph_pool, "disk", 1 * MiB + 512, len(data)) == data
    assert ceph.read(ceph_pool, "disk", 0, 1 * MiB) == bytes(MiB)

    client = open_client(ceph.conf)
    try:
        assert client.get_fsid() == ceph.fsid
        with client.open_ioctx(ceph_pool) as ioctx:
            assert ioctx.application_list() == ["rbd"]
            assert rbd.RBD().list(ioctx) == ["disk"]
            with rbd.Image(ioctx, "disk", read_only=True) as image:
                assert image.read(1 * MiB + 512, len(data)) == data
    finally:
        client.shutdown()


def test_pools_are_fresh_and_distinct(ceph, ceph_pool):
    other = ceph.new_pool()
    try:
        assert other != ceph_pool
        ceph.create_image(ceph_pool, "disk", 1 * MiB)
        ceph.create_image(other, "disk", 1 * MiB)
        ceph.write(ceph_pool, "disk", 0, b"a" * 4096)
        ceph.write(other, "disk", 0, b"b" * 4096)
        assert ceph.read(ceph_pool, "disk", 0, 4096) == b"a" * 4096
        assert ceph.read(other, "disk", 0, 4096) == b"b" * 4096
    finally:
        ceph.delete_pool(other)


def test_snapshot_keeps_what_the_image_held(ceph, ceph_pool):
    ceph.create_image(ceph_pool, "disk", 4 * MiB)
    ceph.write(ceph_pool, "disk", 0, b"1" * MiB)
    ceph.snapshot(ceph_pool, "disk", "before")
    ceph.write(ceph_pool, "disk", 0, b"2" * MiB)
    assert ceph.read(ceph_pool, "disk", 0, MiB, snapshot="before") == b"1" * MiB
    assert ceph.read(ceph_pool, "disk", 0, MiB) == b"2" * MiB


def test_osd_stopped_then_started_keeps_the_data(ceph, ceph_pool):
    """A stopped OSD fails a client's read after its rados_osd_op_timeout (no hang), and comes back
    with every byte; the cluster is healthy again."""
    import rbd

    data = os.urandom(2 * MiB)
    ceph.create_image(ceph_pool, "disk", 4 * MiB)
    ceph.write(ceph_pool, "disk", MiB, data)

    client = open_client(ceph.client_conf(rados_osd_op_timeout=2))
    try:
        with client.open_ioctx(ceph_pool) as ioctx, rbd.Image(ioctx, "disk") as image:
            ceph.stop_osd()
            try:
                assert ceph.health() == "HEALTH_WARN"  # the mon knows at once: the OSD told it
                started = time.monotonic()
                with pytest.raises(rbd.Timeout) as failed:
                    image.read(MiB, MiB)
                assert failed.value.errno == errno.ETIMEDOUT
                assert 1.5 < time.monotonic() - started < 10
            finally:
                ceph.start_osd()
            assert ceph.health() == "HEALTH_OK"
            assert image.read(MiB, len(data)) == data
    finally:
        client.shutdown()
    assert ceph.read(ceph_pool, "disk", MiB, len(data)) == data


@pytest.mark.skipif(missing_requirements() is not None, reason=missing_requirements() or "")
def test_start_and_stop_leave_nothing_behind():
    """A cluster of its own: up in a few seconds, and after stop() no daemon and no directory is
    left (each process is reaped: /proc has no entry, not even a zombie)."""
    cluster = CephCluster()
    started = time.monotonic()
    try:
        cluster.start()
        start_seconds = time.monotonic() - started
        pids = [cluster.mon.pid, cluster.osd.pid]
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    finally:
        stopping = time.monotonic()
        cluster.stop()
        stop_seconds = time.monotonic() - stopping
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not cluster.directory.exists()
    assert start_seconds < 20, start_seconds
    assert stop_seconds < 10, stop_seconds
