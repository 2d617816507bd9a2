"""A throwaway Redis for the data movers' tests: its own directory, a private port on 127.0.0.1 (and on the
gateways of test hosts in network namespaces while they exist, tests/netns_hosts.py), no persistence,
started once per test session and removed after (the ``redis`` fixture).

The server runs in the foreground as a child of the test process, so that ``stop()`` reaps it and the
kernel ends it if the test process dies. ``kill()`` and ``start()`` again are a Redis crash and its
restart for fault tests: the same port and addresses, and nothing kept (no RDB, no AOF), as a Redis that
lost its memory, which is what the movers must survive.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


class RedisServer:
    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="volcopy-redis-"))
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.addresses = ["127.0.0.1"]  # where it listens; listen_on() adds test hosts' gateways

    @property
    def url(self) -> str:
        """tooz's URL of this server over TCP."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Starts the server (again after kill(): the same port and addresses, empty)."""
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", *self.addresses]
        args += ["--dir", str(self.directory), "--save", "", "--appendonly", "no", "--daemonize", "no"]
        args += ["--protected-mode", "no"]  # no password: it listens only where the tests put it
        args += ["--logfile", str(self.directory / "redis.log")]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ping():
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port} in {START_TIMEOUT} s")
            time.sleep(0.02)

    def listen_on(self, address: str) -> None:
        """Listens on ``address`` too (a test host's gateway, tests/netns_hosts.py), at once."""
        self.addresses.append(address)
        self._bind()

    def stop_listening_on(self, address: str) -> None:
        """Before the address goes away: a restart would fail to bind it."""
        self.addresses.remove(address)
        if self.ping():  # else its next start() listens where it should
            self._bind()

    def _bind(self) -> None:
        import redis

        redis.Redis(host="127.0.0.1", port=self.port).config_set("bind", " ".join(self.addresses))

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """A crash: SIGKILL, every connection cut, everything it held lost."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis():
    if REDIS_SERVER is None:
        pytest.skip("needs redis-server (Debian: redis-server)")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mover_group() -> str:
    """A tooz group of this test's own, so that tests sharing the session's Redis never see each
    other's movers."""
    return f"volcopy-movers-{uuid.uuid4().hex[:8]}"
