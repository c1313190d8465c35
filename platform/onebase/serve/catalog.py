"""The catalog: which model names the endpoint serves beyond its bases, and at which revision.

An entry is one servable thing on a base, named by an id requests use as `model`. Its `kind` says
what runs a request for it on a replica (see `replica.LOADERS`): today `adapter` (trained weights
on the shared base); other kinds (e.g. prompt programs) register a loader of their own and reuse
the catalog, the revision switch and the routing unchanged.

Loading a new version stages a new revision; once a replica has warmed it, `commit` makes it the
active one. Requests already running keep the revision they were routed with.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

ADAPTER = "adapter"
REPORT_TTL_S = 10  # a replica that has not reported for this long is gone


def model_key(entry_id: str, revision: int | str) -> str:
    """The multiplexed model id of one revision of an entry: `<id>#<revision>`."""
    return f"{entry_id}#{revision}"


def entry_id_of(key: str) -> str:
    """The entry id of a multiplexed model id (`<id>#<revision>` -> `<id>`)."""
    return key.partition("#")[0]


@dataclass(frozen=True)
class CatalogEntry:
    """One servable thing on a base, as the gateway checked it. Replicas load exactly these bytes:
    `digest` is the sha256 of the checked files (onebase.serve.artifacts.content_digest) and `pin`
    the S3 objects' ETags as listed when checked (None for other sources)."""

    id: str
    source: str  # as given (a registry alias stays an alias here; `resolved_source` pins the version)
    resolved_source: str
    base: str
    method: str
    task: str
    labels: list[str] | None = None
    bytes: int = 0
    kind: str = ADAPTER
    prefix_cache: bool = True  # prompt programs: keep the demo prefix's KV cache
    digest: str | None = None
    pin: dict[str, str] | None = None
    revision: int = 0
    loaded_at: int = 0

    @property
    def key(self) -> str:
        return model_key(self.id, self.revision)

    def public(self) -> dict[str, Any]:
        """What the admin API shows."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "pin"}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class Catalog:
    """Entry id -> its active CatalogEntry; staged revisions become active once warmed."""

    def __init__(self) -> None:
        self.active: dict[str, CatalogEntry] = {}
        self.staged: dict[str, CatalogEntry] = {}  # by key
        self.failed: dict[str, str] = {}
        self.revision = 0
        self.replicas: dict[str, dict[str, Any]] = {}  # replica id -> {base, at, held: {key: figures}}

    def stage(self, entry: CatalogEntry) -> CatalogEntry:
        self.revision += 1
        entry = dataclasses.replace(entry, revision=self.revision, loaded_at=int(time.time()))
        self.staged[entry.key] = entry
        return entry

    def lookup(self, key: str) -> CatalogEntry | None:
        entry = self.active.get(entry_id_of(key))
        if entry and entry.key == key:
            return entry
        return self.staged.get(key)

    def commit(self, key: str) -> CatalogEntry:
        entry = self.staged.pop(key)
        self.active[entry.id] = entry
        self.failed.pop(entry.id, None)
        return entry

    def discard(self, key: str, reason: str | None = None) -> None:
        entry = self.staged.pop(key, None)
        if entry and reason and entry.id not in self.active:
            self.failed[entry.id] = reason

    def fail(self, entry_id: str, reason: str) -> None:
        self.failed[entry_id] = reason

    def remove(self, entry_id: str) -> bool:
        self.failed.pop(entry_id, None)
        return self.active.pop(entry_id, None) is not None

    def resolve(self, entry_id: str) -> CatalogEntry | None:
        return self.active.get(entry_id)

    def listing(self) -> dict[str, Any]:
        """Active entries, each with the replicas holding its revision and its request figures."""
        return {"adapters": [{**e.public(), **self._figures(e.key)} for e in self.active.values()],
                "failed": dict(self.failed)}

    # ---- what the replicas hold (each reports every second) ----------------------------------

    def report(self, replica: str, base: str, held: dict[str, dict[str, Any]]) -> None:
        self.replicas[replica] = {"base": base, "at": time.time(), "held": held}

    def active_keys(self, base: str) -> list[str]:
        return [e.key for e in self.active.values() if e.base == base]

    def holders(self, key: str) -> list[str]:
        return [r for r, report in self._live_replicas().items() if key in report["held"]]

    def replica_count(self, base: str) -> int:
        return sum(1 for report in self._live_replicas().values() if report["base"] == base)

    def _live_replicas(self) -> dict[str, dict[str, Any]]:
        cutoff = time.time() - REPORT_TTL_S
        return {r: report for r, report in self.replicas.items() if report["at"] >= cutoff}

    def _figures(self, key: str) -> dict[str, Any]:
        held = {r: report["held"][key] for r, report in self._live_replicas().items() if key in report["held"]}
        latencies = [ms for figures in held.values() for ms in figures["latencies_ms"]]
        per_replica = {r: {k: v for k, v in f.items() if k not in ("id", "latencies_ms")} for r, f in held.items()}
        return {"replicas": per_replica,
                "requests": sum(f["requests"] for f in held.values()),
                "errors": sum(f["errors"] for f in held.values()),
                "p50_ms": round(statistics.median(latencies), 1) if latencies else None}

    def live_keys(self) -> list[str]:
        return [e.key for e in self.active.values()] + list(self.staged)
