"""`volcopy mover` processes for the tests, each with its own configuration file, name and transports, on
the session's Redis (tests/redis_server.py) or etcd (tests/etcd_server.py), with a short membership
timeout so that a dead mover lapses in seconds. A started mover has printed its "joined" line; its log
(stderr) is kept in a file.

``MoverProcesses.start()`` runs one on this host; with ``host=`` (a NetnsHost, tests/netns_hosts.py)
it runs on that host: its own network namespace, address and host name, reaching Redis at the host's
gateway, where Redis listens for as long as the mover's processes run.
"""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

MEMBERSHIP_TIMEOUT = 2.0  # seconds after its last heartbeat that a mover leaves the group
CLAIM_EXPIRY = 3.0  # seconds a job's claim outlives its mover
HEARTBEAT_INTERVAL = MEMBERSHIP_TIMEOUT / 3  # the mover's default: a third of the membership timeout
JOIN_TIMEOUT = 30.0  # a mover's start: Python, oslo, os-brick and tooz imports on a busy 2-core machine


def coordination_url(base: str) -> str:
    """``timeout=2``: the backend's calls give up after 2 s (a mover notices a lost Redis within a beat)."""
    return f"{base}?membership_timeout={MEMBERSHIP_TIMEOUT:g}&timeout=2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MoverProcess:
    def __init__(self, name: str, process: subprocess.Popen, log: Path, config: Path, metrics: str):
        self.metrics_address = metrics  # HOST:PORT of its Prometheus metrics
        self.name = name
        self.process = process
        self.log = log
        self.config = config
        self.joined_line = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> dict[str, float]:
        """Its Prometheus metrics, by sample name with labels but without ``mover``."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as response:
            text = response.read().decode()
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "mover")
                found[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return found

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_joined(self, timeout: float = JOIN_TIMEOUT) -> str:
        """The "joined" line it prints once it is in the group."""
        deadline = time.monotonic() + timeout
        stdout = self.process.stdout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([stdout], [], [], 0.1)
            if ready:
                line = stdout.readline()
                if line:
                    self.joined_line = line.strip()
                    return self.joined_line
            if self.process.poll() is not None:
                raise AssertionError(f"mover {self.name} exited {self.process.returncode}: {self.log_text()}")
        raise AssertionError(f"mover {self.name} did not join in {timeout} s: {self.log_text()}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def terminate(self, timeout: float = 10) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


class MoverProcesses:
    def __init__(
        self,
        directory: Path,
        redis,
        group: str,
        journal: str | None = None,
        own_hosts=None,
        journal_on_hosts: str | None = None,
    ):
        """journal: the SQLAlchemy URL every mover shares (default: a SQLite file here). own_hosts: the
        netns_hosts fixture, to start each mover on a host of its own, where it reaches the journal at
        journal_on_hosts (a PostgreSQL server's unix socket)."""
        self.directory = directory
        self.journal = journal or f"sqlite:///{directory}/movers-journal.sqlite"
        self.own_hosts = own_hosts
        self.journal_on_hosts = journal_on_hosts
        self.redis = redis  # or an etcd server (no own_hosts then)
        self.url = coordination_url(redis.url)
        self.group = group
        self.started: list[MoverProcess] = []
        self.gateways: list[str] = []  # where Redis listens for this object's hosts

    def config(
        self,
        name: str,
        transports: list[str],
        slots: int = 2,
        bandwidth: str = "0",
        url=None,
        journal=None,
        metrics: str = "",
        compute: dict | None = None,
    ) -> Path:
        """compute: the [compute] section (keystoneauth1's options), e.g. admin_token's endpoint and
        token for the test's compute agent; none: the mover runs detached volumes only."""
        path = self.directory / f"mover-{name}-{len(self.started)}.conf"
        path.write_text(
            "[mover]\n"
            f"name = {name}\n"
            f"coordination_url = {url or self.url}\n"
            f"group = {self.group}\n"
            f"transports = {', '.join(transports)}\n"
            f"slots = {slots}\n"
            f"bandwidth = {bandwidth}\n"
            f"journal = {journal or self.journal}\n"
            f"checkpoint_dir = {self.directory / ('checkpoints-' + name)}\n"
            f"claim_expiry = {CLAIM_EXPIRY:g}\n"
            f"metrics_address = {metrics}\n"
        )
        if compute:
            with path.open("a") as f:
                f.write("[compute]\n" + "".join(f"{key} = {value}\n" for key, value in compute.items()))
        return path

    def start(
        self,
        name: str,
        transports: list[str],
        slots: int = 2,
        bandwidth: str = "0",
        host=None,
        wait: bool = True,
        journal: str | None = None,
        compute: dict | None = None,
    ) -> MoverProcess:
        """A mover; with ``host`` (a NetnsHost), on that host (with own_hosts, on a new one named after
        it). journal: its URL of the shared journal, when it is not reached there as here."""
        if host is None and self.own_hosts is not None:
            host = self.own_hosts(f"volcopy-{name}")
        if host is not None and journal is None:
            journal = self.journal_on_hosts
        url = self.url
        if host is not None:
            if host.gateway not in self.gateways:
                self.redis.listen_on(host.gateway)
                self.gateways.append(host.gateway)
            url = coordination_url(f"redis://{host.gateway}:{self.redis.port}")
        metrics = f"{host.address if host else '127.0.0.1'}:{_free_port()}"
        config = self.config(name, transports, slots, bandwidth, url, journal, metrics, compute)
        log = self.directory / f"mover-{name}-{len(self.started)}.log"
        command = [sys.executable, "-m", "volcopy.cli", "mover", "--config-file", str(config)]
        if host is not None:
            command = host.command(command)
        with open(log, "w") as stderr:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        mover = MoverProcess(name, process, log, config, metrics)
        self.started.append(mover)
        if wait:
            mover.wait_joined()
        return mover

    def stop_all(self) -> None:
        for mover in self.started:
            if mover.process.poll() is None:
                mover.kill()
            mover.process.stdout.close()
        self.started.clear()
        for gateway in self.gateways:
            self.redis.stop_listening_on(gateway)
        self.gateways.clear()


@pytest.fixture
def fleet_journal(postgres) -> str:
    """A PostgreSQL journal of the test's own, shared by its movers and its fleet_migrator."""
    return postgres.new_database()


@pytest.fixture
def coordination_server(redis):
    """The movers' coordination backend: the session's Redis; a test module may give etcd instead."""
    return redis


@pytest.fixture
def fleet_migrator(coordination_server, mover_group, fleet_journal, tmp_path):
    """A Migrator that runs its migrations on the test's movers (mover_group on coordination_server)."""
    from volcopy.migration.migrator import Migrator

    migrator = Migrator(
        fleet_journal,
        checkpoint_dir=str(tmp_path / "checkpoints-cinder"),
        fleet_url=coordination_url(coordination_server.url),
        fleet_group=mover_group,
    )
    yield migrator
    migrator.close()
