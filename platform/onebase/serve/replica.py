"""A base replica: one frozen copy of the base, and the catalog entries requests have asked for.

Requests name an entry by its multiplexed model id (`<id>#<revision>`); Serve routes them to a
replica that already holds it, and `get_adapter` (Serve's multiplexed LRU) loads it on first use
through the loader of the entry's kind (`LOADERS`). Every request leases what it runs on for its
whole duration (`_leased`), so an unloaded or replaced revision is freed only once no request uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray import serve

from onebase.serve import programs
from onebase.serve.artifacts import AdapterError, fetch_checked, inspect
from onebase.serve.catalog import ADAPTER, CatalogEntry, entry_id_of
from onebase.serve.config import BaseSpec, LimitSpec
from onebase.serve.scheduler import Scheduler
from onebase.serve.stats import EntryStats, ReplicaStats

log = logging.getLogger("ray.serve")


class Resident:
    """What the multiplexed loader returns: an entry on this replica's engine; unloaded on eviction."""

    def __init__(self, engine, loaded) -> None:
        self.engine, self.loaded = engine, loaded

    def __del__(self) -> None:
        self.engine.unload(self.loaded)


async def _load_adapter(server: BaseServer, entry: CatalogEntry):
    info = await asyncio.to_thread(lambda: inspect(fetch_checked(entry.resolved_source, entry.digest,
                                                                 server.tracking_uri, entry.pin)))
    return await asyncio.to_thread(server.engine.load, entry.id, info)


# What runs a request for an entry of each kind: a loader that puts the entry on this replica's
# engine and returns its `Loaded`. A new kind of catalog entry registers its loader here.
LOADERS: dict[str, Callable[[BaseServer, CatalogEntry], Awaitable[Any]]] = {ADAPTER: _load_adapter,
                                                                               programs.PROGRAM: programs.load}


