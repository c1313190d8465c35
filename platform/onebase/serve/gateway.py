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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from onebase.serve import programs
from onebase.serve.artifacts import AdapterError, check_id, content_digest, fetch, resolve_registry, s3_listing
from onebase.serve.catalog import CatalogEntry, model_key
from onebase.serve.config import AdapterRef, ServeArgs
from onebase.serve.openai_format import Chunks, chat_choice, completion_choice, usage
from onebase.serve.schemas import (
    AnswerRequest,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    LoadRequest,
    PromoteRequest,
    Sampling,
    TagRequest,
)

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


@api.exception_handler(RequestValidationError)
async def _one_line_validation(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
    return await _one_line_errors(request, HTTPException(400, f"{where}: {first.get('msg', 'invalid')}"))


def _raise_for(result: dict[str, Any]) -> None:
    if "error" in result:
        raise HTTPException(result.get("status", 400), result["error"])


STOP_LIMIT, STOP_CHARS, TOP_LOGPROBS = 4, 64, 20
SPREAD_TIMEOUT_S = 60  # an admin load waits this long for every replica to hold the adapter


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
        pin = await asyncio.to_thread(s3_listing, resolved) if resolved.startswith("s3://") else None
        path = await asyncio.to_thread(fetch, resolved, self.args.tracking_uri, pin)
        # What was checked is what every replica loads: the files' digest (and S3 objects' ETags) go
        # into the entry, and a replica refuses files that differ (artifacts.fetch_checked).
        digest = await asyncio.to_thread(content_digest, path)
        info = await asyncio.to_thread(programs.inspect_source, path)
        base = self._pick_base(ref, info)
        entry = CatalogEntry(id=ref.id, source=ref.source, resolved_source=resolved, base=base, method=info.method,
                             task=info.task, labels=info.labels, bytes=info.nbytes, digest=digest, pin=pin,
                             **programs.entry_fields(info, ref.prefix_cache))
        key = (await self.catalog.stage.remote(entry)).key
        report = await self.servers[base].options(multiplexed_model_id=key).warm.remote()
        if "error" in report:
            await self.catalog.discard.remote(key, report["error"])
            raise AdapterError(report["error"])
        committed = await self.catalog.commit.remote(key)
        return {**committed.public(), "replicas": await self._spread(key, base)}

    async def _spread(self, key: str, base: str) -> int:
        """Wait until every replica of the base holds the new revision (each loads the catalog's
        active entries within about a second); the count of replicas holding it."""
        deadline = time.monotonic() + SPREAD_TIMEOUT_S
        # The configured count: a replica that has not reported yet (just started) is still waited for.
        replicas = next(b.replicas for b in self.args.bases if b.model_name == base)
        while True:
            holders = len(await self.catalog.holders.remote(key))
            if holders >= max(replicas, await self.catalog.replica_count.remote(base)) or \
                    time.monotonic() > deadline:
                return holders
            await asyncio.sleep(0.25)

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
                if info.base_fingerprint in base["fingerprints"]:
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
        return self.servers[entry.base].options(multiplexed_model_id=model_key(model, entry.revision))

    # ---- OpenAI-compatible API -----------------------------------------------------------------

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        await self.ready()
        listing = await self.catalog.listing.remote()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "onebase", "kind": "base",
                 "task": b["task"], "base": name} for name, b in self.bases.items()]
        data += [{"id": e["id"], "object": "model", "created": e["loaded_at"], "owned_by": "onebase",
                  "kind": e["kind"], "task": e["task"], "method": e["method"], "base": e["base"]}
                 for e in listing["adapters"]]
        return {"object": "list", "data": data}

    @api.post("/v1/classify")
    async def classify(self, body: ClassifyRequest, request: Request) -> dict[str, Any]:
        """A label per text (granularity "sequence") or per word of each text ("token")."""
        self.check_key(request)
        task = "token-classification" if body.granularity == "token" else "sequence-classification"
        return await self._predict(body.model, task, self._texts(body.input, "input"))

    @api.post("/v1/tag")
    async def tag(self, body: TagRequest, request: Request) -> dict[str, Any]:
        """Token classification: each word of each text with its label, score and character offsets."""
        self.check_key(request)
        return await self._predict(body.model, "token-classification", self._texts(body.input, "input"))

    @api.post("/v1/answer")
    async def answer(self, body: AnswerRequest, request: Request) -> dict[str, Any]:
        """Extractive QA: the span of the context answering the question, its score and offsets."""
        self.check_key(request)
        questions = self._texts(body.question, "question")
        if body.context is None or not (body.context if isinstance(body.context, str) else all(body.context)):
            raise HTTPException(400, "context: give the text that holds the answer")
        contexts = [body.context] if isinstance(body.context, str) else body.context
        if len(contexts) != len(questions):
            raise HTTPException(400, f"context: one per question ({len(questions)} questions, "
                                     f"{len(contexts)} contexts)")
        return await self._predict(body.model, "extractive-qa", questions, contexts)

    def _texts(self, value: str | list[str], field: str) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > self.args.limits.max_inputs:
            raise HTTPException(400, f"{field}: give 1 to {self.args.limits.max_inputs} texts")
        return texts

    async def _predict(self, model: str, task: str, texts: list[str], contexts: list[str] | None = None):
        handle = await self.route(model)
        result = await handle.predict.remote(task, texts, contexts)
        _raise_for(result)
        return {"object": "list", "model": model, "data": [{"index": i, **r} for i, r in enumerate(result["data"])]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_key(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        settings = self._settings(body.max_tokens, body, body.logprobs)
        if not prompts:
            raise HTTPException(400, "prompt: empty")
        handle = await self.route(body.model)
        if body.stream:
            if len(prompts) != 1:
                raise HTTPException(400, "stream: one prompt per streamed request")
            return await self._stream(handle, body, prompts[0], None, settings, chat=False)
        answers = await asyncio.gather(*(handle.complete.remote(p, None, settings) for p in prompts))
        for answer in answers:
            _raise_for(answer)
        # OpenAI's order: the n samples of the first prompt, then those of the second, ...
        results = [{**r, "first": j == 0} for a in answers for j, r in enumerate(a["choices"])]
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": [completion_choice(i, r) for i, r in enumerate(results)],
                "usage": usage(results)}

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self.check_key(request)
        if body.top_logprobs is not None and not body.logprobs:
            raise HTTPException(400, "top_logprobs: needs logprobs: true")
        settings = self._settings(body.max_completion_tokens or body.max_tokens or 256, body,
                                  (body.top_logprobs or 0) if body.logprobs else None)
        messages = [m.model_dump() for m in body.messages]
        handle = await self.route(body.model)
        if body.stream:
            return await self._stream(handle, body, None, messages, settings, chat=True)
        answer = await handle.complete.remote(None, messages, settings)
        _raise_for(answer)
        results = [{**r, "first": j == 0} for j, r in enumerate(answer["choices"])]
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "usage": usage(results),
                "choices": [chat_choice(i, r) for i, r in enumerate(results)]}

    def _settings(self, max_tokens: int, body: Sampling, logprobs: int | None) -> dict[str, Any]:
        """The sampling settings of a request, every limit checked (one line per refusal)."""
        limits = self.args.limits
        if not 1 <= body.n <= limits.max_n:
            raise HTTPException(400, f"n: give 1 to {limits.max_n}")
        if not 1 <= max_tokens <= limits.max_tokens:
            raise HTTPException(400, f"max_tokens: give 1 to {limits.max_tokens}")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > STOP_LIMIT or any(not 1 <= len(s) <= STOP_CHARS for s in stop):
            raise HTTPException(400, f"stop: up to {STOP_LIMIT} sequences of 1 to {STOP_CHARS} characters")
        if logprobs is not None and logprobs > TOP_LOGPROBS:
            raise HTTPException(400, f"top_logprobs: give 0 to {TOP_LOGPROBS}")
        return {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "n": body.n,
                "stop": stop, "seed": body.seed, "logprobs": logprobs}

    async def _stream(self, handle, body: Sampling, prompt, messages, settings, chat: bool):
        pieces = handle.options(stream=True).complete_stream.remote(prompt, messages, settings)
        try:
            first = await pieces.__anext__()  # errors come first: answer them as HTTP errors
        except StopAsyncIteration:
            first = {"error": "the replica ended the stream without an answer", "status": 500}
        if isinstance(first, dict) and "error" in first:
            _raise_for(first)
        chunks = Chunks(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", body.model, chat)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            if chat:
                for index in range(settings["n"]):
                    yield chunks.role(index)
            finals: dict[int, dict[str, Any]] = {}
            item = first
            while True:
                if "text" in item:
                    yield chunks.piece(item["text"], index=item["index"], logprobs=item.get("logprobs"))
                elif "final" in item:
                    final = item["final"]
                    if "error" in final:  # the text so far went out; end the stream with the error
                        yield "data: " + json.dumps({"error": {"message": final["error"]}}) + "\n\n"
                        break
                    finals[item["index"]] = final
                    yield chunks.piece(None, final["finish_reason"], index=item["index"])
                    if len(finals) == settings["n"]:
                        if include_usage:
                            yield chunks.usage([finals[i] for i in sorted(finals)])
                        break
                try:
                    item = await pieces.__anext__()
                except StopAsyncIteration:
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- admin: hot swap -------------------------------------------------------------------------

    @api.get("/admin/adapters")
    async def list_adapters(self, request: Request) -> dict[str, Any]:
        self.check_admin(request)
        await self.ready()
        listing = await self.catalog.listing.remote()
        described = {name: await h.describe.remote() for name, h in self.servers.items()}
        return {**listing, "bases": self.bases,
                "resident_on_a_replica": {name: d["resident"] for name, d in described.items()},
                "decoding_on_a_replica": {name: d["decoding"] for name, d in described.items()}}

    @api.post("/admin/adapters", status_code=201)
    async def load(self, body: LoadRequest, request: Request) -> dict[str, Any]:
        self.check_admin(request)
        await self.ready()
        try:
            check_id(body.id)  # the one-line refusal (AdapterRef would refuse it too, as a validation error)
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
        source = entry.source
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
            return await self.load_adapter(AdapterRef(id=adapter_id, source=new_source, base=entry.base))
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
