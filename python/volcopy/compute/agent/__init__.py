"""The reference compute side of the handoff: ``volcopy compute-agent --config FILE``."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from .config import AgentConfig, load
from .handoff import Handoff
from .http import AgentHTTPServer
from .policy import DstPolicy
from .state import StateStore


def serve(config: AgentConfig) -> None:
    """Runs until SIGTERM or SIGINT. Prints the address it listens on (useful with port 0)."""
    os.makedirs(config.overlay_dir, mode=0o700, exist_ok=True)
    store = StateStore(config.state_db)
    policy = DstPolicy(config.allowed_connectors, config.allowed_device_prefixes)
    handoff = Handoff(config.servers, store, config.overlay_dir, policy, config.overlay_min_free)
    handoff.recover()
    server = AgentHTTPServer((config.host, config.port), handoff, config.tokens, config.request_timeout)
    host, port = server.server_address[:2]
    print(f"volcopy compute-agent listening on http://{host}:{port}", flush=True)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        store.close()


def main(config_path: str, listen: str | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load(config_path)
    if listen:
        host, _, port = listen.rpartition(":")
        config.host, config.port = host, int(port)
    serve(config)


__all__ = ["main", "serve", "load"]
