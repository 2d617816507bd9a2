"""A throwaway PostgreSQL server for the journal's tests: its own data directory, socket and port,
started once per test session and removed after. The server refuses to run as root, so as root it runs
as the ``postgres`` user the Debian package creates."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid

BIN_DIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
BIN = BIN_DIRS[-1] if BIN_DIRS else None
USER = "volcopy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="volcopy-postgres-")
        self.data = os.path.join(self.directory, "data")
        self.port = _free_port()
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run(self.run_as + list(args), check=True, capture_output=True, text=True)

    def start(self) -> None:
        self._run(f"{BIN}/initdb", "-D", self.data, "-A", "trust", "-U", USER, "--no-sync")
        self.resume()

    def resume(self) -> None:
        """Starts the server (again, after halt(): same data, port and socket directory)."""
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            f"{BIN}/pg_ctl", "-D", self.data, "-o", options, "-l", f"{self.directory}/log", "-w", "start"
        )

    def halt(self) -> None:
        """Stops the server as a crash would (every connection cut), keeping its data for resume()."""
        self._run(f"{BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def socket_url(self, url: str) -> str:
        """The same database through the unix socket directory, which a process in another network
        namespace still reaches (127.0.0.1 there is another host's loopback)."""
        database = url.rsplit("/", 1)[1]
        return f"postgresql+psycopg://{USER}@/{database}?host={self.directory}&port={self.port}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = "journal_" + uuid.uuid4().hex[:12]
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True
        ) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run(
            self.run_as + [f"{BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(self.directory, ignore_errors=True)
