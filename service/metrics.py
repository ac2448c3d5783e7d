"""Prometheus metrics of the service, in a registry of its own (one per app).

Latency histograms and token counters are fed by the completions route from the engine's events;
running and waiting requests and state bytes are read from the loaded engines at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily

from service.registry import ModelRegistry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class EngineCollector:
    """Gauges read from each loaded model's engine when Prometheus scrapes."""

    def __init__(self, models: ModelRegistry):
        self.models = models

    def collect(self):
        running = GaugeMetricFamily("xatl_requests_running", "Requests in a decode batch", labels=["model"])
        waiting = GaugeMetricFamily("xatl_requests_waiting", "Requests waiting for a slot", labels=["model"])
        state = GaugeMetricFamily("xatl_state_bytes", "Bytes of per-sequence state held by running requests",
                                  labels=["model"])
        for name, engine in self.models.loaded().items():
            stats = engine.stats()
            running.add_metric([name], stats.running)
            waiting.add_metric([name], stats.waiting)
            state.add_metric([name], stats.state_bytes)
        yield from (running, waiting, state)


class Metrics:
    def __init__(self, models: ModelRegistry):
        self.registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "xatl_time_to_first_token_seconds", "Submission to first generated token",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "xatl_inter_token_latency_seconds", "Time between consecutive generated tokens of a request",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "xatl_e2e_request_latency_seconds", "Submission to last token", ["model"],
            buckets=REQUEST_BUCKETS, registry=self.registry,
        )
        self.prompt_tokens = Counter("xatl_prompt_tokens", "Prompt tokens processed", ["model"],
                                     registry=self.registry)
        self.generation_tokens = Counter("xatl_generation_tokens", "Tokens generated", ["model"],
                                         registry=self.registry)
        self.requests = Counter("xatl_requests", "Finished requests by finish reason",
                                ["model", "finish_reason"], registry=self.registry)
        self.registry.register(EngineCollector(models))
        ProcessCollector(registry=self.registry)  # resident memory, CPU seconds, open files

    def render(self) -> bytes:
        return generate_latest(self.registry)
