"""The handoff's failure paths on a real QEMU with a guest writing throughout. Each case injects its
failure for real (the agent SIGKILLed at its failure points, QEMU refusing a command, dst failing
writes, the guest shutting down or started again, a full overlay directory, a second writer, a stale
token) and ends with the same checks: the guest's view matches its model, the volume it lives on holds
src-at-fence plus every later write in order, src did not change until the switch, and the state the
agent reports is true."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from nbd_devices import nbd_devices

import volcopy
from compute_harness import (
    BACKENDS,
    DST_ATT,
    SERVER,
    SERVER_2,
    SIZE,
    SRC_ATT,
    TOKEN,
    Agent,
    Guest,
    LibvirtGuest,
    boot_again_on,
    check_overlay_placement,
    local,
    needs_guest,
    overlay_files,
    restart_libvirtd,
    server_entry,
    wait_for,
    wait_state,
)
from conftest import MiB, read_all
from volcopy.compute import ComputeConflict, ComputeError, NovaCompute

pytestmark = needs_guest
__all__ = ["nbd_devices"]  # a fixture, used by name below


def client(agent: Agent) -> NovaCompute:
    return NovaCompute(endpoint=agent.url, token=TOKEN, retries=0)


def fenced(guest, started_agent, failpoint: str | None = None) -> tuple[Agent, NovaCompute, int]:
    """An agent (that SIGKILLs itself at failpoint, if given), the guest writing, its disk fenced: the
    agent, a client of it, and the fence's generation."""
    agent = started_agent()
    agent.start(env=dict(os.environ, VOLCOPY_FAILPOINT=failpoint) if failpoint else None)
    compute = client(agent)
    guest.start_writer()
    return agent, compute, compute.migration_start(SERVER, SRC_ATT)["generation"]


def finish_on(guest: Guest, volume: str) -> None:
    """The common ending: the guest stops writing, reads its model, and the volume holds the model."""
    guest.stop_writer()
    assert guest.errors == [] and guest.io_status_ok()
    guest.check_guest_reads_model()
    guest.stop()
    assert read_all(volume) == guest.model, f"{volume} lacks some of the guest's writes"


@pytest.fixture
def started_agent(workdir, guest):
    agents = []

    def start(**settings) -> Agent:
        agent = Agent(workdir, {SERVER: server_entry(guest, SRC_ATT)}, **settings)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
