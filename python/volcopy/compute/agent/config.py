"""The agent's configuration file (JSON):

    {
      "listen": "127.0.0.1:8774",
      "tokens": ["a-long-random-token"],
      "state_db": "/var/lib/volcopy/compute-agent.sqlite",
      "overlay_dir": "/var/lib/volcopy/overlays",
      "allowed_connectors": ["iscsi", "fibre_channel", "nvmeof", "rbd"],
      "allowed_device_prefixes": ["/dev/disk/by-id/"],
      "request_timeout": 30,
      "overlay_min_free": 1073741824,
      "servers": {
        "SERVER_ID": {
          "qmp": "/run/volcopy/SERVER_ID.qmp",
          "pidfile": "/run/volcopy/SERVER_ID.pid",
          "attachments": {"ATTACHMENT_ID": {"qdev": "disk0", "node": "vol0", "volume": "/dev/sdb"}}
        }
      }
    }

``qdev`` is the id of the guest's disk device, ``node`` the block node holding the volume (the
device's drive), ``volume`` its path on this host.

complete attaches the new volume only through ``allowed_connectors`` (os-brick protocols; the default is
the four above); a "local" connection_info's device_path (normalised: no "..") must start with one of
``allowed_device_prefixes`` (default: none, so "local" is refused unless configured): otherwise a caller
could give a guest any device of this host. ``request_timeout`` (seconds, default 30) closes a
connection that sends nothing. start refuses to fence while ``overlay_dir`` has less than
``overlay_min_free`` bytes free (default 1 GiB): the guest's writes go there until complete or cancel,
and a full overlay pauses the guest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .handoff import ServerConfig

DEFAULT_CONNECTORS = ["iscsi", "fibre_channel", "nvmeof", "rbd"]


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
    allowed_connectors: list[str]
    allowed_device_prefixes: list[str]
    request_timeout: float
    overlay_min_free: int


def _require(mapping: dict, key: str, kind, where: str):
    value = mapping.get(key)
    if not isinstance(value, kind):
        raise ConfigError(
            f"{where}: '{key}' must be a {kind.__name__ if isinstance(kind, type) else 'value'}"
        )
    return value


def _strings(raw: dict, key: str, default: list[str], path: str) -> list[str]:
    value = raw.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path}: '{key}' must be a list of strings")
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
        servers[server_id] = ServerConfig(
            qmp=_require(server, "qmp", str, where),
            pidfile=_require(server, "pidfile", str, where),
            attachments=attachments,
        )
    return AgentConfig(
        host=host,
        port=int(port),
        tokens=tokens,
        state_db=_require(raw, "state_db", str, path),
        overlay_dir=_require(raw, "overlay_dir", str, path),
        servers=servers,
        allowed_connectors=_strings(raw, "allowed_connectors", DEFAULT_CONNECTORS, path),
        allowed_device_prefixes=_strings(raw, "allowed_device_prefixes", [], path),
        request_timeout=_timeout(raw, path),
        overlay_min_free=_bytes(raw, "overlay_min_free", 1 << 30, path),
    )


def _bytes(raw: dict, key: str, default: int, path: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: '{key}' must be a number of bytes")
    return value


def _timeout(raw: dict, path: str) -> float:
    value = raw.get("request_timeout", 30)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{path}: 'request_timeout' must be a positive number of seconds")
    return float(value)
