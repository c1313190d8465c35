"""The HTTP request bodies the gateway accepts (OpenAI's field names and defaults)."""

# No `from __future__ import annotations`: FastAPI must see real types.
from typing import Literal

from pydantic import BaseModel, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What completions and chat completions share (OpenAI's defaults)."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int = 16
    logprobs: int | None = Field(None, ge=0, description="the chosen token's logprob and the top k")


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class ClassifyRequest(BaseModel):
    model: str
    input: str | list[str]
    granularity: Literal["sequence", "token"] = "sequence"  # token: a label per word (as /v1/tag)


class TagRequest(BaseModel):
    model: str
    input: str | list[str]


class AnswerRequest(BaseModel):
    """Extractive QA: the span of `context` that answers `question` (or lists of both, pairwise)."""

    model: str
    question: str | list[str]
    context: str | list[str] | None = None


class LoadRequest(BaseModel):
    id: str
    source: str = Field(min_length=1)
    base: str | None = None
    prefix_cache: bool = True  # prompt programs: false recomputes the demo prefix per request


class PromoteRequest(BaseModel):
    version: str | int
    alias: str | None = None
