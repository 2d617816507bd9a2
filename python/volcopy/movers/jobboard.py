"""The movers' jobboard: TaskFlow's jobboard on the coordination backend, Redis (``redis://``) or etcd
(``etcd3+http://``, ``etcd3+https://``, the URLs of tooz's etcd3gw driver), and TaskFlow's SQLAlchemy
persistence in the journal's database.

A migration placed on the fleet is one job, named ``migration-ID``; its details name the migration, the
mover it was placed on, the transports it needs and whether it fences attachments (so that another
mover can take it over when that one is gone). Its logbook holds one flow, made by
``volcopy.movers.flow:migration_flow``, whose state TaskFlow keeps in the journal's database beside the
journal's own tables. The journal stays the record
of the migration itself (state, steps, checkpoint); the jobboard says who runs it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import urllib.parse
import uuid
import warnings

from ..errors import InvalidRequest
from ..migration.errors import JournalError
from .errors import CoordinationUnreachable
from .membership import BACKEND_ERRORS, one_line, where

log = logging.getLogger(__name__)

JOB_PREFIX = "migration-"


def _taskflow():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eventlet's deprecation, through futurist
        from taskflow import engines
        from taskflow.jobs import backends as jobboards
        from taskflow.persistence import backends as persistence_backends
        from taskflow.persistence import models
    return engines, jobboards, persistence_backends, models


ETCD_SCHEMES = ("etcd3+http", "etcd3+https")


def check_url(url: str) -> None:
    """InvalidRequest unless the coordination URL is a backend the jobboard runs on."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("redis", *ETCD_SCHEMES):
        raise InvalidRequest(
            "the movers' jobboard needs Redis (redis://HOST:PORT) or etcd (etcd3+http://HOST:PORT) as "
            f"the coordination backend, not {where(url)}"
        )
    if "sentinel" in urllib.parse.parse_qs(parsed.query):
        raise InvalidRequest(f"the movers' jobboard does not follow a Redis Sentinel: {where(url)}")


def _board_config(url: str, group: str) -> tuple[dict, object]:
    """TaskFlow's jobboard configuration for the group, and its client (None: TaskFlow makes it)."""
    check_url(url)
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "redis":
        return {"board": "redis", "namespace": f"volcopy:{group}".encode()}, _redis_client(parsed)
    options = {name: values[-1] for name, values in urllib.parse.parse_qs(parsed.query).items()}
    conf = {
        "board": "etcd",
        "path": f"volcopy/{group}",  # under TaskFlow's /taskflow/jobs
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or 2379,
        "protocol": "https" if parsed.scheme.endswith("https") else "http",
        "timeout": float(options.get("timeout", "30")),  # tooz's default; etcd3gw's own is none at all
    }
    conf.update({name: options[name] for name in ("ca_cert", "cert_key", "cert_cert") if name in options})
    return conf, None


def _redis_client(parsed: urllib.parse.SplitResult):
    """A redis-py client for tooz's Redis URL, without redis-py's own retries (see
    membership._fail_fast): a jobboard call to a Redis that is down fails at once, and the conductor's
    next round is its retry."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options = urllib.parse.parse_qs(parsed.query)
    timeout = float(options.get("timeout", ["30"])[0])
    return redis.Redis(
        host=parsed.hostname or "127.0.0.1",
        port=parsed.port or 6379,
        username=urllib.parse.unquote(parsed.username) if parsed.username else None,
        password=urllib.parse.unquote(parsed.password) if parsed.password else None,
        db=int(options.get("db", ["0"])[0]),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def persistence(journal_url: str):
    """TaskFlow's SQLAlchemy persistence in the journal's database, its tables made if need be."""
    _, _, persistence_backends, _ = _taskflow()
    from taskflow import exceptions

    logging.getLogger("alembic").setLevel(logging.WARNING)  # a line per migration step at every start
    try:
        backend = persistence_backends.fetch({"connection": journal_url})
        with contextlib.closing(backend.get_connection()) as connection:
            try:
                connection.upgrade()
            except exceptions.StorageFailure as exc:  # another process made the tables at the same moment?
                log.debug("TaskFlow's tables: %s; checking them again", one_line(exc))
                connection.upgrade()
    except exceptions.TaskFlowException as exc:
        shown = journal_url.split("@", 1)[-1]
        raise JournalError(
            f"TaskFlow's persistence in journal {shown} cannot be used: {one_line(exc)}"
        ) from None
    return backend


def connect(coordination_url: str, group: str, backend):
    """The group's jobboard (its keys under ``volcopy:GROUP`` in Redis, ``/taskflow/jobs/volcopy/GROUP``
    in etcd), connected."""
    _, jobboards, _, _ = _taskflow()
    from taskflow import exceptions

    conf, client = _board_config(coordination_url, group)
    board = jobboards.fetch(f"volcopy-{group}", conf, persistence=backend, client=client)
    try:
        board.connect()
    except exceptions.JobFailure as exc:
        cause = getattr(exc, "cause", None) or exc  # TaskFlow's "Failed to connect to redis" says less
        raise CoordinationUnreachable(
            f"coordination {where(coordination_url)} is unreachable: {one_line(cause)}"
        ) from None
    return board


def post(
    board,
    backend,
    migration_id: str,
    mover: str,
    transports: tuple[str, str],
    fences: bool,
    backends: list[str],
    backend_limit: int,
) -> str:
    """Posts the migration's job for ``mover`` ("": any that fits); returns the job's uuid. fences: the
    volume is attached, so only a mover with a compute can run it. backend_limit: at most that many
    jobs claimed at once on any of ``backends`` (0: no limit)."""
    engines, _, _, models = _taskflow()
    from .flow import migration_flow

    book = models.LogBook(f"{JOB_PREFIX}{migration_id}")
    flow_detail = models.FlowDetail(f"{JOB_PREFIX}{migration_id}", str(uuid.uuid4()))
    book.add(flow_detail)
    with contextlib.closing(backend.get_connection()) as connection:
        connection.save_logbook(book)
    engines.save_factory_details(flow_detail, migration_flow, [migration_id], {}, backend=backend)
    details = {
        "store": {},
        "migration_id": migration_id,
        "mover": mover,
        "transports": list(transports),
        "fences": fences,
        "backends": list(dict.fromkeys(backends)),
        "backend_limit": backend_limit,
        "posted_at": time.time(),  # its age (conductor._age): TaskFlow's etcd jobboard loses created_on
    }
    try:
        job = board.post(f"{JOB_PREFIX}{migration_id}", book=book, details=details)
    except BACKEND_ERRORS as exc:  # etcd3gw's: TaskFlow's etcd jobboard passes them on
        raise CoordinationUnreachable(f"the jobboard is unreachable: {one_line(exc)}") from None
    return job.uuid