@pytest.mark.parametrize("point", ["agent-before-snapshot", "agent-after-snapshot"])
def test_agent_killed_while_fencing_resolves_from_the_graph(workdir, guest, volumes, started_agent, point):
    src, dst = volumes
    agent = started_agent()
    agent.start(env=dict(os.environ, VOLCOPY_FAILPOINT=point))
    guest.start_writer()
    with pytest.raises(ComputeError):
        client(agent).migration_start(SERVER, SRC_ATT)
    agent.process.wait(timeout=10)
    agent.start()
    compute = client(agent)

    state = compute.migration_state(SERVER, SRC_ATT)
    if point == "agent-before-snapshot":  # the overlay never reached the chain: no fence, no leftovers
        assert state["state"] == "none" and "restarted before the fence" in state["reason"]
        assert overlay_files(workdir / "overlays") == []
        gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
        assert gen == 2
    else:  # it did: the guest writes to it, so the fence stands
        assert state["state"] == "fenced" and state["generation"] == 1
        gen = 1
    at_fence = volcopy.digest(src)
    volcopy.copy(src, dst)
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    wait_state(compute, "completed")
    assert volcopy.digest(src) == at_fence, "src was written after its fence"
    finish_on(guest, dst)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "point", ["agent-after-attach", "agent-before-repoint", "agent-after-repoint", "agent-after-merge"]
)
def test_agent_killed_while_completing_finishes_on_restart(workdir, guest, volumes, started_agent, point):
    src, dst = volumes
    agent, compute, gen = fenced(guest, started_agent, point)
    at_fence = volcopy.digest(src)
    volcopy.copy(src, dst)
    try:
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    except ComputeError:
        pass  # killed before it answered (the merge point is reached after the answer)
    agent.process.wait(timeout=60)
    if point == "agent-after-repoint":  # the guest is on the overlay (libvirt: newtop) over dst
        check_overlay_placement(workdir, guest, gen, moved=True)
    agent.start()
    compute = client(agent)

    wait_state(compute, "completed")  # the recorded intent is carried out by the restarted agent
    again = compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    assert again["state"] == "completed" and again["data_location"] == f"the new volume {dst}"
    assert [a["id"] for a in compute.attachments(SERVER)] == [DST_ATT]
    assert overlay_files(workdir / "overlays") == []
    assert volcopy.digest(src) == at_fence, "src was written after its fence"
    finish_on(guest, dst)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_qemu_refusing_to_release_src_is_failed_then_retried(guest, volumes, started_agent):
    """Something else uses the disk while complete runs. QMP: an NBD export of src's node, so that
    blockdev-del of src fails after the overlay was moved onto dst: complete answers 409 and the state is
    failed, saying the data is in the overlay over dst; cancel cannot go back. libvirt: a backup job
    (pull mode, an NBD export of the disk), which no block copy may join: complete answers 409 and the
    migration stays fenced on src, the other job left alone. Once the export ends, a repeated complete
    finishes."""
    src, dst = volumes
    _, compute, gen = fenced(guest, started_agent)
    volcopy.copy(src, dst)
    guest.export_disk()

    if isinstance(guest, LibvirtGuest):
        refused = r"moving the overlay onto the new volume failed: .*another block job runs on it \(a backup"
        with pytest.raises(ComputeConflict, match=refused):
            compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
        state = compute.migration_state(SERVER, SRC_ATT)
        assert state["state"] == "fenced" and state["data_location"].endswith(f"over src {src}")
    else:
        with pytest.raises(ComputeConflict, match="releasing src after the switch failed: .*blockdev-del"):
            compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
        state = compute.migration_state(SERVER, SRC_ATT)
        assert state["state"] == "failed"
        assert state["data_location"].startswith("overlay ") and state["data_location"].endswith(
            f"over the new volume {dst}"
        )
        with pytest.raises(ComputeConflict, match="already runs on the new volume"):
            compute.migration_cancel(SERVER, SRC_ATT, gen)

    guest.end_export()
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    wait_state(compute, "completed")
    finish_on(guest, dst)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_dst_failing_writes_during_the_merge_is_failed_then_retried(
    guest, volumes, started_agent, nbd_devices
):
    """dst is a loop device over nbdkit whose writes fail during the final merge: the block-commit
    fails, the state is failed with the data in the overlay over dst, the guest keeps writing; once
    dst heals, a repeated complete merges everything."""
    src, _ = volumes
    dst_device = nbd_devices.faulty(size=SIZE)
    dst = dst_device.path
    _, compute, gen = fenced(guest, started_agent)
    volcopy.copy(src, dst)
    time.sleep(0.5)  # writes for the merge to carry

    dst_device.fail(write=True)
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    failed = wait_state(compute, "failed")
    assert "merging the overlay into the new volume failed" in failed["reason"]
    assert failed["data_location"].endswith(f"over the new volume {dst}")
    time.sleep(0.3)

    dst_device.heal()
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    wait_state(compute, "completed")
    finish_on(guest, dst)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_a_merge_refused_while_another_job_runs_is_tried_again(workdir, guest, volumes, started_agent):
    """Cancel's merge back into src is refused while another block job (a throttled pull into the
    overlay, as a tool beside Nova might run) holds the disk: the migration stays cancelling, the agent
    tries again, and once the other job has ended the merge is done: cancelled, src holds every write."""
    src, _ = volumes
    agent, compute, gen = fenced(guest, started_agent)
    time.sleep(0.3)  # writes for the merge to carry
    guest.start_other_job()

    compute.migration_cancel(SERVER, SRC_ATT, gen)
    wait_for(lambda: "(try 1 of 3)" in agent.log.read_text(), what="the agent's first try to be refused")
    assert compute.migration_state(SERVER, SRC_ATT)["state"] == "cancelling"
    guest.end_other_job()
    wait_state(compute, "cancelled")
    assert overlay_files(workdir / "overlays") == []
    finish_on(guest, src)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_qemu_stopped_while_cancel_moves_the_disk_down(workdir, guest, volumes, started_agent):
    """The agent is SIGKILLed just before cancel's merge moves the disk down onto src, and QEMU is
    killed before the agent is back. QMP holds the disk drained until the move, so src has every write
    whatever became of it: cancelled, the overlay gone. libvirt's pivot does not drain the disk (the
    guest writes the overlay until it), so which of src and the overlay is newer is unknown: failed,
    nothing merged or deleted, complete refused, cancel failing the same way again. The kept overlay,
    committed by hand, gives src every write."""
    src, dst = volumes
    agent, compute, gen = fenced(guest, started_agent, "agent-before-switch")
    time.sleep(0.5)  # writes for the merge to carry
    guest.stop_writer()
    assert guest.errors == []
    guest.flush()
    (overlay,) = overlay_files(workdir / "overlays")
    compute.migration_cancel(SERVER, SRC_ATT, gen)
    agent.process.wait(timeout=60)
    guest.destroy()
    guest.wait_stopped(timeout=30)
    agent.start()
    compute = client(agent)

    if isinstance(guest, LibvirtGuest):
        failed = wait_state(compute, "failed")
        assert f"QEMU stopped while the disk moved down from overlay {overlay} onto {src}" in failed["reason"]
        unknown = f"src {src} or overlay {overlay} over it, whichever QEMU wrote last"
        unknown += " (the instance is stopped)"
        assert failed["data_location"] == unknown
        with pytest.raises(ComputeConflict, match="whether it moved is unknown.*the operator must decide"):
            compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
        compute.migration_cancel(SERVER, SRC_ATT, gen)
        assert wait_state(compute, "failed")["data_location"] == unknown
        assert overlay.exists(), "the overlay may hold the newest writes: it is never deleted on a guess"
        subprocess.run(["qemu-img", "commit", "-q", str(overlay)], check=True)
    else:
        wait_state(compute, "cancelled")
        assert overlay_files(workdir / "overlays") == []
    assert read_all(src) == guest.model


