"""The catalog: which model names the endpoint serves beyond its bases, and at which revision.

An entry is one servable thing on a base, named by an id requests use as `model`. Its `kind` says
what runs a request for it on a replica (see `replica.LOADERS`): today `adapter` (trained weights
on the shared base); other kinds (e.g. prompt programs) register a loader of their own and reuse
the catalog, the revision switch and the routing unchanged.

Loading a new version stages a new revision; once a replica has warmed it, `commit` makes it the
active one. Requests already running keep the revision they were routed with.
"""

from __future__ import annotations

import time
from typing import Any

from ray import serve

ADAPTER = "adapter"


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
        return {"adapters": list(self.active.values()), "failed": dict(self.failed)}

    def live_keys(self) -> list[str]:
        return [entry_key(e) for e in self.active.values()] + list(self.staged)
