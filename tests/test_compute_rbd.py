"""The compute handoff with Ceph RBD volumes, on a real single-node Ceph (tests/ceph_cluster.py) and a
real guest whose disk is an RBD image opened by QEMU's rbd driver, in a QEMU the agent reaches over QMP
or in a libvirt domain (a network disk): start fences src with a local qcow2 overlay above the guest's
rbd node, complete opens dst (an image in another pool, named by Cinder's RBD connection_info) through
librbd with no host path, cancel merges the guest's writes back into src. The guest writes all along,
and its disk must end up holding every write."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

import volcopy
from compute_harness import (
    BACKENDS,
    DST_ATT,
    INITIAL,
    SERVER,
    SRC_ATT,
    TOKEN,
    Agent,
    LibvirtGuest,
    needs_guest,
    overlay_files,
    server_entry,
    wait_for,
    wait_state,
)
from conftest import MiB
from volcopy.compute import ComputeBadRequest, ComputeConflict, NovaCompute
from volcopy.compute.rbd import name_of_node

pytestmark = needs_guest

SIZE = 16 * MiB  # of each test image


class RbdVolumes:
    """src (every block INITIAL) and dst (garbage until the copy), each an image in a pool of its own."""

    def __init__(self, ceph):
        self.ceph = ceph
        self.src_pool, self.dst_pool = ceph.new_pool(), ceph.new_pool()
        self.src_image, self.dst_image = "volume-src", "volume-dst"
        self.dst_volume_id = str(uuid.uuid4())  # Cinder's id of dst
        ceph.create_image(self.src_pool, self.src_image, SIZE)
        ceph.write(self.src_pool, self.src_image, 0, bytes([INITIAL]) * SIZE)
        ceph.create_image(self.dst_pool, self.dst_image, SIZE)
        ceph.write(self.dst_pool, self.dst_image, 0, bytes([0x3C]) * SIZE)

    @property
    def src(self) -> str:
        """src's name, as the agent's records and the disk's chain show it."""
        return f"rbd:{self.src_pool}/{self.src_image}"

    @property
    def dst(self) -> str:
        return f"rbd:{self.dst_pool}/{self.dst_image}"

    def read_src(self) -> bytes:
        return self.ceph.read(self.src_pool, self.src_image, 0, SIZE)

    def read_dst(self) -> bytes:
        return self.ceph.read(self.dst_pool, self.dst_image, 0, SIZE)

    def connection_info(self, pool: str | None = None, image: str | None = None, **data) -> dict:
        """Cinder's RBD connection_info for dst (as its RBD driver's initialize_connection hands out,
        with cephx off): the monitors by address, no host path."""
        host, port = self.ceph.mon_host.rsplit(":", 1)
        fields = {
            "name": f"{pool or self.dst_pool}/{image or self.dst_image}",
            "hosts": [host],
            "ports": [port],
            "cluster_name": "ceph",
            "auth_enabled": False,
            "auth_username": None,
            "secret_type": "ceph",
            "secret_uuid": None,
            "volume_id": self.dst_volume_id,
            "discard": True,
        }
        return {"driver_volume_type": "rbd", "data": fields | data}

    def copy(self) -> None:
        """Cinder's copy of src onto dst while fenced: the engine, through librbd on both sides."""
        conf = f":conf={self.ceph.conf}"
        result = volcopy.copy(self.src + conf, self.dst + conf)
        assert result.size == SIZE

    def remove(self) -> None:
        for pool in (self.src_pool, self.dst_pool):
            self.ceph.delete_pool(pool)


@pytest.fixture
def rbd_volumes(ceph):
    volumes = RbdVolumes(ceph)
    yield volumes
    volumes.remove()


@pytest.fixture
def rbd_guest(request, make_guest, rbd_volumes, ceph):
    """The guest, its disk on src through QEMU's rbd driver; over QMP the cluster's address comes from
    ceph.conf, in a libvirt domain (a network disk) from its monitors. Its backend is the parameter
    ("qmp" unless parametrized)."""
    backend = getattr(request, "param", "qmp")
    if backend == "qmp":
        volume = f"{rbd_volumes.src}:conf={ceph.conf}"
    else:
        volume = f"{rbd_volumes.src}:mon_host={ceph.mon_host.replace(':', chr(92) + ':')}"
    return make_guest(backend, "a", volume, size=SIZE)


@pytest.fixture
def rbd_compute(workdir, rbd_guest):
    agent = Agent(workdir, {SERVER: server_entry(rbd_guest, SRC_ATT)}, allowed_connectors=["rbd"])
    agent.start()
    yield NovaCompute(endpoint=agent.url, token=TOKEN)
    agent.stop()