def fence_then_stop(
    guest, compute, src, how: str = "halt", prepared_onto: str | None = None
) -> tuple[int, str, dict]:
    """Fenced (and prepared onto the volume prepared_onto, if given), the guest writes to its overlay,
    then goes away: it shuts down ("halt"), or its QEMU is killed ("destroy": SIGKILL, or
    virDomainDestroy) once the guest flushed its writes, which are then on the overlay. Returns (the
    generation, src's digest at the fence, the state once the agent has seen QEMU stop)."""
    guest.start_writer()
    gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
    at_fence = volcopy.digest(src)
    if prepared_onto:
        compute.migration_prepare(SERVER, SRC_ATT, DST_ATT, local(prepared_onto), gen)
    time.sleep(0.5)
    guest.stop_writer()
    assert guest.errors == []
    guest.check_guest_reads_model()
    if how == "halt":
        guest.send("halt")
    else:
        guest.flush()
        guest.destroy()
    guest.wait_stopped(timeout=30)
    stopped = wait_for(
        lambda: (s := compute.migration_state(SERVER, SRC_ATT))["instance_running"] is False and s,
        what="the agent to see QEMU stop",
    )
    return gen, at_fence, stopped


@pytest.mark.parametrize("guest", [*BACKENDS, "libvirt-persistent"], indirect=True)
@pytest.mark.parametrize("ending,how", [("complete", "halt"), ("cancel", "halt"), ("complete", "destroy")])
def test_guest_stopped_while_fenced_is_merged_offline(guest, volumes, started_agent, workdir, ending, how):
    """The guest shuts down, or is destroyed, while fenced: the agent reports the instance stopped and
    the fence kept. The overlay is merged with qemu-img into dst (complete) or src (cancel). A persistent
    domain's definition, which names the overlay over src, is then on that volume alone: started again,
    the guest boots there with every write."""
    src, dst = volumes
    agent = started_agent()
    agent.start()
    compute = client(agent)
    gen, at_fence, stopped = fence_then_stop(guest, compute, src, how)
    assert stopped["state"] == "fenced" and stopped["data_location"].endswith("(the instance is stopped)")
    assert volcopy.digest(src) == at_fence
    volcopy.copy(src, dst)
    if ending == "complete":
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
        wait_state(compute, "completed")
        volume = dst
        assert volcopy.digest(src) == at_fence
    else:
        compute.migration_cancel(SERVER, SRC_ATT, gen)
        wait_state(compute, "cancelled")
        volume = src
    assert overlay_files(workdir / "overlays") == []
    assert read_all(volume) == guest.model
    if getattr(guest, "persistent", False):
        boot_again_on(guest, volume)


