"""Movers on hosts of their own: each `volcopy mover` in a network namespace with its own address and
host name (tests/netns_hosts.py), reaching the session's Redis over its veth link. Placement tells the
hosts apart by their transports; a host whose link goes down drops out of the group once its heartbeat
lapses (bounded, while the other movers stay) and joins again, the same process, when its link comes
back."""

from __future__ import annotations

import re
import time

import pytest
from netns_hosts import needs_netns, netns_hosts  # noqa: F401 - the fixture

from mover_processes import HEARTBEAT_INTERVAL, MEMBERSHIP_TIMEOUT, MoverProcesses, coordination_url
from volcopy._core import rbd_compiled
from volcopy.movers.errors import NoMoverFits
from volcopy.movers.fleet import Fleet

pytestmark = needs_netns

RBD_INFO = {"driver_volume_type": "rbd", "data": {"name": "volumes/volume-1"}}
POLL = 0.05


@pytest.fixture
def processes(redis, mover_group, tmp_path, netns_hosts):  # noqa: F811 - after the hosts: stopped first
    processes = MoverProcesses(tmp_path, redis, mover_group)
    yield processes
    processes.stop_all()


@pytest.fixture
def fleet(redis, mover_group):
    with Fleet(coordination_url(redis.url), mover_group) as fleet:
        yield fleet


def hosts_of(fleet: Fleet) -> dict[str, str]:
    return {m.name: m.host for m in fleet.movers()}


@pytest.mark.skipif(not rbd_compiled(), reason="this build of volcopy has no librbd")
def test_each_copy_lands_on_the_host_that_reaches_both_transports(processes, fleet, netns_hosts):  # noqa: F811
    host_x, host_y = netns_hosts("volcopy-host-x"), netns_hosts("volcopy-host-y")
    assert host_x.address != host_y.address
    movers = [
        processes.start("mover-x", ["file"], host=host_x, wait=False),
        processes.start("mover-y", ["local", "rbd"], host=host_y, wait=False),
    ]
    for mover in movers:
        mover.wait_joined()

    assert hosts_of(fleet) == {"mover-x": "volcopy-host-x", "mover-y": "volcopy-host-y"}
    assert fleet.place("/volumes/a.img", "/volumes/b.img").host == "volcopy-host-x"
    assert fleet.place(RBD_INFO, RBD_INFO).host == "volcopy-host-y"
    with pytest.raises(
        NoMoverFits, match="^no mover can copy from file to rbd: no live mover reaches file and rbd;"
    ):
        fleet.place("/volumes/a.img", RBD_INFO)
    assert [mover.terminate() for mover in movers] == [0, 0]
    assert hosts_of(fleet) == {}


def test_a_host_cut_off_drops_out_once_its_heartbeat_lapses_and_rejoins_when_its_link_is_back(
    processes,
    fleet,
    netns_hosts,  # noqa: F811
):
    host = netns_hosts("volcopy-host-cut")
    cut = processes.start("mover-cut", ["file"], host=host, wait=False)
    local = processes.start("mover-local", ["file"], wait=False)
    for mover in (cut, local):
        mover.wait_joined()
    (before,) = [m for m in fleet.movers() if m.name == "mover-cut"]

    host.link_down()
    cut_at = time.monotonic()
    while "mover-cut" in hosts_of(fleet):
        assert time.monotonic() - cut_at < 10, "the cut-off mover did not lapse"
        time.sleep(POLL)
    lapsed_after = time.monotonic() - cut_at
    assert MEMBERSHIP_TIMEOUT - HEARTBEAT_INTERVAL - 0.5 <= lapsed_after <= MEMBERSHIP_TIMEOUT + 0.5, (
        lapsed_after
    )
    assert list(hosts_of(fleet)) == ["mover-local"]

    time.sleep(HEARTBEAT_INTERVAL)  # cut off a while longer: its beats keep failing, it keeps trying
    host.link_up()
    up_at = time.monotonic()
    while "mover-cut" not in hosts_of(fleet):
        assert time.monotonic() - up_at < 10, "the mover did not join again"
        time.sleep(POLL)
    back_after = time.monotonic() - up_at

    assert back_after <= HEARTBEAT_INTERVAL + 0.5, back_after  # its next beat
    (after,) = [m for m in fleet.movers() if m.name == "mover-cut"]
    assert (after.pid, after.incarnation, after.host) == (before.pid, before.incarnation, "volcopy-host-cut")
    log = cut.log_text()
    # A beat on the open connection times out (timeout=2; redis-py names the socket or the host:port,
    # depending on which layer saw it), or a new connection finds no route.
    assert re.search(r"is unreachable: (Timeout reading from \S+|Error 101 connecting to)", log), log
    assert log.index("is unreachable") < log.index("no longer in group") < log.index("answers again")
    assert cut.process.poll() is None and local.process.poll() is None
