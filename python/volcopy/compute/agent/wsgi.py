"""The agent's REST API as a WSGI app: Nova-style server actions with a microversion header.

POST /servers/{server_id}/action                              start, cancel, prepare, complete
GET  /servers/{server_id}/volume-migrations/{attachment_id}   a migration's state
GET  /servers/{server_id}/os-volume_attachments               the server's attachments

Authentication is a middleware in front of this app (auth.py); its refusals use fault() too.
"""

from __future__ import annotations

import json
import logging
import re

from .. import api
from ..errors import ComputeError
from .handoff import Handoff

log = logging.getLogger(__name__)

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
    408: "requestTimeout",
    409: "conflictingRequest",
    413: "requestEntityTooLarge",
    500: "computeFault",
}
_REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    406: "Not Acceptable",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    500: "Internal Server Error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def respond(start_response, status: int, body: dict) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        f"{status} {_REASONS.get(status, 'Error')}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            (api.VERSION_HEADER, f"compute {api.MICROVERSION}"),
            ("Vary", api.VERSION_HEADER),
        ],
    )
    return [data]


def fault(start_response, status: int, message: str) -> list[bytes]:
    return respond(
        start_response, status, {_FAULTS.get(status, "computeFault"): {"code": status, "message": message}}
    )


def _requested_version(environ) -> tuple[int, int]:
    value = environ.get("HTTP_OPENSTACK_API_VERSION")
    if value is not None:
        service, _, version = value.strip().partition(" ")
        if service.lower() != "compute":
            return api.parse_version(api.MIN_MICROVERSION)
        value = version
    else:
        value = environ.get("HTTP_X_OPENSTACK_NOVA_API_VERSION", api.MIN_MICROVERSION)
    if value.strip() == "latest":
        return api.parse_version(api.MICROVERSION)
    try:
        return api.parse_version(value)
    except api.BadRequest as exc:
        raise ApiError(400, str(exc)) from None


def _check_version(environ) -> None:
    version = _requested_version(environ)
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


class AgentApp:
    """The routes, over a Handoff. ``max_body`` bounds what a request may send."""

    def __init__(self, handoff: Handoff, max_body: int):
        self.handoff = handoff
        self.max_body = max_body

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        try:
            _check_version(environ)
            status, body = self._route(environ, method, path)
            return respond(start_response, status, body)
        except ApiError as exc:
            return fault(start_response, exc.status, str(exc))
        except api.BadRequest as exc:
            return fault(start_response, 400, str(exc))
        except ComputeError as exc:  # the same errors the client raises for these statuses
            return fault(start_response, exc.status or 500, str(exc))
        except Exception:  # noqa: BLE001 - a fault of ours: 500, logged; its text may hold paths or secrets
            log.exception("request failed: %s %s", method, path)
            return fault(start_response, 500, "internal error of the compute agent; its log has the details")

    def _body(self, environ):
        if environ.get("HTTP_TRANSFER_ENCODING"):  # the server reads Content-Length bytes, nothing else
            raise ApiError(400, "a body must come with a Content-Length, not a Transfer-Encoding")
        value = environ.get("CONTENT_LENGTH") or "0"
        if not value.isdigit():  # a negative length would read until the client closes
            raise ApiError(400, f"invalid Content-Length {value!r}")
        length = int(value)
        if length > self.max_body:
            raise ApiError(413, f"request body too large: at most {self.max_body} bytes")
        try:
            data = environ["wsgi.input"].read(length)
        except TimeoutError:  # the server's deadline for the whole request (request_timeout)
            raise ApiError(
                408, "the request body did not arrive within the agent's request_timeout"
            ) from None
        try:
            return json.loads(data or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None

    def _route(self, environ, method: str, path: str) -> tuple[int, dict]:
        handoff = self.handoff
        if method == "POST" and (match := _ACTION.match(path)):
            action, args = api.parse_action(self._body(environ))
            server_id = match.group(1)
            if action == api.START:
                return 200, {"volume_migration": handoff.start(server_id, args["attachment_id"])}
            if action == api.CANCEL:
                view = handoff.cancel(server_id, args["attachment_id"], args["generation"])
                return 202, {"volume_migration": view}
            step = handoff.prepare if action == api.PREPARE else handoff.complete
            view = step(
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