@pytest.mark.parametrize("guest", ["libvirt-persistent"], indirect=True)
@pytest.mark.parametrize("ending", ["complete", "cancel"])
def test_repoint_failing_after_an_offline_merge_keeps_to_the_merged_volume(
    guest, volumes, started_agent, workdir, ending
):
    """The guest stopped while fenced; the agent is SIGKILLed between the offline merge (into dst for
    complete, src for cancel) and the repoint of the persistent definition, which meanwhile was put on
    an image of someone else's: the restarted agent's repoint fails. The migration is failed with the
    data in the volume the merge went into, the other ending is refused and the overlay kept; with the
    definition back, the first ending finishes on that volume with every write."""
    import libvirt

    from volcopy.compute.libvirt import define_disk_on

    src, dst = volumes
    agent = started_agent()
    agent.start(env=dict(os.environ, VOLCOPY_FAILPOINT="agent-after-offline-merge"))
    compute = client(agent)
    gen, at_fence, _ = fence_then_stop(guest, compute, src)
    volcopy.copy(src, dst)
    end = {
        "complete": lambda: compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen),
        "cancel": lambda: compute.migration_cancel(SERVER, SRC_ATT, gen),
    }
    try:
        end[ending]()
    except ComputeError:
        pass  # killed before it answered
    agent.process.wait(timeout=60)
    definition = guest.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    define_disk_on(guest.domain, guest.qdev, str(workdir / "elsewhere.qcow2"), "qcow2")
    (overlay,) = overlay_files(workdir / "overlays")
    agent.start()
    compute = client(agent)

    failed = wait_state(compute, "failed")
    assert "no image of this migration" in failed["reason"]
    volume, named = (dst, f"the new volume {dst}") if ending == "complete" else (src, f"src {src}")
    merged = f"{named}, into which overlay {overlay} was merged (the instance is stopped)"
    assert failed["data_location"] == merged
    if ending == "complete":
        with pytest.raises(ComputeConflict, match="already runs on the new volume"):
            end["cancel"]()
    else:
        with pytest.raises(ComputeConflict, match="was merged back into src: cancel again"):
            end["complete"]()
    assert compute.migration_state(SERVER, SRC_ATT)["data_location"] == merged
    assert overlay.exists()

    guest.domain.connect().defineXML(definition)
    end[ending]()
    wait_state(compute, "completed" if ending == "complete" else "cancelled")
    assert overlay_files(workdir / "overlays") == []
    if ending == "complete":
        assert volcopy.digest(src) == at_fence
    assert read_all(volume) == guest.model
    boot_again_on(guest, volume)


