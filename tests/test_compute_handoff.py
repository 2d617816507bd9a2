"""The compute handoff on a real QEMU, with a guest writing through its disk all along: start fences
src, complete moves the guest onto dst with every write, cancel merges the writes back into src; the
API answers as documented (401, 400, 404, 409, idempotent repeats); a stopped instance and an agent
restart are handled."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import pytest
from faultshim import fault_env, injections

import volcopy
from compute_harness import (
    BACKENDS,
    DST_ATT,
    REQUEST_TIMEOUT,
    SERVER,
    SIZE,
    SRC_ATT,
    TOKEN,
    Agent,
    LibvirtGuest,
    boot_again_on,
    check_overlay_placement,
    local,
    needs_guest,
    overlay_files,
    server_entry,
    wait_state,
)
from conftest import MiB, read_all
from volcopy.compute import (
    ComputeConflict,
    ComputeForbidden,
    ComputeNotFound,
    ComputeUnauthorized,
    NovaCompute,
)
from volcopy.compute.libvirt import disk_chain

pytestmark = needs_guest


def prepare_before_the_copy(guest, compute, src: str, dst: str, gen: int) -> None:
    """prepare with dst, as the Cinder side does before its copy: the migration stays fenced on src,
    dst named; on libvirt the block copy runs, and the disk's chain is still [overlay, src] (dst is not
    opened). Another new volume is refused and changes nothing."""
    prepared = compute.migration_prepare(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    assert (prepared["state"], prepared["new_attachment_id"], prepared["reason"]) == ("fenced", DST_ATT, None)
    assert prepared["data_location"].endswith(f"over src {src}")
    again = compute.migration_prepare(SERVER, SRC_ATT, DST_ATT, local(dst), gen)  # idempotent
    assert (again["state"], again["new_attachment_id"], again["generation"]) == ("fenced", DST_ATT, gen)
    for new_id, info in [("att-other", local(dst)), (DST_ATT, local(src))]:
        with pytest.raises(ComputeConflict, match=f"prepared onto attachment {DST_ATT}"):
            compute.migration_prepare(SERVER, SRC_ATT, new_id, info, gen)
        with pytest.raises(ComputeConflict, match=f"prepared onto attachment {DST_ATT}"):
            compute.migration_complete(SERVER, SRC_ATT, new_id, info, gen)
        state = compute.migration_state(SERVER, SRC_ATT)
        assert (state["state"], state["new_attachment_id"]) == ("fenced", DST_ATT)
    if isinstance(guest, LibvirtGuest):
        chain = disk_chain(guest.domain, guest.qdev)
        assert chain == [chain[0], src] and chain[0].endswith(f"-{gen}.qcow2"), "dst opened before the pivot"
        assert guest.domain.blockJobInfo(guest.qdev, 0), "the block copy does not run"


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
@pytest.mark.parametrize("prepared", [False, True], ids=["", "prepared"])
def test_complete_moves_the_guest_onto_dst_with_every_write(guest, compute, volumes, prepared):
    src, dst = volumes
    guest.start_writer()
    time.sleep(0.3)

    started = compute.migration_start(SERVER, SRC_ATT)
    assert started["state"] == "fenced" and started["generation"] == 1
    assert started["data_location"].startswith("overlay ") and started["data_location"].endswith(
        f"over src {src}"
    )
    gen = started["generation"]
    at_start = read_all(src)
    digest_at_start = volcopy.digest(src)
    if prepared:
        prepare_before_the_copy(guest, compute, src, dst, gen)
    volcopy.copy(src, dst)  # Cinder's copy, while the guest keeps writing
    time.sleep(0.3)
    assert volcopy.digest(src) == digest_at_start, "src changed while fenced"
    assert compute.migration_state(SERVER, SRC_ATT)["bytes_written_since_start"] > 0

    done = compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    assert done["state"] in ("completing", "completed")
    time.sleep(0.3)  # more writes, now onto dst
    guest.stop_writer()
    wait_state(compute, "completed")

    assert guest.errors == [] and guest.io_status_ok()
    assert len(guest.writes) > 50
    guest.check_guest_reads_model()
    assert [a["id"] for a in compute.attachments(SERVER)] == [DST_ATT]
    assert read_all(src) == at_start, "src was written after its fence"
    guest.stop()
    assert read_all(dst) == guest.model, "dst does not hold src-at-start plus every write"


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
@pytest.mark.parametrize("prepared", [False, True], ids=["", "prepared"])
def test_cancel_merges_every_write_back_into_src(guest, compute, volumes, workdir, prepared):
    src, dst = volumes
    guest.start_writer()
    gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
    digest_at_start = volcopy.digest(src)
    if prepared:
        prepare_before_the_copy(guest, compute, src, dst, gen)
    time.sleep(0.5)
    assert volcopy.digest(src) == digest_at_start

    cancelled = compute.migration_cancel(SERVER, SRC_ATT, gen)
    assert cancelled["state"] in ("cancelling", "cancelled")
    assert cancelled["new_attachment_id"] is None, "dst is still attached"
    wait_state(compute, "cancelled")
    assert overlay_files(workdir / "overlays") == [], "an overlay (or newtop) was left"
    time.sleep(0.2)  # the guest writes on, to src again
    guest.stop_writer()

    with pytest.raises(ComputeConflict, match="cancelled"):
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    assert guest.errors == [] and guest.io_status_ok()
    guest.check_guest_reads_model()
    guest.stop()
    assert read_all(src) == guest.model, "src lacks some of the guest's writes"


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_start_and_complete_repeated_are_idempotent(guest, compute, volumes):
    src, dst = volumes
    guest.start_writer()
    first = compute.migration_start(SERVER, SRC_ATT)
    again = compute.migration_start(SERVER, SRC_ATT)
    assert first["state"] == again["state"] == "fenced"
    assert first["generation"] == again["generation"] == 1
    volcopy.copy(src, dst)

    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), 1)
    repeated = compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), 1)
    assert repeated["state"] in ("completing", "completed")
    wait_state(compute, "completed")
    assert compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), 1)["state"] == "completed"
    with pytest.raises(ComputeConflict, match="completed onto"):
        compute.migration_complete(SERVER, SRC_ATT, "att-other", local(dst), 1)
    guest.stop_writer()
    guest.stop()
    assert read_all(dst) == guest.model


def test_cancel_of_a_migration_not_running_is_a_no_op(compute):
    assert compute.migration_cancel(SERVER, SRC_ATT, 1)["state"] == "none"
    assert compute.migration_state(SERVER, SRC_ATT)["state"] == "none"


def test_complete_without_start_is_a_conflict(compute, volumes):
    with pytest.raises(ComputeConflict, match="not started"):
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(volumes[1]), 1)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_start_is_refused_when_the_disk_is_not_on_its_volume(guest, compute, workdir):
    """Something else (a backup, another snapshot) already sits on the disk: 409 with the reason."""
    guest.snapshot_onto(f"{workdir}/other.qcow2")

    with pytest.raises(ComputeConflict, match="cannot suspend writes: .*not on its volume"):
        compute.migration_start(SERVER, SRC_ATT)
    assert compute.migration_state(SERVER, SRC_ATT)["state"] == "none"
    assert overlay_files(workdir / "overlays") == [], "a refused fence leaves no overlay behind"


def test_unknown_server_or_attachment_is_404(compute):
    with pytest.raises(ComputeNotFound, match="server"):
        compute.migration_start("no-such-server", SRC_ATT)
    with pytest.raises(ComputeNotFound, match="attachment"):
        compute.migration_start(SERVER, "no-such-attachment")
    with pytest.raises(ComputeNotFound):
        compute.migration_state(SERVER, "no-such-attachment")


def test_requests_without_a_valid_token_are_401(agent):
    with pytest.raises(ComputeUnauthorized):
        NovaCompute(endpoint=agent.url, token="wrong-token-0123456789").migration_start(SERVER, SRC_ATT)
    status, body = raw(agent, "POST", f"/servers/{SERVER}/action", {"volume-migration-start": {}}, token=None)
    assert status == 401 and body["unauthorized"]["code"] == 401


def raw(agent, method, path, body, token=TOKEN, version="compute 2.97"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(agent.url + path, data=data if method == "POST" else None, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("X-Auth-Token", token)
    if version:
        request.add_header("OpenStack-API-Version", version)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize(
    "body,message",
    [
        (b"{not json", "not valid JSON"),
        ([], "exactly one action"),
        ({"volume-migration-start": {}, "volume-migration-cancel": {}}, "exactly one action"),
        ({"reboot": {}}, "unknown action"),
        ({"volume-migration-start": "att"}, "must be an object"),
        ({"volume-migration-start": {}}, "'attachment_id' must be an id"),
        ({"volume-migration-start": {"attachment_id": 7}}, "'attachment_id' must be an id"),
        ({"volume-migration-start": {"attachment_id": "a/b"}}, "'attachment_id' must be an id"),
        ({"volume-migration-start": {"attachment_id": SRC_ATT, "force": True}}, "unexpected key"),
        ({"volume-migration-cancel": {"attachment_id": SRC_ATT}}, "'generation' must be the positive"),
        ({"volume-migration-cancel": {"attachment_id": SRC_ATT, "generation": "1"}}, "'generation' must"),
        (
            {
                "volume-migration-complete": {
                    "attachment_id": SRC_ATT,
                    "new_attachment_id": DST_ATT,
                    "generation": 1,
                }
            },
            "'connection_info' must be an object",
        ),
        (
            {
                "volume-migration-complete": {
                    "attachment_id": SRC_ATT,
                    "new_attachment_id": SRC_ATT,
                    "generation": 1,
                    "connection_info": {"driver_volume_type": "local", "data": {}},
                }
            },
            "must differ",
        ),
    ],
)
def test_malformed_bodies_are_400_with_a_reason(agent, body, message):
    status, reply = raw(agent, "POST", f"/servers/{SERVER}/action", body)
    assert status == 400
    assert message in reply["badRequest"]["message"]


def test_microversion_is_required(agent):
    body = {"volume-migration-start": {"attachment_id": SRC_ATT}}
    status, reply = raw(agent, "POST", f"/servers/{SERVER}/action", body, version=None)
    assert status == 400 and "microversion 2.97" in reply["badRequest"]["message"]
    status, reply = raw(agent, "POST", f"/servers/{SERVER}/action", body, version="compute 2.200")
    assert status == 406


@pytest.mark.parametrize("guest", [*BACKENDS, "libvirt-persistent"], indirect=True)
def test_stopped_instance_is_fenced_in_state_and_completed_onto_dst(workdir, guest, volumes):
    """The guest wrote, then was shut down before start: start fences it in the agent's state alone,
    complete moves the record (and a persistent domain's definition) onto dst, where the guest, started
    again, finds every write."""
    src, dst = volumes
    guest.start_writer()
    time.sleep(0.3)
    guest.stop_writer()
    guest.send("halt")
    guest.wait_stopped()
    agent = Agent(workdir, {SERVER: server_entry(guest, SRC_ATT)})
    agent.start()
    try:
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)
        fenced = compute.migration_start(SERVER, SRC_ATT)
        assert fenced["state"] == "fenced" and fenced["instance_running"] is False
        volcopy.copy(src, dst)

        done = compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), fenced["generation"])

        assert done["state"] == "completed"
        assert compute.attachments(SERVER) == [{"id": DST_ATT, "serverId": SERVER, "device_path": dst}]
        assert read_all(dst) == read_all(src) == guest.model
        if getattr(guest, "persistent", False):
            boot_again_on(guest, dst)
    finally:
        agent.stop()


@pytest.mark.parametrize("guest", ["libvirt-persistent"], indirect=True)
@pytest.mark.parametrize("ending", ["complete", "cancel"])
def test_a_persistent_domain_is_defined_on_the_volume_the_handoff_ends_on(
    workdir, guest, compute, volumes, ending
):
    """Nova's domains are persistent. libvirt 9.0 updates the definition itself at the fence's snapshot
    and at each pivot: it shows the overlay over src while fenced, and the volume the handoff ended on
    alone. The domain, shut down and started again from it, boots there with every write."""
    import libvirt

    src, dst = volumes
    guest.start_writer()
    gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
    check_overlay_placement(workdir, guest, gen)
    (overlay,) = overlay_files(workdir / "overlays")
    assert guest.chain(libvirt.VIR_DOMAIN_XML_INACTIVE) == [str(overlay), src]
    at_fence = volcopy.digest(src)
    volcopy.copy(src, dst)
    time.sleep(0.3)
    if ending == "complete":
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
        wait_state(compute, "completed")
        volume = dst
    else:
        compute.migration_cancel(SERVER, SRC_ATT, gen)
        wait_state(compute, "cancelled")
        volume = src
    guest.stop_writer()
    assert guest.errors == []
    assert overlay_files(workdir / "overlays") == []
    if ending == "complete":
        assert volcopy.digest(src) == at_fence, "src was written after its fence"
    boot_again_on(guest, volume)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_agent_restarted_while_fenced_still_knows_and_completes(workdir, guest, volumes):
    src, dst = volumes
    agent = Agent(workdir, {SERVER: server_entry(guest, SRC_ATT)})
    agent.start()
    try:
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)
        guest.start_writer()
        gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
        digest_at_start = volcopy.digest(src)
        agent.kill()
        volcopy.copy(src, dst)
        agent.start()
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)

        assert compute.migration_state(SERVER, SRC_ATT)["state"] == "fenced"
        assert volcopy.digest(src) == digest_at_start
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
        agent.kill()  # killed again, maybe while merging the overlay into dst
        agent.start()
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)
        wait_state(compute, "completed")
        guest.stop_writer()
        assert guest.errors == []
        guest.check_guest_reads_model()
        guest.stop()
        assert read_all(dst) == guest.model
        assert volcopy.digest(src) == digest_at_start, "src was written after its fence"
    finally:
        agent.stop()


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_complete_attaches_only_an_allowed_large_enough_new_volume(workdir, guest, volumes, loops, request):
    """complete must not give the guest a device of the host's choosing: a connector or a device path
    (or where its symlink leads) the agent's configuration does not allow, another attachment's volume,
    or a device mounted on the host is 403; a new volume smaller than src, or an attachment
    id in use, is 409; each leaves the migration fenced, and the guest keeps writing to its overlay,
    which only root may read."""
    src, dst = volumes
    other = {"qdev": "none", "node": "none", "volume": "/dev/null"}
    entry = server_entry(guest, SRC_ATT)
    entry["attachments"]["att-in-use"] = other
    agent = Agent(workdir, {SERVER: entry})
    agent.start()
    try:
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)
        guest.start_writer()
        gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
        check_overlay_placement(workdir, guest, gen)
        small = loops.create(SIZE // 2)
        mounted = loops.create(SIZE)
        subprocess.run(["mkfs.ext4", "-q", mounted], check=True)
        (workdir / "mnt").mkdir()
        subprocess.run(["mount", mounted, str(workdir / "mnt")], check=True)
        link = f"/dev/loop-volcopy-test-{os.getpid()}"  # under the allowed prefix, leading outside it
        os.symlink("/dev/zero", link)
        request.addfinalizer(lambda: (os.unlink(link), subprocess.run(["umount", str(workdir / "mnt")])))
        refusals = [
            (local(link), DST_ATT, ComputeForbidden, "/dev/zero lies outside"),
            (local(src), DST_ATT, ComputeForbidden, "the volume of another attachment"),
            (local(mounted), DST_ATT, ComputeForbidden, "is mounted on this host"),
            (local("/dev/vda"), DST_ATT, ComputeForbidden, "lies outside the paths"),
            (local("/dev/loop0/../vda"), DST_ATT, ComputeForbidden, "/dev/vda lies outside"),
            ({"driver_volume_type": "nfs", "data": {}}, DST_ATT, ComputeForbidden, "'nfs' is not allowed"),
            (local("/dev/loop-missing"), DST_ATT, ComputeConflict, "new volume"),
            (local(small), DST_ATT, ComputeConflict, f"fewer than the {SIZE}"),
            (local(dst), "att-in-use", ComputeConflict, "att-in-use exists already"),
        ]
        for connection_info, new_id, error, message in refusals:
            with pytest.raises(error, match=message):
                compute.migration_complete(SERVER, SRC_ATT, new_id, connection_info, gen)
            assert compute.migration_state(SERVER, SRC_ATT)["state"] == "fenced"

        compute.migration_cancel(SERVER, SRC_ATT, gen)
        wait_state(compute, "cancelled")
        guest.stop_writer()
        assert guest.errors == [] and guest.io_status_ok()
        guest.check_guest_reads_model()
    finally:
        agent.stop()


def raw_http(agent, request: bytes, timeout: float = 10) -> bytes:
    """Sends bytes as they are and reads until the agent closes the connection."""
    import socket

    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def test_the_transport_refuses_bad_lengths_large_bodies_and_silent_connections(agent):
    head = (
        f"POST /servers/{SERVER}/action HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n"
        "OpenStack-API-Version: compute 2.97\r\nConnection: close\r\n"
    )
    negative = raw_http(agent, (head + "Content-Length: -1\r\n\r\n").encode())
    assert negative.startswith(b"HTTP/1.1 400") and b"invalid Content-Length '-1'" in negative

    status, body = raw(agent, "POST", f"/servers/{SERVER}/action", b"{" + b" " * (64 * 1024) + b"}")
    assert status == 413 and "at most 65536 bytes" in body["requestEntityTooLarge"]["message"]

    started = time.monotonic()
    silent = raw_http(agent, b"")  # connects, sends nothing
    closed_after = time.monotonic() - started
    assert silent == b"" and REQUEST_TIMEOUT <= closed_after < REQUEST_TIMEOUT + 2


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_a_fence_that_fails_after_the_snapshot_is_merged_back_never_deleted(workdir, guest, volumes):
    """The agent's fsync of src after the snapshot fails (LD_PRELOAD): the overlay is in the disk's chain
    by then and holds the guest's writes since. start answers 409 and leaves the guest on src with every
    write; the overlay was merged back before it was removed (it used to be unlinked under the guest)."""
    src, _dst = volumes
    agent = Agent(workdir, {SERVER: server_entry(guest, SRC_ATT)})
    agent.start(env=fault_env("fsync", nth=1, errno="EIO", path=src, log=workdir / "faults.log"))
    try:
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)
        guest.start_writer()
        time.sleep(0.3)
        with pytest.raises(ComputeConflict, match="cannot suspend writes"):
            compute.migration_start(SERVER, SRC_ATT)
        assert [i.call for i in injections(workdir / "faults.log")] == ["fsync"]
        assert compute.migration_state(SERVER, SRC_ATT)["state"] == "none"
        time.sleep(0.3)
        guest.stop_writer()
        assert guest.errors == [] and guest.io_status_ok()
        guest.check_guest_reads_model()
        assert overlay_files(workdir / "overlays") == []
        guest.stop()
        assert read_all(src) == guest.model, "a write the guest made between snapshot and failure is lost"
    finally:
        agent.stop()


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_start_is_refused_when_the_overlay_directory_is_short_of_space(workdir, guest, volumes):
    """The overlay directory on a 32 MiB tmpfs, 64 MiB required free: start answers 409 with the reason
    and sets no fence (it used to answer 500 and stay "fencing" when the overlay could not be made)."""
    overlays = workdir / "small"
    overlays.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(overlays)], check=True)
    agent = Agent(
        workdir, {SERVER: server_entry(guest, SRC_ATT)}, overlay_dir=str(overlays), overlay_min_free=64 * MiB
    )
    try:
        agent.start()
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)
        with pytest.raises(ComputeConflict, match=r"has \d+ bytes free, less than the 67108864 configured"):
            compute.migration_start(SERVER, SRC_ATT)
        assert compute.migration_state(SERVER, SRC_ATT)["state"] == "none"
        assert overlay_files(overlays) == []
    finally:
        agent.stop()
        subprocess.run(["umount", "-l", str(overlays)], check=False)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_a_guest_moves_back_onto_the_volume_it_left(guest, compute, volumes):
    """A volume released by a complete is no other attachment's any more: the guest can be moved back
    onto it (found by the handoff benchmark, which moves a guest back and forth)."""
    src, dst = volumes
    guest.start_writer()
    gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
    volcopy.copy(src, dst)
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    wait_state(compute, "completed")

    gen = compute.migration_start(SERVER, DST_ATT)["generation"]
    volcopy.copy(dst, src)
    compute.migration_complete(SERVER, DST_ATT, "att-back", local(src), gen)
    wait_state(compute, "completed", attachment=DST_ATT)
    assert [a["id"] for a in compute.attachments(SERVER)] == ["att-back"]
    guest.stop_writer()
    assert guest.errors == []
    guest.check_guest_reads_model()
    guest.stop()
    assert read_all(src) == guest.model
