"""The HTTP request bodies the gateway accepts (OpenAI's field names and defaults)."""

# No `from __future__ import annotations`: FastAPI must see real types.
from pydantic import BaseModel, Field


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
    prefix_cache: bool = True  # prompt programs: false recomputes the demo prefix per request


class PromoteRequest(BaseModel):
    version: str | int
    alias: str | None = None