def chain(guest) -> list[str]:
    """The guest's disk chain, top first: a file's path, an RBD image's rbd:POOL/IMAGE."""
    if isinstance(guest, LibvirtGuest):
        return guest.chain()
    return [
        node if isinstance(node, str) else name_of_node(node) or node["file"]["filename"]
        for node in disk_nodes(guest)
    ]


def disk_nodes(guest) -> list[dict]:
    """The options of each image in a QMP guest's disk chain, top first, as QEMU describes them."""
    images = []
    blocks = guest.monitor.cmd("query-block")
    image = next(b for b in blocks if b["qdev"].startswith(f"/machine/peripheral/{guest.qdev}/"))
    image = image["inserted"]["image"]
    while image:
        name = image["filename"]
        images.append(json.loads(name.removeprefix("json:")) if name.startswith("json:") else name)
        image = image.get("backing-image")
    return images


@pytest.mark.parametrize("rbd_guest", BACKENDS, indirect=True)
@pytest.mark.parametrize("prepared", [False, True], ids=["", "prepared"])
def test_complete_moves_the_guest_onto_an_rbd_dst_with_every_write(
    rbd_guest, rbd_compute, rbd_volumes, prepared
):
    """prepared: dst named ahead of the copy (prepare), as the Cinder side does; complete then only
    switches (on libvirt the block copy into a new overlay over dst runs from prepare on)."""
    guest, compute, volumes = rbd_guest, rbd_compute, rbd_volumes
    guest.start_writer()
    time.sleep(0.3)

    started = compute.migration_start(SERVER, SRC_ATT)
    assert (started["state"], started["generation"]) == ("fenced", 1)
    assert started["data_location"].startswith("overlay ")
    assert started["data_location"].endswith(f"over src {volumes.src}")
    gen = started["generation"]
    overlay, below = chain(guest)
    assert overlay.endswith(f"-{gen}.qcow2") and below == volumes.src
    at_start = volumes.read_src()
    if prepared:
        ready = compute.migration_prepare(SERVER, SRC_ATT, DST_ATT, volumes.connection_info(), gen)
        assert (ready["state"], ready["new_attachment_id"], ready["reason"]) == ("fenced", DST_ATT, None)
        assert chain(guest) == [overlay, volumes.src], "dst was opened before complete"

    volumes.copy()  # while the guest keeps writing, into the overlay
    time.sleep(0.3)
    assert volumes.read_src() == at_start, "src changed while fenced"
    assert compute.migration_state(SERVER, SRC_ATT)["bytes_written_since_start"] > 0

    done = compute.migration_complete(SERVER, SRC_ATT, DST_ATT, volumes.connection_info(), gen)
    assert done["state"] in ("completing", "completed")
    time.sleep(0.3)  # more writes, now onto dst
    guest.stop_writer()
    completed = wait_state(compute, "completed")
    assert completed["data_location"] == f"the new volume {volumes.dst}"

    assert guest.errors == [] and guest.io_status_ok()
    assert len(guest.writes) > 50
    guest.check_guest_reads_model()
    assert chain(guest) == [volumes.dst]  # the overlay merged
    if not isinstance(guest, LibvirtGuest):  # dst's rbd node: QEMU opened it, no host path
        [only] = disk_nodes(guest)
        assert (only["file"]["driver"], only["file"]["pool"]) == ("rbd", volumes.dst_pool)
        assert only["file"]["image"] == volumes.dst_image and "filename" not in only["file"]
    assert compute.attachments(SERVER) == [{"id": DST_ATT, "serverId": SERVER, "device_path": volumes.dst}]
    assert volumes.read_src() == at_start, "src was written after its fence"
    guest.stop()
    assert volumes.read_dst() == guest.model, "dst does not hold src-at-start plus every write"


@pytest.mark.parametrize("rbd_guest", BACKENDS, indirect=True)
def test_cancel_leaves_the_guest_on_its_rbd_src_with_every_write(
    rbd_guest, rbd_compute, rbd_volumes, workdir
):
    guest, compute, volumes = rbd_guest, rbd_compute, rbd_volumes
    guest.start_writer()
    gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
    at_start = volumes.read_src()
    time.sleep(0.5)
    assert volumes.read_src() == at_start, "src changed while fenced"

    cancelled = compute.migration_cancel(SERVER, SRC_ATT, gen)
    assert cancelled["state"] in ("cancelling", "cancelled")
    wait_state(compute, "cancelled")
    assert overlay_files(workdir / "overlays") == [], "the overlay was left"
    assert chain(guest) == [volumes.src]
    time.sleep(0.2)  # the guest writes on, to src again
    guest.stop_writer()

    with pytest.raises(ComputeConflict, match="cancelled"):
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, volumes.connection_info(), gen)
    assert guest.errors == [] and guest.io_status_ok()
    guest.check_guest_reads_model()
    guest.stop()
    assert volumes.read_src() == guest.model, "src lacks some of the guest's writes"
    assert volumes.read_dst() == bytes([0x3C]) * SIZE, "dst was written"


