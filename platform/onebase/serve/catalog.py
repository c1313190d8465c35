"""The catalog: which model names the endpoint serves beyond its bases, and at which revision.

An entry is one servable thing on a base, named by an id requests use as `model`. Its `kind` says
what runs a request for it on a replica (see `replica.LOADERS`): today `adapter` (trained weights
on the shared base); other kinds (e.g. prompt programs) register a loader of their own and reuse
the catalog, the revision switch and the routing unchanged.

Loading a new version stages a new revision; once a replica has warmed it, `commit` makes it the
active one. Requests already running keep the revision they were routed with.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from ray import serve

ADAPTER = "adapter"
REPORT_TTL_S = 10  # a replica that has not reported for this long is gone


def entry_key(entry: dict[str, Any]) -> str:
    """The multiplexed model id of an entry's revision: `<id>#<revision>`."""
    return f"{entry['id']}#{entry['revision']}"


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class Catalog:
    """Entry id -> {kind, source, base, revision, ...}; staged revisions become active once warmed."""

    def __init__(self) -> None:
        self.active: dict[str, dict[str, Any]] = {}
        self.staged: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.revision = 0
        self.replicas: dict[str, dict[str, Any]] = {}  # replica id -> {base, at, held: {key: figures}}

    def stage(self, entry: dict[str, Any]) -> int:
        self.revision += 1
        entry = {"kind": ADAPTER, **entry, "revision": self.revision, "loaded_at": int(time.time())}
        self.staged[entry_key(entry)] = entry
        return self.revision

    def lookup(self, key: str) -> dict[str, Any] | None:
        entry_id, _, rev = key.partition("#")
        entry = self.active.get(entry_id)
        if entry and str(entry["revision"]) == rev:
            return entry
        return self.staged.get(key)

    def commit(self, key: str) -> dict[str, Any]:
        entry = self.staged.pop(key)
        self.active[entry["id"]] = entry
        self.failed.pop(entry["id"], None)
        return entry

    def discard(self, key: str, reason: str | None = None) -> None:
        entry = self.staged.pop(key, None)
        if entry and reason and entry["id"] not in self.active:
            self.failed[entry["id"]] = reason

    def fail(self, entry_id: str, reason: str) -> None:
        self.failed[entry_id] = reason

    def remove(self, entry_id: str) -> bool:
        self.failed.pop(entry_id, None)
        return self.active.pop(entry_id, None) is not None

    def resolve(self, entry_id: str) -> dict[str, Any] | None:
        return self.active.get(entry_id)

    def listing(self) -> dict[str, Any]:
        """Active entries, each with the replicas holding its revision and its request figures."""
        return {"adapters": [{**e, **self._figures(entry_key(e))} for e in self.active.values()],
                "failed": dict(self.failed)}

    # ---- what the replicas hold (each reports every second) ----------------------------------

    def report(self, replica: str, base: str, held: dict[str, dict[str, Any]]) -> None:
        self.replicas[replica] = {"base": base, "at": time.time(), "held": held}

    def active_keys(self, base: str) -> list[str]:
        return [entry_key(e) for e in self.active.values() if e["base"] == base]

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
        return [entry_key(e) for e in self.active.values()] + list(self.staged)
