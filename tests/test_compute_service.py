"""The compute agent as a service: TLS, Keystone tokens (a real Keystone), request limits, a bounded
worker pool, configuration errors and secrets kept out of the log. No guest is needed: the agent owns a
server whose QEMU is not running, and only the calls that never reach QEMU are made."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import pytest

from compute_harness import REQUEST_TIMEOUT, SERVER, SRC_ATT, TOKEN, Agent
from keystone_server import ADMIN_PASSWORD

VOLUME = "/dev/vdb"
ATTACHMENTS = [{"id": SRC_ATT, "serverId": SERVER, "device_path": VOLUME}]
ATTACHMENTS_PATH = f"/servers/{SERVER}/os-volume_attachments"
AGENT_USER, AGENT_PASSWORD = "volcopy-agent", "agent-password-0123456789"
MEMBER, MEMBER_PASSWORD = "member-user", "member-password-0123456789"
UNAUTHORIZED = {"unauthorized": {"code": 401, "message": "authentication required: a valid X-Auth-Token"}}

needs_openssl = pytest.mark.skipif(
    subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
    reason="needs the openssl command (Debian: openssl)",
)


def servers(workdir) -> dict:
    qmp = str(workdir / "no-qemu.qmp")  # never connected to: these calls do not reach QEMU
    pidfile = str(workdir / "no-qemu.pid")
    attachments = {SRC_ATT: {"qdev": "disk-a", "node": "vol-a", "volume": VOLUME}}
    return {SERVER: {"qmp": qmp, "pidfile": pidfile, "attachments": attachments}}


@pytest.fixture
def start_agent(workdir):
    """start_agent(**settings) -> a running Agent (see compute_harness.Agent), stopped after the test."""
    started = []

    def start(**settings) -> Agent:
        agent = Agent(workdir, servers(workdir), **settings)
        agent.start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def request(agent, method, path, *, token=TOKEN, body=None, headers=None, context=None):
    """One request with http.client; returns (status, decoded JSON body)."""
    url = urllib.parse.urlsplit(agent.url)
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=30, context=context)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    sent = {"OpenStack-API-Version": "compute 2.97", "Content-Type": "application/json"}
    if token:
        sent["X-Auth-Token"] = token
    try:
        conn.request(method, path, body=body, headers=sent | (headers or {}))
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def address(agent) -> tuple[str, int]:
    url = urllib.parse.urlsplit(agent.url)
    return url.hostname, url.port


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> dict:
    """A self-signed CA and the agent's certificate for 127.0.0.1 signed by it (the openssl command)."""
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("needs the openssl command (Debian: openssl)")
    directory = tmp_path_factory.mktemp("tls")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA")
    openssl("req", *key, "-keyout", "agent.key", "-out", "agent.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "agent.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "agent.pem", "-days", "2", "-extfile", "san.ext",
    )  # fmt: skip
    openssl("req", *key, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=a client")
    openssl(
        "x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.pem", "-days", "2",
    )  # fmt: skip
    names = ("ca.pem", "agent.pem", "agent.key", "client.pem", "client.key")
    return {name: str(directory / name) for name in names}


def tls(certificates) -> dict:
    return {"ssl": {"cert_file": certificates["agent.pem"], "key_file": certificates["agent.key"]}}


def test_a_client_with_the_ca_gets_its_answer_over_tls(start_agent, certificates):
    from volcopy.compute import NovaCompute

    agent = start_agent(**tls(certificates))
    assert agent.url.startswith("https://127.0.0.1:")

    compute = NovaCompute(endpoint=agent.url, token=TOKEN, verify=certificates["ca.pem"])

    assert compute.attachments(SERVER) == ATTACHMENTS


def test_plain_http_to_the_tls_port_gets_no_answer_and_the_agent_serves_on(start_agent, certificates):
    agent = start_agent(**tls(certificates))

    with socket.create_connection(address(agent), timeout=10) as s:
        s.sendall(f"GET {ATTACHMENTS_PATH} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n\r\n".encode())
        try:
            answer = s.recv(65536)
        except ConnectionResetError:
            answer = b""
    assert answer == b""  # closed: no HTTP answer in the clear, and nothing served

    context = ssl.create_default_context(cafile=certificates["ca.pem"])
    assert request(agent, "GET", ATTACHMENTS_PATH, context=context) == (
        200,
        {"volumeAttachments": ATTACHMENTS},
    )


def test_a_client_without_the_ca_gets_a_certificate_error(start_agent, certificates):
    from volcopy.compute import ComputeError, NovaCompute

    agent = start_agent(**tls(certificates))
    compute = NovaCompute(endpoint=agent.url, token=TOKEN, verify=True, retries=0)  # the system's CAs

    with pytest.raises(ComputeError, match="CERTIFICATE_VERIFY_FAILED"):
        compute.attachments(SERVER)


def test_with_a_ca_file_the_agent_requires_a_client_certificate_signed_by_it(start_agent, certificates):
    settings = tls(certificates)
    settings["ssl"]["ca_file"] = certificates["ca.pem"]
    agent = start_agent(**settings)
    context = ssl.create_default_context(cafile=certificates["ca.pem"])

    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):  # TLS 1.3: on first read
        request(agent, "GET", ATTACHMENTS_PATH, context=context)

    context.load_cert_chain(certificates["client.pem"], certificates["client.key"])
    assert request(agent, "GET", ATTACHMENTS_PATH, context=context) == (
        200,
        {"volumeAttachments": ATTACHMENTS},
    )


