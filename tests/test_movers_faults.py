"""Data movers through faults, on a real Redis with `volcopy mover` processes: a mover SIGKILLed drops out
of the group once its heartbeat lapses (bounded on both sides) and no copy is placed on it after, while
one stopped with SIGTERM leaves at once; Redis killed and started again empty under running movers
(each joins again, the same process); a mover restarted at once after SIGKILL takes its name back once
the dead one's entry has stopped beating; a second live mover under a name in use is refused and the
first keeps its place."""

from __future__ import annotations

import time

import pytest

from mover_processes import HEARTBEAT_INTERVAL, MEMBERSHIP_TIMEOUT, MoverProcesses, coordination_url
from volcopy.movers.errors import CoordinationUnreachable, NoMoverFits
from volcopy.movers.fleet import Fleet
from volcopy.movers.service import Mover

LOCAL = {"driver_volume_type": "local", "data": {"device_path": "/dev/loop0"}}
POLL = 0.05


@pytest.fixture
def processes(redis, mover_group, tmp_path):
    processes = MoverProcesses(tmp_path, redis, mover_group)
    yield processes
    processes.stop_all()


@pytest.fixture
def fleet(redis, mover_group):
    with Fleet(coordination_url(redis.url), mover_group) as fleet:
        yield fleet


def start_together(processes: MoverProcesses, *specs: tuple[str, list[str]]):
    """Movers started at once (each start is mostly Python's imports), returned once all have joined."""
    started = [processes.start(name, transports, wait=False) for name, transports in specs]
    for mover in started:
        mover.wait_joined()
    return started


def names(fleet: Fleet) -> list[str]:
    return [m.name for m in fleet.movers()]


def wait_until(predicate, what: str, timeout: float) -> float:
    """Seconds until ``predicate()`` holds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(POLL)
    return time.monotonic() - started


def test_a_sigkilled_mover_drops_out_once_its_heartbeat_lapses_a_stopped_one_at_once(processes, fleet):
    victim, survivor = start_together(
        processes, ("mover-victim", ["file", "local"]), ("mover-survivor", ["local"])
    )
    assert names(fleet) == ["mover-survivor", "mover-victim"]

    victim.kill()
    killed_at = time.monotonic()
    assert "mover-victim" in names(fleet)  # nothing tells the group at once: its heartbeat must lapse
    wait_until(lambda: "mover-victim" not in names(fleet), "the victim lapses", timeout=10)
    gone_after = time.monotonic() - killed_at

    # Its last beat was at most one interval before the kill (a beat late on a busy machine: 0.5 s more);
    # it lapses a membership timeout after it.
    assert MEMBERSHIP_TIMEOUT - HEARTBEAT_INTERVAL - 0.5 <= gone_after <= MEMBERSHIP_TIMEOUT + 0.5, gone_after
    assert names(fleet) == ["mover-survivor"]
    assert survivor.process.poll() is None
    with pytest.raises(
        NoMoverFits, match=r"no live mover reaches file and local; movers seen in group \S+: "
    ):
        fleet.place("/volumes/a.img", LOCAL)
    assert fleet.place(LOCAL, LOCAL).name == "mover-survivor"

    # SIGTERM: it leaves, not lapses: the very next read has it gone.
    assert survivor.terminate() == 0
    assert names(fleet) == []
    assert "left group" in survivor.log_text()


def test_redis_killed_and_started_again_empty_under_running_movers(redis, processes, fleet):
    first, second = start_together(processes, ("mover-one", ["file"]), ("mover-two", ["local"]))
    before = {m.name: m for m in fleet.movers()}

    redis.kill()
    time.sleep(2 * HEARTBEAT_INTERVAL)  # each mover has found it unreachable at a beat
    redis.start()
    back_after = wait_until(
        lambda: names(fleet) == ["mover-one", "mover-two"], "both movers back in the group", timeout=10
    )

    # The next beat after the restart finds the group gone and joins again.
    assert back_after <= HEARTBEAT_INTERVAL + 0.5, back_after
    after = {m.name: m for m in fleet.movers()}
    for name, mover in after.items():  # the same processes, not restarted
        assert (mover.pid, mover.incarnation) == (before[name].pid, before[name].incarnation)
        assert mover.beats > before[name].beats
    for process in (first, second):
        log = process.log_text()
        assert "is unreachable" in log and "retrying every" in log
        assert "no longer in group" in log and "joining it again" in log
        assert log.index("is unreachable") < log.index("answers again")
        assert process.process.poll() is None


def test_slots_taken_while_redis_is_down_are_published_at_the_next_beat(redis, mover_group, fleet):
    """The conductor's slot accounting is the mover's own: a backend that does not answer neither fails
    it nor loses it, and a mover stopped while the backend is down still stops at once."""
    mover = Mover("mover-counting", coordination_url(redis.url), mover_group, ["file"], slots=2)
    mover.start()
    try:
        redis.kill()
        assert mover.reserve() is True
        assert mover.beat() is False
        with pytest.raises(
            CoordinationUnreachable, match=r"^coordination redis://127\.0\.0\.1:\d+\?\S+ is unreachable: "
        ):
            fleet.movers()
        redis.start()
        assert mover.beat() is True  # the group is gone with Redis's memory: joined again
        (shown,) = fleet.movers()
        assert (shown.name, shown.slots_in_use, shown.slots) == ("mover-counting", 1, 2)
        redis.kill()
        mover.release()
    finally:
        started = time.monotonic()
        mover.stop()
        stopped_after = time.monotonic() - started
        redis.start()
    assert stopped_after < 1.0, stopped_after
    assert fleet.movers() == []  # Redis came back empty, and nothing joined it since


def test_a_mover_restarted_at_once_after_sigkill_takes_its_name_back(processes, fleet):
    (old,) = start_together(processes, ("mover-phoenix", ["file"]))
    old.kill()

    started = time.monotonic()
    new = processes.start("mover-phoenix", ["file"])
    joined_after = time.monotonic() - started

    # It watched the dead one's entry for a membership timeout and a beat before taking it.
    assert joined_after >= MEMBERSHIP_TIMEOUT + HEARTBEAT_INTERVAL - 0.1, joined_after
    (mover,) = fleet.movers()
    assert (mover.name, mover.pid) == ("mover-phoenix", new.pid)
    log = new.log_text()
    assert f"already has a mover named mover-phoenix (pid {old.pid} on " in log
    assert "stopped beating: its entry is taken over" in log


def test_a_second_live_mover_under_a_name_in_use_is_refused(processes, fleet):
    (first,) = start_together(processes, ("mover-taken", ["file"]))
    (before,) = fleet.movers()

    second = processes.start("mover-taken", ["local"], wait=False)
    assert second.process.wait(timeout=30) == 1
    assert second.log_text().strip().splitlines()[-1] == (
        f"volcopy mover: error: another live mover named mover-taken is in group {fleet.group} (pid "
        f"{first.pid} on {before.host}): give each mover its own [mover] name"
    )
    # The first keeps its place: the refused one neither left the group nor removed the heartbeat of
    # the name (a reader would have dropped the first until its next beat).
    for _ in range(int(2 * HEARTBEAT_INTERVAL / POLL)):
        (mover,) = fleet.movers()
        assert (mover.pid, mover.incarnation, mover.transports) == (first.pid, before.incarnation, ("file",))
        time.sleep(POLL)
    assert first.process.poll() is None
