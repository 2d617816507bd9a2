"""Migrations run by data movers: `volcopy mover` processes, each on a host of its own (a network
namespace), on the session's Redis (the group and the jobboard) and PostgreSQL (the journal, TaskFlow's
persistence and the migrations' locks), with a Migrator given the fleet's URL submitting to them.

- each migration runs on a mover that reaches both of its transports, and nothing is recorded when no
  mover does;
- a mover SIGKILLed mid-copy: another takes the job over once the claim lapses, resumes from the
  checkpoint the journal holds (re-copying at most one checkpoint interval), and the digests match;
- a cancel from the CLI on another host (a network namespace) stops a migration running on a mover;
- 50 small migrations on 3 movers of 2 slots: all complete, each once, never more than 2 at a time on
  a mover;
- faults under a running job: a mover cut off from Redis, a mover frozen while the database dropped its
  session (refused by the generation token once it runs on), Redis restarted empty, PostgreSQL
  restarted;
- a mover's copies share its bandwidth budget: one alone gets all of it, two never more together;
- a job posted twice for one migration: the one the journal does not name is dropped, unless the named
  one is gone from the jobboard: then it becomes the named one and runs the migration.

An attached volume moved by a mover: test_movers_attached.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from netns_hosts import needs_netns, netns_hosts  # noqa: F401 - the fixture
from oslo_config import cfg
from test_migration_hosts import lock_holders

from compute_harness import wait_for
from conftest import reference_digest
from mover_processes import CLAIM_EXPIRY, MoverProcesses, coordination_url
from volcopy.migration import config as config_options
from volcopy.migration import journal as j
from volcopy.migration.errors import MigrationCancelled
from volcopy.migration.migrator import Migrator
from volcopy.movers import jobboard
from volcopy.movers.errors import NoMoverFits

pytestmark = needs_netns
MiB = 1 << 20


def volcopy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "volcopy.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def processes(redis, mover_group, tmp_path, fleet_journal, postgres, netns_hosts):  # noqa: F811
    """Each mover on a host of its own (a network namespace: its own address and host name), reaching
    Redis over its link and the journal through PostgreSQL's unix socket."""
    processes = MoverProcesses(
        tmp_path,
        redis,
        mover_group,
        journal=fleet_journal,
        own_hosts=netns_hosts,
        journal_on_hosts=postgres.socket_url(fleet_journal),
    )
    yield processes
    processes.stop_all()


def ended_migration(migrator, migration_id: str, timeout: float = 60):
    """The migration once it has ended."""
    return wait_for(lambda: (m := migrator.status(migration_id)).finished and m, timeout, what="its end")


