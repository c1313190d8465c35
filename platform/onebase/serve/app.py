"""The Ray Serve application: a gateway (FastAPI ingress), one deployment per base, a catalog.

    Gateway  --(multiplexed_model_id "<adapter>#<revision>")-->  BaseServer (one frozen base each)
        \\--> Catalog (adapter id -> source, base, revision)

A request names a model: a base (the generalist) or an adapter. The gateway resolves an adapter
to its current revision and lets Serve's model multiplexing route it to a replica that already
holds that revision; replicas load adapters on first use (LRU of `max_adapters`). Loading a new
version or moving an alias stages a new revision, warms it on a replica, then switches the
catalog to it: requests already running keep the revision they started with.
"""


# No `from __future__ import annotations`: FastAPI (through serve.ingress) must see real types.
import asyncio
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve

from onebase.serve.artifacts import AdapterError, check_id, fetch, inspect, resolve_registry
from onebase.serve.config import AdapterRef, BaseSpec, LimitSpec, ServeArgs

log = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class Catalog:
    """Adapter id -> {source, base, revision, ...}; staged revisions become active once warmed."""

    def __init__(self) -> None:
        self.active: dict[str, dict[str, Any]] = {}
        self.staged: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.revision = 0

    def stage(self, entry: dict[str, Any]) -> int:
        self.revision += 1
        entry = {**entry, "revision": self.revision, "loaded_at": int(time.time())}
        self.staged[f"{entry['id']}#{self.revision}"] = entry
        return self.revision

    def lookup(self, key: str) -> dict[str, Any] | None:
        adapter_id, _, rev = key.partition("#")
        entry = self.active.get(adapter_id)
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

    def fail(self, adapter_id: str, reason: str) -> None:
        self.failed[adapter_id] = reason

    def remove(self, adapter_id: str) -> bool:
        self.failed.pop(adapter_id, None)
        return self.active.pop(adapter_id, None) is not None

    def resolve(self, adapter_id: str) -> dict[str, Any] | None:
        return self.active.get(adapter_id)

    def listing(self) -> dict[str, Any]:
        return {"adapters": list(self.active.values()), "failed": dict(self.failed)}

    def live_keys(self) -> list[str]:
        return [f"{e['id']}#{e['revision']}" for e in self.active.values()] + list(self.staged)


def _share_batches() -> None:
    """Let this request join batches with requests for other adapters.

    Serve's @serve.batch splits every batch by multiplexed model id, which would run one forward per
    adapter. Each row already carries its adapter (leased above), so this request's context drops
    the id: the batch stays whole and LoRA rows mix in one forward. Only this request's task sees it.
    """
    import dataclasses

    from ray.serve import context

    current = context._get_serve_request_context()
    context._serve_request_context.set(dataclasses.replace(current, multiplexed_model_id=""))


class Resident:
    """What the multiplexed loader returns: an adapter on this replica's engine; unloaded on eviction."""

    def __init__(self, engine, loaded) -> None:
        self.engine, self.loaded = engine, loaded

    def __del__(self) -> None:
        self.engine.unload(self.loaded)


class BaseServer:
    """One replica = one frozen copy of the base + the adapters requests have asked for."""

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
        info = await asyncio.to_thread(lambda: inspect(fetch(entry["resolved_source"], self.tracking_uri)))
        loaded = await asyncio.to_thread(self.engine.load, entry["id"], info)
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

    async def _resident(self):
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return None
        resident = await self.get_adapter(model_id)
        return self.engine.lease(resident.loaded)

    async def warm(self) -> dict[str, Any]:
        """Load the adapter named by the request's model id; report it (or why it cannot load)."""
        try:
            loaded = await self._resident()
        except AdapterError as err:
            return {"error": str(err)}
        try:
            info = loaded.info
            return {"method": info.method, "task": info.task, "labels": info.labels, "bytes": info.nbytes,
                    "load_ms": round(loaded.load_ms, 1)}
        finally:
            self.engine.release(loaded)

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.model_name, "model": self.spec.name, "task": self.engine.task,
                "fingerprint": self.engine.fingerprint, "decoder": self.engine.decoder,
                "resident": sorted({a.id for a in self.engine.adapters.values() if not a.closing})}

    async def classify(self, texts: list[str]) -> dict[str, Any]:
        from onebase.serve.engine import Row

        try:
            loaded = await self._resident()
        except AdapterError as err:
            return {"error": str(err)}
        _share_batches()
        try:
            rows = [Row(loaded, text) for text in texts]
            results = await asyncio.gather(*(self._classify_batch(row) for row in rows))
            failed = next((r for r in results if "error" in r), None)
            return failed or {"data": results}
        finally:
            if loaded:
                self.engine.release(loaded)

    async def complete(self, prompt: str | None, messages: list[dict[str, str]] | None,
                       settings: dict[str, Any]) -> dict[str, Any]:
        try:
            loaded = await self._resident()
        except AdapterError as err:
            return {"error": str(err)}
        _share_batches()
        try:
            row = self._row(loaded, prompt, messages, settings)
            if isinstance(row, dict):
                return row
            return await self._generate_batch(row)
        finally:
            if loaded:
                self.engine.release(loaded)

    async def complete_stream(self, prompt: str | None, messages: list[dict[str, str]] | None,
                              settings: dict[str, Any]):
        """Yields text pieces; a first item {"error": ...} when the request cannot run."""
        try:
            loaded = await self._resident()
        except AdapterError as err:
            yield {"error": str(err)}
            return
        try:
            row = self._row(loaded, prompt, messages, settings)
            if isinstance(row, dict):
                yield row
                return
            pieces = self.engine.stream(row)
            done = object()
            while (piece := await asyncio.to_thread(next, pieces, done)) is not done:
                if piece:
                    yield piece
        finally:
            if loaded:
                self.engine.release(loaded)

    def _row(self, loaded, prompt, messages, settings):
        from onebase.serve.engine import Row

        if self.engine.task != "causal-lm" or (loaded and loaded.info.task != "causal-lm"):
            name = loaded.id if loaded else self.spec.model_name
            return {"error": f"model {name} does not generate text (a classifier: use /v1/classify)"}
        text = prompt if messages is None else self.engine.render_chat(messages, loaded)
        count = self.engine.count_tokens(text)
        if count > self.limits.max_prompt_tokens:
            return {"error": f"prompt is {count} tokens; the limit is {self.limits.max_prompt_tokens}"}
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


