"""An attached volume migrated by a data mover while its guest writes: placed only on the mover that has
a compute to fence it with ([compute] in its configuration: keystoneauth1's admin_token plugin, to the
test's compute agent), refused with NoMoverFits while no such mover is there, and ending as an in-process
migration must (test_migration_compute.check_completed): the guest on dst with every write, src as it
was at its fence. A mover SIGKILLed in the middle of such a copy: another mover with a compute takes it
over, with the one fence held throughout."""

from __future__ import annotations

import pytest
from test_migration_compute import FenceWatcher, check_completed

from compute_harness import DST_ATT, SERVER, SIZE, SRC_ATT, TOKEN, local, needs_guest, wait_for
from conftest import MiB
from mover_processes import MoverProcesses
from volcopy.movers.errors import NoMoverFits

pytestmark = needs_guest


@pytest.fixture
def processes(redis, mover_group, tmp_path, fleet_journal):
    """The movers on this host: the compute agent listens on this host's loopback."""
    processes = MoverProcesses(tmp_path, redis, mover_group, journal=fleet_journal)
    yield processes
    processes.stop_all()


def test_an_attached_volume_moves_on_a_mover_that_can_fence_it(
    processes, fleet_migrator, guest, agent, compute, volumes
):
    src, dst = volumes
    processes.start("mover-plain", ["local"])  # reaches both volumes, has no compute to fence with
    attachment = [(SERVER, SRC_ATT, DST_ATT)]
    with pytest.raises(NoMoverFits, match="reaches local with a compute to fence the attachments"):
        fleet_migrator.migrate(local(src), local(dst), attachments=attachment)

    processes.start(
        "mover-fencing",
        ["local"],
        compute={"auth_type": "admin_token", "endpoint": agent.url, "token": TOKEN},
    )
    guest.start_writer()
    with FenceWatcher(compute, src) as watcher:
        m = fleet_migrator.migrate(local(src), local(dst), attachments=attachment)

    assert fleet_migrator.journal.placement(m.id).run_by == "mover-fencing"
    assert [(s.name, s.status) for s in fleet_migrator.steps(m.id)] == [
        ("start", "done"),
        ("prepare", "done"),
        ("copy", "done"),
        ("verify", "done"),
        ("complete", "done"),
    ]
    check_completed(m, guest, compute, src, dst, watcher)


def test_a_mover_killed_mid_copy_of_an_attached_volume_is_taken_over_with_the_fence_held(
    processes, fleet_migrator, guest, agent, compute, volumes
):
    src, dst = volumes
    compute_section = {"auth_type": "admin_token", "endpoint": agent.url, "token": TOKEN}
    first = processes.start("mover-a", ["local"], compute=compute_section)
    guest.start_writer()
    with FenceWatcher(compute, src) as watcher:
        m = fleet_migrator.submit(
            local(src), local(dst), attachments=[(SERVER, SRC_ATT, DST_ATT)], rate_limit=8 * MiB
        )
        wait_for(lambda: fleet_migrator.status(m.id).bytes_done > 0, 60, 0.05, "copying on mover-a")
        # mover-b joins while mover-a copies (mover-a has the job), so that the kill comes mid-copy
        second = processes.start("mover-b", ["local"], compute=compute_section)
        wait_for(lambda: fleet_migrator.status(m.id).bytes_done >= SIZE // 2, 60, 0.05, "half copied")
        first.kill()
        killed_in = fleet_migrator.status(m.id)
        ended = wait_for(lambda: (s := fleet_migrator.status(m.id)).finished and s, 120, 0.1, "ended")

    assert killed_in.state == "copying" and killed_in.bytes_done < SIZE, killed_in
    assert fleet_migrator.journal.placement(m.id).run_by == "mover-b"
    assert ended.owner.split(":")[1] == str(second.pid)
    assert ended.resumed_from > 0, second.log_text()
    # one fence all along: started once, never cancelled, completed by mover-b
    steps = [(s.name, s.status) for s in fleet_migrator.steps(m.id)]
    assert steps.count(("start", "done")) == 1 and not any(name == "cancel" for name, _ in steps)
    assert steps[-1] == ("complete", "done")
    check_completed(ended, guest, compute, src, dst, watcher)