# ---------------------------------------------------------------- Keystone


@pytest.fixture(scope="session")
def keystone_users(keystone):
    """The agent's service user (role service, which may validate tokens) and a user with only the
    member role; Keystone's bootstrap made admin (role admin on project admin)."""
    keystone.add_user(AGENT_USER, AGENT_PASSWORD, role="service", project="service")
    keystone.add_user(MEMBER, MEMBER_PASSWORD, role="member", project="demo")
    return keystone


def keystone_settings(keystone, **agent) -> dict:
    authtoken = {
        "auth_type": "password",
        "auth_url": keystone.url,
        "www_authenticate_uri": keystone.url,
        "username": AGENT_USER,
        "password": AGENT_PASSWORD,
        "project_name": "service",
        "user_domain_id": "default",
        "project_domain_id": "default",
    }
    return {"auth_strategy": "keystone", "keystone_authtoken": authtoken} | agent


def test_a_keystone_token_with_the_admin_role_is_accepted(
    start_agent, keystone_users, certificates, monkeypatch
):
    """The client in its Keystone mode (password auth from OS_* settings, the agent found in the
    catalog) against an agent on TLS that validates the token with Keystone."""
    from volcopy.compute import NovaCompute

    keystone = keystone_users
    agent = start_agent(**keystone_settings(keystone), **tls(certificates))
    region = f"region-{uuid.uuid4().hex[:8]}"  # this agent's endpoint only
    keystone.add_endpoint("compute", agent.url, region)
    for name, value in {
        "OS_AUTH_URL": keystone.url,
        "OS_USERNAME": "admin",
        "OS_PASSWORD": ADMIN_PASSWORD,
        "OS_PROJECT_NAME": "admin",
        "OS_USER_DOMAIN_ID": "default",
        "OS_PROJECT_DOMAIN_ID": "default",
        "OS_CACERT": certificates["ca.pem"],
    }.items():
        monkeypatch.setenv(name, value)

    compute = NovaCompute(region_name=region)

    assert compute.attachments(SERVER) == ATTACHMENTS


def test_a_keystone_session_reaches_an_agent_given_by_its_endpoint(start_agent, keystone_users, certificates):
    """One agent per compute host: the caller names it, and its Keystone session's token is sent."""
    from volcopy.compute import NovaCompute

    agent = start_agent(**keystone_settings(keystone_users), **tls(certificates))
    session = keystone_users.session(verify=certificates["ca.pem"])

    compute = NovaCompute(session, endpoint=agent.url)

    assert compute.attachments(SERVER) == ATTACHMENTS


