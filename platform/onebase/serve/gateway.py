"""The HTTP gateway (FastAPI ingress): OpenAI-compatible routes, the admin API, auth and limits.

It resolves a request's `model` to a base or a catalog entry and forwards it to the base's
deployment with the entry's multiplexed id (`<id>#<revision>`), so Serve routes it to a replica
that already holds that revision.
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
from ray import serve

from onebase.serve import programs
from onebase.serve.artifacts import AdapterError, check_id, fetch, resolve_registry
from onebase.serve.catalog import ADAPTER
from onebase.serve.config import AdapterRef, ServeArgs
from onebase.serve.schemas import ChatRequest, ClassifyRequest, CompletionRequest, LoadRequest, PromoteRequest, Sampling

log = logging.getLogger("ray.serve")

api = FastAPI(title="onebase", description="one frozen base, many adapters, OpenAI-compatible")


@api.exception_handler(HTTPException)
async def _one_line_errors(request: Request, err: HTTPException) -> JSONResponse:
    # OpenAI clients read error.message; every refusal is one line naming what is wrong.
    return JSONResponse({"error": {"message": err.detail, "type": "invalid_request_error", "code": err.status_code}},
                        status_code=err.status_code)


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
        info = await asyncio.to_thread(lambda: programs.inspect_source(fetch(resolved, self.args.tracking_uri)))
        base = self._pick_base(ref, info)
        entry = {"id": ref.id, "kind": ADAPTER, "source": ref.source, "resolved_source": resolved, "base": base,
                 "method": info.method, "task": info.task, "labels": info.labels, "bytes": info.nbytes,
                 **programs.entry_fields(info, ref.prefix_cache)}
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
                  "kind": e.get("kind", ADAPTER), "task": e["task"], "method": e["method"], "base": e["base"]}
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
            return await self.load_adapter(AdapterRef(id=body.id, source=body.source, base=body.base,
                                                      prefix_cache=body.prefix_cache))
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