class BaseServer:
    """One replica = one frozen copy of the base + the entries requests have asked for."""

    def __init__(self, base: dict[str, Any], catalog, tracking_uri: str | None, limits: dict[str, Any]) -> None:
        from onebase.serve.engine import BaseEngine

        self.spec = BaseSpec.model_validate(base)
        self.limits = LimitSpec.model_validate(limits)
        self.engine = BaseEngine(self.spec.name, self.spec.task, threads=self.spec.threads, dtype=self.spec.dtype,
                                 packed_weights=self.spec.packed_weights)
        self.scheduler = Scheduler(self.engine, self.spec.max_batch_size, self.spec.max_queue,
                                   self.spec.batch_wait_ms / 1000, kv_tokens=self.limits.kv_cache_tokens,
                                   prefix_tokens=self.limits.prefix_cache_tokens,
                                   prefill_thread=self.spec.prefill_thread)
        self.catalog, self.tracking_uri = catalog, tracking_uri
        self._reaper: asyncio.Task | None = None
        self.stats = ReplicaStats(self.spec.model_name)
        self.replica_id = _replica_id()
        self._closing = False

    def __del__(self) -> None:
        """Serve calls this first when the replica shuts down, then unloads the adapters it holds: the
        catalog sync stops here, so it does not load them again meanwhile."""
        self._closing = True

    async def get_adapter(self, model_id: str) -> Resident:
        raise NotImplementedError  # replaced per base by server_deployment (the LRU size is per base)

    async def _load(self, model_id: str) -> Resident:
        entry = await self.catalog.lookup.remote(model_id)
        if entry is None:
            raise AdapterError(f"adapter {entry_id_of(model_id)}: not in the catalog")
        loader = LOADERS.get(entry.kind)
        if loader is None:
            raise AdapterError(f"{entry.id}: this replica cannot serve entries of kind {entry.kind!r}")
        loaded = await loader(self, entry)
        loaded.tag = model_id
        self._start_reaper()
        return Resident(self.engine, loaded)

    def _start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._sync())

    async def check_health(self) -> None:
        """Serve calls this on every replica from its start: it starts the catalog sync loop."""
        self._start_reaper()

    async def _sync(self) -> None:
        """Every second: report what this replica holds (and its request figures) to the catalog, load
        the entries of this base it does not hold yet (an admin load reaches every replica), and free
        revisions that were unloaded or replaced once no request uses them.

        Serve's LRU would free them only when the slot is needed; a revision is reaped after two
        passes out of the catalog, so a request routed just before a switch still finds it."""
        stale: set[str] = set()
        while True:
            await asyncio.sleep(1)
            if self._closing:
                return
            try:
                await self._report()
                live = set(await self.catalog.live_keys.remote())
                gone = {a.tag for a in self.engine.adapters.values() if a.tag not in live}
                for loaded in list(self.engine.adapters.values()):
                    if loaded.tag in gone & stale:
                        self.engine.unload(loaded)
                stale = gone
                await self._preload()
            except Exception:  # the sync loop must never take the replica down
                log.exception("catalog sync")

    async def _report(self) -> None:
        held = {a.tag: {"id": a.id, "load_ms": round(a.load_ms, 1),
                        **self.stats.entries.get(a.tag, EntryStats()).summary()}
                for a in self.engine.adapters.values() if not a.closing}
        self.stats.resident(len(held))
        await self.catalog.report.remote(self.replica_id, self.spec.model_name, held)

    async def _preload(self) -> None:
        held = {a.tag for a in self.engine.adapters.values() if not a.closing}
        for key in await self.catalog.active_keys.remote(self.spec.model_name):
            if self._closing:
                return
            if key in held or len(held) >= self.spec.max_adapters:
                continue
            try:
                await self.get_adapter(key)  # through Serve's multiplexing: the router learns we hold it
                held.add(key)
            except AdapterError as err:
                log.warning(f"preload {key}: {err}")

    @contextlib.asynccontextmanager
    async def _leased(self, count: bool = True) -> AsyncIterator[Any]:
        """The entry this request names (None: the bare base), loaded if needed and leased until the
        request is done. Raises AdapterError when it cannot be loaded or was unloaded meanwhile."""
        model_id = serve.get_multiplexed_model_id()
        started, failed, loaded = time.perf_counter(), True, None
        try:
            if model_id:
                if count:  # a warm-up (count=False) is not a request: no cache hit or miss
                    self.stats.lookup(model_id, hit=any(a.tag == model_id for a in self.engine.adapters.values()))
                resident = await self.get_adapter(model_id)
                loaded = self.engine.lease(resident.loaded)
            yield loaded
            failed = False
        finally:
            if loaded is not None:
                self.engine.release(loaded)
            if count:
                self.stats.request(model_id or self.spec.model_name, time.perf_counter() - started, failed)

    async def warm(self) -> dict[str, Any]:
        """Load the adapter named by the request's model id; report it (or why it cannot load)."""
        try:
            async with self._leased(count=False) as loaded:
                info = loaded.info
                report = {"method": info.method, "task": info.task, "labels": info.labels, "bytes": info.nbytes,
                          "load_ms": round(loaded.load_ms, 1)}
        except AdapterError as err:
            return {"error": str(err)}
        await self._report()  # the catalog knows at once that this replica holds it
        return report

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.model_name, "model": self.spec.name, "task": self.engine.task,
                "fingerprint": self.engine.fingerprint, "fingerprints": sorted(self.engine.fingerprints),
                "decoder": self.engine.decoder,
                "resident": sorted({a.id for a in self.engine.adapters.values() if not a.closing}),
                "decoding": self.scheduler.load()}

    async def predict(self, task: str, texts: list[str], contexts: list[str] | None = None) -> dict[str, Any]:
        """A non-generating head's answer per text (`contexts`: extractive QA, `texts` are the questions)."""
        from onebase.serve.engine import Row

        contexts = contexts or [None] * len(texts)
        try:
            async with self._leased() as loaded:
                if programs.is_program(loaded):
                    return await programs.classify(self, loaded, texts, task)
                rows = [Row(loaded, text, context=context) for text, context in zip(texts, contexts)]
                return {"data": await self.scheduler.predict(rows, task)}
        except AdapterError as err:
            return _refusal(err)

    async def complete(self, prompt: str | None, messages: list[dict[str, str]] | None,
                       settings: dict[str, Any]) -> dict[str, Any]:
        """{"choices": [one result per sample (n)]}, or {"error": ..., "status": ...}."""
        try:
            async with self._leased() as loaded:
                if programs.is_program(loaded):
                    return {"choices": [await programs.complete(self, loaded, prompt, messages)]}
                seqs = self._sequences(loaded, prompt, messages, settings)
                results: list[dict[str, Any]] = [{}] * len(seqs)
                async for index, item in self.scheduler.generate(seqs, stream=False):
                    if isinstance(item, dict):
                        results[index] = item
        except AdapterError as err:
            return _refusal(err)
        failed = next((r for r in results if "error" in r), None)
        return {**failed, "status": 500} if failed else {"choices": results}

    async def complete_stream(self, prompt: str | None, messages: list[dict[str, str]] | None,
                              settings: dict[str, Any]):
        """Yields {"index": i, "text": piece, "logprobs": its tokens' logprobs or None} as sample i produces
        text and {"index": i, "final": result} once it is done (n samples interleaved); a first item
        {"error": ...} when it cannot run."""
        try:
            async with self._leased() as loaded:
                if programs.is_program(loaded):  # a program answers whole: one piece, then the result
                    result = await programs.complete(self, loaded, prompt, messages)
                    yield {"index": 0, "text": result["text"]}
                    yield {"index": 0, "final": result}
                    return
                seqs = self._sequences(loaded, prompt, messages, settings)
                async for index, item in self.scheduler.generate(seqs):
                    yield {"index": index, "final": item} if isinstance(item, dict) else \
                        {"index": index, "text": item.text, "logprobs": item.logprobs}
        except AdapterError as err:
            yield _refusal(err)

    def _sequences(self, loaded, prompt, messages, settings) -> list:
        """The request's n sequences (a seed gives sample i the seed + i: reproducible, yet distinct)."""
        from onebase.serve.engine import Row

        if self.engine.task != "causal-lm" or (loaded and loaded.info.task != "causal-lm"):
            name = loaded.id if loaded else self.spec.model_name
            raise AdapterError(f"model {name} does not generate text (a classifier: use /v1/classify)")
        text = prompt if messages is None else self.engine.render_chat(messages, loaded)
        count = self.engine.count_tokens(text)
        if count > self.limits.max_prompt_tokens:
            raise AdapterError(f"prompt is {count} tokens; the limit is {self.limits.max_prompt_tokens}")
        seed = settings.get("seed")
        seqs = [self.engine.sequence(Row(loaded, text, max_tokens=settings["max_tokens"],
                                         temperature=settings["temperature"], top_p=settings["top_p"],
                                         stop=tuple(settings.get("stop") or ()), logprobs=settings.get("logprobs"),
                                         seed=None if seed is None else seed + i))
                for i in range(settings.get("n", 1))]
        too_large = self.scheduler.batcher.kv.alone_too_large(seqs[0])  # the n samples reserve alike
        if too_large:
            raise AdapterError(too_large)
        return seqs


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica
        return "local"


def _refusal(err: AdapterError) -> dict[str, Any]:
    return {"error": str(err), "status": getattr(err, "status", 400)}


def server_deployment(max_adapters: int):
    """BaseServer with Serve's multiplexed adapter loader sized for this base."""

    class Server(BaseServer):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_adapter(self, model_id: str) -> Resident:
            return await self._load(model_id)

    Server.__name__ = Server.__qualname__ = "BaseServer"
    return serve.deployment(Server, ray_actor_options={"num_cpus": 1})
