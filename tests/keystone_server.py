"""A throwaway Keystone for the compute agent's tests: the real identity service (PyPI's keystone) on
SQLite, set up with keystone-manage, served by a threaded wsgiref server in a subprocess, started once
per test session and removed after.

Two settings make it quick enough for tests: an in-memory cache (a token is validated in about 10 ms
instead of about 1 s) and 4 password hash rounds, set before bootstrap (a token is issued in about
30 ms instead of 0.6 s).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

KEYSTONE_MANAGE = shutil.which("keystone-manage", path=os.path.dirname(sys.executable))
ADMIN_PASSWORD = "admin-password-0123456789"
REGION = "RegionOne"

CONFIG = """
[database]
connection = sqlite:///{directory}/keystone.sqlite
[fernet_tokens]
key_repository = {directory}/fernet-keys
[credential]
key_repository = {directory}/credential-keys
[cache]
enabled = true
backend = dogpile.cache.memory
[identity]
password_hash_rounds = 4
"""

# keystone parses sys.argv as its own options: the port comes in the environment
SERVE = """
import os, socketserver
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from keystone.server.wsgi import initialize_public_application

class Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

class Handler(WSGIRequestHandler):
    def log_message(self, *args):
        pass

port = int(os.environ["KEYSTONE_PORT"])
make_server("127.0.0.1", port, initialize_public_application(), Server, Handler).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KeystoneServer:
    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="volcopy-keystone-"))
        self.config = self.directory / "keystone.conf"
        self.log = self.directory / "keystone.log"
        self.url = f"http://127.0.0.1:{_free_port()}/v3"
        self.process: subprocess.Popen | None = None

    def _manage(self, *args: str) -> None:
        subprocess.run(
            [KEYSTONE_MANAGE, "--config-file", str(self.config), *args], check=True, capture_output=True
        )

    def start(self) -> None:
        self.config.write_text(CONFIG.format(directory=self.directory))
        owner = ["--keystone-user", pwd.getpwuid(os.getuid()).pw_name]
        owner += ["--keystone-group", grp.getgrgid(os.getgid()).gr_name]
        self._manage("db_sync")
        self._manage("fernet_setup", *owner)
        self._manage("credential_setup", *owner)
        self._manage(
            "bootstrap",
            "--bootstrap-password",
            ADMIN_PASSWORD,
            "--bootstrap-public-url",
            self.url,
            "--bootstrap-internal-url",  # keystonemiddleware looks for the internal one by default
            self.url,
            "--bootstrap-region-id",
            REGION,
        )
        port = self.url.rsplit(":", 1)[1].split("/")[0]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SERVE],
                env=os.environ | {"OS_KEYSTONE_CONFIG_FILES": str(self.config), "KEYSTONE_PORT": port},
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"keystone did not start: {self.log.read_text()}") from None
                time.sleep(0.2)

    def session(
        self, username: str = "admin", password: str = ADMIN_PASSWORD, project: str = "admin", verify=True
    ):
        from keystoneauth1 import session
        from keystoneauth1.identity import v3

        auth = v3.Password(
            auth_url=self.url,
            username=username,
            password=password,
            project_name=project,
            user_domain_id="default",
            project_domain_id="default",
        )
        return session.Session(auth=auth, verify=verify)

    def add_user(self, name: str, password: str, role: str, project: str) -> None:
        """A user with ``role`` on ``project`` (both created when missing)."""
        admin = self.session()

        def find_or_create(kind: str, body: dict) -> str:
            found = admin.get(f"{self.url}/{kind}s?name={body['name']}").json()[f"{kind}s"]
            if found:
                return found[0]["id"]
            return admin.post(f"{self.url}/{kind}s", json={kind: body}).json()[kind]["id"]

        project_id = find_or_create("project", {"name": project, "domain_id": "default"})
        user_id = find_or_create("user", {"name": name, "password": password, "domain_id": "default"})
        role_id = find_or_create("role", {"name": role})
        admin.put(f"{self.url}/projects/{project_id}/users/{user_id}/roles/{role_id}")

    def add_endpoint(self, service_type: str, url: str, region: str) -> None:
        """A service of ``service_type`` whose public endpoint in ``region`` is ``url``."""
        admin = self.session()
        admin.post(f"{self.url}/regions", json={"region": {"id": region}})
        service = admin.post(f"{self.url}/services", json={"service": {"type": service_type}}).json()
        endpoint = {
            "service_id": service["service"]["id"],
            "interface": "public",
            "url": url,
            "region_id": region,
        }
        admin.post(f"{self.url}/endpoints", json={"endpoint": endpoint})

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def keystone():
    """A running Keystone; ``keystone.url`` is its v3 endpoint, admin/ADMIN_PASSWORD its admin."""
    if KEYSTONE_MANAGE is None:
        pytest.skip("needs keystone (pip install .[test])")
    server = KeystoneServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()
