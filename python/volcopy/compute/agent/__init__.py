"""The reference compute side of the handoff: ``volcopy compute-agent --config-file FILE``.

config.py holds the options, wsgi.py the REST app, auth.py who may call it, server.py the listening
socket (TLS, worker pool, deadlines); handoff.py is what the calls do on QEMU.
"""

from __future__ import annotations

import os
import signal
import ssl
import sys
import threading

from oslo_log import log as logging

from . import auth
from .config import AgentConfig, ConfigError, load
from .handoff import Handoff
from .policy import DstPolicy
from .server import AgentServer, tls_context
from .state import StateStore
from .wsgi import AgentApp

log = logging.getLogger(__name__)


def _tls(config: AgentConfig) -> ssl.SSLContext | None:
    if not config.cert_file:
        return None
    try:
        return tls_context(config.cert_file, config.key_file, config.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"[ssl] cert_file {config.cert_file}, key_file {config.key_file}"
            f"{f', ca_file {config.ca_file}' if config.ca_file else ''}: cannot be loaded: {exc}"
        ) from None


def _protect(app, config: AgentConfig):
    if config.auth_strategy == "static":
        return auth.static_tokens(app, config.tokens)
    return auth.keystone(app, config.conf, config.required_role)


def serve(config: AgentConfig) -> None:
    """Runs until SIGTERM or SIGINT. Prints the URL it listens on (useful with port 0)."""
    ssl_context = _tls(config)  # a bad certificate is a configuration error: before anything starts
    if not os.path.isdir(config.overlay_dir):  # an existing one (Nova's instances directory) keeps its mode
        os.makedirs(config.overlay_dir, mode=0o700)
        if any(server.uri for server in config.servers.values()):
            # libvirt's QEMU runs as its own user (libvirt-qemu), which must reach the overlays it is
            # given (libvirt makes them its own); their names are not listed to it, and each is 0600.
            os.chmod(config.overlay_dir, 0o711)
    store = StateStore(config.state_db)
    policy = DstPolicy(config.allowed_connectors, config.allowed_device_prefixes)
    handoff = Handoff(config.servers, store, config.overlay_dir, policy, config.overlay_min_free)
    handoff.recover()
    server = AgentServer(
        (config.host, config.port),
        _protect(AgentApp(handoff, config.max_body), config),
        request_timeout=config.request_timeout,
        max_workers=config.max_workers,
        ssl_context=ssl_context,
    )
    log.info("listening on %s with %d workers", server.url, config.max_workers)
    print(f"volcopy compute-agent listening on {server.url}", flush=True)

    def stop(signum, frame):
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        store.close()


def main(argv: list[str]) -> int:
    """``volcopy compute-agent ARGS``: 2 for a bad configuration, with nothing started."""
    try:
        config = load(argv)
    except ConfigError as exc:
        print(f"volcopy compute-agent: error: {exc}", file=sys.stderr)
        return 2
    logging.setup(config.conf, "volcopy")
    config.conf.log_opt_values(log, logging.DEBUG)  # secret options (tokens, passwords) show as ****
    try:
        serve(config)
    except ConfigError as exc:
        print(f"volcopy compute-agent: error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["main", "serve", "load"]
