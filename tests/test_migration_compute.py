"""The migration orchestrator with the real compute agent and a guest writing through its disk all along:
an attached (and a multi-attached) volume moves onto dst with every write; a refused fence lifts the
fences already set; and the orchestrator killed with SIGKILL at every failure point is brought to an
end by recover(), with the guest's data exactly right, src never written after its fence, and no
completed migration whose dst digest differs from src's."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
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
    local,
    needs_guest,
    overlay_files,
    server_entry,
    wait_for,
    wait_state,
)
from conftest import MiB, read_all
from volcopy.compute import ComputeError, NovaCompute
from volcopy.migration import Journal, MigrationCancelled, MigrationError, Migrator

pytestmark = needs_guest
__all__ = ["nbd_devices"]  # a fixture, used by name below

ATTACH = f"{SERVER}:{SRC_ATT}:{DST_ATT}"
UNKNOWN_ATTACH = f"{SERVER}:att-not-here:att-dst-2"


class FenceWatcher:
    """Polls the compute and reads src's digest each time a fence is newly set: what src must still
    hold at the end of a completed migration if nothing wrote to it after its (last) fence."""

    def __init__(self, compute: NovaCompute, src: str):
        self.compute, self.src = compute, src
        self.snapshots: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> FenceWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        state, updated_at, written = None, None, 0
        while not self._stop.is_set():
            try:
                s = self.compute.migration_state(SERVER, SRC_ATT)
            except ComputeError:
                s = {"state": "unknown"}  # the agent is busy: ask again
            if s["state"] == "fenced":
                # A new fence: seen for the first time, stamped anew, or with its written bytes reset.
                if (
                    state != "fenced"
                    or s["updated_at"] != updated_at
                    or s["bytes_written_since_start"] < written
                ):
                    self.snapshots.append(volcopy.digest(self.src))
                updated_at, written = s["updated_at"], s["bytes_written_since_start"]
            state = s["state"]
            time.sleep(0.02)


def check_completed(m, guest, compute, src, dst, watcher) -> None:
    """The guest runs on dst with every write; src is as it was at its last fence."""
    assert m.state == "completed" and m.dst_valid
    time.sleep(0.3)  # more writes, now onto dst
    guest.stop_writer()
    wait_state(compute, "completed")
    assert guest.errors == [] and guest.io_status_ok()
    guest.check_guest_reads_model()
    assert [a["id"] for a in compute.attachments(SERVER)] == [DST_ATT]
    guest.stop()
    assert read_all(dst) == guest.model, "dst does not hold src-at-start plus every later write"
    assert watcher.snapshots, "the fence was never seen"
    assert volcopy.digest(src) == watcher.snapshots[-1], "src was written after its fence"
    assert m.src_digest == m.dst_digest == watcher.snapshots[-1], "completed onto a dst that differs"


def check_cancelled(m, guest, compute, src) -> None:
    """The guest runs on src again, with every write merged back; dst is marked invalid."""
    assert m.state == "cancelled" and not m.dst_valid
    check_back_on_src(guest, compute, src)


def check_back_on_src(guest, compute, src) -> None:
    """The compute's cancel has ended and the guest writes to src, which holds every write."""
    wait_state(compute, "cancelled")
    time.sleep(0.2)
    guest.stop_writer()
    assert guest.errors == [] and guest.io_status_ok()
    guest.check_guest_reads_model()
    guest.stop()
    assert read_all(src) == guest.model, "src lacks some of the guest's writes"


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_an_attached_volume_moves_while_the_guest_writes(journal_url, guest, compute, volumes):
    """The migrator prepares each attachment before the copy (on libvirt the guest's writes move onto dst
    while the copy runs), then completes."""
    src, dst = volumes
    guest.start_writer()
    with FenceWatcher(compute, src) as watcher:
        m = Migrator(journal_url, compute).migrate(
            local(src), local(dst), attachments=[(SERVER, SRC_ATT, DST_ATT)], verify=True
        )
    steps = Migrator(journal_url).steps(m.id)
    assert [(s.name, s.target, s.status) for s in steps] == [
        ("start", f"{SERVER}/{SRC_ATT}", "done"),
        ("prepare", f"{SERVER}/{SRC_ATT}", "done"),
        ("copy", f"path:{src} -> path:{dst}", "done"),
        ("verify", "local volume", "done"),
        ("complete", f"{SERVER}/{SRC_ATT}", "done"),
    ]
    check_completed(m, guest, compute, src, dst, watcher)


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_a_refused_fence_lifts_the_fences_already_set(workdir, guest, agent, compute, volumes):
    src, dst = volumes
    guest.start_writer()
    migrator = Migrator(f"sqlite:///{workdir}/journal.sqlite", compute)

    with pytest.raises(MigrationCancelled, match=f"refused the fence of {SERVER}/att-not-here") as raised:
        migrator.migrate(src, dst, attachments=[(SERVER, SRC_ATT, DST_ATT), (SERVER, "att-not-here", "x")])

    steps = migrator.steps(raised.value.migration_id)
    assert [(s.name, s.target.split("/")[1], s.status) for s in steps] == [
        ("start", SRC_ATT, "done"),
        ("start", "att-not-here", "failed"),
        ("cancel", SRC_ATT, "done"),
        ("cancel", "att-not-here", "done"),
    ]
    env = dict(os.environ, OS_TOKEN=TOKEN)
    refused = subprocess.run(
        [sys.executable, "-m", "volcopy.cli", "migrate", src, dst, "--attach", UNKNOWN_ATTACH]
        + ["--compute-url", agent.url, "--journal", f"sqlite:///{workdir}/journal.sqlite"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert (
        f"refused the fence of {SERVER}/att-not-here: attachment att-not-here is not attached"
        in refused.stderr
    )
    check_cancelled(migrator.status(raised.value.migration_id), guest, compute, src)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_multi_attached_volume_is_fenced_everywhere_before_the_copy(workdir, make_guest, volumes, backend):
    """src multi-attached to two guests: the first writes, the second has it read-only (the agent refuses
    a second writer: see test_handoff_faults). The reader is named first, so that it also completes
    first, as a libvirt read-only disk must (see docs/compute-agent.md)."""
    src, dst = volumes
    writer = make_guest(backend, "a", src)
    reader = make_guest(backend, "b", src, SERVER_2, read_only=True)
    attachments = [(SERVER_2, "att-b", "att-b-dst"), (SERVER, "att-a", "att-a-dst")]
    agent = Agent(workdir, {SERVER: server_entry(writer, "att-a"), SERVER_2: server_entry(reader, "att-b")})
    agent.start()
    try:
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)
        writer.start_writer()
        migrator = Migrator(f"sqlite:///{workdir}/journal.sqlite", compute)

        m = migrator.migrate(src, dst, attachments=attachments)

        assert m.state == "completed"
        assert [(s.name, s.target) for s in migrator.steps(m.id)] == [
            ("start", f"{SERVER_2}/att-b"),
            ("start", f"{SERVER}/att-a"),
            ("prepare", f"{SERVER_2}/att-b"),
            ("prepare", f"{SERVER}/att-a"),
            ("copy", f"path:{src} -> path:{dst}"),
            ("verify", dst),
            ("complete", f"{SERVER_2}/att-b"),
            ("complete", f"{SERVER}/att-a"),
        ]
        time.sleep(0.3)
        writer.stop_writer()
        for server, attachment, new in attachments:
            wait_state(compute, "completed", attachment=attachment, server=server)
            assert [a["id"] for a in compute.attachments(server)] == [new]
        assert writer.errors == [] and writer.io_status_ok()
        writer.check_guest_reads_model()
        writer.stop()
        reader.stop()
        assert read_all(dst) == writer.model
    finally:
        agent.stop()


# Where a migration may be killed, the state the journal then shows, and how recover() must end it.
FAILPOINTS = [
    ("after-record", "pending", "completed"),
    ("before-start-1", "fencing", "completed"),
    ("after-start-1", "fencing", "completed"),
    ("mid-copy", "copying", "completed"),
    ("after-copy", "copying", "completed"),
    ("before-complete-1", "completing", "completed"),
    ("after-complete-1", "completing", "completed"),
    ("before-finish", "completing", "completed"),
    ("before-cancel-1", "cancelling", "cancelled"),  # a second attachment refused its fence
]
# Every point on SQLite; on PostgreSQL, one point of each kind of recovery (fence again, resume a copy).
CASES = [(*case, "sqlite") for case in FAILPOINTS] + [
    (*case, "postgresql") for case in FAILPOINTS if case[0] in ("after-start-1", "mid-copy")
]


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "point,killed_in,ending,journal", CASES, ids=[f"{case[0]}-{case[3]}" for case in CASES]
)
def test_recover_ends_a_migration_killed_at(
    point, killed_in, ending, journal, request, workdir, guest, agent, compute, volumes
):
    src, dst = volumes
    if journal == "sqlite":
        url = f"sqlite:///{workdir}/journal.sqlite"
    else:
        url = request.getfixturevalue("postgres").new_database()
    attach = ["--attach", ATTACH] + (["--attach", UNKNOWN_ATTACH] if ending == "cancelled" else [])
    # Slow enough at mid-copy for the engine's first checkpoint (after 2 s) to come before half-way.
    rate = ["--rate", "12M"] if point == "mid-copy" else []
    guest.start_writer()
    with FenceWatcher(compute, src) as watcher:
        killed = subprocess.run(
            [sys.executable, "-m", "volcopy.cli", "migrate", src, dst, *attach, *rate]
            + ["--compute-url", agent.url, "--journal", url, "--checkpoint-dir", workdir / "checkpoints"],
            capture_output=True,
            text=True,
            env=dict(os.environ, OS_TOKEN=TOKEN, VOLCOPY_FAILPOINT=point),
        )
        assert killed.returncode == -9, f"not killed at {point}: {killed.stderr}"
        assert Journal(url).list()[0].state == killed_in

        recovered = Migrator(url, compute).recover()

    assert [m.state for m in recovered] == [ending], recovered[0].reason
    if ending == "completed":
        check_completed(recovered[0], guest, compute, src, dst, watcher)
    else:
        check_cancelled(recovered[0], guest, compute, src)
    if point == "mid-copy":
        assert recovered[0].resumed_from > 0, "the copy started again instead of resuming"
    assert Migrator(url, compute).recover() == [], "nothing is left to recover"


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_a_merge_into_dst_that_fails_is_never_reported_completed(workdir, guest, nbd_devices, volumes):
    """dst (a loop device over nbdkit) fails writes from the moment complete is intended: the guest is
    switched onto dst, but the compute cannot merge its writes there. The migration must not end
    completed: it stays completing with the data's place in its reason, and once dst heals, recover()
    completes it with dst holding every write."""
    src, _ = volumes
    dst_device = nbd_devices.faulty(size=SIZE)
    dst = dst_device.path
    agent = Agent(workdir, {SERVER: server_entry(guest, SRC_ATT)})
    agent.start()
    try:
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)
        migrator = Migrator(f"sqlite:///{workdir}/journal.sqlite", compute)
        armed = threading.Event()

        def fail_dst_at_complete():
            while not armed.is_set():
                if any(s.name == "complete" for m in migrator.list() for s in migrator.steps(m.id)):
                    dst_device.fail(write=True)
                    armed.set()
                time.sleep(0.005)

        threading.Thread(target=fail_dst_at_complete, daemon=True).start()
        guest.start_writer()
        with pytest.raises(
            MigrationError, match="stays completing: .*could not merge .* over the new volume"
        ):
            migrator.migrate(src, dst, attachments=[(SERVER, SRC_ATT, DST_ATT)])
        armed.set()
        [m] = migrator.list()
        assert m.state == "completing" and not m.dst_valid
        assert compute.migration_state(SERVER, SRC_ATT)["state"] == "failed"

        dst_device.heal()
        [recovered] = migrator.recover()
        assert recovered.state == "completed" and recovered.dst_valid
        guest.stop_writer()
        assert guest.errors == []
        guest.check_guest_reads_model()
        guest.stop()
        assert read_all(dst) == guest.model
    finally:
        agent.stop()


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
@pytest.mark.parametrize("small_overlays", [6 * MiB], indirect=True)
def test_a_full_overlay_during_the_copy_cancels_the_migration(small_overlays, workdir, guest, volumes):
    """The overlay directory (a 6 MiB tmpfs) fills while a throttled copy runs: the compute reports
    overlay-full, the orchestrator cancels, which merges the overlay back into src and resumes the
    guest, and the migration ends cancelled with that reason."""
    src, dst = volumes
    agent = Agent(
        workdir,
        {SERVER: server_entry(guest, SRC_ATT)},
        overlay_dir=str(small_overlays),
        overlay_min_free=1 << 20,
    )
    try:
        agent.start()
        compute = NovaCompute(endpoint=agent.url, token=TOKEN)
        guest.start_writer()
        migrator = Migrator(f"sqlite:///{workdir}/journal.sqlite", compute)
        with pytest.raises(MigrationCancelled, match=f"the compute reports {SERVER}/{SRC_ATT} overlay-full"):
            migrator.migrate(src, dst, attachments=[(SERVER, SRC_ATT, DST_ATT)], rate_limit=2 << 20)
        [m] = migrator.list()
        assert m.state == "cancelled" and not m.dst_valid
        wait_state(compute, "cancelled")
        assert overlay_files(small_overlays) == []
        time.sleep(0.2)
        guest.stop_writer()
        assert guest.errors == []  # QEMU keeps io-status "nospace" as the record of the pause
        guest.check_guest_reads_model()
        guest.stop()
        assert read_all(src) == guest.model, "src lacks some of the guest's writes"
    finally:
        agent.stop()


