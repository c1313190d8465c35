"""A base replica: one frozen copy of the base, and the catalog entries requests have asked for.

Requests name an entry by its multiplexed model id (`<id>#<revision>`); Serve routes them to a
replica that already holds it, and `get_adapter` (Serve's multiplexed LRU) loads it on first use
through the loader of the entry's kind (`LOADERS`). Every request leases what it runs on for its
whole duration (`_leased`), so an unloaded or replaced revision is freed only once no request uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray import serve

from onebase.serve import programs
from onebase.serve.artifacts import AdapterError, fetch, inspect
from onebase.serve.catalog import ADAPTER
from onebase.serve.config import BaseSpec, LimitSpec

log = logging.getLogger("ray.serve")


def _share_batches() -> None:
    """Let this request join batches with requests for other adapters.

    Serve's @serve.batch splits every batch by multiplexed model id, which would run one forward per
    adapter. Each row already carries its adapter (leased), so this request's context drops the id:
    the batch stays whole and LoRA rows mix in one forward. Only this request's task sees it.
    """
    from ray.serve import context

    current = context._get_serve_request_context()
    context._serve_request_context.set(dataclasses.replace(current, multiplexed_model_id=""))


class Resident:
    """What the multiplexed loader returns: an entry on this replica's engine; unloaded on eviction."""

    def __init__(self, engine, loaded) -> None:
        self.engine, self.loaded = engine, loaded

    def __del__(self) -> None:
        self.engine.unload(self.loaded)


async def _load_adapter(server: BaseServer, entry: dict[str, Any]):
    info = await asyncio.to_thread(lambda: inspect(fetch(entry["resolved_source"], server.tracking_uri)))
    return await asyncio.to_thread(server.engine.load, entry["id"], info)


# What runs a request for an entry of each kind: a loader that puts the entry on this replica's
# engine and returns its `Loaded`. A new kind of catalog entry registers its loader here.
LOADERS: dict[str, Callable[[BaseServer, dict[str, Any]], Awaitable[Any]]] = {ADAPTER: _load_adapter,
                                                                               programs.PROGRAM: programs.load}