@pytest.mark.parametrize("guest", ["libvirt", "libvirt-persistent"], indirect=True)
@pytest.mark.parametrize("ending", ["cancel", "complete"])
def test_guest_stopped_after_prepare_is_merged_offline(guest, volumes, started_agent, workdir, ending):
    """libvirt (QMP starts nothing at prepare): prepare started the block copy into newtop, then the
    guest shuts down, and its job ends with QEMU (a transient domain is gone with it). cancel detaches
    dst and merges the overlay into src, complete merges it into dst; neither the overlay nor newtop is
    left, and a persistent domain boots on the volume with every write."""
    src, dst = volumes
    agent = started_agent()
    agent.start()
    compute = client(agent)
    gen, at_fence, stopped = fence_then_stop(guest, compute, src, prepared_onto=dst)
    assert (stopped["state"], stopped["new_attachment_id"]) == ("fenced", DST_ATT)
    assert len(overlay_files(workdir / "overlays")) == 2, "the overlay and newtop"
    if ending == "cancel":
        compute.migration_cancel(SERVER, SRC_ATT, gen)
        assert wait_state(compute, "cancelled")["new_attachment_id"] is None
        volume, attachment = src, SRC_ATT
    else:
        volcopy.copy(src, dst)
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
        wait_state(compute, "completed")
        assert volcopy.digest(src) == at_fence
        volume, attachment = dst, DST_ATT
    assert [a["id"] for a in compute.attachments(SERVER)] == [attachment]
    assert overlay_files(workdir / "overlays") == []
    assert read_all(volume) == guest.model
    if getattr(guest, "persistent", False):
        boot_again_on(guest, volume)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_guest_started_again_on_src_while_fenced_is_reported(guest, volumes, started_agent, workdir):
    src, dst = volumes
    agent = started_agent()
    agent.start()
    compute = client(agent)
    gen, _, _ = fence_then_stop(guest, compute, src)
    (overlay,) = overlay_files(workdir / "overlays")
    guest.stop()
    guest.start()  # the same QEMU command line: on src

    failed = wait_state(compute, "failed")
    assert "started again while fenced" in failed["reason"]
    assert f"overlay {overlay} holds the writes made while fenced" in failed["data_location"]
    with pytest.raises(ComputeConflict, match="started again while fenced"):
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    assert compute.migration_cancel(SERVER, SRC_ATT, gen)["state"] == "cancelled"
    assert overlay.exists(), "the overlay holds writes that are nowhere else: it is never deleted on a guess"


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_full_overlay_directory_is_reported_and_cancel_frees_it(small_overlays, guest, volumes, workdir):
    """The overlay directory on an 8 MiB tmpfs fills as the guest writes: QEMU pauses the guest,
    the agent reports overlay-full, and cancel merges the overlay back into src and resumes the guest,
    whose pending write then lands on src."""
    src, _ = volumes
    agent = Agent(
        workdir, {SERVER: server_entry(guest, SRC_ATT)}, overlay_dir=str(small_overlays), overlay_min_free=MiB
    )
    try:
        agent.start()
        compute = client(agent)
        guest.start_writer()
        gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
        full = wait_state(compute, "overlay-full", timeout=120)
        assert full["overlay_bytes"] > 4 * MiB and full["generation"] == gen

        compute.migration_cancel(SERVER, SRC_ATT, gen)
        wait_state(compute, "cancelled")
        assert overlay_files(small_overlays) == []
        writes = len(guest.writes)
        wait_for(lambda: len(guest.writes) > writes + 20, what="the guest to write again")
        assert not guest.paused()
        guest.stop_writer()
        # QEMU keeps the device's io-status "nospace" as the record of the pause: the guest saw no error.
        assert guest.errors == []
        guest.check_guest_reads_model()
        guest.stop()
        assert read_all(src) == guest.model, "src lacks some of the guest's writes"
    finally:
        agent.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_writers_on_a_multi_attached_volume_are_refused(workdir, volumes, make_guest, backend):
    src, _ = volumes
    first = make_guest(backend, "a", src, shared=True)
    second = make_guest(backend, "b", src, SERVER_2, shared=True)
    agent = Agent(workdir, {SERVER: server_entry(first, SRC_ATT), SERVER_2: server_entry(second, "att-b")})
    try:
        agent.start()
        compute = client(agent)
        for server, attachment in ((SERVER, SRC_ATT), (SERVER_2, "att-b")):
            with pytest.raises(ComputeConflict, match="writable multi-attachment .* stop seeing each other"):
                compute.migration_start(server, attachment)
            assert compute.migration_state(server, attachment)["state"] == "none"
        assert overlay_files(workdir / "overlays") == []
    finally:
        agent.stop()


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_a_stale_generation_is_refused(guest, volumes, started_agent):
    src, dst = volumes
    _, compute, first = fenced(guest, started_agent)
    compute.migration_cancel(SERVER, SRC_ATT, first)
    wait_state(compute, "cancelled")
    second = compute.migration_start(SERVER, SRC_ATT)["generation"]
    assert second == first + 1

    with pytest.raises(ComputeConflict, match=f"generation {first} is stale: .* is generation {second}"):
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), first)
    with pytest.raises(ComputeConflict, match=f"generation {first} is stale"):
        compute.migration_cancel(SERVER, SRC_ATT, first)
    assert compute.migration_state(SERVER, SRC_ATT)["state"] == "fenced"
    volcopy.copy(src, dst)
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), second)
    wait_state(compute, "completed")
    finish_on(guest, dst)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_a_qcow2_new_volume_is_opened_as_qcow2(guest, volumes, started_agent, loops, workdir):
    """connection_info's data.format says how dst is laid out: a qcow2 image on a device is attached
    as qcow2, and the guest's writes are merged into the image."""
    src, _ = volumes
    image = loops.create(SIZE + 4 * MiB)
    _, compute, gen = fenced(guest, started_agent)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE)], check=True)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", src, image], check=True)
    info = {"driver_volume_type": "local", "data": {"device_path": image, "format": "qcow2", "discard": True}}
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, info, gen)
    wait_state(compute, "completed")
    guest.stop_writer()
    assert guest.errors == []
    guest.check_guest_reads_model()
    guest.stop()
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, str(workdir / "out.raw")], check=True
    )
    assert (workdir / "out.raw").read_bytes() == guest.model


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_read_only_attachment_moves_with_the_writable_one(workdir, volumes, make_guest, backend):
    """One writer and one reader of a multi-attached volume: both are fenced, both move to dst (the
    reader first: with libvirt its move is a block copy of src onto dst, which must not meet the
    writer's newer writes there), and the reader then reads what the writer wrote."""
    src, dst = volumes
    writer = make_guest(backend, "a", src)
    reader = make_guest(backend, "b", src, SERVER_2, read_only=True)
    agent = Agent(workdir, {SERVER: server_entry(writer, SRC_ATT), SERVER_2: server_entry(reader, "att-b")})
    try:
        agent.start()
        compute = client(agent)
        writer.start_writer()
        generations = [
            compute.migration_start(s, a)["generation"] for s, a in ((SERVER, SRC_ATT), (SERVER_2, "att-b"))
        ]
        at_fence = volcopy.digest(src)
        volcopy.copy(src, dst)
        compute.migration_complete(SERVER_2, "att-b", "att-b-dst", local(dst), generations[1])
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), generations[0])
        wait_state(compute, "completed")
        wait_state(compute, "completed", attachment="att-b", server=SERVER_2)
        assert volcopy.digest(src) == at_fence
        writer.stop_writer()
        assert writer.errors == [] and reader.errors == []
        writer.check_guest_reads_model()
        reader.lines.extend(line for line in writer.lines if line.startswith("W "))  # its model: the writer's
        reader.check_guest_reads_model()
        writer.stop()
        assert read_all(dst) == writer.model
    finally:
        agent.stop()


