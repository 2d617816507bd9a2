"""The client's retry policy against a real HTTP server on loopback: 502/503/504 and connection failures
are retried (every call is idempotent by contract), 4xx never are, and typed errors carry the status."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from volcopy.compute import ComputeConflict, ComputeError, ComputeUnauthorized, NovaCompute


class Scripted(ThreadingHTTPServer):
    """Answers each request with the next (status, body) of its script and records what it got."""

    def __init__(self, script):
        self.script, self.requests = list(script), []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 - the base class's name
                length = int(self.headers.get("Content-Length") or 0)
                server.requests.append((self.path, dict(self.headers), json.loads(self.rfile.read(length))))
                status, body = server.script.pop(0)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = self
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


FENCED = {"volume_migration": {"state": "fenced"}}


def test_unavailable_answers_are_retried_until_success():
    server = Scripted([(503, {}), (502, {}), (200, FENCED)])
    compute = NovaCompute(endpoint=server.url, token="t" * 20)

    assert compute.migration_start("srv", "att")["state"] == "fenced"
    assert len(server.requests) == 3
    path, headers, body = server.requests[-1]
    assert path == "/servers/srv/action"
    assert body == {"volume-migration-start": {"attachment_id": "att"}}
    assert headers["X-Auth-Token"] == "t" * 20
    assert headers["OpenStack-API-Version"] == "compute 2.97"
    server.shutdown()


def test_conflict_is_not_retried_and_carries_the_reason():
    server = Scripted(
        [(409, {"conflictingRequest": {"code": 409, "message": "cannot suspend writes: busy"}})]
    )
    compute = NovaCompute(endpoint=server.url, token="t" * 20)

    with pytest.raises(ComputeConflict, match="cannot suspend writes: busy") as caught:
        compute.migration_complete("srv", "att", "new", {"driver_volume_type": "local", "data": {}}, 1)
    assert caught.value.status == 409
    assert len(server.requests) == 1
    server.shutdown()


def test_unauthorized_is_typed():
    server = Scripted([(401, {"unauthorized": {"code": 401, "message": "authentication required"}})])

    with pytest.raises(ComputeUnauthorized):
        NovaCompute(endpoint=server.url, token="t" * 20).migration_cancel("srv", "att", 1)
    server.shutdown()


def test_unreachable_compute_is_a_compute_error_after_retries():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    compute = NovaCompute(endpoint=f"http://127.0.0.1:{port}", token="t" * 20, retries=1)

    with pytest.raises(ComputeError, match="cannot reach the compute service"):
        compute.migration_state("srv", "att")
