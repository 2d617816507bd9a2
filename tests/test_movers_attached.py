"""An attached volume migrated by a data mover while its guest writes: placed only on the mover that has
a compute to fence it with ([compute] in its configuration: keystoneauth1's admin_token plugin, to the
test's compute agent), refused with NoMoverFits while no such mover is there, and ending as an in-process
migration must (test_migration_compute.check_completed): the guest on dst with every write, src as it
was at its fence."""

from __future__ import annotations

import pytest
from test_migration_compute import FenceWatcher, check_completed

from compute_harness import DST_ATT, SERVER, SRC_ATT, TOKEN, local, needs_guest
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
