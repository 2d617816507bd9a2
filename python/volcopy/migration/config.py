"""The Migrator's options (oslo.config), in a ``[volcopy]`` section: where the journal is, and the movers'
fleet that migrations run on. A Cinder driver registers them on its own configuration; the volcopy
command reads them from ``--config-file FILE``.

    [volcopy]
    journal = postgresql+psycopg://volcopy:PASSWORD@db/volcopy
    coordination_url = redis://coordination:6379
    group = volcopy-movers
    backend_limit = 4

    # a Cinder driver:
    volcopy.migration.config.register_opts(CONF)
    migrator = volcopy.migration.config.migrator_from_config(CONF, compute=NovaCompute(session))
"""

from __future__ import annotations

from oslo_config import cfg

from ..errors import InvalidRequest
from ..movers.defaults import DEFAULT_GROUP

GROUP = "volcopy"

migration_opts = [
    cfg.StrOpt(
        "journal",
        secret=True,  # may hold a password
        help="SQLAlchemy URL of the migrations' journal (PostgreSQL to share it between hosts); default: "
        "the volcopy command's SQLite journal.",
    ),
    cfg.StrOpt(
        "checkpoint_dir", help="Where copies run here keep their checkpoint; default: the Migrator's."
    ),
    cfg.StrOpt(
        "coordination_url",
        secret=True,
        help="tooz's URL of the data movers' group (Redis or etcd): migrations run on a mover that "
        "reaches both volumes (docs/movers.md); empty: in this process.",
    ),
    cfg.StrOpt("group", default=DEFAULT_GROUP, help="The movers' group."),
    cfg.IntOpt(
        "backend_limit",
        default=0,
        min=0,
        help="With coordination_url: migrations of the fleet at once on any one backend; 0: no limit.",
    ),
]


def register_opts(conf: cfg.ConfigOpts, group: str = GROUP) -> None:
    conf.register_opts(migration_opts, group=group)


def list_opts():
    """For oslo-config-generator (namespace volcopy.migration)."""
    return [(GROUP, migration_opts)]


def load_file(path: str) -> cfg.ConfigOpts:
    """The options of one INI file (the volcopy command's --config-file); InvalidRequest names what is
    wrong in it."""
    conf = cfg.ConfigOpts()
    register_opts(conf)
    try:
        conf(["--config-file", path], project="volcopy", default_config_files=[])
        for opt in migration_opts:
            conf[GROUP][opt.dest]  # each value checked now, not at its first use
    except (cfg.Error, ValueError) as exc:
        raise InvalidRequest(f"{path}: {exc}") from None
    return conf


def migrator_from_config(conf: cfg.ConfigOpts, group: str = GROUP, **kwargs):
    """A Migrator as the options say; kwargs (compute, clone, ...) go to it as they are."""
    from .commands import default_journal
    from .migrator import Migrator

    options = conf[group]
    return Migrator(
        options.journal or default_journal(),
        checkpoint_dir=options.checkpoint_dir,
        fleet_url=options.coordination_url or None,
        fleet_group=options.group,
        backend_limit=options.backend_limit,
        **kwargs,
    )
