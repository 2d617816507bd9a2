"""A mover's Prometheus metrics (prometheus_client), served at ``http://[mover] metrics_address/metrics``
when that option is set. Every series carries the mover's name as the label ``mover``, so that the
fleet's movers add up in one query.

| metric | kind | what |
| --- | --- | --- |
| volcopy_mover_jobs_running | gauge | migrations running on this mover now |
| volcopy_mover_jobs_total{outcome} | counter | runs ended, by outcome (OUTCOMES) |
| volcopy_mover_bytes_copied_total | counter | bytes its copies moved |
| volcopy_mover_rate_bytes | gauge | bytes per second its copies move now |
| volcopy_mover_errors_total | counter | runs that stopped on an error (the job runs again) |
| volcopy_mover_takeovers_total | counter | jobs it claimed that were placed on another mover |
| volcopy_mover_slots | gauge | copies it runs at once (jobs_running of them are in use) |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from .errors import MoverError

OUTCOMES = ("completed", "cancelled", "handed_back", "duplicate", "error")


class MoverMetrics:
    def __init__(self, mover: str, slots: int):
        self.registry = CollectorRegistry()
        labels = ["mover"]

        def gauge(name, text):
            return Gauge(name, text, labels, registry=self.registry).labels(mover)

        def counter(name, text):
            return Counter(name, text, labels, registry=self.registry).labels(mover)

        self.running = gauge("volcopy_mover_jobs_running", "Migrations running on this mover now")
        self._ended = Counter(
            "volcopy_mover_jobs",
            "Runs of migrations ended, by outcome",
            ["mover", "outcome"],
            registry=self.registry,
        )
        self.ended = {outcome: self._ended.labels(mover, outcome) for outcome in OUTCOMES}
        self.bytes_copied = counter("volcopy_mover_bytes_copied", "Bytes this mover's copies moved")
        self.rate = gauge("volcopy_mover_rate_bytes", "Bytes per second this mover's copies move now")
        self.errors = counter("volcopy_mover_errors", "Runs stopped on an error, to run again")
        self.takeovers = counter("volcopy_mover_takeovers", "Jobs claimed that were placed on another mover")
        self.slots = gauge("volcopy_mover_slots", "Copies this mover runs at once")
        self.slots.set(slots)

    def serve(self, address: str) -> None:
        """Serves /metrics at HOST:PORT (checked by config.py); MetricsUnavailable when it cannot."""
        host, _, port = address.rpartition(":")
        try:
            start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        except OSError as exc:
            raise MetricsUnavailable(f"cannot serve metrics at {address}: {exc.strerror or exc}") from None


class MetricsUnavailable(MoverError):
    """The metrics' address cannot be listened on (in use, not this host's)."""