def test_a_read_only_attachment_after_its_writer_is_refused_with_libvirt(workdir, volumes, make_guest):
    """libvirt only: a read-only disk moves by a block copy of src onto dst, which would undo the writes
    of a writer that already runs on dst. Its complete is refused (409, nothing moved, the reader still
    fenced on src) and dst keeps every write of the writer."""
    src, dst = volumes
    writer = make_guest("libvirt", "a", src)
    reader = make_guest("libvirt", "b", src, SERVER_2, read_only=True)
    agent = Agent(workdir, {SERVER: server_entry(writer, SRC_ATT), SERVER_2: server_entry(reader, "att-b")})
    try:
        agent.start()
        compute = client(agent)
        writer.start_writer()
        generations = [
            compute.migration_start(s, a)["generation"] for s, a in ((SERVER, SRC_ATT), (SERVER_2, "att-b"))
        ]
        volcopy.copy(src, dst)
        compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), generations[0])
        wait_state(compute, "completed")
        with pytest.raises(ComputeConflict, match="complete the read-only attachments first"):
            compute.migration_complete(SERVER_2, "att-b", "att-b-dst", local(dst), generations[1])
        assert compute.migration_state(SERVER_2, "att-b")["state"] == "fenced"
        assert [a["id"] for a in compute.attachments(SERVER_2)] == ["att-b"]
        finish_on(writer, dst)
    finally:
        agent.stop()