def test_a_keystone_token_without_the_required_role_is_refused_with_403(start_agent, keystone_users):
    agent = start_agent(**keystone_settings(keystone_users))
    token = keystone_users.session(MEMBER, MEMBER_PASSWORD, "demo").get_token()

    assert request(agent, "GET", ATTACHMENTS_PATH, token=token) == (
        403,
        {"forbidden": {"code": 403, "message": "the token lacks the role 'admin'"}},
    )


def test_the_required_role_is_configurable(start_agent, keystone_users):
    agent = start_agent(**keystone_settings(keystone_users, required_role="member"))
    token = keystone_users.session(MEMBER, MEMBER_PASSWORD, "demo").get_token()

    assert request(agent, "GET", ATTACHMENTS_PATH, token=token) == (200, {"volumeAttachments": ATTACHMENTS})


def test_a_bogus_or_missing_keystone_token_is_refused_with_401(start_agent, keystone_users):
    """Also when the client sends the headers the middleware sets for a valid token."""
    agent = start_agent(**keystone_settings(keystone_users))
    spoofed = {"X-Identity-Status": "Confirmed", "X-Roles": "admin"}

    assert request(agent, "GET", ATTACHMENTS_PATH, token="gAAAAA-not-a-token", headers=spoofed) == (
        401,
        UNAUTHORIZED,
    )
    assert request(agent, "GET", ATTACHMENTS_PATH, token=None, headers=spoofed) == (401, UNAUTHORIZED)


def test_secrets_never_reach_the_log(start_agent, keystone_users):
    """At debug level: neither the tokens sent, nor the agent's Keystone password, nor a password in a
    complete's connection_info appear in the agent's log."""
    agent = start_agent(**keystone_settings(keystone_users), DEFAULT={"debug": "true"})
    admin_token = keystone_users.session().get_token()
    bogus_token = "bogus-token-" + uuid.uuid4().hex
    chap_password = "chap-password-" + uuid.uuid4().hex
    complete = {
        "volume-migration-complete": {
            "attachment_id": SRC_ATT,
            "new_attachment_id": "att-dst-1",
            "generation": 1,
            "connection_info": {
                "driver_volume_type": "iscsi",
                "data": {"target_iqn": "iqn.2010-10.org.openstack:v", "auth_password": chap_password},
            },
        }
    }

    status, _ = request(
        agent, "POST", f"/servers/{SERVER}/action", token=admin_token, body=json.dumps(complete)
    )
    assert status == 409  # not started
    assert request(agent, "GET", ATTACHMENTS_PATH, token=bogus_token)[0] == 401

    log = agent.log.read_text()
    assert f"POST /servers/{SERVER}/action" in log and "DEBUG" in log
    for secret in (admin_token, bogus_token, chap_password, AGENT_PASSWORD):
        assert secret not in log


# ---------------------------------------------------------------- limits


def test_an_oversized_body_is_refused_with_413(start_agent):
    agent = start_agent(max_body=1024)

    status, body = request(agent, "POST", f"/servers/{SERVER}/action", body=b"{" + b" " * 1024 + b"}")

    assert (status, body) == (
        413,
        {"requestEntityTooLarge": {"code": 413, "message": "request body too large: at most 1024 bytes"}},
    )


def test_a_connection_that_sends_nothing_is_closed_after_request_timeout_while_others_are_served(
    start_agent,
):
    agent = start_agent()
    silent = socket.create_connection(address(agent), timeout=REQUEST_TIMEOUT * 5)
    opened = time.monotonic()

    assert request(agent, "GET", ATTACHMENTS_PATH) == (200, {"volumeAttachments": ATTACHMENTS})
    assert silent.recv(1) == b""  # closed by the agent
    assert time.monotonic() - opened >= REQUEST_TIMEOUT - 0.1
    silent.close()


