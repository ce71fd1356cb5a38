"""`/metrics`: Prometheus text from `prometheus_client`, one registry per server.

Engine gauges and counters are read at scrape time from `AsyncEngine.stats` (a snapshot the
engine's worker takes after every step, so they never race a step); latency histograms are
observed by the server as it hands tokens out. Names follow vLLM's, under ``genfuse:``.

| metric | kind | what |
| --- | --- | --- |
| ``genfuse:num_requests_running`` / ``_waiting`` | gauge | requests in the engine's running set / queue |
| ``genfuse:num_requests_awaiting_first_token`` | gauge | what ``--max-waiting`` bounds: accepted, no token yet |
| ``genfuse:requests_finished_total{finished_reason}`` | counter | stop, length, abort, error |
| ``genfuse:prompt_tokens_total`` / ``genfuse:generation_tokens_total`` | counter | tokens in / out |
| ``genfuse:time_to_first_token_seconds`` | histogram | request arrival to its first token |
| ``genfuse:inter_token_latency_seconds`` | histogram | between a request's successive tokens |
| ``genfuse:e2e_request_latency_seconds`` | histogram | arrival to the last token |
| ``genfuse:kv_cache_usage_perc`` | gauge | fraction of KV blocks in use, 0..1 |
| ``genfuse:prefix_cache_queries_total`` / ``_hits_total`` | counter | prompt tokens looked up / served from the cache |
| ``genfuse:prefix_cache_hit_rate`` | gauge | hits / queries since start |
| ``genfuse:num_preemptions_total`` | counter | requests preempted (recomputed later) |
| ``genfuse:http_responses_total{status}`` | counter | responses by HTTP status |
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class _EngineCollector:
    def __init__(self, stats: Callable, awaiting: Callable[[], int]):
        self.stats, self.awaiting = stats, awaiting

    def collect(self):
        g = GaugeMetricFamily("genfuse:num_requests_awaiting_first_token",
                              "Requests accepted that have produced no token yet (bounded by --max-waiting)")
        g.add_metric([], self.awaiting())
        yield g
        s = self.stats()
        if s is None:  # still loading
            return

        def gauge(name, doc, value):
            m = GaugeMetricFamily(name, doc)
            m.add_metric([], value)
            return m

        def counter(name, doc, value):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], value)
            return m

        yield gauge("genfuse:num_requests_running", "Requests in the engine's running set", s.num_running)
        yield gauge("genfuse:num_requests_waiting", "Requests in the engine's waiting queue", s.num_waiting)
        fin = CounterMetricFamily("genfuse:requests_finished", "Finished requests by reason",
                                  labels=["finished_reason"])
        for reason in ("stop", "length", "abort", "error"):
            fin.add_metric([reason], s.finished.get(reason, 0))
        yield fin
        yield counter("genfuse:prompt_tokens", "Prompt tokens admitted", s.num_prompt_tokens)
        yield counter("genfuse:generation_tokens", "Tokens generated", s.num_generation_tokens)
        yield gauge("genfuse:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)", s.kv_cache_usage)
        yield gauge("genfuse:num_kv_blocks_free", "KV-cache blocks free or evictable", s.num_free_kv_blocks)
        yield gauge("genfuse:num_kv_blocks", "KV-cache blocks in the pool", s.num_kv_blocks)
        yield counter("genfuse:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                      s.num_prompt_tokens)
        yield counter("genfuse:prefix_cache_hits", "Prompt tokens served by the prefix cache",
                      s.num_cached_prompt_tokens)
        yield gauge("genfuse:prefix_cache_hit_rate", "Prefix-cache hits / queries since start",
                    s.prefix_cache_hit_rate)
        yield counter("genfuse:num_preemptions", "Requests preempted", s.num_preemptions)


class ServerMetrics:
    def __init__(self, stats: Callable, awaiting: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("genfuse:time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("genfuse:inter_token_latency_seconds", "Between a request's successive tokens",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("genfuse:e2e_request_latency_seconds", "Request arrival to its last token",
                             buckets=_E2E, registry=r)
        self.http = Counter("genfuse:http_responses", "HTTP responses by status", ["status"], registry=r)
        r.register(_EngineCollector(stats, awaiting))

    def render(self) -> bytes:
        return generate_latest(self.registry)
