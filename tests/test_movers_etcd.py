"""The data movers on their other coordination backend, etcd (tooz's etcd3gw driver and TaskFlow's etcd
jobboard, through the same [mover] coordination_url): the session's etcd (tests/etcd_server.py), movers
on this host, the journal on the session's PostgreSQL.

- placement, `volcopy movers list` and a per-backend limit, whose count and claim are made under a tooz
  lock on etcd;
- a mover SIGKILLed mid-copy: its claim (an etcd lease) lapses, another mover takes the job over and
  resumes from the journal's checkpoint;
- a mover stopped past its claim's expiry takes the claim again when it runs on, and keeps it.

The Redis cases, and the faults under a running job: test_movers_jobs.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_movers_jobs import copy_steps, ended_migration, most_at_once, volume

from compute_harness import wait_for
from conftest import reference_digest
from mover_processes import CLAIM_EXPIRY, MoverProcesses, coordination_url
from volcopy.migration import journal as j
from volcopy.migration.migrator import Migrator
from volcopy.movers.errors import NoMoverFits

MiB = 1 << 20


@pytest.fixture
def coordination_server(etcd):
    return etcd


@pytest.fixture
def processes(etcd, mover_group, tmp_path, fleet_journal):
    processes = MoverProcesses(tmp_path, etcd, mover_group, journal=fleet_journal)
    yield processes
    processes.stop_all()


def test_movers_on_etcd_place_list_and_keep_a_backend_limit(
    processes, etcd, mover_group, fleet_journal, tmp_path
):
    processes.start("mover-local", ["local"], slots=1)
    for name in ("mover-1", "mover-2"):
        processes.start(name, ["file"], slots=2)
    url = coordination_url(etcd.url)
    command = ["movers", "list", "--json", "--coordination-url", url, "--group", mover_group]
    listed = subprocess.run(
        [sys.executable, "-m", "volcopy.cli", *command], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert sorted((m["name"], m["transports"]) for m in json.loads(listed.stdout)) == [
        ("mover-1", ["file"]), ("mover-2", ["file"]), ("mover-local", ["local"])
    ]  # fmt: skip

    migrator = Migrator(
        fleet_journal,
        checkpoint_dir=str(tmp_path / "checkpoints-cinder"),
        fleet_url=url,
        fleet_group=mover_group,
        backend_limit=1,
    )
    try:
        iscsi = {"driver_volume_type": "iscsi", "data": {"target_iqn": "iqn.2010-10.org.openstack:v"}}
        volume(tmp_path / "any.img", 1 * MiB)
        with pytest.raises(NoMoverFits, match="^no mover can copy from file to iscsi: no live mover reaches"):
            migrator.migrate(str(tmp_path / "any.img"), iscsi)
        datas, submitted = {}, []
        for number in range(4):  # every volume on one file system: one backend, 4 file slots for it
            src = tmp_path / f"src-{number}.img"
            datas[number] = volume(src, 1 * MiB)
            m = migrator.submit(str(src), str(tmp_path / f"dst-{number}.img"), rate_limit=1 * MiB)
            submitted.append((number, m.id))
        wait_for(
            lambda: all(migrator.status(i).finished for _, i in submitted), 120, what="the migrations ended"
        )

        spans = []
        for number, migration_id in submitted:
            m = migrator.status(migration_id)
            assert m.state == j.COMPLETED, m.reason
            assert (tmp_path / f"dst-{number}.img").read_bytes() == datas[number]
            assert migrator.journal.placement(migration_id).run_by in ("mover-1", "mover-2")
            [copy] = copy_steps(migrator, migration_id)
            spans.append((copy.intended_at, copy.ended_at))
        assert most_at_once(spans) == 1  # the limit, with 4 slots free for them
    finally:
        migrator.close()


def test_a_mover_killed_mid_copy_on_etcd_is_taken_over_from_the_shared_checkpoint(
    processes, fleet_migrator, tmp_path
):
    rate, size = 4 * MiB, 32 * MiB
    first = processes.start("mover-a", ["file"])
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = volume(src, size)

    m = fleet_migrator.submit(str(src), str(dst), rate_limit=rate)
    wait_for(lambda: fleet_migrator.status(m.id).bytes_done > 0, 30, what="copying on mover-a")
    second = processes.start("mover-b", ["file"])
    wait_for(lambda: fleet_migrator.status(m.id).bytes_done >= 12 * MiB, 30, what="12 MiB copied on mover-a")
    done_at_kill = fleet_migrator.status(m.id).bytes_done
    first.kill()
    killed_at = time.monotonic()
    wait_for(lambda: fleet_migrator.journal.placement(m.id).run_by == "mover-b", 30, what="taken over")
    taken_over_after = time.monotonic() - killed_at
    ended = ended_migration(fleet_migrator, m.id)

    assert ended.state == j.COMPLETED, ended.reason
    assert taken_over_after < CLAIM_EXPIRY + 10
    assert 0 < ended.resumed_from and ended.resumed_from >= done_at_kill - 3 * rate, (
        ended.resumed_from,
        done_at_kill,
    )
    assert ended.dst_digest == ended.src_digest == reference_digest(data) and dst.read_bytes() == data
    assert [s.status for s in copy_steps(fleet_migrator, m.id)] == [j.INTENDED, j.DONE]
    assert ended.owner.split(":")[1] == str(second.pid)
    assert second.metrics()["volcopy_mover_takeovers_total"] == 1


def test_a_claim_that_lapsed_is_taken_again_and_then_kept_on_etcd(processes, fleet_migrator, tmp_path):
    """A mover stopped (SIGSTOP) past its claim's expiry, with no other mover: once it runs again it
    takes the claim again (a new etcd lease), and from then on keeps it, renewing that lease, not the
    lapsed one."""
    mover = processes.start("mover-a", ["file"])
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = volume(src, 24 * MiB)
    m = fleet_migrator.submit(str(src), str(dst), rate_limit=2 * MiB)
    wait_for(lambda: fleet_migrator.status(m.id).bytes_done > 0, 30, what="copying on mover-a")
    board = fleet_migrator.fleet_client().board
    [job] = [
        job
        for job in board.iterjobs(ensure_fresh=True)
        if job.uuid == fleet_migrator.journal.placement(m.id).job
    ]

    os.kill(mover.pid, signal.SIGSTOP)
    time.sleep(CLAIM_EXPIRY + 1)
    lapsed = board.find_owner(job)
    os.kill(mover.pid, signal.SIGCONT)
    wait_for(lambda: board.find_owner(job) == "mover-a", 10, 0.1, "the claim taken again")
    owners = set()
    for _ in range(int(3 * CLAIM_EXPIRY / 0.2)):  # three expiries: the new lease is the one renewed
        owners.add(board.find_owner(job))
        time.sleep(0.2)
    ended = ended_migration(fleet_migrator, m.id)

    assert lapsed is None and owners == {"mover-a"}
    assert ended.state == j.COMPLETED and dst.read_bytes() == data
    assert [s.status for s in copy_steps(fleet_migrator, m.id)] == [j.DONE]
