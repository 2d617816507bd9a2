"""A throwaway etcd for the data movers' tests on their other coordination backend: its own directory and
private ports on 127.0.0.1, started once per test session and removed after (the ``etcd`` fixture).

As with Redis (tests/redis_server.py), the server is a child of the test process: ``stop()`` reaps it,
and the kernel ends it if the test process dies.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from redis_server import _die_with_parent, _free_port

ETCD = shutil.which("etcd")
START_TIMEOUT = 20.0


class EtcdServer:
    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="volcopy-etcd-"))
        self.port = _free_port()
        self.peer_port = _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """tooz's URL of this server (its etcd3gw driver: etcd's gRPC gateway over HTTP)."""
        return f"etcd3+http://127.0.0.1:{self.port}"

    def start(self) -> None:
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        args = [ETCD, "--name", "volcopy-test", "--data-dir", str(self.directory / "data")]
        args += ["--listen-client-urls", client, "--advertise-client-urls", client]
        args += ["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer]
        args += ["--initial-cluster", f"volcopy-test={peer}", "--logger", "zap"]
        with open(self.directory / "etcd.log", "ab") as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_die_with_parent
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.healthy():
            if self.process.poll() is not None:
                log = (self.directory / "etcd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"etcd exited with {self.process.returncode}: {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not answer on port {self.port} in {START_TIMEOUT} s")
            time.sleep(0.05)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as answer:
                return b'"true"' in answer.read()
        except (TimeoutError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd():
    if ETCD is None:
        pytest.skip("needs etcd (Debian: etcd-server)")
    server = EtcdServer()
    server.start()
    yield server
    server.stop()
