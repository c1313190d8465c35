"""Prompt programs served beside adapters: catalog entries of kind `prompt-program`.

A program (platform/onebase/prompt) is text for one base: an instruction, demonstrations and a
decoding strategy. On a replica it runs on the replica's own frozen causal LM object (the engine's
`base`, no second copy) through the prompt package's `ProgramRunner`. The runner is built when the
program becomes resident, so the instruction + demonstrations prefix is run once there and its KV
cache is kept for as long as the program stays resident (each batch gets its own copy of it).

Requests name a program like any model: `/v1/classify` for classification programs (label and
probabilities), `/v1/completions` and `/v1/chat/completions` for generation programs (the user's
text, or the last user message, is the program's query; the program's own decoding applies).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from onebase.errors import OnebaseError
from onebase.serve.artifacts import AdapterError, AdapterInfo, fetch_checked, inspect

PROGRAM = "prompt-program"  # the catalog kind; also the manifest's `method` (onebase.prompt.program.METHOD)
_serial = itertools.count(1)

# A resident program is the engine's `Loaded` (leases, unload, reaping as for adapters) whose info
# says `prompt-program` and whose `program` attribute holds its ProgramRunner (with the prefix cache).
ProgramLoaded = Any


def is_program(loaded: Any) -> bool:
    return loaded is not None and loaded.info.method == PROGRAM


def inspect_source(path: Path) -> AdapterInfo:
    """What the catalog records for a fetched source: a program's manifest, else the adapter checks."""
    from onebase.prompt.artifact import is_program_dir, load_program, read_manifest

    if not is_program_dir(path):
        return inspect(path)
    try:
        meta = read_manifest(path)
        program = load_program(path)
    except OnebaseError as err:
        raise AdapterError(str(err)) from None
    if program.adapter is not None:
        # Its base + export would be a second model on the replica, not the one frozen base it shares.
        raise AdapterError(f"{path}: the program runs on the training export {program.adapter.path} "
                           f"({program.adapter.method}); a replica serves programs on its frozen base only "
                           "(serve that export as an adapter, or run the program with `onebase prompt eval`)")
    nbytes = sum(f.stat().st_size for f in Path(path).rglob("*.json"))
    return AdapterInfo(path=Path(path), method=PROGRAM, task=program.task, peft_type=None,
                       labels=program.label_names or None, base_fingerprint=program.base_sha256, prompt=None,
                       weights=Path(path), nbytes=nbytes, meta=meta)


def entry_fields(info: AdapterInfo, prefix_cache: bool = True) -> dict[str, Any]:
    """What a program's catalog entry holds beyond an adapter's (nothing for adapters)."""
    if info.method != PROGRAM:
        return {}
    return {"kind": PROGRAM, "prefix_cache": prefix_cache}


async def load(server, entry) -> ProgramLoaded:
    """The replica loader of kind `prompt-program` (registered in replica.LOADERS); `entry`: a CatalogEntry."""
    path = await asyncio.to_thread(fetch_checked, entry.resolved_source, entry.digest, server.tracking_uri, entry.pin)
    return await asyncio.to_thread(attach, server.engine, entry.id, path, entry.prefix_cache)


def attach(engine, program_id: str, path: Path, prefix_cache: bool = True) -> ProgramLoaded:
    """Put a program on this engine's base: refused for another base or a base not served as a causal LM."""
    from onebase.prompt.artifact import load_program
    from onebase.prompt.runner import ProgramRunner
    from onebase.serve.engine import Loaded, Runner

    info = inspect_source(path)
    if info.method != PROGRAM:
        raise AdapterError(f"{program_id}: {path} is not a prompt program")
    if info.base_fingerprint != engine.fingerprint:
        raise AdapterError(f"program {program_id}: made for a different base (sha256 {info.base_fingerprint[:12]}...),"
                           f" this replica serves {engine.name} (sha256 {engine.fingerprint[:12]}...)")
    if engine.task != "causal-lm":
        raise AdapterError(f"program {program_id}: needs its base served as a causal LM, "
                           f"{engine.name} is served as {engine.task}")
    started = time.perf_counter()
    with engine.lock:  # the runner's prefix forward runs on the shared base, like every model call
        try:
            runner = ProgramRunner(engine.base, engine.tokenizer, load_program(path), cache_prefix=prefix_cache)
        except (OnebaseError, ValueError) as err:  # e.g. a chat template on a tokenizer without one
            raise AdapterError(f"program {program_id}: cannot run on {engine.name}: {err}") from None
        key = f"program{next(_serial)}"
        loaded = Loaded(program_id, key, info, Runner(engine.base, PROGRAM, info.labels, mixed=False, keys={key}),
                        (time.perf_counter() - started) * 1000)
        loaded.program = runner
        engine.adapters[key] = loaded  # listed as resident; unloaded and reaped like an adapter
    return loaded


def _predict(engine, loaded: ProgramLoaded, texts: list[str]):
    with engine.lock:  # one model call at a time on the shared base (the decoder steps under it too)
        return loaded.program.predict(texts)


def _check_length(server, program_id: str, texts: list[str]) -> None:
    """The limit applies to what the user sent; the program's own prefix is the operator's."""
    limit = server.limits.max_prompt_tokens
    for text in texts:
        count = server.engine.count_tokens(text)
        if count > limit:
            raise AdapterError(f"input is {count} tokens; the limit is {limit}")


async def classify(server, loaded: ProgramLoaded, texts: list[str],
                   task: str = "sequence-classification") -> dict[str, Any]:
    program = loaded.program.program
    if task != "sequence-classification":
        raise AdapterError(f"model {loaded.id} is a prompt program; it does not answer {task} requests")
    if not program.is_classification:
        raise AdapterError(f"model {loaded.id} is a generation program; it does not classify "
                           "(use /v1/completions or /v1/chat/completions)")
    _check_length(server, loaded.id, texts)
    predictions = await asyncio.to_thread(_predict, server.engine, loaded, texts)
    return {"data": [{"label": p.answer,
                      "probabilities": {label: round(float(v), 6) for label, v in (p.probs or {}).items()}}
                     for p in predictions]}


def query_text(prompt: str | None, messages: list[dict[str, str]] | None) -> str:
    """The program's query: the prompt, or the chat's last user message (the program brings its own turns)."""
    if messages is None:
        return prompt or ""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


async def complete(server, loaded: ProgramLoaded, prompt: str | None,
                   messages: list[dict[str, str]] | None) -> dict[str, Any]:
    program = loaded.program.program
    if program.is_classification:
        raise AdapterError(f"model {loaded.id} is a classification program (use /v1/classify)")
    text = query_text(prompt, messages)
    _check_length(server, loaded.id, [text])
    prediction = (await asyncio.to_thread(_predict, server.engine, loaded, [text]))[0]
    return {"text": prediction.text, "finish_reason": "stop", "prompt_tokens": prediction.prompt_tokens,
            "completion_tokens": server.engine.count_tokens(prediction.text), "answer": prediction.answer}