@pytest.mark.parametrize(
    "guest,setting,message",
    [
        ("qmp", {"pidfile": "elsewhere.pid"}, r"in use although the pid file .* says QEMU is not running"),
        # a libvirt that does not run the domain (the test driver, in the client library)
        ("libvirt", {"uri": "test:///default"}, r"in use although libvirt \(test:///default.* not running"),
        # a libvirtd that cannot be reached
        ("libvirt", {"uri": "qemu+unix:///system?socket=/nonexistent"}, "cannot connect to libvirt at"),
    ],
    indirect=["guest"],
)
def test_a_wrong_pid_file_setting_is_an_error_never_stopped(workdir, guest, volumes, setting, message):
    """The agent is told a pid file QEMU does not use, or a libvirt URI that does not lead to the
    domain. It must not take the running guest for a stopped one (it would "fence" it in its records
    while the guest writes on): QEMU's lock on the volume proves otherwise, a libvirtd that does not
    answer proves nothing, and start answers 409 with the reason."""
    src, _ = volumes
    entry = server_entry(guest, SRC_ATT) | setting
    if "pidfile" in setting:  # in the test's directory
        entry["pidfile"] = str(workdir / setting["pidfile"])
    agent = Agent(workdir, {SERVER: entry})
    try:
        agent.start()
        compute = client(agent)
        guest.start_writer()
        with pytest.raises(ComputeConflict, match=message):
            compute.migration_start(SERVER, SRC_ATT)
        assert compute.migration_state(SERVER, SRC_ATT)["state"] == "none"
        finish_on(guest, src)
    finally:
        agent.stop()


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
@pytest.mark.parametrize("discard", [True, False])
def test_discards_reach_the_new_volume_only_when_its_connection_allows(
    discard, guest, volumes, started_agent, workdir
):
    """connection_info's data.discard: the guest's discards (blkdiscard of its first 4 MiB) reach dst,
    a loop device whose file then has a hole there; without it they are ignored. libvirt keeps one
    discard setting for the whole disk (the domain's <driver discard>, here none), which a running
    domain cannot change: the guest's discards are ignored there either way, as they were on src."""
    src, dst = volumes
    agent = started_agent()
    agent.start()
    compute = client(agent)
    gen = compute.migration_start(SERVER, SRC_ATT)["generation"]
    volcopy.copy(src, dst)
    info = {"driver_volume_type": "local", "data": {"device_path": dst, "discard": discard}}
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, info, gen)
    wait_state(compute, "completed")
    mark = len(guest.lines)
    guest.send("discard")
    guest.wait_line("DISCARDED", after=mark)
    guest.stop()
    backing = workdir / "dst-backing.img"
    with open(backing, "rb") as f:
        hole_at_start = os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 0
    passed_on = discard and not isinstance(guest, LibvirtGuest)
    assert hole_at_start == passed_on
    assert read_all(dst, 4 * MiB) == (bytes(4 * MiB) if passed_on else read_all(src, 4 * MiB))