def test_a_request_sent_a_byte_at_a_time_is_closed_at_its_deadline(start_agent):
    """The timeout bounds the whole request, not each read: a slow client cannot hold a worker."""
    agent = start_agent()
    head = f"GET {ATTACHMENTS_PATH} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n" + "X-Pad: y\r\n" * 100
    with socket.create_connection(address(agent), timeout=REQUEST_TIMEOUT * 5) as s:
        opened, sent = time.monotonic(), 0
        try:
            while time.monotonic() - opened < REQUEST_TIMEOUT * 3:
                s.sendall(head[sent].encode())
                sent += 1
                time.sleep(0.05)
            answer = s.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
    assert answer == b"" and sent < len(head)


def test_a_body_that_does_not_arrive_within_request_timeout_gets_408(start_agent):
    agent = start_agent()
    head = (
        f"POST /servers/{SERVER}/action HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n"
        "OpenStack-API-Version: compute 2.97\r\nContent-Length: 100\r\n\r\n{"
    )
    with socket.create_connection(address(agent), timeout=REQUEST_TIMEOUT * 5) as s:
        s.sendall(head.encode())  # 1 byte of the 100 announced
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk

    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout"
    assert json.loads(rest.partition(b"\r\n\r\n")[2]) == {
        "requestTimeout": {
            "code": 408,
            "message": "the request body did not arrive within the agent's request_timeout",
        }
    }


def test_more_connections_than_workers_wait_for_a_free_worker(start_agent):
    """Two workers, four silent connections: the agent starts no thread for them, and a request behind
    them is served once the silent ones are closed at their deadline."""
    agent = start_agent(max_workers=2)
    threads_before = len(os.listdir(f"/proc/{agent.process.pid}/task"))
    silent = [socket.create_connection(address(agent), timeout=REQUEST_TIMEOUT * 10) for _ in range(4)]
    time.sleep(0.5)
    result = {}
    waiting = threading.Thread(target=lambda: result.update(answer=request(agent, "GET", ATTACHMENTS_PATH)))
    waiting.start()
    time.sleep(0.5)

    assert len(os.listdir(f"/proc/{agent.process.pid}/task")) == threads_before
    waiting.join(timeout=REQUEST_TIMEOUT * 5)
    assert result["answer"] == (200, {"volumeAttachments": ATTACHMENTS})
    for s in silent:
        assert s.recv(1) == b""  # each was closed at its deadline
        s.close()


# ---------------------------------------------------------------- configuration


STATIC = f"[agent]\nauth_strategy = static\ntokens = {TOKEN}\n"
BAD_CONFIGS = [
    (
        "[agent]\nlisten_port = http\n",
        "{file}: [agent] listen_port: invalid literal for int() with base 10: 'http'",
    ),
    (
        "[agent]\nrequest_timeout = 0\n",
        "{file}: [agent] request_timeout: Should be greater than or equal to 0.001",
    ),
    (
        "[agent]\nauth_strategy = static\ntokens = short\n",
        "{file}: [agent] tokens must list tokens of at least 16 characters with auth_strategy = static",
    ),
    (
        "[agent]\nauth_strategy = ldap\n",
        "{file}: [agent] auth_strategy: Valid values are [keystone, static], but found 'ldap'",
    ),
    (
        "[agent]\nauth_strategy = keystone\n",
        "{file}: [keystone_authtoken] auth_type is required with auth_strategy = keystone",
    ),
    (
        STATIC + "[attachment:a1]\nserver = s9\nqdev = d\nnode = n\nvolume = /dev/vdb\n",
        "{file}: [attachment:a1] server: no [server:s9] section",
    ),
    (
        STATIC
        + "[server:s1]\nqmp = /run/s1.qmp\npidfile = /run/s1.pid\n[attachment:a1]\nserver = s1\nqdev = d\n",
        "{file}: [attachment:a1] node is required",
    ),
    (
        STATIC
        + "[server:s1]\nqmp = /run/s1.qmp\npidfile = /run/s1.pid\n[attachment:a1]\nserver = s1\nqdev = d\n"
        + "node = n\nvolume = rbd:volumes/volume-1@snap-1\n",
        "{file}: [attachment:a1] volume: 'rbd:volumes/volume-1@snap-1': a snapshot is read-only, not a "
        "guest's disk to move",
    ),
    (
        STATIC
        + "[server:s1]\nqmp = /run/s1.qmp\npidfile = /run/s1.pid\n[attachment:a1]\nserver = s1\nqdev = d\n"
        + "node = n\nvolume = rbd:volumes/volume-1:keyring=/etc/ceph/k\n",
        "{file}: [attachment:a1] volume: 'rbd:volumes/volume-1:keyring=/etc/ceph/k': the settings after "
        "the image may be conf, id and mon_host, not keyring",
    ),
    (
        STATIC + "[ssl]\ncert_file = /nonexistent.pem\nkey_file = /nonexistent.key\n",
        "[ssl] cert_file /nonexistent.pem, key_file /nonexistent.key: cannot be loaded: "
        "[Errno 2] No such file or directory",
    ),
    ("[agent\n", "Failed to parse {file}: at {file}:1, Invalid section (must end with ]): '[agent'"),
]


