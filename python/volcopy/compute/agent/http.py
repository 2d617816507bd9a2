"""The agent's HTTP front: Nova-style server actions with a microversion header and token auth.

POST /servers/{server_id}/action                              the three calls
GET  /servers/{server_id}/volume-migrations/{attachment_id}   a migration's state
GET  /servers/{server_id}/os-volume_attachments               the server's attachments
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .. import api
from ..errors import ComputeError
from .handoff import Handoff

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
_ACTION = re.compile(r"^/servers/([^/]+)/action$")
_MIGRATION = re.compile(r"^/servers/([^/]+)/volume-migrations/([^/]+)$")
_ATTACHMENTS = re.compile(r"^/servers/([^/]+)/os-volume_attachments$")

# Nova's error bodies name the fault by status
_FAULTS = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    406: "notAcceptable",
    409: "conflictingRequest",
    413: "requestEntityTooLarge",
    500: "computeFault",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _requested_version(headers) -> tuple[int, int]:
    value = headers.get(api.VERSION_HEADER)
    if value is not None:
        service, _, version = value.strip().partition(" ")
        if service.lower() != "compute":
            return api.parse_version(api.MIN_MICROVERSION)
        value = version
    else:
        value = headers.get(api.LEGACY_VERSION_HEADER, api.MIN_MICROVERSION)
    if value.strip() == "latest":
        return api.parse_version(api.MICROVERSION)
    try:
        return api.parse_version(value)
    except api.BadRequest as exc:
        raise ApiError(400, str(exc)) from None


class Handler(BaseHTTPRequestHandler):
    server: AgentHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header(api.VERSION_HEADER, f"compute {api.MICROVERSION}")
        self.send_header("Vary", api.VERSION_HEADER)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {_FAULTS.get(status, "computeFault"): {"code": status, "message": message}})

    def _authenticate(self) -> None:
        token = self.headers.get("X-Auth-Token", "")
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in self.server.tokens):
            raise ApiError(401, "authentication required: a valid X-Auth-Token")

    def _check_version(self) -> None:
        version = _requested_version(self.headers)
        if version > api.parse_version(api.MICROVERSION):
            raise ApiError(
                406,
                f"compute API microversion {version[0]}.{version[1]} is not supported; "
                f"the maximum is {api.MICROVERSION}",
            )
        if version < api.parse_version(api.MICROVERSION):
            raise ApiError(
                400,
                f"volume migrations need compute API microversion {api.MICROVERSION} or later "
                f"(header '{api.VERSION_HEADER}: compute {api.MICROVERSION}')",
            )

    def _body(self):
        value = self.headers.get("Content-Length") or "0"
        if not value.isdigit():  # a negative length would read until the client closes
            raise ApiError(400, f"invalid Content-Length {value!r}")
        length = int(value)
        if length > MAX_BODY:
            raise ApiError(413, f"request body too large: at most {MAX_BODY} bytes")
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None

    def _handle(self, method: str) -> None:
        try:
            self._authenticate()
            self._check_version()
            status, body = self._route(method)
            self._reply(status, body)
        except ApiError as exc:
            self._error(exc.status, str(exc))
        except api.BadRequest as exc:
            self._error(400, str(exc))
        except ComputeError as exc:  # the same errors the client raises for these statuses
            self._error(exc.status or 500, str(exc))
        except Exception:  # noqa: BLE001 - a fault of ours: 500, logged; its text may hold paths or secrets
            log.exception("request failed: %s %s", method, self.path)
            self._error(500, "internal error of the compute agent; its log has the details")

    def _route(self, method: str) -> tuple[int, dict]:
        handoff = self.server.handoff
        path = self.path.split("?", 1)[0]
        if method == "POST" and (match := _ACTION.match(path)):
            action, args = api.parse_action(self._body())
            server_id = match.group(1)
            if action == api.START:
                return 200, {"volume_migration": handoff.start(server_id, args["attachment_id"])}
            if action == api.CANCEL:
                view = handoff.cancel(server_id, args["attachment_id"], args["generation"])
                return 202, {"volume_migration": view}
            view = handoff.complete(
                server_id,
                args["attachment_id"],
                args["new_attachment_id"],
                args["connection_info"],
                args["generation"],
            )
            return 200, {"volume_migration": view}
        if method == "GET" and (match := _MIGRATION.match(path)):
            return 200, {"volume_migration": handoff.view(match.group(1), match.group(2))}
        if method == "GET" and (match := _ATTACHMENTS.match(path)):
            return 200, {"volumeAttachments": handoff.attachments(match.group(1))}
        raise ApiError(404, f"no such resource: {method} {path}")

    def do_GET(self):  # noqa: N802 - the base class's name
        self._handle("GET")

    def do_POST(self):  # noqa: N802 - the base class's name
        self._handle("POST")


class AgentHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handoff: Handoff, tokens: list[str], request_timeout: float):
        # A connection that sends nothing (or too slowly) is closed after request_timeout: it would
        # otherwise hold its thread for ever.
        handler = type("TimedHandler", (Handler,), {"timeout": request_timeout})
        super().__init__(address, handler)
        self.handoff = handoff
        self.tokens = tokens
