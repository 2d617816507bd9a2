"""The agent's configuration file (JSON):

    {
      "listen": "127.0.0.1:8774",
      "tokens": ["a-long-random-token"],
      "state_db": "/var/lib/volcopy/compute-agent.sqlite",
      "overlay_dir": "/var/lib/volcopy/overlays",
      "servers": {
        "SERVER_ID": {
          "qmp": "/run/volcopy/SERVER_ID.qmp",
          "attachments": {"ATTACHMENT_ID": {"qdev": "disk0", "node": "vol0", "volume": "/dev/sdb"}}
        }
      }
    }

``qdev`` is the id of the guest's disk device, ``node`` the block node holding the volume (the
device's drive), ``volume`` its path on this host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .handoff import ServerConfig


class ConfigError(ValueError):
    pass


@dataclass
class AgentConfig:
    host: str
    port: int
    tokens: list[str]
    state_db: str
    overlay_dir: str
    servers: dict[str, ServerConfig]


def _require(mapping: dict, key: str, kind, where: str):
    value = mapping.get(key)
    if not isinstance(value, kind):
        raise ConfigError(
            f"{where}: '{key}' must be a {kind.__name__ if isinstance(kind, type) else 'value'}"
        )
    return value


def load(path: str) -> AgentConfig:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the configuration {path}: {exc}") from None
    host, _, port = _require(raw, "listen", str, path).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{path}: 'listen' must be HOST:PORT")
    tokens = _require(raw, "tokens", list, path)
    if not tokens or not all(isinstance(t, str) and len(t) >= 16 for t in tokens):
        raise ConfigError(f"{path}: 'tokens' must list tokens of at least 16 characters")
    servers = {}
    for server_id, server in _require(raw, "servers", dict, path).items():
        where = f"{path}: server {server_id}"
        attachments = _require(server, "attachments", dict, where)
        for attachment_id, a in attachments.items():
            for key in ("qdev", "node", "volume"):
                _require(a, key, str, f"{where} attachment {attachment_id}")
        servers[server_id] = ServerConfig(qmp=_require(server, "qmp", str, where), attachments=attachments)
    return AgentConfig(
        host=host,
        port=int(port),
        tokens=tokens,
        state_db=_require(raw, "state_db", str, path),
        overlay_dir=_require(raw, "overlay_dir", str, path),
        servers=servers,
    )
