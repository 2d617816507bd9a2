"""The migration orchestrator on Ceph RBD volumes, on the real single-node cluster (ceph_cluster.py):
RBD connection_info and rbd: specs opened through librbd (no os-brick attach); pool to pool inside one
cluster by librbd's deep copy, checked by digest afterwards; the engine whenever dst may not be replaced
(data, another size, snapshots on either side, open elsewhere), with a rate limit, or across clusters;
a deep copy failing on a stopped OSD; recover() after a SIGKILL in the middle of a deep copy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import volcopy
from ceph_cluster import CephCluster, missing_requirements
from conftest import MiB
from volcopy.errors import InvalidRequest
from volcopy.migration import Migrator
from volcopy.migration.errors import MigrationCancelled, VolumeBusy
from volcopy.migration.volumes import redacted

VOLCOPY = [sys.executable, "-m", "volcopy.cli"]
SIZE = 32 * MiB
DATA = [(0, 3 * MiB), (13 * MiB, 2 * MiB + 4096), (28 * MiB, MiB)]


@pytest.fixture
def other_pool(ceph):
    pool = ceph.new_pool()
    yield pool
    ceph.delete_pool(pool)


@pytest.fixture
def journal(workdir) -> str:
    return f"sqlite:///{workdir}/journal.sqlite"


def write_src(ceph, pool: str, image: str = "src", size: int = SIZE) -> bytes:
    """A thin image with DATA written (the rest never allocated); returns its whole content."""
    content = bytearray(size)
    ceph.create_image(pool, image, size)
    for number, (offset, length) in enumerate(DATA):
        data = bytes([number + 1]) * 4096 + os.urandom(length - 4096)
        ceph.write(pool, image, offset, data)
        content[offset : offset + length] = data
    return bytes(content)


def layout(ceph, pool: str, image: str) -> dict:
    import rbd

    with ceph._cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image, read_only=True) as img:
        try:
            parent = img.get_parent_image_spec()
        except rbd.ImageNotFound:
            parent = None
        snaps = [snap["name"] for snap in img.list_snaps()]
        return {"features": img.features(), "order": img.stat()["order"], "parent": parent, "snaps": snaps}


def create_image(ceph, pool: str, image: str, size: int, **options) -> None:
    import rbd

    with ceph._cluster.open_ioctx(pool) as ioctx:
        rbd.RBD().create(ioctx, image, size, **options)


def steps(journal: str, migration_id: str) -> list[tuple[str, str, str, str | None]]:
    return [(s.name, s.target, s.status, s.detail) for s in Migrator(journal).steps(migration_id)]


def test_pool_to_pool_takes_librbds_deep_copy_and_checks_the_digest(ceph, ceph_pool, other_pool, journal):
    """Cinder's connection_info on both sides, dst as Cinder made it (empty, src's size) with a layout
    of its own (layering only, as for a kernel client; 2 MiB objects): it keeps that layout."""
    import rbd

    content = write_src(ceph, ceph_pool)
    create_image(ceph, other_pool, "dst", SIZE, features=rbd.RBD_FEATURE_LAYERING, order=21)
    src, dst = ceph.connection_info(ceph_pool, "src"), ceph.connection_info(other_pool, "dst")
    seen = []

    m = Migrator(journal, rbd_deep_copy=True).migrate(
        src, dst, progress=lambda done, total: seen.append((done, total))
    )

    assert m.state == "completed" and m.dst_valid and m.copy_path == "rbd-deep-copy"
    assert steps(journal, m.id) == [
        ("clone", "rbd-deep-copy", "done", None),
        ("verify", f"rbd volume {other_pool}-dst", "done", None),
    ], "the deep copy is its own step; dst is read back after it, as after a clone"
    assert m.src_digest == m.dst_digest == volcopy.digest(ceph.spec(ceph_pool, "src"))
    assert ceph.read(other_pool, "dst", 0, SIZE) == content
    assert (m.bytes_done, m.bytes_total) == (SIZE, SIZE)
    assert seen[-1] == (SIZE, SIZE) and len(seen) > 1, "librbd's progress, object by object, in bytes"
    assert layout(ceph, other_pool, "dst") == {
        "features": rbd.RBD_FEATURE_LAYERING,
        "order": 21,
        "parent": None,
        "snaps": [],
    }
    assert layout(ceph, ceph_pool, "src")["order"] == 22 and ceph.read(ceph_pool, "src", 0, SIZE) == content


def test_a_dst_holding_data_is_copied_over_by_the_engine(ceph, ceph_pool, other_pool, journal):
    content = write_src(ceph, ceph_pool)
    ceph.create_image(other_pool, "dst", SIZE)
    ceph.write(other_pool, "dst", 20 * MiB, os.urandom(5 * MiB))  # where src is zero

    m = Migrator(journal, rbd_deep_copy=True).migrate(
        ceph.connection_info(ceph_pool, "src"), ceph.connection_info(other_pool, "dst")
    )

    assert m.state == "completed" and m.copy_path == "copy"
    (name, target, status, detail), *rest = steps(journal, m.id)
    assert (name, target, status) == ("clone", "rbd-deep-copy", "done")
    assert detail.endswith("dst holds data: not replaced"), detail
    assert [step[0] for step in rest] == ["copy", "verify"]
    assert ceph.read(other_pool, "dst", 0, SIZE) == content
    assert m.src_digest == m.dst_digest == volcopy.digest(ceph.spec(ceph_pool, "src"))


def _src_has_a_snapshot(ceph, pool, other_pool):
    ceph.snapshot(pool, "src", "before")
    ceph.create_image(other_pool, "dst", SIZE)


def _dst_is_larger(ceph, pool, other_pool):
    ceph.create_image(other_pool, "dst", SIZE + 4 * MiB)


def _dst_has_a_snapshot(ceph, pool, other_pool):
    ceph.create_image(other_pool, "dst", SIZE)
    ceph.snapshot(other_pool, "dst", "empty")


@pytest.mark.parametrize(
    "setup, reason",
    [
        (_src_has_a_snapshot, "src has snapshots, which a deep copy would carry onto dst: not replaced"),
        (_dst_is_larger, f"dst holds {SIZE + 4 * MiB} bytes, src {SIZE}: not replaced"),
        (_dst_has_a_snapshot, "dst has snapshots: not replaced"),
    ],
)
def test_what_a_deep_copy_may_not_replace_goes_to_the_engine(
    ceph, ceph_pool, other_pool, journal, setup, reason
):
    content = write_src(ceph, ceph_pool)
    setup(ceph, ceph_pool, other_pool)
    before = layout(ceph, other_pool, "dst")

    m = Migrator(journal, rbd_deep_copy=True).migrate(
        ceph.connection_info(ceph_pool, "src"), ceph.connection_info(other_pool, "dst")
    )

    assert m.state == "completed" and m.copy_path == "copy"
    clone = steps(journal, m.id)[0]
    assert clone[:3] == ("clone", "rbd-deep-copy", "done") and clone[3].endswith(reason), clone
    assert ceph.read(other_pool, "dst", 0, SIZE) == content
    assert layout(ceph, other_pool, "dst") == before, "dst is the same image, written by the engine"
    assert layout(ceph, ceph_pool, "src")["snaps"] == (["before"] if setup is _src_has_a_snapshot else [])


def test_a_dst_open_elsewhere_is_neither_replaced_nor_written(ceph, ceph_pool, other_pool, journal):
    """As a compute that attached dst holds it: librbd refuses to remove it, and the engine refuses to
    write under it (librbd's exclusive lock is handed over on request: both would write). The
    migration ends cancelled with the reason, dst as it was."""
    import rbd

    write_src(ceph, ceph_pool)
    ceph.create_image(other_pool, "dst", SIZE)
    with ceph._cluster.open_ioctx(other_pool) as ioctx, rbd.Image(ioctx, "dst") as held:
        with pytest.raises(MigrationCancelled, match="the image is open elsewhere"):
            Migrator(journal, rbd_deep_copy=True).migrate(
                ceph.connection_info(ceph_pool, "src"), ceph.connection_info(other_pool, "dst")
            )
        assert held.read(0, SIZE) == bytes(SIZE)


def test_a_rate_limit_keeps_the_copy_in_the_engine(ceph, ceph_pool, other_pool, journal):
    """librbd's deep copy cannot keep to a rate: not even tried."""
    content = write_src(ceph, ceph_pool)
    ceph.create_image(other_pool, "dst", SIZE)

    m = Migrator(journal, rbd_deep_copy=True).migrate(
        ceph.connection_info(ceph_pool, "src"), ceph.connection_info(other_pool, "dst"), rate_limit=256 * MiB
    )

    assert m.copy_path == "copy" and [step[0] for step in steps(journal, m.id)] == ["copy", "verify"]
    assert ceph.read(other_pool, "dst", 0, SIZE) == content


def test_rbd_specs_a_clone_src_and_a_dst_not_yet_there(ceph, ceph_pool, other_pool, journal):
    """rbd: specs on both sides (a key among the settings, never shown); src a clone of another image's
    snapshot: dst is made flattened, as the engine would leave it, and does not depend on src's parent."""
    import rbd

    parent = write_src(ceph, ceph_pool, "parent")
    ceph.snapshot(ceph_pool, "parent", "base")
    with ceph._cluster.open_ioctx(ceph_pool) as ioctx:
        with rbd.Image(ioctx, "parent") as image:
            image.protect_snap("base")
        rbd.RBD().clone(ioctx, "parent", "base", ioctx, "src")
    ceph.write(ceph_pool, "src", 20 * MiB, b"\x07" * MiB)
    content = parent[: 20 * MiB] + b"\x07" * MiB + parent[21 * MiB :]
    src = ceph.spec(ceph_pool, "src", key="AQBsecretsecretsecretsecret==")
    dst = ceph.spec(other_pool, "dst")

    m = Migrator(journal, rbd_deep_copy=True).migrate(src, dst)

    assert m.copy_path == "rbd-deep-copy" and ceph.read(other_pool, "dst", 0, SIZE) == content
    assert layout(ceph, other_pool, "dst")["parent"] is None
    assert layout(ceph, ceph_pool, "src")["parent"]["image_name"] == "parent"
    assert m.dst_digest == volcopy.digest(ceph.spec(ceph_pool, "src"))
    assert m.src_key == f"rbd:{ceph_pool}/src"  # the image: how it is reached is not part of its claim
    shown = subprocess.run(
        VOLCOPY + ["migrations", "--journal", journal, "show", m.id, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(shown)["src"]["rbd"]["options"] == {"key": "***"}
    assert "secret" not in shown


def test_one_image_reached_two_ways_is_refused_before_it_is_written(ceph, ceph_pool, journal):
    """By conf file and by monitors: maybe namesakes in two clusters, so the engine, which opens both,
    tells (by cluster fsid and image id), and refuses before writing anything."""
    content = write_src(ceph, ceph_pool)

    with pytest.raises(MigrationCancelled) as refused:
        Migrator(journal).migrate(ceph.spec(ceph_pool, "src"), ceph.connection_info(ceph_pool, "src"))

    m = Migrator(journal).status(refused.value.migration_id)
    assert m.state == "cancelled" and "are the same volume" in m.reason, m.reason
    assert ceph.read(ceph_pool, "src", 0, SIZE) == content


def test_an_rbd_spec_dst_cannot_be_handed_to_a_compute(ceph, ceph_pool, journal):
    write_src(ceph, ceph_pool)

    class Compute:  # never called: the request is refused before anything is recorded
        pass

    migrator = Migrator(journal, compute=Compute())
    with pytest.raises(InvalidRequest, match="give dst as RBD connection_info"):
        migrator.migrate(
            ceph.connection_info(ceph_pool, "src"), ceph.spec(ceph_pool, "dst"), attachments=[("s", "a", "b")]
        )
    with pytest.raises(InvalidRequest, match="data.name 'nopool' is not POOL"):
        migrator.migrate(
            ceph.connection_info(ceph_pool, "src"), {"driver_volume_type": "rbd", "data": {"name": "nopool"}}
        )
    assert migrator.list() == []


@pytest.fixture(scope="module")
def other_ceph():
    """A second cluster (its own fsid): the same pool and image names reach other volumes there."""
    missing = missing_requirements()
    if missing:
        pytest.skip(missing)
    cluster = CephCluster(memstore_bytes=128 * MiB)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_across_clusters_the_engine_copies(ceph, ceph_pool, other_ceph, journal):
    """Pool and image of the same names in the other cluster: namesakes, not one image."""
    content = write_src(ceph, ceph_pool)
    other_ceph._create_pool(ceph_pool)
    try:
        other_ceph.create_image(ceph_pool, "src", SIZE)

        m = Migrator(journal, rbd_deep_copy=True).migrate(
            ceph.connection_info(ceph_pool, "src"), other_ceph.connection_info(ceph_pool, "src")
        )

        assert m.copy_path == "copy" and ceph.fsid != other_ceph.fsid
        assert m.src_key == m.dst_key == f"rbd:{ceph_pool}/src"  # one claim covers both
        detail = steps(journal, m.id)[0][3]
        assert detail == f"src and dst are in different clusters ({ceph.fsid}, {other_ceph.fsid})"
        assert other_ceph.read(ceph_pool, "src", 0, SIZE) == content
    finally:
        other_ceph.delete_pool(ceph_pool)


def test_a_deep_copy_failing_on_a_stopped_osd_cancels(ceph, ceph_pool, other_pool, journal):
    """The OSD stops once librbd has copied its first object: the rest fails after the client's
    rados_osd_op_timeout (never a hang), and the migration ends cancelled with the reason; src is
    untouched."""
    content = write_src(ceph, ceph_pool)
    ceph.create_image(other_pool, "dst", SIZE)
    # one object at a time: librbd issues the next only once the progress report has returned
    conf = ceph.client_conf(rados_osd_op_timeout="2", rbd_concurrent_management_ops="1")
    src, dst = f"rbd:{ceph_pool}/src:conf={conf}", f"rbd:{other_pool}/dst:conf={conf}"

    def stop_at_first_object(done: int, total: int) -> None:
        if ceph.osd.poll() is None:
            ceph.stop_osd()

    try:
        with pytest.raises(volcopy.VolcopyError) as raised:
            Migrator(journal, rbd_deep_copy=True).migrate(src, dst, progress=stop_at_first_object)
    finally:
        ceph.start_osd()
    m = Migrator(journal).status(raised.value.migration_id)
    assert m.state == "cancelled" and not m.dst_valid
    assert m.reason.startswith("the copy failed: CopyIOError: the deep copy failed: "), m.reason
    assert steps(journal, m.id)[0][:3] == ("clone", "rbd-deep-copy", "failed")
    assert ceph.read(ceph_pool, "src", 0, SIZE) == content


def test_recover_after_a_sigkill_in_the_middle_of_a_deep_copy(ceph, ceph_pool, other_pool, journal, workdir):
    """A deep copy is not resumed: its partial dst holds data, so recover() copies over it with the
    engine. dst without exclusive-lock: with it, the killed process's lock is broken only once its
    watch has expired (osd_client_watch_timeout, 30 s: measured, recover() took 30.5 s)."""
    import rbd

    content = write_src(ceph, ceph_pool)
    create_image(ceph, other_pool, "dst", SIZE, features=rbd.RBD_FEATURE_LAYERING)
    env = dict(os.environ, VOLCOPY_FAILPOINT="mid-copy")
    # one object at a time, in order: killed half-way, dst holds src's first objects
    src, dst = ceph.spec(ceph_pool, "src", rbd_concurrent_management_ops="1"), ceph.spec(other_pool, "dst")
    killed = subprocess.run(
        VOLCOPY
        + [
            "migrate",
            src,
            dst,
            "--rbd-deep-copy",
            "--journal",
            journal,
            "--checkpoint-dir",
            str(workdir / "checkpoints"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    migrator = Migrator(journal, rbd_deep_copy=True)
    (interrupted,) = migrator.list()
    assert interrupted.state == "copying"
    assert steps(journal, interrupted.id) == [("clone", "rbd-deep-copy", "intended", None)]
    # The claim is the image's, however it is given: until recovered, no other migration may take it.
    with pytest.raises(VolumeBusy, match=f"already in migration {interrupted.id}"):
        migrator.migrate(ceph.connection_info(ceph_pool, "src"), ceph.spec(other_pool, "elsewhere"))

    (recovered,) = migrator.recover()

    assert recovered.state == "completed" and recovered.copy_path == "copy"
    assert [step[:3] for step in steps(journal, recovered.id)][1:] == [
        ("clone", "rbd-deep-copy", "done"),
        ("copy", f"rbd:{ceph_pool}/src -> rbd:{other_pool}/dst", "done"),
        ("verify", dst, "done"),
    ]
    assert ceph.read(other_pool, "dst", 0, SIZE) == content


def test_volcopy_migrate_takes_rbd_connection_info_and_specs(ceph, ceph_pool, other_pool, journal, workdir):
    content = write_src(ceph, ceph_pool)
    ceph.create_image(other_pool, "dst", SIZE)
    (workdir / "src.json").write_text(json.dumps(ceph.connection_info(ceph_pool, "src")))
    dst = ceph.spec(other_pool, "dst")

    migrated = subprocess.run(
        VOLCOPY
        + ["migrate", f"@{workdir / 'src.json'}", dst, "--rbd-deep-copy", "--journal", journal, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert migrated.returncode == 0, migrated.stderr
    m = json.loads(migrated.stdout)
    assert m["state"] == "completed" and m["copy_path"] == "rbd-deep-copy"
    assert m["src"]["connection_info"]["data"]["name"] == f"{ceph_pool}/src"
    assert m["dst"] == {
        "rbd": {
            "pool": other_pool,
            "namespace": "",
            "image": "dst",
            "snap": None,
            "conf": ceph.conf,
            "user": None,
            "options": {},
        }
    }
    assert m["src_digest"] == m["dst_digest"] == volcopy.digest(ceph.spec(ceph_pool, "src"))
    assert ceph.read(other_pool, "dst", 0, SIZE) == content
    shown = subprocess.run(
        VOLCOPY + ["migrations", "--journal", journal, "show", m["id"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = shown.splitlines()
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines if line[2] != " ")
    assert (rows["dst"], rows["path"], rows["digest"]) == (dst, "rbd-deep-copy", m["dst_digest"])
    assert json.loads(rows["src"]) == redacted(ceph.connection_info(ceph_pool, "src"))
    steps_shown = [line.split()[1:] for line in lines if line[2] == " "]
    assert steps_shown == [["clone", "done", "rbd-deep-copy"], ["verify", "done", dst]]
