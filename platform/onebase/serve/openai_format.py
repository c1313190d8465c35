"""OpenAI response shapes for the engine's results: choices, logprobs, usage, stream chunks."""

from __future__ import annotations

import json
import time
from typing import Any


def usage(results: list[dict[str, Any]]) -> dict[str, int]:
    # n samples of one prompt count its prompt tokens once per prompt, as OpenAI does.
    prompt = sum(r["prompt_tokens"] for r in results if r.get("first", True))
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    # text_offset: where each token starts in the completion's text (streamed chunks too: not per chunk).
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": [e["offset"] for e in entries]}


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if entries is None:
        return None

    def token(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**token(e["token"], e["logprob"]), "top_logprobs": [token(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


def completion_choice(index: int, result: dict[str, Any]) -> dict[str, Any]:
    return {"index": index, "text": result["text"], "finish_reason": result["finish_reason"],
            "logprobs": completion_logprobs(result.get("logprobs"))}


def chat_choice(index: int, result: dict[str, Any]) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": result["text"]},
            "finish_reason": result["finish_reason"], "logprobs": chat_logprobs(result.get("logprobs"))}


class Chunks:
    """The server-sent events of one streamed completion or chat completion."""

    def __init__(self, stream_id: str, model: str, chat: bool) -> None:
        self.id, self.model, self.chat = stream_id, model, chat
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({"id": self.id, "object": self.object, "created": int(time.time()),
                                      "model": self.model, "choices": choices, **extra}) + "\n\n"

    def role(self, index: int = 0) -> str:
        return self.event([{"index": index, "delta": {"role": "assistant"}, "finish_reason": None}])

    def piece(self, text: str | None, finish: str | None = None, index: int = 0,
              logprobs: list[dict[str, Any]] | None = None) -> str:
        """A piece of sample `index`'s text with the logprobs of the tokens it begins (None: not asked)."""
        if self.chat:
            delta = {"content": text} if text is not None else {}
            return self.event([{"index": index, "delta": delta, "finish_reason": finish,
                                "logprobs": chat_logprobs(logprobs)}])
        return self.event([{"index": index, "text": text or "", "finish_reason": finish,
                            "logprobs": completion_logprobs(logprobs)}])

    def usage(self, results: list[dict[str, Any]]) -> str:
        """The n samples of one prompt: its prompt tokens counted once."""
        return self.event([], usage=usage([{**r, "first": i == 0} for i, r in enumerate(results)]))