def volume(path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_each_migration_runs_on_a_mover_that_reaches_both_transports(
    processes, fleet_migrator, loops, tmp_path
):
    processes.start("mover-files", ["file"], wait=False)
    processes.start("mover-devices", ["file", "local"], wait=False)
    for mover in processes.started:
        mover.wait_joined()
    src = tmp_path / "src.img"
    data = volume(src, 4 * MiB)
    device = loops.create(4 * MiB)
    onto_device = {"driver_volume_type": "local", "data": {"device_path": device}}

    to_device = fleet_migrator.migrate(str(src), onto_device)
    to_file = fleet_migrator.migrate(str(src), str(tmp_path / "dst.img"))

    assert to_device.state == to_file.state == j.COMPLETED
    assert to_device.dst_digest == to_file.dst_digest == reference_digest(data)
    with open(device, "rb") as f:
        assert f.read(4 * MiB) == data
    assert (tmp_path / "dst.img").read_bytes() == data
    placements = fleet_migrator.journal.placements()
    assert placements[to_device.id].placed_on == placements[to_device.id].run_by == "mover-devices"
    assert placements[to_file.id].run_by == placements[to_file.id].placed_on
    # Cinder's side ran none of it: the owner was the mover's process.
    assert to_device.owner.split(":")[:2] == ["volcopy-mover-devices", str(processes.started[1].pid)]

    # The CLI submits to the fleet too, and lists who ran what.
    url = fleet_migrator.journal.engine.url.render_as_string(hide_password=False)
    migrate = volcopy(
        "migrate",
        str(src),
        str(tmp_path / "by-cli.img"),
        "--journal",
        url,
        "--json",
        "--coordination-url",
        fleet_migrator.fleet_url,
        "--group",
        fleet_migrator.fleet_group,
    )
    assert migrate.returncode == 0, migrate.stderr
    by_cli = json.loads(migrate.stdout)
    assert by_cli["state"] == "completed" and (tmp_path / "by-cli.img").read_bytes() == data
    listed = volcopy("migrations", "list", "--journal", url).stdout.splitlines()
    assert [line.split()[3] for line in listed] == [
        "mover-devices",
        placements[to_file.id].run_by,
        fleet_migrator.journal.placement(by_cli["id"]).run_by,
    ]
    shown = json.loads(volcopy("migrations", "list", "--journal", url, "--json").stdout)
    assert shown[0]["placed_on"] == shown[0]["run_by"] == "mover-devices"

    # The same from an oslo.config file's [volcopy] section: the command's, and a Cinder driver's.
    config = tmp_path / "volcopy.conf"
    config.write_text(
        f"[volcopy]\njournal = {url}\ncoordination_url = {fleet_migrator.fleet_url}\n"
        f"group = {fleet_migrator.fleet_group}\nbackend_limit = 4\n"
    )
    by_file = volcopy(
        "migrate", str(src), str(tmp_path / "by-file.img"), "--config-file", str(config), "--json"
    )
    assert by_file.returncode == 0, by_file.stderr
    assert fleet_migrator.journal.placement(json.loads(by_file.stdout)["id"]).backend_limit == 4
    listed_by_file = volcopy("migrations", "list", "--config-file", str(config)).stdout.splitlines()
    assert len(listed_by_file) == 4 and listed_by_file[:3] == listed
    conf = cfg.ConfigOpts()
    config_options.register_opts(conf)
    conf(["--config-file", str(config)], default_config_files=[])
    driver_side = config_options.migrator_from_config(conf)
    try:
        m = driver_side.migrate(str(src), str(tmp_path / "by-driver.img"))
    finally:
        driver_side.close()
    assert m.state == j.COMPLETED and fleet_migrator.journal.placement(m.id).run_by
    assert (tmp_path / "by-driver.img").read_bytes() == data
    bad = tmp_path / "bad.conf"
    bad.write_text("[volcopy]\nbackend_limit = many\n")
    refused = volcopy("migrations", "list", "--config-file", str(bad))
    assert refused.returncode == 1 and "backend_limit" in refused.stderr, refused.stderr

    # iSCSI is offered by no mover here: refused before anything is recorded.
    iscsi = {"driver_volume_type": "iscsi", "data": {"target_iqn": "iqn.2010-10.org.openstack:v"}}
    before = len(fleet_migrator.list())
    with pytest.raises(NoMoverFits, match=r"^no mover can copy from file to iscsi: no live mover reaches"):
        fleet_migrator.migrate(str(src), iscsi)
    assert len(fleet_migrator.list()) == before


def test_a_mover_killed_mid_copy_is_taken_over_from_the_shared_checkpoint(
    processes, fleet_migrator, tmp_path
):
    rate = 4 * MiB
    size = 40 * MiB
    first = processes.start("mover-a", ["file"])
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = volume(src, size)

    m = fleet_migrator.submit(str(src), str(dst), rate_limit=rate)
    wait_for(lambda: fleet_migrator.status(m.id).bytes_done >= 16 * MiB, 30, what="16 MiB copied on mover-a")
    second = processes.start("mover-b", ["file"])  # mover-a has the job; mover-b has none yet
    done_at_kill = fleet_migrator.status(m.id).bytes_done
    first.kill()
    killed_at = time.monotonic()

    taken = wait_for(
        lambda: fleet_migrator.journal.placement(m.id).run_by == "mover-b", 30, what="taken over by mover-b"
    )
    taken_over_after = time.monotonic() - killed_at
    ended = ended_migration(fleet_migrator, m.id)

    assert taken and ended.state == j.COMPLETED, ended.reason
    assert taken_over_after < CLAIM_EXPIRY + 10
    # It resumed from the checkpoint the journal held: at most one checkpoint interval (2 s of copying)
    # and one progress interval (1 s, how stale bytes_done may be) below where mover-a was.
    assert ended.resumed_from > 0
    assert ended.resumed_from >= done_at_kill - 3 * rate, (ended.resumed_from, done_at_kill)
    assert ended.dst_digest == ended.src_digest == reference_digest(data)
    assert dst.read_bytes() == data
    copies = [s for s in fleet_migrator.steps(m.id) if s.name == "copy"]
    assert [s.status for s in copies] == [j.INTENDED, j.DONE]  # mover-a's never ended; mover-b's did
    assert ended.owner.split(":")[:2] == ["volcopy-mover-b", str(second.pid)]
    assert "taken over from" in second.log_text()
    metrics = second.metrics()
    assert metrics["volcopy_mover_takeovers_total"] == 1
    assert metrics["volcopy_mover_jobs_total{outcome=completed}"] == 1
    assert metrics["volcopy_mover_jobs_running"] == 0 and metrics["volcopy_mover_errors_total"] == 0
    assert metrics["volcopy_mover_bytes_copied_total"] == size - ended.resumed_from


def test_a_cancel_from_the_cli_on_another_host_stops_a_migration_on_a_mover(
    processes,
    fleet_migrator,
    postgres,
    fleet_journal,
    tmp_path,
    netns_hosts,  # noqa: F811
):
    mover = processes.start("mover-a", ["file"])
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    volume(src, 32 * MiB)
    outcome = {}

    def run():
        try:
            outcome["migration"] = fleet_migrator.migrate(str(src), str(dst), rate_limit=2 * MiB)
        except MigrationCancelled as exc:
            outcome["cancelled"] = exc

    submitter = threading.Thread(target=run)
    submitter.start()
    running = wait_for(
        lambda: next((m for m in fleet_migrator.list() if m.bytes_done > 0), None),
        30,
        what="copying on the mover",
    )
    other_host = netns_hosts("volcopy-operator")
    command = [sys.executable, "-m", "volcopy.cli", "migrations", "cancel", running.id]
    command += ["--journal", postgres.socket_url(fleet_journal), "--wait", "30"]
    cancel = subprocess.run(other_host.command(command), capture_output=True, text=True, timeout=60)
    submitter.join(60)

    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.strip() == f"migration {running.id}: cancelled"
    assert outcome["cancelled"].reason == "cancelled on request"
    m = fleet_migrator.status(running.id)
    assert m.state == j.CANCELLED and not m.dst_valid
    assert m.bytes_done < 32 * MiB
    assert m.owner.split(":")[1] == str(mover.pid)  # the mover ended it, not the CLI


def test_fifty_migrations_on_three_movers_of_two_slots(processes, fleet_migrator, tmp_path):
    for name in ("mover-1", "mover-2", "mover-3"):
        processes.start(name, ["file"], slots=2, wait=False)
    for mover in processes.started:
        mover.wait_joined()
    datas, submitted = {}, []
    for number in range(50):
        src = tmp_path / f"src-{number}.img"
        datas[number] = volume(src, 1 * MiB)
        # 512 KiB/s: each copy lasts about 2 s, so that the slots fill up
        m = fleet_migrator.submit(str(src), str(tmp_path / f"dst-{number}.img"), rate_limit=512 * 1024)
        submitted.append((number, m.id))

    wait_for(lambda: all(m.finished for m in fleet_migrator.list()), 180, what="the 50 migrations completed")

    placements = fleet_migrator.journal.placements()
    running: dict[str, list[tuple]] = {}
    for number, migration_id in submitted:
        m = fleet_migrator.status(migration_id)
        assert m.state == j.COMPLETED, (migration_id, m.reason)
        assert (tmp_path / f"dst-{number}.img").read_bytes() == datas[number]
        copies = [s for s in fleet_migrator.steps(migration_id) if s.name == "copy"]
        assert [s.status for s in copies] == [j.DONE]  # run once
        mover = placements[migration_id].run_by
        running.setdefault(mover, []).append((copies[0].intended_at, copies[0].ended_at))
    assert set(running) == {"mover-1", "mover-2", "mover-3"}
    for mover, spans in running.items():
        assert most_at_once(spans) == 2, mover  # its two slots were used, never more


def most_at_once(spans: list[tuple]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    at_once = most = 0
    for _, change in events:
        at_once += change
        most = max(most, at_once)
    return most


def test_a_backend_limit_holds_across_the_fleet(processes, fleet_journal, redis, mover_group, tmp_path):
    for name in ("mover-1", "mover-2", "mover-3"):
        processes.start(name, ["file"], slots=2, wait=False)
    for mover in processes.started:
        mover.wait_joined()
    migrator = Migrator(
        fleet_journal,
        checkpoint_dir=str(tmp_path / "checkpoints-cinder"),
        fleet_url=coordination_url(redis.url),
        fleet_group=mover_group,
        backend_limit=2,
    )
    try:
        submitted = []
        for number in range(8):  # every volume on one file system: one backend, 6 slots for it
            src = tmp_path / f"src-{number}.img"
            volume(src, 1 * MiB)
            m = migrator.submit(str(src), str(tmp_path / f"dst-{number}.img"), rate_limit=512 * 1024)
            submitted.append(m.id)
        wait_for(
            lambda: all(migrator.status(i).finished for i in submitted), 120, what="the migrations ended"
        )

        spans = []
        for migration_id in submitted:
            assert migrator.status(migration_id).state == j.COMPLETED
            [copy] = copy_steps(migrator, migration_id)
            spans.append((copy.intended_at, copy.ended_at))
        assert most_at_once(spans) == 2  # never more than the limit, on 3 movers with 6 slots
        assert len({migrator.journal.placement(i).run_by for i in submitted}) >= 2
    finally:
        migrator.close()


def test_a_movers_copies_share_its_bandwidth_budget(processes, fleet_migrator, tmp_path):
    """A mover of 2 slots and 4 MiB/s: a copy alone gets the whole budget (not half of it), and two
    copies at once never exceed it together."""
    budget, size = 4 * MiB, 12 * MiB
    processes.start("mover-a", ["file"], slots=2, bandwidth="4M")
    data = {name: volume(tmp_path / f"{name}.img", size) for name in ("alone", "one", "two")}

    alone = fleet_migrator.migrate(str(tmp_path / "alone.img"), str(tmp_path / "alone-copy.img"))
    pair = [
        fleet_migrator.submit(str(tmp_path / f"{name}.img"), str(tmp_path / f"{name}-copy.img"))
        for name in ("one", "two")
    ]
    ended = [ended_migration(fleet_migrator, m.id) for m in pair]

    assert alone.state == j.COMPLETED and (tmp_path / "alone-copy.img").read_bytes() == data["alone"]
    # its rate over the copy step, start and final flush included: well above the 2 MiB/s of half
    assert 0.75 * budget <= alone.rate <= 1.05 * budget, alone.rate / MiB
    assert all(m.state == j.COMPLETED for m in ended)
    assert [(tmp_path / f"{n}-copy.img").read_bytes() for n in ("one", "two")] == [data["one"], data["two"]]
    copies = [copy_steps(fleet_migrator, m.id)[0] for m in pair]
    assert most_at_once([(c.intended_at, c.ended_at) for c in copies]) == 2
    span = (max(c.ended_at for c in copies) - min(c.intended_at for c in copies)).total_seconds()
    # together: 24 MiB at no more than the budget (and the 50 ms of credit each copy starts with)
    assert 2 * size / span <= 1.05 * budget, 2 * size / span / MiB


# ---------------------------------------------------------------- faults under a running job


def copy_steps(fleet_migrator, migration_id: str) -> list:
    return [s for s in fleet_migrator.steps(migration_id) if s.name == "copy"]


def test_a_mover_cut_off_from_redis_hands_its_migration_to_another(
    processes,
    fleet_migrator,
    tmp_path,
    netns_hosts,  # noqa: F811
):
    rate, size = 4 * MiB, 40 * MiB
    host = netns_hosts("volcopy-host-a")
    first = processes.start("mover-a", ["file"], host=host)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = volume(src, size)
    m = fleet_migrator.submit(str(src), str(dst), rate_limit=rate)
    wait_for(lambda: fleet_migrator.status(m.id).bytes_done >= 8 * MiB, 30, what="8 MiB copied on mover-a")
    processes.start("mover-b", ["file"])

    host.link_down()  # Redis is out of mover-a's reach; the journal (a unix socket) is not
    wait_for(
        lambda: fleet_migrator.journal.placement(m.id).run_by == "mover-b", 30, what="taken over by mover-b"
    )
    host.link_up()
    ended = ended_migration(fleet_migrator, m.id)

    assert ended.state == j.COMPLETED, ended.reason
    assert ended.dst_digest == ended.src_digest == reference_digest(data)
    assert dst.read_bytes() == data
    assert ended.resumed_from > 0
    # mover-a stopped its copy (its claim could not be renewed) before mover-b's began: never both
    a_copy, b_copy = copy_steps(fleet_migrator, m.id)
    assert a_copy.status == j.FAILED and "stopped by its mover" in a_copy.detail
    assert a_copy.ended_at <= b_copy.intended_at and b_copy.status == j.DONE
    assert "its job's claim could not be renewed for 3 s" in first.log_text()
    assert first.process.poll() is None  # it rides the partition out, and is back in the group
    wait_for(lambda: "answers again" in first.log_text(), 15, what="mover-a back in the group")


def test_a_frozen_mover_whose_session_died_is_refused_by_the_generation_token(
    processes,
    fleet_migrator,
    postgres,
    fleet_journal,
    tmp_path,
):
    """mover-a frozen (SIGSTOP, as a long pause or a partition would) past its claim's expiry, and the
    session that holds its migration's lock dropped by the database (as TCP keepalives would): mover-b
    takes the migration over. mover-a, let go on, is refused by the journal's owner (the generation
    token), stops the migration there, and leaves it to mover-b."""
    rate, size = 4 * MiB, 40 * MiB
    first = processes.start("mover-a", ["file"])
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = volume(src, size)
    m = fleet_migrator.submit(str(src), str(dst), rate_limit=rate)
    wait_for(lambda: fleet_migrator.status(m.id).bytes_done >= 8 * MiB, 30, what="8 MiB copied on mover-a")
    processes.start("mover-b", ["file"])

    first.process.send_signal(signal.SIGSTOP)
    [holder] = lock_holders(postgres, fleet_journal)
    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=volcopy dbname=postgres") as c:
        assert c.execute("SELECT pg_terminate_backend(%s)", (holder,)).fetchone() == (True,)
    wait_for(
        lambda: fleet_migrator.journal.placement(m.id).run_by == "mover-b", 30, what="taken over by mover-b"
    )
    first.process.send_signal(signal.SIGCONT)
    ended = ended_migration(fleet_migrator, m.id)

    assert ended.state == j.COMPLETED, ended.reason
    assert ended.dst_digest == ended.src_digest == reference_digest(data) and dst.read_bytes() == data
    assert ended.owner.split(":")[0] == "volcopy-mover-b"
    a_copy, b_copy = copy_steps(fleet_migrator, m.id)
    assert a_copy.status == j.FAILED and "LostOwnership" in a_copy.detail, a_copy.detail
    assert b_copy.status == j.DONE
    refused = wait_for(lambda: "stopped here, to run again" in first.log_text(), 15, what="mover-a stopped")
    assert refused and first.process.poll() is None


def test_redis_restarted_empty_under_a_running_job(redis, processes, fleet_migrator, tmp_path):
    rate, size = 4 * MiB, 24 * MiB
    processes.start("mover-a", ["file"])
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = volume(src, size)
    m = fleet_migrator.submit(str(src), str(dst), rate_limit=rate)
    wait_for(lambda: fleet_migrator.status(m.id).bytes_done >= 4 * MiB, 30, what="copying on mover-a")
    lost_job = fleet_migrator.journal.placement(m.id).job

    redis.kill()  # every job, claim and member gone
    redis.start()
    ended = ended_migration(fleet_migrator, m.id)

    assert ended.state == j.COMPLETED, ended.reason
    assert dst.read_bytes() == data and ended.dst_digest == reference_digest(data)
    assert [s.status for s in copy_steps(fleet_migrator, m.id)] == [j.DONE]  # it ran on, never twice
    assert fleet_migrator.journal.placement(m.id).job != lost_job  # posted again for the jobboard's sake
    board = jobboard.connect(fleet_migrator.fleet_url, fleet_migrator.fleet_group, None)
    try:
        wait_for(lambda: board.job_count == 0, 15, what="the posted-again job consumed")
    finally:
        board.close()


def test_the_journal_server_restarted_under_a_running_job(postgres, processes, fleet_migrator, tmp_path):
    rate, size = 4 * MiB, 24 * MiB
    mover = processes.start("mover-a", ["file"])
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = volume(src, size)
    m = fleet_migrator.submit(str(src), str(dst), rate_limit=rate)
    wait_for(lambda: fleet_migrator.status(m.id).bytes_done >= 4 * MiB, 30, what="copying on mover-a")

    postgres.halt()
    time.sleep(3)
    postgres.resume()
    ended = ended_migration(fleet_migrator, m.id)

    assert ended.state == j.COMPLETED, ended.reason
    assert dst.read_bytes() == data and ended.dst_digest == reference_digest(data)
    assert ended.owner.split(":")[1] == str(mover.pid)
    assert copy_steps(fleet_migrator, m.id)[-1].status == j.DONE


def test_a_job_posted_twice_runs_its_migration_once(processes, fleet_migrator, tmp_path):
    """A second job for a placed migration, as a mover posting a "lost" job while its submitter posted
    the first would leave: the mover that claims the job the journal does not name drops it, at once
    rather than holding a slot while the other runs."""
    mover = processes.start("mover-a", ["file"], slots=2)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = volume(src, 16 * MiB)
    m = fleet_migrator.submit(str(src), str(dst), rate_limit=2 * MiB)
    client = fleet_migrator.fleet_client()
    placement = fleet_migrator.journal.placement(m.id)
    second = jobboard.post(
        client.board, client.backend, m.id, "mover-a", ("file", "file"), False, placement.backends, 0
    )
    wait_for(lambda: mover.metrics()["volcopy_mover_jobs_total{outcome=duplicate}"] == 1, 30, what="dropped")
    assert not fleet_migrator.status(m.id).finished  # dropped while the migration runs on

    ended = ended_migration(fleet_migrator, m.id)
    assert ended.state == j.COMPLETED and dst.read_bytes() == data
    assert [s.status for s in copy_steps(fleet_migrator, m.id)] == [j.DONE]
    assert fleet_migrator.journal.placement(m.id).job == placement.job != second
    wait_for(lambda: client.board.job_count == 0, 15, what="both jobs consumed")
    assert f"is not its job ({placement.job} is): dropped" in mover.log_text()


def test_a_job_the_journal_does_not_name_runs_its_migration_when_the_named_one_is_gone(
    processes, fleet_migrator, tmp_path
):
    """The journal names a job that is no longer on the jobboard (consumed by mistake, or dropped before
    the journal named it), and another job of the migration is there: that one becomes its job."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = volume(src, 4 * MiB)
    mover = processes.start("mover-a", ["file"])
    os.kill(mover.pid, signal.SIGSTOP)  # listed a little longer, claiming nothing meanwhile
    m = fleet_migrator.submit(str(src), str(dst))
    client = fleet_migrator.fleet_client()
    named = fleet_migrator.journal.placement(m.id)
    [lost] = [job for job in client.board.iterjobs(ensure_fresh=True) if job.uuid == named.job]
    client.board.claim(lost, "test")
    client.board.consume(lost, "test")
    other = jobboard.post(client.board, client.backend, m.id, "", ("file", "file"), False, named.backends, 0)

    os.kill(mover.pid, signal.SIGCONT)
    ended = ended_migration(fleet_migrator, m.id)

    assert ended.state == j.COMPLETED and dst.read_bytes() == data
    assert fleet_migrator.journal.placement(m.id).job == other
    assert f"its job {named.job} is gone: {other} runs it" in mover.log_text()