# ---- the HTTP gateway --------------------------------------------------------------------------

api = FastAPI(title="onebase", description="one frozen base, many adapters, OpenAI-compatible")


@api.exception_handler(HTTPException)
async def _one_line_errors(request: Request, err: HTTPException) -> JSONResponse:
    # OpenAI clients read error.message; every refusal is one line naming what is wrong.
    return JSONResponse({"error": {"message": err.detail, "type": "invalid_request_error", "code": err.status_code}},
                        status_code=err.status_code)


class Sampling(BaseModel):
    """What completions and chat completions share (OpenAI's defaults)."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int = 16


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class ClassifyRequest(BaseModel):
    model: str
    input: str | list[str]


class LoadRequest(BaseModel):
    id: str
    source: str
    base: str | None = None


class PromoteRequest(BaseModel):
    version: str | int
    alias: str | None = None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def _raise_for(result: dict[str, Any]) -> None:
    if "error" in result:
        raise HTTPException(400, result["error"])


def _usage(results: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}



# Serve admits 5 requests per replica by default: the gateway only awaits, so let it hold many
# (and the bases see enough concurrent requests to fill their batches).
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Gateway:
    def __init__(self, catalog, servers: dict[str, Any], args: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        self.catalog, self.servers = catalog, servers
        self.bases: dict[str, dict[str, Any]] = {}
        self._started = asyncio.Lock()
        self._ready = False

    # ---- auth ---------------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        keys = self.args.auth.keys()
        if keys and _bearer(request) not in keys:
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key>)")

    def check_admin(self, request: Request) -> None:
        token = self.args.auth.admin()
        if not token:
            raise HTTPException(403, "the admin API is off: set auth.admin_token or auth.admin_token_env")
        if _bearer(request) != token:
            raise HTTPException(401, "missing or invalid admin token")

    # ---- start-up: bases and the adapters named in the config ---------------------------------

    async def ready(self) -> None:
        if self._ready:
            return
        async with self._started:
            if self._ready:
                return
            for name, handle in self.servers.items():
                self.bases[name] = await handle.describe.remote()
            for ref in self.args.adapters:
                try:
                    await self.load_adapter(ref)
                except AdapterError as err:  # a bad configured adapter is reported, never fatal
                    log.error(f"adapter {ref.id}: {err}")
                    await self.catalog.fail.remote(ref.id, str(err))
            self._ready = True

    async def load_adapter(self, ref: AdapterRef) -> dict[str, Any]:
        check_id(ref.id)
        if ref.id in self.bases:
            raise AdapterError(f"adapter id {ref.id!r} is the name of a served base")
        resolved = await asyncio.to_thread(self._resolve_source, ref.source)
        info = await asyncio.to_thread(lambda: inspect(fetch(resolved, self.args.tracking_uri)))
        base = self._pick_base(ref, info)
        entry = {"id": ref.id, "source": ref.source, "resolved_source": resolved, "base": base,
                 "method": info.method, "task": info.task, "labels": info.labels, "bytes": info.nbytes}
        rev = await self.catalog.stage.remote(entry)
        key = f"{ref.id}#{rev}"
        report = await self.servers[base].options(multiplexed_model_id=key).warm.remote()
        if "error" in report:
            await self.catalog.discard.remote(key, report["error"])
            raise AdapterError(report["error"])
        return await self.catalog.commit.remote(key)

    def _resolve_source(self, source: str) -> str:
        """Registry aliases are pinned to a version at load time: a revision never changes under a request."""
        if source.startswith("models:/") and "@" in source:
            name, version = resolve_registry(source, self.args.tracking_uri)
            return f"models:/{name}/{version}"
        return source

    def _pick_base(self, ref: AdapterRef, info) -> str:
        if ref.base:
            if ref.base not in self.bases:
                raise AdapterError(f"base {ref.base!r} is not served (served: {', '.join(self.bases)})")
            return ref.base
        if info.base_fingerprint:
            for name, base in self.bases.items():
                if base["fingerprint"] == info.base_fingerprint:
                    return name
            raise AdapterError(f"adapter {ref.id}: trained on a base that is not served (sha256 "
                               f"{info.base_fingerprint[:12]}...; served: "
                               + ", ".join(f"{n} {b['fingerprint'][:12]}..." for n, b in self.bases.items()) + ")")
        fits = [n for n, b in self.bases.items() if info.task != "causal-lm" or b["decoder"]]
        if len(fits) != 1:
            raise AdapterError(f"adapter {ref.id}: no base fingerprint in the adapter; name the base "
                               f"(one of {', '.join(self.bases)})")
        return fits[0]

    async def route(self, model: str):
        """The base deployment handle for a model name, with the adapter's multiplexed id."""
        await self.ready()
        if model in self.servers:
            return self.servers[model]
        entry = await self.catalog.resolve.remote(model)
        if entry is None:
            raise HTTPException(404, f"model {model!r} not found (GET /v1/models lists the served models)")
        return self.servers[entry["base"]].options(multiplexed_model_id=f"{model}#{entry['revision']}")

    # ---- OpenAI-compatible API -----------------------------------------------------------------

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        await self.ready()
        listing = await self.catalog.listing.remote()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "onebase", "kind": "base",
                 "task": b["task"], "base": name} for name, b in self.bases.items()]
        data += [{"id": e["id"], "object": "model", "created": e["loaded_at"], "owned_by": "onebase",
                  "kind": "adapter", "task": e["task"], "method": e["method"], "base": e["base"]}
                 for e in listing["adapters"]]
        return {"object": "list", "data": data}

    @api.post("/v1/classify")
    async def classify(self, body: ClassifyRequest, request: Request) -> dict[str, Any]:
        self.check_key(request)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > self.args.limits.max_inputs:
            raise HTTPException(400, f"input: give 1 to {self.args.limits.max_inputs} texts")
        handle = await self.route(body.model)
        result = await handle.classify.remote(texts)
        _raise_for(result)
        return {"object": "list", "model": body.model,
                "data": [{"index": i, **r} for i, r in enumerate(result["data"])]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_key(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        settings = self._settings(body.max_tokens, body)
        if not prompts:
            raise HTTPException(400, "prompt: empty")
        handle = await self.route(body.model)
        if body.stream:
            if len(prompts) != 1:
                raise HTTPException(400, "stream: one prompt per streamed request")
            return await self._stream(handle, body.model, prompts[0], None, settings, chat=False)
        results = await asyncio.gather(*(handle.complete.remote(p, None, settings) for p in prompts))
        for result in results:
            _raise_for(result)
        choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                   for i, r in enumerate(results)]
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": _usage(results)}

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self.check_key(request)
        settings = self._settings(body.max_completion_tokens or body.max_tokens or 256, body)
        messages = [m.model_dump() for m in body.messages]
        handle = await self.route(body.model)
        if body.stream:
            return await self._stream(handle, body.model, None, messages, settings, chat=True)
        result = await handle.complete.remote(None, messages, settings)
        _raise_for(result)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "usage": _usage([result]),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"]}]}

    def _settings(self, max_tokens: int, body: Sampling) -> dict[str, Any]:
        if body.n != 1:
            raise HTTPException(400, "n: only n=1 is supported")
        if not 1 <= max_tokens <= self.args.limits.max_tokens:
            raise HTTPException(400, f"max_tokens: give 1 to {self.args.limits.max_tokens}")
        return {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p}

    async def _stream(self, handle, model: str, prompt, messages, settings, chat: bool):
        pieces = handle.options(stream=True).complete_stream.remote(prompt, messages, settings)
        try:
            first = await pieces.__anext__()  # errors come first: answer them as HTTP errors
        except StopAsyncIteration:
            first = ""
        if isinstance(first, dict):
            _raise_for(first)
        stream_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

        def event(text: str | None, finish: str | None) -> str:
            if chat:
                delta = {"content": text} if text is not None else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
                obj = "text_completion"
            return "data: " + json.dumps({"id": stream_id, "object": obj, "created": int(time.time()),
                                          "model": model, "choices": [choice]}) + "\n\n"

        async def events():
            if chat:
                yield "data: " + json.dumps({"id": stream_id, "object": "chat.completion.chunk", "model": model,
                                             "created": int(time.time()),
                                             "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                          "finish_reason": None}]}) + "\n\n"
            yield event(first, None)
            async for piece in pieces:
                yield event(piece, None)
            yield event(None, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- admin: hot swap -------------------------------------------------------------------------

    @api.get("/admin/adapters")
    async def list_adapters(self, request: Request) -> dict[str, Any]:
        self.check_admin(request)
        await self.ready()
        listing = await self.catalog.listing.remote()
        resident = {name: (await h.describe.remote())["resident"] for name, h in self.servers.items()}
        return {**listing, "bases": self.bases, "resident_on_a_replica": resident}

    @api.post("/admin/adapters", status_code=201)
    async def load(self, body: LoadRequest, request: Request) -> dict[str, Any]:
        self.check_admin(request)
        await self.ready()
        try:
            return await self.load_adapter(AdapterRef(id=body.id, source=body.source, base=body.base))
        except AdapterError as err:
            raise HTTPException(400, str(err)) from None

    @api.delete("/admin/adapters/{adapter_id}")
    async def unload(self, adapter_id: str, request: Request) -> dict[str, Any]:
        self.check_admin(request)
        await self.ready()
        if not await self.catalog.remove.remote(adapter_id):
            raise HTTPException(404, f"adapter {adapter_id!r} is not loaded")
        return {"id": adapter_id, "unloaded": True}

    @api.post("/admin/adapters/{adapter_id}/promote")
    async def promote(self, adapter_id: str, body: PromoteRequest, request: Request) -> dict[str, Any]:
        """Point the adapter at another registry version: moves the alias (models:/name@alias sources)
        or the pinned version (models:/name/N), warms it, then switches requests over."""
        self.check_admin(request)
        await self.ready()
        entry = await self.catalog.resolve.remote(adapter_id)
        if entry is None:
            raise HTTPException(404, f"adapter {adapter_id!r} is not loaded")
        source = entry["source"]
        if not source.startswith("models:/"):
            raise HTTPException(400, f"adapter {adapter_id}: promote needs a registry source (models:/...), "
                                     f"not {source}")
        ref = source.removeprefix("models:/")
        name, at, alias = ref.partition("@")
        name = name if at else ref.rpartition("/")[0]
        alias = body.alias or alias
        try:
            if alias:
                await asyncio.to_thread(self._move_alias, name, alias, str(body.version))
                new_source = f"models:/{name}@{alias}"
            else:
                new_source = f"models:/{name}/{body.version}"
            return await self.load_adapter(AdapterRef(id=adapter_id, source=new_source, base=entry["base"]))
        except AdapterError as err:
            raise HTTPException(400, str(err)) from None

    def _move_alias(self, name: str, alias: str, version: str) -> None:
        from mlflow.exceptions import MlflowException

        from onebase.serve.artifacts import _default_uri
        from onebase.tracking.mlflow_run import client

        try:
            client(self.args.tracking_uri or _default_uri()).set_registered_model_alias(name, alias, version)
        except MlflowException as err:
            raise AdapterError(f"promote {name}@{alias} -> {version}: {err.message.splitlines()[0]}") from None

    @api.get("/healthz")
    async def health(self) -> dict[str, Any]:
        await self.ready()
        return {"status": "ok", "bases": list(self.bases)}


def server_deployment(max_adapters: int):
    """BaseServer with Serve's multiplexed adapter loader sized for this base."""

    class Server(BaseServer):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_adapter(self, model_id: str) -> Resident:
            return await self._load(model_id)

    Server.__name__ = Server.__qualname__ = "BaseServer"
    return serve.deployment(Server, ray_actor_options={"num_cpus": 1})


def build(args: dict[str, Any]):
    """The application builder named in Serve configs: `import_path: onebase.serve.app:build`."""
    parsed = ServeArgs.model_validate(args)
    catalog = Catalog.bind()
    servers = {}
    for base in parsed.bases:
        deployment = server_deployment(base.max_adapters).options(
            name=f"base-{base.model_name}", num_replicas=base.replicas,
            ray_actor_options={"num_cpus": base.cpus, "num_gpus": base.gpus},
            max_ongoing_requests=max(64, 4 * base.max_batch_size))
        servers[base.model_name] = deployment.bind(base.model_dump(), catalog, parsed.tracking_uri,
                                                   parsed.limits.model_dump())
    return Gateway.bind(catalog, servers, parsed.model_dump())
