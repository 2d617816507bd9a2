"""An attached volume migrated by a data mover while its guest writes: placed only on the mover that has
a compute to fence it with ([compute] in its configuration: keystoneauth1's admin_token plugin, to the
test's compute agent), refused with NoMoverFits while no such mover is there, and ending as an in-process
migration must (test_migration_compute.check_completed): the guest on dst with every write, src as it
was at its fence."""

from __future__ import annotations

import pytest
from test_migration_compute import FenceWatcher, check_completed
from test_movers_jobs import journal_url, migrator, processes  # noqa: F401 - fixtures

from compute_harness import DST_ATT, SERVER, SRC_ATT, TOKEN, local, needs_guest
from volcopy.movers.errors import NoMoverFits

pytestmark = needs_guest


def test_an_attached_volume_moves_on_a_mover_that_can_fence_it(
    processes,
    migrator,
    guest,
    agent,
    compute,
    volumes,  # noqa: F811 - the fixtures imported above
):
    src, dst = volumes
    processes.start("mover-plain", ["local"])  # reaches both volumes, has no compute to fence with
    attachment = [(SERVER, SRC_ATT, DST_ATT)]
    with pytest.raises(NoMoverFits, match="reaches local with a compute to fence the attachments"):
        migrator.migrate(local(src), local(dst), attachments=attachment)

    processes.start(
        "mover-fencing",
        ["local"],
        compute={"auth_type": "admin_token", "endpoint": agent.url, "token": TOKEN},
    )
    guest.start_writer()
    with FenceWatcher(compute, src) as watcher:
        m = migrator.migrate(local(src), local(dst), attachments=attachment)

    assert migrator.journal.placement(m.id).run_by == "mover-fencing"
    assert [(s.name, s.status) for s in migrator.steps(m.id)] == [
        ("start", "done"),
        ("prepare", "done"),
        ("copy", "done"),
        ("verify", "done"),
        ("complete", "done"),
    ]
    check_completed(m, guest, compute, src, dst, watcher)
