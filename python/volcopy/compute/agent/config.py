"""The agent's options (oslo.config), read from the INI file given by ``--config-file``.

Fixed groups: ``[agent]`` (listening, auth, limits, where state and overlays live), ``[ssl]`` (TLS),
``[keystone_authtoken]`` (keystonemiddleware's own options) and oslo.log's options in ``[DEFAULT]``.
The servers and attachments this agent owns are one group each, named after their id:

    [server:SERVER_ID]
    qmp = /run/volcopy/SERVER_ID.qmp
    pidfile = /run/volcopy/SERVER_ID.pid   # QEMU's -pidfile, which it keeps locked while it runs

    [attachment:ATTACHMENT_ID]
    server = SERVER_ID
    qdev = disk0          # the id of the guest's disk device
    node = vol0           # the block node holding the volume (the device's drive)
    volume = /dev/sdb     # the volume's path on this host

A server that libvirt runs (as Nova does) names libvirt's URI instead; its id is the domain's UUID
(Nova's instance UUID), and an attachment's qdev is the disk's target (vda), with no node:

    [server:INSTANCE_UUID]
    uri = qemu:///system

docs/compute-agent.md shows a whole file and what each option is for.
"""

from __future__ import annotations

from dataclasses import dataclass

from oslo_config import cfg
from oslo_log import log as logging

from ..rbd import MalformedRbdConnection, from_name, is_rbd_name
from .handoff import ServerConfig

SERVER_PREFIX = "server:"
ATTACHMENT_PREFIX = "attachment:"
MIN_TOKEN_LENGTH = 16

agent_opts = [
    cfg.HostAddressOpt("listen", default="127.0.0.1", help="The address the agent listens on."),
    cfg.PortOpt("listen_port", default=8774, help="The TCP port the agent listens on (0: any free port)."),
    cfg.StrOpt(
        "state_db",
        default="/var/lib/volcopy/compute-agent.sqlite",
        help="The SQLite file holding the agent's attachments and migrations; it survives a restart.",
    ),
    cfg.StrOpt(
        "overlay_dir",
        default="/var/lib/nova/instances",
        help="Where start creates each fenced guest's overlay, in the instance's directory "
        "(<overlay_dir>/<server id>/volcopy-<attachment id>-<generation>.qcow2, 0600), as Nova keeps "
        "an instance's disks. Directories the agent makes are 0700 (0711 with libvirt servers); "
        "existing ones keep their mode. The guest's writes land here until complete or cancel.",
    ),
    cfg.IntOpt(
        "overlay_min_free",
        default=1 << 30,
        min=0,
        help="Bytes that must be free in overlay_dir for start to fence a guest; below it start answers "
        "409. A full overlay directory pauses the guest.",
    ),
    cfg.ListOpt(
        "allowed_connectors",
        default=["iscsi", "fibre_channel", "nvmeof", "rbd"],
        help="The os-brick protocols (connection_info's driver_volume_type) complete may attach dst through.",
    ),
    cfg.ListOpt(
        "allowed_device_prefixes",
        default=[],
        help="Where a 'local' connection_info's device_path (normalised) may lie, e.g. /dev/disk/by-id/. "
        "Empty: 'local' is refused, since a caller could otherwise give a guest any device of this host.",
    ),
    cfg.StrOpt(
        "auth_strategy",
        default="keystone",
        choices=[
            ("keystone", "tokens validated by keystonemiddleware from [keystone_authtoken]"),
            ("static", "a token of the tokens option, for a single host without Keystone"),
        ],
        help="How a request's X-Auth-Token is checked.",
    ),
    cfg.StrOpt(
        "required_role",
        default="admin",
        help="With auth_strategy = keystone, the role a token must carry (403 without it).",
    ),
    cfg.ListOpt(
        "tokens",
        default=[],
        secret=True,
        help=f"With auth_strategy = static, the accepted tokens, each at least {MIN_TOKEN_LENGTH} "
        "characters.",
    ),
    cfg.FloatOpt(
        "request_timeout",
        default=30.0,
        min=0.001,
        help="Seconds a connection has to send its whole request (and the TLS handshake); then it is closed.",
    ),
    cfg.IntOpt(
        "max_workers",
        default=16,
        min=1,
        help="Requests served at once, each by a thread of a fixed pool; further connections wait.",
    ),
    cfg.IntOpt(
        "max_body", default=64 * 1024, min=1, help="The largest request body in bytes; larger is 413."
    ),
]

ssl_opts = [
    cfg.StrOpt("cert_file", help="The server's certificate (PEM, with its chain); TLS is on when set."),
    cfg.StrOpt("key_file", help="The private key of cert_file (PEM)."),
    cfg.StrOpt(
        "ca_file",
        help="CA certificates that sign client certificates; when set, a client must present one.",
    ),
]

server_opts = [
    cfg.StrOpt(
        "uri",
        help="libvirt's connection URI (qemu:///system): the server is the libvirt domain whose UUID is "
        "the server's id, and the handoff goes through libvirt's API. Without it: qmp and pidfile.",
    ),
    cfg.StrOpt("qmp", help="The QMP socket of the server's QEMU."),
    cfg.StrOpt(
        "pidfile",
        help="QEMU's -pidfile. QEMU keeps it locked while it runs: the agent's only sign of whether "
        "the server's QEMU runs (a QMP socket that cannot be reached is an error, never 'stopped').",
    ),
]