MALFORMED = [
    ({"name": None}, "data.name must be the string 'POOL/IMAGE'"),
    ({"name": "volume-dst"}, "must be 'POOL/IMAGE'"),
    ({"name": "pool/a/b/c"}, "must be 'POOL/IMAGE'"),
    ({"name": "pool/image@snap"}, "names without '/', '@', ':'"),
    ({"hosts": ["127.0.0.1", "127.0.0.2"]}, "data.hosts and data.ports must be lists of the same length"),
    ({"hosts": "127.0.0.1"}, "data.hosts and data.ports must be lists"),
    ({"ports": ["http"]}, "monitor port 'http' is not a TCP port"),
    ({"ports": ["70000"]}, "monitor port '70000' is not a TCP port"),
    ({"hosts": [""]}, "monitor host '' is not a host name"),
    ({"auth_enabled": True}, "data.auth_enabled needs data.auth_username"),
    ({"auth_enabled": "yes"}, "data.auth_enabled must be true or false"),
    ({"auth_username": 7}, "data.auth_username must be a non-empty string"),
    ({"keyring": ["[client.cinder]"]}, "data.keyring must be a non-empty string"),
    ({"secret_uuid": ""}, "data.secret_uuid must be a non-empty string"),
    ({"format": "qcow2"}, "an RBD image is a raw volume"),
]


def test_a_malformed_rbd_connection_info_is_400_and_changes_nothing(rbd_guest, rbd_compute, rbd_volumes):
    """Every field QEMU would need is checked before anything is attached: prepare and complete answer
    400 with what is wrong, and the guest stays fenced on src (one guest for all the cases: each boots
    in seconds)."""
    compute, volumes = rbd_compute, rbd_volumes
    gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
    for data, message in MALFORMED:
        info = volumes.connection_info(**data)
        for step in (compute.migration_prepare, compute.migration_complete):
            with pytest.raises(ComputeBadRequest, match=re.escape(message)) as refused:
                step(SERVER, SRC_ATT, DST_ATT, info, gen)
            assert refused.value.status == 400
    state = compute.migration_state(SERVER, SRC_ATT)
    assert (state["state"], state["new_attachment_id"]) == ("fenced", None)
    assert chain(rbd_guest)[1:] == [volumes.src]  # still overlay -> src


def test_an_rbd_dst_that_cannot_hold_the_disk_is_refused_and_the_guest_stays_on_src(
    rbd_guest, rbd_compute, rbd_volumes, ceph
):
    """Checked by opening dst through librbd before the guest gets it: a missing image, one smaller
    than src. Each is 409 with the reason; the guest stays fenced on src and cancel brings it back."""
    guest, compute, volumes = rbd_guest, rbd_compute, rbd_volumes
    ceph.create_image(volumes.dst_pool, "too-small", SIZE - MiB)
    guest.start_writer()
    gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
    refusals = [
        (volumes.connection_info(image="missing"), "cannot open the new volume"),
        (volumes.connection_info(image="too-small"), f"holds {SIZE - MiB} bytes, fewer than the {SIZE}"),
    ]
    for info, message in refusals:
        with pytest.raises(ComputeConflict, match=message):
            compute.migration_complete(SERVER, SRC_ATT, DST_ATT, info, gen)
        state = compute.migration_state(SERVER, SRC_ATT)
        assert (state["state"], state["new_attachment_id"]) == ("fenced", None)
        assert chain(guest)[1:] == [volumes.src]
    compute.migration_cancel(SERVER, SRC_ATT, gen)
    wait_state(compute, "cancelled")
    guest.stop_writer()
    guest.check_guest_reads_model()
    guest.stop()
    assert volumes.read_src() == guest.model


