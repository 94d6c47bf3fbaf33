"""A Prometheus text endpoint on the coordinator (``coordinator.prometheus_port``).

Every figure is read from the coordinator when the endpoint is scraped, so a scrape never
sees a half-updated round and nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lssfl.server.coordinator import Coordinator


class CoordinatorCollector(Collector):
    """The coordinator's rounds, silos, bytes and refusals as Prometheus metrics."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        """One family per figure, read from one snapshot of the coordinator."""
        s = self.coordinator.snapshot()
        yield GaugeMetricFamily("lssfl_round", "The round in progress (0: none yet)", s.round)
        yield CounterMetricFamily(
            "lssfl_rounds_completed", "Rounds committed, resumed ones included", s.rounds_completed
        )
        yield GaugeMetricFamily(
            "lssfl_silos_live", "Silos heard from within 3 heartbeats", s.live_silos
        )
        yield GaugeMetricFamily("lssfl_silos_enrolled", "Silos the config lists", s.enrolled_silos)
        sent = CounterMetricFamily(
            "lssfl_bytes",
            "Serialized gRPC message bytes since the coordinator started, by direction",
            labels=["direction"],
        )
        sent.add_metric(["down"], s.bytes_down)
        sent.add_metric(["up"], s.bytes_up)
        yield sent
        refused = CounterMetricFamily(
            "lssfl_refusals", "Calls refused, by gRPC status code", labels=["code"]
        )
        for code, n in sorted(s.refusals.items()):
            refused.add_metric([code], n)
        yield refused
        if s.global_accuracy is not None:
            yield GaugeMetricFamily(
                "lssfl_global_accuracy", "Accuracy of the last committed round", s.global_accuracy
            )


def serve_metrics(coordinator: Coordinator, host: str, port: int) -> tuple[WSGIServer, int]:
    """Start the endpoint (``/metrics``) in a thread; the server and the port it bound.

    OSError, one line, when the port cannot be bound.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(CoordinatorCollector(coordinator))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(
            f"cannot serve Prometheus metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None
    return server, server.server_port
