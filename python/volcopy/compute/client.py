"""The client the Cinder side uses to call the compute calls (keystoneauth1).

    compute = NovaCompute(endpoint="https://compute:8774", token="...", verify="/etc/volcopy/ca.pem")
    compute = NovaCompute(session=keystone_session)    # or OS_* settings from the environment
    fence = compute.migration_start(server_id, attachment_id)
    compute.migration_prepare(server_id, attachment_id, new_attachment_id, connection_info,
                              fence["generation"])    # optional, before the copy
    compute.migration_complete(server_id, attachment_id, new_attachment_id, connection_info,
                               fence["generation"])

Every call is idempotent by contract (a repeated start or complete answers 200, cancel is always a
202), so connection failures and 502/503/504 are retried for all of them; 4xx never are. cancel and
complete carry the generation start returned, the fencing token: a stale one is a ComputeConflict.
"""

from __future__ import annotations

import os

from keystoneauth1 import adapter, exceptions, loading, token_endpoint
from keystoneauth1 import session as ks_session

from . import api
from .errors import BY_STATUS, ComputeError

RETRIABLE_STATUSES = [502, 503, 504]


def _verify(verify: bool | str | None) -> bool | str:
    return verify if verify is not None else os.environ.get("OS_CACERT", True)


def session_from_environment(verify: bool | str | None = None) -> ks_session.Session:
    """A keystone session from the usual OS_* settings: OS_TOKEN with OS_ENDPOINT, or OS_AUTH_URL
    with the options of OS_AUTH_TYPE (default: password). ``verify``: the CA file (or False) that TLS
    certificates are checked with, for Keystone and the compute alike; default OS_CACERT, else the
    system's CAs."""
    env = os.environ
    verify = _verify(verify)
    if env.get("OS_TOKEN") and env.get("OS_ENDPOINT"):
        return ks_session.Session(
            auth=token_endpoint.Token(env["OS_ENDPOINT"], env["OS_TOKEN"]), verify=verify
        )
    if env.get("OS_AUTH_URL"):
        loader = loading.get_plugin_loader(env.get("OS_AUTH_TYPE", "password"))
        options = {}
        for option in loader.get_options():
            name = "OS_" + option.dest.upper()
            if name in env:
                options[option.dest] = env[name]
        return ks_session.Session(auth=loader.load_from_options(**options), verify=verify)
    raise ComputeError(
        "no compute credentials: pass endpoint and token, a session, or set OS_TOKEN and "
        "OS_ENDPOINT (or OS_AUTH_URL and friends)"
    )


class NovaCompute:
    def __init__(
        self,
        session: ks_session.Session | None = None,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        region_name: str | None = None,
        interface: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        verify: bool | str | None = None,
    ):
        """endpoint: the agent's URL; with a token, the token is sent to it, otherwise the session's
        (or the OS_* settings') Keystone token is, instead of looking the compute up in the catalog:
        the reference agent runs on each compute host. verify (without a session): the CA file that
        the agent's TLS certificate is checked with, or False; default OS_CACERT, else the system's
        CAs."""
        endpoint_override = endpoint if endpoint and not token else None
        if session is None:
            if endpoint and token:
                session = ks_session.Session(
                    auth=token_endpoint.Token(endpoint, token), timeout=timeout, verify=_verify(verify)
                )
            else:
                session = session_from_environment(verify)
                session.timeout = timeout
        self._api = adapter.Adapter(
            session,
            service_type="compute",
            region_name=region_name,
            interface=interface,
            endpoint_override=endpoint_override,
            default_microversion=api.MICROVERSION,
            connect_retries=retries,
            status_code_retries=retries,
            retriable_status_codes=RETRIABLE_STATUSES,
        )

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            response = self._api.request(path, method, json=body, raise_exc=False)
        except exceptions.ConnectFailure as exc:
            raise ComputeError(f"cannot reach the compute service: {exc}") from None
        except exceptions.ClientException as exc:
            raise ComputeError(f"compute request failed: {exc}") from None
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code < 300:
            return payload.get("volume_migration", payload)
        fault = next(iter(payload.values()), {}) if isinstance(payload, dict) and payload else {}
        message = fault.get("message") if isinstance(fault, dict) else None
        error = BY_STATUS.get(response.status_code, ComputeError)
        raise error(message or f"{method} {path}: HTTP {response.status_code}", status=response.status_code)

    def _action(self, server_id: str, action: str, args: dict) -> dict:
        return self._call("POST", f"/servers/{server_id}/action", {action: args})

    def migration_start(self, server_id: str, attachment_id: str) -> dict:
        """Returns once nothing writes to the attachment's volume; ComputeConflict if that cannot be."""
        return self._action(server_id, api.START, {"attachment_id": attachment_id})

    def migration_cancel(self, server_id: str, attachment_id: str, generation: int) -> dict:
        """Returns at once; migration_state() shows when the cancel has finished. generation: what
        migration_start returned (a stale one is a ComputeConflict)."""
        return self._action(server_id, api.CANCEL, {"attachment_id": attachment_id, "generation": generation})

    def migration_prepare(
        self,
        server_id: str,
        attachment_id: str,
        new_attachment_id: str,
        connection_info: dict,
        generation: int,
    ) -> dict:
        """Optional, while fenced, with what complete will be given: the compute attaches the new volume
        and may start moving the guest's writes onto it while the copy still writes it, so that complete
        is shorter. An agent without it answers 404 or 400 (complete works without it)."""
        return self._action(
            server_id,
            api.PREPARE,
            {
                "attachment_id": attachment_id,
                "new_attachment_id": new_attachment_id,
                "connection_info": connection_info,
                "generation": generation,
            },
        )

    def migration_complete(
        self,
        server_id: str,
        attachment_id: str,
        new_attachment_id: str,
        connection_info: dict,
        generation: int,
    ) -> dict:
        """Returns once the guest does its I/O on the new volume (state "completing": its writes since
        the fence are still being merged into it; poll migration_state() until "completed")."""
        return self._action(
            server_id,
            api.COMPLETE,
            {
                "attachment_id": attachment_id,
                "new_attachment_id": new_attachment_id,
                "connection_info": connection_info,
                "generation": generation,
            },
        )

    def migration_state(self, server_id: str, attachment_id: str) -> dict:
        return self._call("GET", f"/servers/{server_id}/volume-migrations/{attachment_id}")

    def attachments(self, server_id: str) -> list[dict]:
        return self._call("GET", f"/servers/{server_id}/os-volume_attachments")["volumeAttachments"]
