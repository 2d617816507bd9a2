"""Migrations on a PostgreSQL journal shared by several hosts: the journal's server stopped mid-copy and
started again; a second host (a process in its own network and UTS namespace, reaching PostgreSQL
through its unix socket directory) that takes over a migration exactly when its owner's database
session dies, and never while the owner lives; an owner whose session was cut stops before any further
effect once the other host has taken over."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from conftest import MiB, fill_garbage, needs_root, read_all, write_layout
from volcopy.migration import Journal, JournalError, Migrator

SIZE = 32 * MiB
RATE = 6 * MiB  # a copy of about 5 s: long enough to stop things in its middle
OTHER_HOST = "host-b"

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="another host is a process in its own network and UTS namespace: needs root and unshare "
    "(util-linux)",
)


@pytest.fixture
def volumes(workdir) -> tuple[str, str, bytes]:
    src, dst = workdir / "src.img", workdir / "dst.img"
    content = write_layout(src, SIZE, [(0, 5 * MiB), (8 * MiB, 24 * MiB)], seed=21)
    fill_garbage(dst, SIZE)
    return str(src), str(dst), content


@pytest.fixture
def url(postgres) -> str:
    return postgres.new_database()


def wait_for(predicate, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def copying(url: str):
    """The one migration in the journal, once its copy has made progress."""
    return wait_for(lambda: [m for m in Journal(url).list() if m.bytes_done > 0], "progress")[0]


def steps(url: str, migration_id: str) -> list[tuple[str, str]]:
    return [(s.name, s.status) for s in Journal(url).steps(migration_id)]


def owner_process(url: str, src: str, dst: str, workdir) -> subprocess.Popen:
    """The owner: `volcopy migrate` in a process of its own, on this host."""
    return subprocess.Popen(
        [sys.executable, "-m", "volcopy.cli", "migrate", src, dst, "--rate", str(RATE)]
        + ["--journal", url, "--checkpoint-dir", str(workdir / "checkpoints")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


OTHER_HOST_RECOVER = """
import json, sys, tempfile
from volcopy.migration import Migrator
# its own checkpoint directory: the owner's checkpoint reaches it through the journal only
with tempfile.TemporaryDirectory(prefix="volcopy-other-host-") as checkpoints:
    migrator = Migrator(sys.argv[1], checkpoint_dir=checkpoints)
    print(json.dumps([[m.id, m.state, m.owner, m.resumed_from] for m in migrator.recover()]))