@pytest.mark.parametrize("guest", BACKENDS, indirect=True)
def test_a_stale_generation_is_refused_and_the_newer_fence_is_left_alone(workdir, guest, compute, volumes):
    """While the copy runs, someone else lifts the fence and sets a new one, as an orchestrator that
    wrongly took the migration over would. The owner's complete carries the generation of its own
    start: refused (409); so is its cancel. The migration stays cancelling with that reason, and the
    newer fence is neither completed nor lifted by it."""
    src, dst = volumes
    guest.start_writer()
    migrator = Migrator(f"sqlite:///{workdir}/journal.sqlite", compute)
    outcome = {}

    def run():
        try:
            migrator.migrate(src, dst, attachments=[(SERVER, SRC_ATT, DST_ATT)], rate_limit=16 << 20)
        except MigrationError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    first = wait_state(compute, "fenced")["generation"]

    def prepared() -> bool:  # the copy runs once prepare is done: the takeover happens while it runs
        return any(
            s.name == "prepare" and s.status == "done" for m in migrator.list() for s in migrator.steps(m.id)
        )

    wait_for(prepared, what="the migrator's prepare")
    compute.migration_cancel(SERVER, SRC_ATT, first)
    wait_state(compute, "cancelled")
    second = compute.migration_start(SERVER, SRC_ATT)["generation"]
    thread.join(timeout=120)

    assert second == first + 1
    stale = f"generation {first} is stale: the current fence of attachment {SRC_ATT} is generation {second}"
    [m] = migrator.list()
    assert str(outcome["error"]) == (
        f"migration {m.id} stays cancelling: cancel of {SERVER}/{SRC_ATT} failed: {stale}; "
        "recover() will retry"
    )
    assert (m.state, m.dst_valid) == ("cancelling", False)
    assert m.reason == f"cancel of {SERVER}/{SRC_ATT} failed: {stale}"
    assert [
        (s.name, s.status, s.detail) for s in migrator.steps(m.id) if s.name not in ("clone", "copy")
    ] == [
        ("start", "done", f"generation {first}"),
        ("prepare", "done", None),
        ("verify", "done", None),
        ("complete", "failed", f"ComputeConflict: {stale}"),
        ("cancel", "failed", f"ComputeConflict: {stale}"),
    ]
    state = compute.migration_state(SERVER, SRC_ATT)
    assert (state["state"], state["generation"]) == ("fenced", second), "the newer fence was touched"
    assert [a["id"] for a in compute.attachments(SERVER)] == [SRC_ATT]
    compute.migration_cancel(SERVER, SRC_ATT, second)  # the newer fence's holder lifts it
    check_back_on_src(guest, compute, src)