attachment_opts = [
    cfg.StrOpt("server", help="The id of the server the volume is attached to."),
    cfg.StrOpt("qdev", help="The id of the guest's disk device (with libvirt: the disk's target, vda)."),
    cfg.StrOpt("node", help="The block node holding the volume (the device's drive); not with libvirt."),
    cfg.StrOpt(
        "volume",
        help="The volume's path on this host, or an RBD image: rbd:POOL/IMAGE[:conf=PATH][:id=USER].",
    ),
]


def list_opts():
    """For oslo-config-generator (namespace volcopy.compute_agent); the server: and attachment:
    groups are one per id and are described in the module's docstring."""
    return [("agent", agent_opts), ("ssl", ssl_opts)]


class ConfigError(ValueError):
    """Bad configuration; the message names the file and the option."""


@dataclass
class AgentConfig:
    conf: cfg.ConfigOpts  # for oslo.log and keystonemiddleware, which read their own options
    host: str
    port: int
    state_db: str
    overlay_dir: str
    overlay_min_free: int
    allowed_connectors: list[str]
    allowed_device_prefixes: list[str]
    auth_strategy: str
    required_role: str
    tokens: list[str]
    request_timeout: float
    max_workers: int
    max_body: int
    cert_file: str | None
    key_file: str | None
    ca_file: str | None
    servers: dict[str, ServerConfig]


def new_conf() -> cfg.ConfigOpts:
    """The agent's options, oslo.log's and keystonemiddleware's, registered on a fresh ConfigOpts."""
    conf = cfg.ConfigOpts()
    conf.register_opts(agent_opts, group="agent")
    conf.register_opts(ssl_opts, group="ssl")
    logging.register_options(conf)
    # stdout carries the one "listening on" line a supervisor (or a test) waits for
    conf.set_default("use_stderr", True)
    try:
        from keystonemiddleware import auth_token
    except ImportError:  # only needed with auth_strategy = keystone, checked in load()
        pass
    else:
        for group, opts in auth_token.list_opts():
            conf.register_opts(opts, group=group)
    return conf


def load(argv: list[str]) -> AgentConfig:
    """Parses ``argv`` (``--config-file FILE`` and oslo.log's options) and checks every value."""
    conf = new_conf()
    try:
        conf(argv, project="volcopy", prog="volcopy compute-agent", default_config_files=[])
    except cfg.Error as exc:
        raise ConfigError(str(exc)) from None
    if not conf.config_file and not conf.config_dir:
        raise ConfigError("no configuration: give --config-file FILE (see docs/compute-agent.md)")
    files = ", ".join(conf.config_file) or conf.config_dir

    def get(group: str, name: str):
        try:
            return conf[group][name]
        except (cfg.Error, ValueError) as exc:
            reason = str(exc).rpartition(" is not valid: ")[2]
            raise ConfigError(f"{files}: [{group}] {name}: {reason}") from None

    def require(group: str, name: str) -> str:
        value = get(group, name)
        if not value:
            raise ConfigError(f"{files}: [{group}] {name} is required")
        return value

    values = {opt.dest: get("agent", opt.dest) for opt in agent_opts}
    values |= {opt.dest: get("ssl", opt.dest) for opt in ssl_opts}
    for name in ("allowed_connectors", "allowed_device_prefixes", "tokens"):
        values[name] = [v for v in values[name] if v]
    if values["auth_strategy"] == "static":
        if not values["tokens"] or any(len(t) < MIN_TOKEN_LENGTH for t in values["tokens"]):
            raise ConfigError(
                f"{files}: [agent] tokens must list tokens of at least {MIN_TOKEN_LENGTH} characters "
                "with auth_strategy = static"
            )
    elif "keystone_authtoken" not in conf:
        raise ConfigError("auth_strategy = keystone needs keystonemiddleware: pip install volcopy[openstack]")
    elif not get("keystone_authtoken", "auth_type"):
        raise ConfigError(
            f"{files}: [keystone_authtoken] auth_type is required with auth_strategy = keystone"
        )
    if bool(values["cert_file"]) != bool(values["key_file"]):
        raise ConfigError(f"{files}: [ssl] cert_file and key_file go together")
    if values["ca_file"] and not values["cert_file"]:
        raise ConfigError(f"{files}: [ssl] ca_file needs cert_file and key_file")

    sections = conf.list_all_sections()
    servers: dict[str, ServerConfig] = {}
    for section in sections:
        if section.startswith(SERVER_PREFIX):
            conf.register_opts(server_opts, group=section)
            server_id = section.removeprefix(SERVER_PREFIX)
            if get(section, "uri"):
                servers[server_id] = ServerConfig(uri=get(section, "uri"), attachments={})
            else:
                servers[server_id] = ServerConfig(
                    qmp=require(section, "qmp"), pidfile=require(section, "pidfile"), attachments={}
                )
    for section in sections:
        if section.startswith(ATTACHMENT_PREFIX):
            conf.register_opts(attachment_opts, group=section)
            server_id = require(section, "server")
            if server_id not in servers:
                raise ConfigError(f"{files}: [{section}] server: no [{SERVER_PREFIX}{server_id}] section")
            keys = ("qdev", "volume") if servers[server_id].uri else ("qdev", "node", "volume")
            attachment = {key: require(section, key) for key in keys}
            attachment.setdefault("node", get(section, "node") or "")
            if is_rbd_name(attachment["volume"]):
                try:
                    from_name(attachment["volume"])
                except MalformedRbdConnection as exc:
                    raise ConfigError(f"{files}: [{section}] volume: {exc}") from None
            servers[server_id].attachments[section.removeprefix(ATTACHMENT_PREFIX)] = attachment
    return AgentConfig(
        conf=conf,
        host=values.pop("listen"),
        port=values.pop("listen_port"),
        servers=servers,
        **values,
    )