"""


def other_host(socket_url: str) -> subprocess.Popen:
    """recover() on another host: its own network namespace (no route to this host's 127.0.0.1) and
    its own host name; the journal's server is reached through its unix socket directory."""
    script = f'hostname {OTHER_HOST} && exec "$0" -c "$1" "$2"'
    return subprocess.Popen(
        [
            "unshare",
            "--net",
            "--uts",
            "--",
            "sh",
            "-c",
            script,
            sys.executable,
            OTHER_HOST_RECOVER,
            socket_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def recovered_by_other_host(proc: subprocess.Popen) -> list[list]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out)


def lock_holders(postgres, url: str) -> list[int]:
    """The backends holding an advisory lock in the journal's database: the migrations' owners."""
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=volcopy dbname={database}") as c:
        rows = c.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()
    return [pid for (pid,) in rows]


def test_the_journal_server_stopped_mid_copy_and_started_again(postgres, url, volumes, caplog):
    """The copy goes on while the server is down; the journal's writes after it wait for the server;
    the owner's lock, gone with the server, is taken again since nobody took the migration meanwhile."""
    src, dst, content = volumes
    outcome = {}

    def run():
        outcome["m"] = Migrator(url).migrate(src, dst, rate_limit=RATE)

    caplog.set_level(logging.WARNING, logger="volcopy")
    thread = threading.Thread(target=run)
    thread.start()
    running = copying(url)
    postgres.halt()
    # Down until the copy has ended and the journal's writes wait for the server.
    wait_for(lambda: any("retrying in" in r.getMessage() for r in caplog.records), "a write waiting")
    time.sleep(1.0)
    postgres.resume()
    thread.join(timeout=120)

    m = outcome["m"]
    assert (m.state, m.dst_valid, m.owner) == ("completed", True, running.owner)
    assert read_all(dst) == content
    assert m.src_digest == m.dst_digest
    assert steps(url, m.id) == [("clone", "done"), ("copy", "done"), ("verify", "done")]
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "unreachable" in warnings and "retrying in" in warnings, "the wait for the journal was not logged"
    assert "taken again" in warnings, "the lock lost with the server was not taken again"


def test_a_journal_down_longer_than_its_retry_time_stops_the_migration_as_recorded(postgres, url, volumes):
    """Nothing is done that cannot be recorded: the migration stays copying, with its copy step
    intended, and recover() on the server's return finishes it."""
    src, dst, content = volumes
    outcome = {}

    def run():
        try:
            Migrator(Journal(url, retry_for=1.0)).migrate(src, dst, rate_limit=RATE)
        except JournalError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    running = copying(url)
    postgres.halt()
    thread.join(timeout=120)
    postgres.resume()

    error = outcome["error"]
    assert str(error).startswith(f"migration {running.id} stays copying as recorded: journal ")
    assert "is unreachable" in str(error) and str(error).endswith("recover() goes on from there")
    assert Journal(url).get(running.id).state == "copying"
    assert steps(url, running.id) == [("clone", "done"), ("copy", "intended")]

    recovered = Migrator(url).recover()

    assert [(m.id, m.state, m.dst_valid) for m in recovered] == [(running.id, "completed", True)]
    assert read_all(dst) == content
    assert steps(url, running.id) == [
        ("clone", "done"),
        ("copy", "intended"),
        ("clone", "done"),
        ("copy", "done"),
        ("verify", "done"),
    ]


@needs_root
@needs_unshare
def test_another_host_never_takes_over_while_the_owner_lives(postgres, url, volumes, workdir):
    src, dst, content = volumes
    owner = owner_process(url, src, dst, workdir)
    running = copying(url)

    assert recovered_by_other_host(other_host(postgres.socket_url(url))) == []

    out, err = owner.communicate(timeout=120)
    assert owner.returncode == 0, err
    m = Journal(url).get(running.id)
    assert (m.state, m.owner, m.resumed_from) == ("completed", running.owner, 0)
    assert read_all(dst) == content
    assert steps(url, m.id) == [("clone", "done"), ("copy", "done"), ("verify", "done")]


@needs_root
@needs_unshare
def test_another_host_takes_over_a_migration_whose_owner_was_killed(postgres, url, volumes, workdir):
    src, dst, content = volumes
    owner = owner_process(url, src, dst, workdir)
    # The engine's first checkpoint comes after 2 s of copy: half of the volume, at RATE.
    running = wait_for(lambda: [m for m in Journal(url).list() if m.bytes_done >= SIZE // 2], "half")[0]
    owner.send_signal(signal.SIGKILL)
    owner.wait()

    recovered = recovered_by_other_host(other_host(postgres.socket_url(url)))

    [(migration_id, state, new_owner, resumed_from)] = recovered
    assert (migration_id, state) == (running.id, "completed")
    assert new_owner.startswith(f"{OTHER_HOST}:") and running.owner.split(":")[0] != OTHER_HOST
    # from the checkpoint the journal holds: the other host has none of its own
    assert resumed_from > 0, "the copy started again instead of resuming from the checkpoint"
    assert read_all(dst) == content
    assert steps(url, running.id) == [
        ("clone", "done"),
        ("copy", "intended"),
        ("clone", "done"),
        ("copy", "done"),
        ("verify", "done"),
    ]
    assert Migrator(url).recover() == [], "nothing is left to recover"


@needs_root
@needs_unshare
def test_an_owner_whose_session_died_stops_once_another_host_took_over(postgres, url, volumes, workdir):
    """The owner is frozen (as a long pause would), its lock's session terminated, and the other host
    takes the migration over; the owner, let go on, finds it lost and stops, recording nothing more
    than that its copy step failed."""
    src, dst, content = volumes
    owner = owner_process(url, src, dst, workdir)
    running = copying(url)
    owner.send_signal(signal.SIGSTOP)
    [holder] = lock_holders(postgres, url)
    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=volcopy dbname=postgres") as c:
        assert c.execute("SELECT pg_terminate_backend(%s)", (holder,)).fetchone() == (True,)

    taking_over = other_host(postgres.socket_url(url))
    wait_for(lambda: Journal(url).get(running.id).owner.startswith(f"{OTHER_HOST}:"), "the take-over")
    owner.send_signal(signal.SIGCONT)
    out, err = owner.communicate(timeout=60)
    recovered = recovered_by_other_host(taking_over)

    assert owner.returncode == 1
    # Whichever it saw first: its progress row refused (the owner changed), or its lock taken.
    cause = re.escape(f"now run by {recovered[0][2]}, no longer by {running.owner}")
    cause = f"({cause}|its lock is held by another process)"
    stopped = "this process stopped before any further external effect"
    assert re.fullmatch(f"volcopy: error: migration {running.id}: {cause}; {stopped}\n", err), err
    assert [(r[0], r[1]) for r in recovered] == [(running.id, "completed")]
    assert read_all(dst) == content
    [clone, copy, *rest] = Journal(url).steps(running.id)
    assert (clone.name, copy.name, copy.status) == ("clone", "copy", "failed")
    assert re.fullmatch(f"LostOwnership: {cause}", copy.detail), copy.detail
    assert [(s.name, s.status) for s in rest] == [("clone", "done"), ("copy", "done"), ("verify", "done")]