@pytest.mark.parametrize("rbd_guest", ["qmp", "libvirt-persistent"], indirect=True)
@pytest.mark.parametrize("ending", ["complete", "cancel"])
def test_guest_shut_down_while_fenced_is_merged_offline_into_an_rbd_image(
    rbd_guest, rbd_compute, rbd_volumes, workdir, ending
):
    """The guest shuts down while fenced: the agent sees QEMU gone (its pid file unlocked, or libvirt)
    and, through the image's watchers (``rbd status``), that no QEMU has src open any more; the overlay
    is then merged with qemu-img, through librbd, into dst (complete) or src (cancel). A persistent
    domain's definition (the overlay over src while fenced) is then on that image alone, a network
    disk: started again, the guest boots there with every write."""
    guest, compute, volumes = rbd_guest, rbd_compute, rbd_volumes
    guest.start_writer()
    gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
    at_start = volumes.read_src()
    time.sleep(0.5)
    guest.stop_writer()
    guest.send("halt")
    guest.wait_stopped()
    stopped = wait_for(
        lambda: (s := compute.migration_state(SERVER, SRC_ATT))["instance_running"] is False and s,
        what="the agent to see QEMU stop",
    )
    assert stopped["state"] == "fenced" and stopped["data_location"].endswith("(the instance is stopped)")
    assert volumes.read_src() == at_start, "src changed while fenced"
    volumes.copy()
    if ending == "complete":
        done = compute.migration_complete(SERVER, SRC_ATT, DST_ATT, volumes.connection_info(), gen)
        assert done["state"] in ("completing", "completed")
        wait_state(compute, "completed")
        assert volumes.read_dst() == guest.model
        assert volumes.read_src() == at_start
    else:
        compute.migration_cancel(SERVER, SRC_ATT, gen)
        wait_state(compute, "cancelled")
        assert volumes.read_src() == guest.model
        assert volumes.read_dst() == at_start  # the copy, and nothing else
    assert guest.errors == [] and len(guest.writes) > 10
    assert overlay_files(workdir / "overlays") == []
    if isinstance(guest, LibvirtGuest):
        if ending == "complete":
            boot_again_on(guest, volumes.dst, volumes.read_dst)
        else:
            boot_again_on(guest, volumes.src, volumes.read_src)


def boot_again_on(guest: LibvirtGuest, image: str, read) -> None:
    """A persistent domain started again from its definition boots on the RBD image alone and reads
    every write it ever made; a write then lands in the image (read() reads it whole)."""
    import libvirt

    assert guest.chain(libvirt.VIR_DOMAIN_XML_INACTIVE) == [image]
    guest.boot()
    assert guest.chain() == [image]
    guest.check_guest_reads_model()
    guest.start_writer()
    time.sleep(0.2)
    guest.stop_writer()
    assert guest.errors == []
    guest.check_guest_reads_model()
    guest.stop()
    assert read() == guest.model, f"{image} lacks some of the guest's writes"


def test_a_wrong_pid_file_setting_is_an_error_never_stopped_with_an_rbd_src(rbd_guest, rbd_volumes, workdir):
    """The agent is told a pid file QEMU does not use. An RBD image has no lock on a host file to
    prove that QEMU still runs; its header's watch does (``rbd status``): start answers 409 with the
    reason instead of taking the writing guest for a stopped one."""
    entry = server_entry(rbd_guest, SRC_ATT) | {"pidfile": str(workdir / "elsewhere.pid")}
    agent = Agent(workdir, {SERVER: entry}, allowed_connectors=["rbd"])
    agent.start()
    try:
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)
        rbd_guest.start_writer()
        refusal = r"rbd:.* is in use although the pid file .* says QEMU is not running"
        with pytest.raises(ComputeConflict, match=refusal):
            compute.migration_start(SERVER, SRC_ATT)
        assert compute.migration_state(SERVER, SRC_ATT)["state"] == "none"
        rbd_guest.stop_writer()
        rbd_guest.check_guest_reads_model()
        rbd_guest.stop()
        assert rbd_volumes.read_src() == rbd_guest.model
    finally:
        agent.stop()


@pytest.mark.parametrize("rbd_guest", BACKENDS, indirect=True)
def test_the_migrator_moves_an_attached_rbd_volume_to_another_pool_while_the_guest_writes(
    rbd_guest, rbd_compute, rbd_volumes, workdir
):
    """The whole flow, as Cinder drives it: start (fence), prepare, the engine's copy through librbd on
    both sides (dst in another pool, garbage until then), digests compared, complete."""
    from volcopy.migration import Migrator

    guest, compute, volumes = rbd_guest, rbd_compute, rbd_volumes
    journal = f"sqlite:///{workdir}/journal.sqlite"
    src_info = volumes.connection_info(volumes.src_pool, volumes.src_image, volume_id=str(uuid.uuid4()))
    guest.start_writer()
    time.sleep(0.3)

    m = Migrator(journal, compute).migrate(
        src_info, volumes.connection_info(), attachments=[(SERVER, SRC_ATT, DST_ATT)], verify=True
    )

    time.sleep(0.3)  # more writes, now onto dst
    guest.stop_writer()
    assert m.state == "completed" and m.copy_path == "copy" and m.src_digest == m.dst_digest
    steps = [(s.name, s.status, s.detail) for s in Migrator(journal).steps(m.id)]
    assert [step[:2] for step in steps] == [
        ("start", "done"),
        ("prepare", "done"),
        ("copy", "done"),  # the engine: librbd's deep copy only when asked for
        ("verify", "done"),
        ("complete", "done"),
    ]
    assert guest.errors == [] and guest.io_status_ok() and len(guest.writes) > 20
    guest.check_guest_reads_model()
    assert chain(guest) == [volumes.dst]
    guest.stop()
    assert volumes.read_dst() == guest.model, "dst does not hold src-at-start plus every write"
