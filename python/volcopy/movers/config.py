"""The mover's options (oslo.config), read from the INI file given by ``--config-file``: ``[mover]``, and
oslo.log's options in ``[DEFAULT]``. docs/movers.md shows a whole file."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
from oslo_log import log as logging

from ..errors import InvalidRequest
from ..units import parse_size
from .defaults import DEFAULT_GROUP, DEFAULT_URL
from .jobboard import check_url
from .transports import KNOWN, usable

mover_opts = [
    cfg.StrOpt(
        "name",
        default=socket.gethostname(),
        sample_default="<host name>",
        help="The mover's name in the group: one mover per host, so the host name by default.",
    ),
    cfg.StrOpt(
        "coordination_url",
        default=DEFAULT_URL,
        secret=True,  # may hold a password
        help="tooz's URL of the coordination backend, Redis or etcd, e.g. "
        "redis://HOST:6379?membership_timeout=10 or etcd3+http://HOST:2379?membership_timeout=10 "
        "(a mover whose heartbeats stop leaves the group that many seconds after its last one; "
        "30 by default). The group, its locks and the jobboard live there.",
    ),
    cfg.StrOpt("group", default=DEFAULT_GROUP, help="The tooz group the movers join."),
    cfg.ListOpt(
        "transports",
        default=[],
        help=f"The transports this mover offers, among {', '.join(KNOWN)}; each must work on this host "
        "(checked at start through os-brick, or librbd for rbd), else the mover does not start. "
        "Empty: every one that works here.",
    ),
    cfg.IntOpt("slots", default=2, min=1, help="Copies this mover runs at once."),
    cfg.StrOpt(
        "bandwidth",
        default="0",
        help="Bytes per second for all of this mover's copies together, e.g. 200M; 0: unlimited.",
    ),
    cfg.StrOpt(
        "journal",
        secret=True,  # may hold a password
        help="SQLAlchemy URL of the migrations' journal, shared with the Cinder side that submits them "
        "(e.g. postgresql+psycopg://volcopy:PASSWORD@db/volcopy); TaskFlow's persistence lives there too. "
        "Default: the volcopy command's own default (a SQLite file: one host only).",
    ),
    cfg.StrOpt(
        "checkpoint_dir",
        help="Where this mover keeps the checkpoints of the copies it runs (the journal keeps a copy for "
        "a takeover). Default: as the Migrator's.",
    ),
    cfg.IntOpt(
        "claim_expiry",
        default=15,
        min=2,  # etcd's shortest lease
        help="Seconds a job's claim lasts unless renewed (three times per expiry): about how long after "
        "a mover dies another one takes its migrations over. Whole seconds, as etcd's leases.",
    ),
    cfg.StrOpt(
        "metrics_address",
        default="",
        help="HOST:PORT where the mover serves its Prometheus metrics (/metrics); empty: none.",
    ),
    cfg.FloatOpt(
        "heartbeat_interval",
        default=0.0,
        min=0.0,
        help="Seconds between heartbeats; 0: a third of the coordination backend's membership timeout.",
    ),
]


COMPUTE_GROUP = "compute"


def list_opts():
    """For oslo-config-generator (namespace volcopy.mover)."""
    from keystoneauth1 import loading as ks_loading

    compute = ks_loading.get_session_conf_options() + ks_loading.get_auth_common_conf_options()
    return [("mover", mover_opts), (COMPUTE_GROUP, compute)]


class ConfigError(ValueError):
    """Bad configuration; the message names the file and the option."""


@dataclass
class MoverConfig:
    conf: cfg.ConfigOpts  # for oslo.log
    name: str
    coordination_url: str
    group: str
    transports: list[str]
    slots: int
    bandwidth: int
    heartbeat_interval: float
    journal: str
    checkpoint_dir: str | None
    claim_expiry: int
    metrics_address: str
    compute: (
        object | None
    )  # a NovaCompute from [compute], to fence attached volumes with; None: detached only
    not_offered: dict[str, str]  # the transports this host cannot attach, and why (when none is configured)


def load(argv: list[str]) -> MoverConfig:
    """Parses ``argv`` (``--config-file FILE`` and oslo.log's options), checks every value, and finds
    the transports this host can attach (the configured ones must all work here)."""
    conf = cfg.ConfigOpts()
    conf.register_opts(mover_opts, group="mover")
    ks_loading.register_session_conf_options(conf, COMPUTE_GROUP)
    ks_loading.register_auth_conf_options(conf, COMPUTE_GROUP)
    logging.register_options(conf)
    conf.set_default("use_stderr", True)  # stdout carries the one "joined" line a supervisor waits for
    try:
        conf(argv, project="volcopy", prog="volcopy mover", default_config_files=[])
    except cfg.Error as exc:
        raise ConfigError(str(exc)) from None
    if not conf.config_file and not conf.config_dir:
        raise ConfigError("no configuration: give --config-file FILE (see docs/movers.md)")
    files = ", ".join(conf.config_file) or conf.config_dir

    def get(name: str):
        try:
            return conf.mover[name]
        except (cfg.Error, ValueError) as exc:
            reason = str(exc).rpartition(" is not valid: ")[2]
            raise ConfigError(f"{files}: [mover] {name}: {reason}") from None

    values = {opt.dest: get(opt.dest) for opt in mover_opts}
    if not values["journal"]:
        from ..migration.commands import default_journal

        values["journal"] = default_journal()
        directory = os.path.dirname(values["journal"][len("sqlite:///") :])
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{files}: [mover] journal: the default's directory {directory}: {exc}"
            ) from None
    for name in ("name", "coordination_url", "group"):
        if not values[name]:
            raise ConfigError(f"{files}: [mover] {name} must not be empty")
    try:
        check_url(values["coordination_url"])
    except InvalidRequest as exc:
        raise ConfigError(f"{files}: [mover] coordination_url: {exc}") from None
    try:
        values["bandwidth"] = parse_size(values["bandwidth"])
    except ValueError as exc:
        raise ConfigError(f"{files}: [mover] bandwidth: {exc}") from None
    host, _, port = values["metrics_address"].rpartition(":")
    if values["metrics_address"] and (not host or not port.isdigit() or not 0 < int(port) < 65536):
        raise ConfigError(f"{files}: [mover] metrics_address: HOST:PORT, not {values['metrics_address']!r}")
    configured = [t.strip().lower() for t in values["transports"] if t.strip()]
    works, refused = usable(configured or None)
    if configured and refused:
        reasons = "; ".join(f"{t}: {why}" for t, why in refused.items())
        raise ConfigError(f"{files}: [mover] transports: cannot be offered on this host: {reasons}")
    if not works:
        raise ConfigError(f"{files}: [mover] transports: none works on this host")
    values["transports"] = works
    return MoverConfig(conf=conf, not_offered=refused, compute=_compute(conf, files), **values)


def _compute(conf: cfg.ConfigOpts, files: str):
    """The compute of [compute] (keystoneauth1's session and auth options, as Nova's and Cinder's own
    sections for other services), or None when it has no auth_type."""
    if not conf[COMPUTE_GROUP].auth_type:
        return None
    from ..compute import NovaCompute

    try:
        auth = ks_loading.load_auth_from_conf_options(conf, COMPUTE_GROUP)
        session = ks_loading.load_session_from_conf_options(conf, COMPUTE_GROUP, auth=auth)
    except Exception as exc:  # noqa: BLE001 - keystoneauth1's errors for a missing or bad option
        raise ConfigError(f"{files}: [{COMPUTE_GROUP}]: {exc}") from None
    return NovaCompute(session)