@pytest.mark.parametrize("text,error", BAD_CONFIGS, ids=[e.split(": ", 2)[-1][:40] for _, e in BAD_CONFIGS])
def test_a_bad_configuration_exits_2_naming_the_option_and_file(workdir, text, error):
    config = workdir / "agent.conf"
    config.write_text(
        text + f"[agent]\nstate_db = {workdir}/agent.sqlite\noverlay_dir = {workdir}/overlays\n"
    )

    done = subprocess.run(
        [sys.executable, "-m", "volcopy.cli", "compute-agent", "--config-file", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"volcopy compute-agent: error: {error.format(file=config)}\n"
    assert not (workdir / "agent.sqlite").exists() and not (workdir / "overlays").exists()  # nothing started


def test_a_missing_configuration_file_exits_2(workdir):
    done = subprocess.run(
        [sys.executable, "-m", "volcopy.cli", "compute-agent", "--config-file", str(workdir / "nope.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert (done.returncode, done.stdout) == (2, "")
    assert (
        done.stderr
        == f"volcopy compute-agent: error: Failed to find some config files: {workdir}/nope.conf\n"
    )


def test_the_state_database_of_an_older_agent_is_read_and_gains_the_new_columns(start_agent, workdir):
    """An agent upgraded on a host keeps its state: the table an older agent made (without `prepared`,
    which prepare added) gets the column, and the recorded migration reads as before."""
    db = sqlite3.connect(workdir / "agent.sqlite")
    db.execute(  # volume_migrations as agents before prepare made it
        "CREATE TABLE volume_migrations (attachment_id TEXT PRIMARY KEY, server_id TEXT NOT NULL, "
        "state TEXT NOT NULL, generation INTEGER NOT NULL, offline INTEGER NOT NULL, "
        "read_only INTEGER NOT NULL, pivoted INTEGER NOT NULL, merged INTEGER NOT NULL, qemu TEXT, "
        "restarted INTEGER NOT NULL, new_attachment_id TEXT, dst_path TEXT, dst_format TEXT, "
        "dst_discard INTEGER NOT NULL, dst_connection TEXT, overlay_path TEXT, "
        "bytes_written INTEGER NOT NULL, reason TEXT, updated_at REAL NOT NULL)"
    )
    db.execute(
        "INSERT INTO volume_migrations VALUES (?, ?, 'cancelled', 2, 0, 0, 0, 0, NULL, 0, NULL, NULL, "
        "NULL, 0, NULL, NULL, 0, NULL, 0)",
        (SRC_ATT, SERVER),
    )
    db.commit()
    db.close()
    agent = start_agent()

    status, body = request(agent, "GET", f"/servers/{SERVER}/volume-migrations/{SRC_ATT}")
    assert (status, body["volume_migration"]["state"], body["volume_migration"]["generation"]) == (
        200,
        "cancelled",
        2,
    )
    db = sqlite3.connect(workdir / "agent.sqlite")
    assert db.execute("SELECT prepared FROM volume_migrations").fetchall() == [(0,)]
    db.close()
