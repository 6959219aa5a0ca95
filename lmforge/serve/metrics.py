"""Prometheus metrics, one registry per app (several apps may share a test process).

Request counts and latencies are recorded as requests pass; the engine's gauges (queue, running sequences,
KV-cache use, prefix cache, preemptions) are read from `engine.health()` when /metrics is scraped. Names follow
vLLM's where one exists, with the `lmforge_` prefix.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmforge.engine import EngineClient

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # the ledger's MAX_BATCH is 64
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.health()
        yield GaugeMetricFamily(
            "lmforge_num_requests_waiting", "Requests waiting in the engine queue.", stats.num_waiting
        )
        yield GaugeMetricFamily(
            "lmforge_num_requests_running", "Sequences the engine is running.", stats.num_running
        )
        yield GaugeMetricFamily(
            "lmforge_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", stats.kv_cache_usage
        )
        yield CounterMetricFamily(
            "lmforge_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries,
        )
        yield CounterMetricFamily(
            "lmforge_prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits
        )
        yield CounterMetricFamily(
            "lmforge_num_preemptions", "Sequences preempted for cache space.", stats.num_preemptions
        )


class ServerMetrics:
    def __init__(self, engine: EngineClient) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lmforge_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter(
            "lmforge_generation_tokens", "Completion tokens generated.", registry=r
        )
        # forwarded requests: what each upstream reported (or, without its usage, what was billed), kept apart
        # from the local engine's counters above
        self.upstream_prompt_tokens = Counter(
            "lmforge_upstream_prompt_tokens", "Prompt tokens of requests forwarded upstream.", ["upstream"],
            registry=r,
        )  # fmt: skip
        self.upstream_completion_tokens = Counter(
            "lmforge_upstream_generation_tokens", "Completion tokens of requests forwarded upstream.",
            ["upstream"], registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "lmforge_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "lmforge_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "lmforge_e2e_request_latency_seconds",
            "From request arrival to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # what the ledger thread's statements (PostgreSQL) or transactions (SQLite) carry: _count is the batches,
        # _sum the requests; fewer, fuller batches are what keeps metering cheap (serve/ledger.py)
        self.ledger_batch_size = Histogram(
            "lmforge_ledger_batch_size", "Requests per ledger batch, by kind (admit, settle).", ["kind"],
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
