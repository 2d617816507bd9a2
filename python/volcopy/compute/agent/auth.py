"""Who may call the agent: a WSGI middleware in front of the app, by ``[agent] auth_strategy``.

keystone: keystonemiddleware's ``auth_token`` validates the X-Auth-Token against Keystone (options in
``[keystone_authtoken]``), then the token must carry ``[agent] required_role``. The middleware runs with
``delay_auth_decision`` so that the refusal is ours, in the API's fault format: 401 for a missing or
invalid token, 403 for a valid one without the role. It strips any X-Identity-Status or X-Roles a
client sends before it sets its own.

static: the token must be one of ``[agent] tokens`` (a single host without Keystone).
"""

from __future__ import annotations

import hmac

from oslo_config import cfg

from .wsgi import fault

UNAUTHORIZED = "authentication required: a valid X-Auth-Token"


def static_tokens(app, tokens: list[str]):
    accepted = [t.encode() for t in tokens]

    def middleware(environ, start_response):
        token = environ.get("HTTP_X_AUTH_TOKEN", "").encode()
        # every token compared, in constant time, so the timing tells nothing about which is near
        if not sum(hmac.compare_digest(token, t) for t in accepted):
            return fault(start_response, 401, UNAUTHORIZED)
        return app(environ, start_response)

    return middleware


def keystone(app, conf: cfg.ConfigOpts, required_role: str):
    from keystonemiddleware import auth_token

    role = required_role.lower()

    def require_role(environ, start_response):
        if environ.get("HTTP_X_IDENTITY_STATUS") != "Confirmed":
            return fault(start_response, 401, UNAUTHORIZED)
        roles = {r.strip().lower() for r in environ.get("HTTP_X_ROLES", "").split(",")}
        if role not in roles:
            return fault(start_response, 403, f"the token lacks the role '{required_role}'")
        return app(environ, start_response)

    return auth_token.AuthProtocol(require_role, {"oslo_config_config": conf, "delay_auth_decision": "true"})
