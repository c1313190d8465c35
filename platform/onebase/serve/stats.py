"""Per-adapter request statistics of a replica, and the same figures as Prometheus metrics.

Each replica counts requests, errors and latencies per catalog entry (in `BaseServer._leased`, the
one place every request passes) and reports them to the catalog with what it holds, so
`GET /admin/adapters` can say per adapter which replicas hold it, its load time, its request count
and its p50 latency. The counters also go to Ray Serve's metrics (`ray.serve.metrics`, exported
with Ray's Prometheus metrics): requests, errors, latency, resident adapters, adapter cache hits.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from onebase.serve.catalog import entry_id_of

RECENT = 200  # latencies kept per entry for the p50


@dataclass
class EntryStats:
    requests: int = 0
    errors: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=RECENT))

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "latencies_ms": list(self.latencies),
                "p50_ms": round(statistics.median(self.latencies), 1) if self.latencies else None}


class ReplicaStats:
    def __init__(self, base: str) -> None:
        self.base = base
        self.entries: dict[str, EntryStats] = {}
        self.metrics = _metrics()

    def request(self, model: str, seconds: float, failed: bool) -> None:
        stats = self.entries.setdefault(model, EntryStats())
        stats.requests += 1
        stats.errors += failed
        stats.latencies.append(seconds * 1000)
        tags = {"base": self.base, "model": entry_id_of(model)}
        if self.metrics:
            self.metrics["requests"].inc(tags=tags)
            if failed:
                self.metrics["errors"].inc(tags=tags)
            self.metrics["latency"].observe(seconds * 1000, tags=tags)

    def lookup(self, model: str, hit: bool) -> None:
        if self.metrics:
            self.metrics["hits" if hit else "misses"].inc(tags={"base": self.base, "model": entry_id_of(model)})

    def resident(self, count: int) -> None:
        if self.metrics:
            self.metrics["resident"].set(count, tags={"base": self.base})


def _metrics() -> dict[str, Any]:
    """Ray Serve's metric objects (empty outside a Serve replica, e.g. in engine tests)."""
    try:
        from ray.serve import metrics
    except ImportError:
        return {}
    keys = ("base", "model")
    return {
        "requests": metrics.Counter("onebase_requests", description="requests per model", tag_keys=keys),
        "errors": metrics.Counter("onebase_request_errors", description="refused or failed requests", tag_keys=keys),
        "latency": metrics.Histogram("onebase_request_latency_ms", description="request latency (ms)",
                                     boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                                     tag_keys=keys),
        "resident": metrics.Gauge("onebase_resident_adapters", description="adapters resident on a replica",
                                  tag_keys=("base",)),
        "hits": metrics.Counter("onebase_adapter_cache_hits", description="requests whose adapter was resident",
                                tag_keys=keys),
        "misses": metrics.Counter("onebase_adapter_cache_misses", description="requests that loaded their adapter",
                                  tag_keys=keys),
    }
