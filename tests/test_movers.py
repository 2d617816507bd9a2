"""Data movers on a real Redis: what each offers (the transports this host can attach, checked through
os-brick), placement among several `volcopy mover` processes with different transports (a copy lands
only on a mover that reaches both of its transports; the least loaded with a free slot first; a clear
error naming the transports and the movers seen when none fits), `volcopy movers list`, and the
mover's refusals at start. Movers on hosts of their own: test_movers_hosts.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mover_processes import HEARTBEAT_INTERVAL, MoverProcesses, coordination_url
from volcopy import cli
from volcopy._core import rbd_compiled
from volcopy.movers import config as mover_config
from volcopy.movers.errors import CoordinationUnreachable, NoMoverFits
from volcopy.movers.fleet import Fleet
from volcopy.movers.service import Mover
from volcopy.movers.transports import transport_of, usable, why_not

needs_librbd = pytest.mark.skipif(not rbd_compiled(), reason="this build of volcopy has no librbd")

ISCSI = {"driver_volume_type": "iscsi", "data": {"target_iqn": "iqn.2010-10.org.openstack:volume-1"}}
RBD_INFO = {"driver_volume_type": "rbd", "data": {"name": "volumes/volume-1"}}
LOCAL = {"driver_volume_type": "local", "data": {"device_path": "/dev/loop0"}}


def volcopy(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "volcopy.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | (env or {}),
    )


# ---------------------------------------------------------------- transports


def test_transport_of_paths_rbd_specs_and_connection_info():
    assert transport_of("/var/lib/volumes/a.img") == "file"
    assert transport_of("rbd:volumes/volume-1") == "rbd"
    assert transport_of(RBD_INFO) == "rbd"
    assert transport_of({"driver_volume_type": "ISCSI", "data": {}}) == "iscsi"
    assert transport_of(LOCAL) == "local"
    with pytest.raises(ValueError, match="a path or Cinder connection_info"):
        transport_of(42)


def test_this_host_offers_what_it_can_attach():
    works, refused = usable()

    assert {"file", "local"} <= set(works)
    assert ("rbd" in works) == rbd_compiled()
    # What this machine lacks is refused with the reason os-brick's connector gives.
    if not os.path.exists("/etc/iscsi/initiatorname.iscsi"):
        assert refused["iscsi"].startswith("os-brick finds no iSCSI initiator name")
    if not os.path.isdir("/sys/class/fc_host") or not os.listdir("/sys/class/fc_host"):
        assert refused["fibre_channel"].startswith("os-brick finds no Fibre Channel HBA")
    if not os.path.exists("/dev/nvme-fabrics"):
        assert "nvmeof" in refused and "nvmeof" not in works
    assert set(works) | set(refused) == {"file", "local", "rbd", "iscsi", "fibre_channel", "nvmeof"}
    assert why_not("nfs") == "unknown transport (known: file, local, rbd, iscsi, fibre_channel, nvmeof)"


def test_a_configured_transport_this_host_cannot_attach_stops_the_mover(tmp_path):
    if os.path.isdir("/sys/class/fc_host") and os.listdir("/sys/class/fc_host"):
        pytest.skip("this host has a Fibre Channel HBA")  # never on the test machines
    config = tmp_path / "mover.conf"
    config.write_text("[mover]\nname = m\ntransports = file, fibre_channel\n")

    with pytest.raises(mover_config.ConfigError) as error:
        mover_config.load(["--config-file", str(config)])

    assert str(error.value) == (
        f"{config}: [mover] transports: cannot be offered on this host: fibre_channel: os-brick finds no "
        "Fibre Channel HBA (no port WWNs under /sys/class/fc_host)"
    )


@pytest.mark.parametrize(
    "body, message",
    [
        ("transports = file, nfs\n", "transports: cannot be offered on this host: nfs: unknown transport"),
        ("bandwidth = fast\n", "bandwidth: not a size: 'fast'"),
        ("slots = 0\n", "slots: Should be greater than or equal to 1"),
        ("name =\n", "name must not be empty"),
        ("coordination_url =\n", "coordination_url must not be empty"),
        ("coordination_url = zookeeper://zk:2181\n", "coordination_url: the movers' jobboard needs Redis"),
        ("coordination_url = redis://s:26379?sentinel=m\n", "jobboard does not follow a Redis Sentinel"),
        ("metrics_address = 9464\n", "metrics_address: HOST:PORT, not '9464'"),
        ("journal = sqlite:///x\n[compute]\nauth_type = nosuchplugin\n", "[compute]: "),
    ],
)
def test_bad_configuration(tmp_path, body, message):
    config = tmp_path / "mover.conf"
    config.write_text("[mover]\nname = m\n" + body)
    with pytest.raises(mover_config.ConfigError, match="^" + str(config) + r": \[(mover|compute)\]") as error:
        mover_config.load(["--config-file", str(config)])
    assert message in str(error.value)


def test_the_mover_command_exits_2_on_a_bad_configuration(tmp_path, capsys):
    config = tmp_path / "mover.conf"
    config.write_text("[mover]\nname = m\ntransports = file, iscsi, nfs\n")

    assert cli.main(["mover", "--config-file", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1  # os-brick's own warnings are not shown
    assert err.startswith(
        f"volcopy mover: error: {config}: [mover] transports: cannot be offered on this host: "
    )
    assert "nfs: unknown transport" in err

    assert cli.main(["mover"]) == 2
    assert capsys.readouterr().err == (
        "volcopy mover: error: no configuration: give --config-file FILE (see docs/movers.md)\n"
    )


def test_the_mover_command_exits_1_when_its_backend_is_unreachable(tmp_path, redis):
    closed_port = redis.port + 1 if redis.port < 65535 else redis.port - 1
    config = tmp_path / "mover.conf"
    config.write_text(
        f"[mover]\nname = m\ntransports = file\ncoordination_url = redis://127.0.0.1:{closed_port}\n"
    )
    started = time.monotonic()
    unreachable = volcopy("mover", "--config-file", str(config))
    assert unreachable.returncode == 1 and unreachable.stdout == ""
    assert unreachable.stderr.strip().splitlines()[-1] == (
        f"volcopy mover: error: coordination redis://127.0.0.1:{closed_port} is unreachable: Error 111 "
        f"connecting to 127.0.0.1:{closed_port}. Connection refused."
    )
    assert time.monotonic() - started < 20  # Python's start on a busy machine; no retry with backoff


def test_the_volcopy_command_does_not_import_tooz_to_build_its_parser():
    """tooz (with eventlet) takes 1 to 2 s to import: a copy must not wait for the movers' commands."""
    probe = (
        "import sys, volcopy.cli as c; c._parser(); "
        "print(sorted(m for m in ('tooz', 'eventlet') if m in sys.modules))"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert (shown.returncode, shown.stdout) == (0, "[]\n"), shown.stderr


# ---------------------------------------------------------------- placement among mover processes


@pytest.fixture(scope="module")
def three_movers(redis, tmp_path_factory):
    """Three movers with different transports, started together once for this module."""
    group = f"volcopy-movers-placement-{os.getpid()}"
    processes = MoverProcesses(tmp_path_factory.mktemp("movers"), redis, group)
    started = [
        processes.start("mover-a", ["file", "local"], slots=2, bandwidth="200M", wait=False),
        processes.start("mover-b", ["local", "rbd"] if rbd_compiled() else ["local"], slots=2, wait=False),
        processes.start("mover-c", ["rbd"] if rbd_compiled() else ["file"], slots=1, wait=False),
    ]
    for mover in started:
        mover.wait_joined()
    yield processes
    processes.stop_all()


@pytest.fixture
def fleet(redis, three_movers):
    with Fleet(coordination_url(redis.url), three_movers.group) as fleet:
        yield fleet


@needs_librbd
def test_each_copy_lands_only_where_both_of_its_transports_match(fleet):
    movers = {m.name: m for m in fleet.movers()}
    assert {name: m.transports for name, m in movers.items()} == {
        "mover-a": ("file", "local"),
        "mover-b": ("local", "rbd"),
        "mover-c": ("rbd",),
    }
    assert all(m.slots_in_use == 0 and m.pid > 0 for m in movers.values())

    assert fleet.place("/volumes/a.img", "/volumes/b.img").name == "mover-a"
    assert fleet.place("/volumes/a.img", LOCAL).name == "mover-a"
    assert fleet.place(LOCAL, LOCAL).name == "mover-a"  # a and b both fit: equally idle, by name
    assert fleet.place(LOCAL, RBD_INFO).name == "mover-b"
    assert fleet.place("rbd:volumes/volume-1", LOCAL).name == "mover-b"
    assert fleet.place(RBD_INFO, "rbd:other/volume-2").name == "mover-b"  # b and c: b by name


@needs_librbd
def test_no_mover_fits_names_the_transports_and_the_movers_seen(fleet):
    with pytest.raises(NoMoverFits) as error:
        fleet.place("/volumes/a.img", RBD_INFO)
    assert str(error.value) == (
        "no mover can copy from file to rbd: no live mover reaches file and rbd; movers seen in group "
        f"{fleet.group}: mover-a (file, local; 0/2 slots), mover-b (local, rbd; 0/2 slots), "
        "mover-c (rbd; 0/1 slots)"
    )
    assert error.value.needed == ("file", "rbd")
    assert [m.name for m in error.value.seen] == ["mover-a", "mover-b", "mover-c"]

    with pytest.raises(
        NoMoverFits, match=r"^no mover can copy from iscsi to iscsi: no live mover reaches iscsi;"
    ):
        fleet.place(ISCSI, ISCSI)


def test_no_mover_in_the_group(redis, mover_group):
    with Fleet(coordination_url(redis.url), mover_group) as fleet:
        with pytest.raises(NoMoverFits) as error:
            fleet.place(ISCSI, RBD_INFO)
    assert str(error.value) == (
        "no mover can copy from iscsi to rbd: no live mover reaches iscsi and rbd; no mover is in group "
        f"{mover_group} (run `volcopy mover` on hosts that reach iscsi and rbd)"
    )


def test_least_loaded_first_and_a_full_mover_is_passed_over(redis, mover_group):
    """In-process movers (the same class as the service's) whose slots are taken as the conductor
    will take them: each change is published at once and placement follows it."""
    url = coordination_url(redis.url)
    big = Mover("mover-big", url, mover_group, ["file", "local"], slots=4)
    small = Mover("mover-small", url, mover_group, ["file", "local"], slots=1)
    other = Mover("mover-other", url, mover_group, ["local"], slots=8)
    for mover in (big, small, other):
        mover.start()
    try:
        with Fleet(url, mover_group) as fleet:
            assert fleet.place("/a", LOCAL).name == "mover-big"  # all idle: by name
            assert big.reserve()
            assert fleet.place("/a", LOCAL).name == "mover-small"  # 0/1 before 1/4
            assert small.reserve() and not small.reserve()
            assert fleet.place("/a", LOCAL).name == "mover-big"  # small is full
            assert big.reserve() and big.reserve() and big.reserve() and not big.reserve()
            with pytest.raises(NoMoverFits) as error:
                fleet.place("/a", LOCAL)
            assert str(error.value) == (
                "no mover can copy from file to local: every mover that reaches file and local is full; "
                f"movers seen in group {mover_group}: mover-big (file, local; 4/4 slots: full), "
                "mover-other (local; 0/8 slots), mover-small (file, local; 1/1 slots: full)"
            )
            assert fleet.place(LOCAL, LOCAL).name == "mover-other"
            small.release()
            assert fleet.place("/a", LOCAL).name == "mover-small"
    finally:
        for mover in (big, small, other):
            mover.stop()


def test_a_fleet_without_its_backend(redis):
    closed_port = redis.port + 1 if redis.port < 65535 else redis.port - 1
    with pytest.raises(
        CoordinationUnreachable, match=f"^coordination redis://127.0.0.1:{closed_port} is unreachable: "
    ):
        Fleet(f"redis://127.0.0.1:{closed_port}")


# ---------------------------------------------------------------- volcopy movers list


def test_movers_list(redis, three_movers, capsys, monkeypatch):
    url = coordination_url(redis.url)
    monkeypatch.setenv("VOLCOPY_COORDINATION_URL", url)
    assert cli.main(["movers", "list", "--group", three_movers.group]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MOVER", "HOST", "TRANSPORTS", "SLOTS", "RATE", "BANDWIDTH", "HEARTBEAT"]
    rows = [line.split() for line in lines[1:]]
    host = os.uname().nodename
    expected_b = "local,rbd" if rbd_compiled() else "local"
    expected_c = "rbd" if rbd_compiled() else "file"
    assert [row[:7] for row in rows] == [
        ["mover-a", host, "file,local", "0/2", "0", "B/s", "200.0"],
        ["mover-b", host, expected_b, "0/2", "0", "B/s", "unlimited"],
        ["mover-c", host, expected_c, "0/1", "0", "B/s", "unlimited"],
    ]
    ages = [float(row[-3]) for row in rows]  # "0.3 s ago"
    assert all(0 <= age <= HEARTBEAT_INTERVAL + 0.5 for age in ages), ages

    monkeypatch.delenv("VOLCOPY_COORDINATION_URL")
    assert (
        cli.main(["movers", "list", "--coordination-url", url, "--group", three_movers.group, "--json"]) == 0
    )
    movers = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["slots"], m["bandwidth"]) for m in movers] == [
        ("mover-a", 2, 200 << 20),
        ("mover-b", 2, 0),
        ("mover-c", 1, 0),
    ]
    assert {m["pid"] for m in movers} == {p.pid for p in three_movers.started}

    assert cli.main(["movers", "list", "--coordination-url", url, "--group", "volcopy-movers-nobody"]) == 0
    assert capsys.readouterr().out == "no mover in group volcopy-movers-nobody\n"
    assert cli.main(["movers", "list"]) == 1
    assert (
        capsys.readouterr().err
        == "volcopy: error: give --coordination-url URL or set $VOLCOPY_COORDINATION_URL\n"
    )