@pytest.mark.parametrize("guest", ["libvirt"], indirect=True)
@pytest.mark.parametrize("ending", ["complete", "prepared complete", "cancel"])
def test_libvirtd_restarted_while_fenced_keeps_the_chain_and_ends(guest, volumes, started_agent, ending):
    """libvirt only: libvirtd stops and starts again while the guest is fenced (and, prepared, while
    the block copy into newtop runs). The domain runs on, on its overlay; the agent reconnects, still
    reports fenced, and complete moves the guest onto dst, or cancel back onto src."""
    src, dst = volumes
    _, compute, gen = fenced(guest, started_agent)
    at_fence = volcopy.digest(src)
    if ending == "prepared complete":
        compute.migration_prepare(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    restart_libvirtd()
    time.sleep(0.3)
    assert compute.migration_state(SERVER, SRC_ATT)["state"] == "fenced"
    assert volcopy.digest(src) == at_fence
    if ending == "cancel":
        compute.migration_cancel(SERVER, SRC_ATT, gen)
        wait_state(compute, "cancelled")
        finish_on(guest, src)
        return
    volcopy.copy(src, dst)
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    wait_state(compute, "completed")
    assert volcopy.digest(src) == at_fence, "src was written after its fence"
    finish_on(guest, dst)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_agent_killed_after_prepare_completes_on_restart(workdir, guest, volumes, started_agent):
    """The agent is SIGKILLed once prepare has attached dst (and, on libvirt, started the block copy):
    the restarted agent reports the migration fenced and prepared, and complete picks up the copy the
    hypervisor kept running (libvirt) or moves at complete (QMP)."""
    src, dst = volumes
    agent, compute, gen = fenced(guest, started_agent, "agent-after-prepare")
    at_fence = volcopy.digest(src)
    with pytest.raises(ComputeError):
        compute.migration_prepare(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    agent.process.wait(timeout=10)
    agent.start()
    compute = client(agent)

    state = compute.migration_state(SERVER, SRC_ATT)
    assert (state["state"], state["new_attachment_id"], state["reason"]) == ("fenced", DST_ATT, None)
    if isinstance(guest, LibvirtGuest):
        assert guest.domain.blockJobInfo(guest.qdev, 0), "the block copy does not run any more"
    volcopy.copy(src, dst)
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    wait_state(compute, "completed")
    assert [a["id"] for a in compute.attachments(SERVER)] == [DST_ATT]
    assert overlay_files(workdir / "overlays") == []
    assert volcopy.digest(src) == at_fence, "src was written after its fence"
    finish_on(guest, dst)


@pytest.mark.parametrize("guest", ["libvirt"], indirect=True)
def test_a_block_copy_that_stops_after_prepare_is_reported_and_complete_moves(
    workdir, guest, volumes, started_agent
):
    """libvirt only (QMP moves at complete): the block copy prepare started ends before complete
    (aborted from outside, through libvirt's API). GET says so, the guest stays on its overlay over
    src, and complete starts the copy again and moves the guest onto dst with every write."""
    src, dst = volumes
    _, compute, gen = fenced(guest, started_agent)
    at_fence = volcopy.digest(src)
    compute.migration_prepare(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    guest.domain.blockJobAbort(guest.qdev, 0)

    # seen at libvirt's block-job event, or at the latest by this GET
    state = wait_for(lambda: (s := compute.migration_state(SERVER, SRC_ATT))["reason"] and s, what="a reason")
    assert state["state"] == "fenced" and "the block copy onto the new volume stopped" in state["reason"]
    assert state["data_location"].endswith(f"over src {src}")
    volcopy.copy(src, dst)
    compute.migration_complete(SERVER, SRC_ATT, DST_ATT, local(dst), gen)
    wait_state(compute, "completed")
    assert overlay_files(workdir / "overlays") == []
    assert volcopy.digest(src) == at_fence, "src was written after its fence"
    finish_on(guest, dst)