class BaseServer:
    """One replica = one frozen copy of the base + the entries requests have asked for."""

    def __init__(self, base: dict[str, Any], catalog, tracking_uri: str | None, limits: dict[str, Any]) -> None:
        from onebase.serve.engine import BaseEngine

        self.spec = BaseSpec.model_validate(base)
        self.limits = LimitSpec.model_validate(limits)
        self.engine = BaseEngine(self.spec.name, self.spec.task, threads=self.spec.threads)
        self.catalog, self.tracking_uri = catalog, tracking_uri
        for batched in (self._classify_batch, self._generate_batch):
            batched.set_max_batch_size(self.spec.max_batch_size)
            batched.set_batch_wait_timeout_s(self.spec.batch_wait_ms / 1000)
        self._reaper: asyncio.Task | None = None

    async def get_adapter(self, model_id: str) -> Resident:
        raise NotImplementedError  # replaced per base by server_deployment (the LRU size is per base)

    async def _load(self, model_id: str) -> Resident:
        entry = await self.catalog.lookup.remote(model_id)
        if entry is None:
            raise AdapterError(f"adapter {model_id.partition('#')[0]}: not in the catalog")
        loader = LOADERS.get(entry.get("kind", ADAPTER))
        if loader is None:
            raise AdapterError(f"{entry['id']}: this replica cannot serve entries of kind {entry['kind']!r}")
        loaded = await loader(self, entry)
        loaded.tag = model_id
        self._start_reaper()
        return Resident(self.engine, loaded)

    def _start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Free adapters whose revision was unloaded or replaced, once a request no longer uses them.

        Serve's LRU would free them only when the slot is needed; a revision is reaped after two
        passes out of the catalog, so a request routed just before a switch still finds it."""
        stale: set[str] = set()
        while True:
            await asyncio.sleep(2)
            try:
                live = set(await self.catalog.live_keys.remote())
                gone = {a.tag for a in self.engine.adapters.values() if a.tag not in live}
                for loaded in list(self.engine.adapters.values()):
                    if loaded.tag in gone & stale:
                        self.engine.unload(loaded)
                stale = gone
            except Exception:  # the reaper must never take the replica down
                log.exception("adapter reaper")

    @contextlib.asynccontextmanager
    async def _leased(self) -> AsyncIterator[Any]:
        """The entry this request names (None: the bare base), loaded if needed and leased until the
        request is done. Raises AdapterError when it cannot be loaded or was unloaded meanwhile."""
        model_id = serve.get_multiplexed_model_id()
        loaded = None
        if model_id:
            resident = await self.get_adapter(model_id)
            loaded = self.engine.lease(resident.loaded)
        try:
            yield loaded
        finally:
            if loaded is not None:
                self.engine.release(loaded)

    async def warm(self) -> dict[str, Any]:
        """Load the adapter named by the request's model id; report it (or why it cannot load)."""
        try:
            async with self._leased() as loaded:
                info = loaded.info
                return {"method": info.method, "task": info.task, "labels": info.labels, "bytes": info.nbytes,
                        "load_ms": round(loaded.load_ms, 1)}
        except AdapterError as err:
            return {"error": str(err)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.model_name, "model": self.spec.name, "task": self.engine.task,
                "fingerprint": self.engine.fingerprint, "decoder": self.engine.decoder,
                "resident": sorted({a.id for a in self.engine.adapters.values() if not a.closing})}

    async def classify(self, texts: list[str]) -> dict[str, Any]:
        from onebase.serve.engine import Row

        try:
            async with self._leased() as loaded:
                _share_batches()
                results = await asyncio.gather(*(self._classify_batch(Row(loaded, text)) for text in texts))
        except AdapterError as err:
            return {"error": str(err)}
        failed = next((r for r in results if "error" in r), None)
        return failed or {"data": results}

    async def complete(self, prompt: str | None, messages: list[dict[str, str]] | None,
                       settings: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self._leased() as loaded:
                _share_batches()
                row = self._row(loaded, prompt, messages, settings)
                return await self._generate_batch(row)
        except AdapterError as err:
            return {"error": str(err)}

    async def complete_stream(self, prompt: str | None, messages: list[dict[str, str]] | None,
                              settings: dict[str, Any]):
        """Yields text pieces; a first item {"error": ...} when the request cannot run."""
        try:
            async with self._leased() as loaded:
                pieces = self.engine.stream(self._row(loaded, prompt, messages, settings))
                done = object()
                while (piece := await asyncio.to_thread(next, pieces, done)) is not done:
                    if piece:
                        yield piece
        except AdapterError as err:
            yield {"error": str(err)}

    def _row(self, loaded, prompt, messages, settings):
        from onebase.serve.engine import Row

        if self.engine.task != "causal-lm" or (loaded and loaded.info.task != "causal-lm"):
            name = loaded.id if loaded else self.spec.model_name
            raise AdapterError(f"model {name} does not generate text (a classifier: use /v1/classify)")
        text = prompt if messages is None else self.engine.render_chat(messages, loaded)
        count = self.engine.count_tokens(text)
        if count > self.limits.max_prompt_tokens:
            raise AdapterError(f"prompt is {count} tokens; the limit is {self.limits.max_prompt_tokens}")
        return Row(loaded, text, max_tokens=settings["max_tokens"], temperature=settings["temperature"],
                   top_p=settings["top_p"])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, rows):
        return await asyncio.to_thread(self._safe, self.engine.classify, rows)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, rows):
        return await asyncio.to_thread(self._safe, self.engine.generate, rows)

    @staticmethod
    def _safe(fn, rows):
        try:
            return fn(rows)
        except AdapterError as err:
            return [{"error": str(err)}] * len(rows)


def server_deployment(max_adapters: int):
    """BaseServer with Serve's multiplexed adapter loader sized for this base."""

    class Server(BaseServer):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_adapter(self, model_id: str) -> Resident:
            return await self._load(model_id)

    Server.__name__ = Server.__qualname__ = "BaseServer"
    return serve.deployment(Server, ray_actor_options={"num_cpus": 1})
