"""Prometheus metrics for GET /metrics, one registry per app.

A dedicated `CollectorRegistry` (not prometheus-client's global one) so every app owns its numbers: tests
create several apps in one process, and a global registry would refuse the second registration.

Two kinds of numbers:
  * request metrics, observed through the access log's `RequestObserver` hook, so every generation route
    (/invocations, /predictions, /v1/completions, /v1/chat/completions) counts the same way:
      lmi_requests_total{route,status}        counter; 499 = the client went away first
      lmi_prompt_tokens_total                 counter, requests that reached the engine
      lmi_generation_tokens_total             counter
      lmi_time_to_first_token_seconds         histogram, arrival to first token
      lmi_inter_token_latency_seconds         histogram, between tokens of one engine request
      lmi_e2e_request_latency_seconds         histogram, arrival to end, requests that reached the engine
      lmi_ignored_request_fields_total{api}   counter, request fields accepted and ignored (unknown here);
                                              the field names are the client's text, so they are logged,
                                              not used as label values
  * engine state, read from `EngineLoop.stats()` when scraped (a custom collector), so a gauge can never
    be left stale by a code path that forgot to update it:
      lmi_num_requests_running                the engine's running batch
      lmi_num_requests_waiting                admitted, not yet running: queued for the engine + prefilling
      lmi_num_requests_active                 admitted and not finished (what job_queue_size limits)
      lmi_kv_cache_usage_perc                 fraction of the KV cache's blocks reserved, 0..1
      lmi_kv_cache_used_tokens                token positions reserved by admitted requests
      lmi_kv_cache_capacity_tokens            token positions the KV cache holds
      lmi_engine_steps_total                  engine steps taken
      lmi_engine_healthy                      1 while the engine can serve
      lmi_model_load_seconds                  from server start to model ready (absent while loading)
Bucket boundaries follow vLLM's, so dashboards built for it read these the same way.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from entrypoint.http.access_log import AccessRecord
from entrypoint.http.state import ServerState

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


def route_label(route: str) -> str:
    """The route's template: the model name in /predictions/{name} is the client's text, and one label value
    per name sent would let any client grow the metrics without bound."""
    return "/predictions/{model_name}" if route.startswith("/predictions/") else route


class ServerMetrics:
    """The app's registry and its request metrics; a `RequestObserver` for access records."""

    def __init__(self, state: ServerState):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lmi_requests", "Generation requests by route and HTTP status.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lmi_prompt_tokens", "Prompt tokens of requests that reached the engine.",
                                     registry=r)
        self.generation_tokens = Counter("lmi_generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram("lmi_time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("lmi_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lmi_e2e_request_latency_seconds",
                             "Time from arrival to the end of requests that reached the engine.",
                             buckets=E2E_BUCKETS, registry=r)
        self.ignored = Counter("lmi_ignored_request_fields", "Request fields accepted and ignored (unknown here).",
                               ["api"], registry=r)
        r.register(EngineCollector(state))

    def ignored_fields(self, api: str, count: int) -> None:
        self.ignored.labels(api).inc(count)

    # ---- RequestObserver ----------------------------------------------------------------------------
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, record: AccessRecord, status: int) -> None:
        self.requests.labels(route_label(record.route), str(status)).inc()
        if record.admitted:
            self.prompt_tokens.inc(record.prompt_tokens)
            self.generation_tokens.inc(record.generated_tokens)
            self.e2e.observe(record.duration)

    # ---- exposition ---------------------------------------------------------------------------------
    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape body and its content type, in the format the scraper's Accept header asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class EngineCollector(Collector):
    """Engine-state gauges read from the EngineLoop at scrape time (zero while no engine is loaded)."""

    def __init__(self, state: ServerState):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        loop = self.state.loop
        stats = loop.stats() if loop is not None else None

        def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_text, value=value)

        yield gauge("lmi_num_requests_running", "Requests in the engine's running batch.",
                    stats.running if stats else 0)
        yield gauge("lmi_num_requests_waiting", "Admitted requests not running yet (queued or prefilling).",
                    stats.pending + stats.waiting if stats else 0)
        yield gauge("lmi_num_requests_active", "Admitted requests not finished yet (limited by job_queue_size).",
                    stats.admitted if stats else 0)
        yield gauge("lmi_kv_cache_usage_perc", "Fraction of the KV cache's blocks reserved by admitted requests (0..1).",
                    stats.kv_cache_usage if stats else 0.0)
        yield gauge("lmi_kv_cache_used_tokens", "Token positions of the KV cache reserved by admitted requests.",
                    stats.kv_cache_tokens if stats else 0)
        yield gauge("lmi_kv_cache_capacity_tokens", "Token positions the KV cache holds (sized at start-up from the "
                    "memory budget).", stats.kv_cache_capacity_tokens if stats else 0)
        yield CounterMetricFamily("lmi_engine_steps", "Engine steps taken.", value=stats.steps if stats else 0)
        yield gauge("lmi_engine_healthy", "1 while the engine can serve requests.",
                    1 if stats is not None and stats.healthy else 0)
        if self.state.ready_at is not None:
            yield gauge("lmi_model_load_seconds", "Seconds from server start until the model was ready.",
                        self.state.ready_at - self.state.started_at)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the metric set depends on the state; nothing to check for name clashes up front
