"""The serving application's arguments (the `args:` of a Ray Serve config), validated."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, model_validator

from onebase.spec.schema import Strict

# Adapter ids are model names, URL path parts and cache directory names: 1-64 safe characters.
ADAPTER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# How a base itself is served: the generalist causal LM, or an encoder backbone whose specialists
# (sequence, token classification, extractive QA adapters) bring their heads.
BaseTask = Literal["causal-lm", "sequence-classification"]


class BaseSpec(Strict):
    name: str = Field(min_length=1, description="bundled model name, HF model directory or hub id")
    alias: str | None = Field(None, min_length=1,
                              description="the model name requests use for the bare base (default: name)")
    task: BaseTask | None = Field(None, description="causal-lm (a decoder served as the generalist) or "
                                                    "sequence-classification (an encoder backbone for its "
                                                    "specialists); default: from the model")
    replicas: int = Field(1, gt=0)
    threads: int | None = Field(None, gt=0, description="torch threads per replica")
    cpus: float = Field(1, gt=0, description="CPUs Ray reserves per replica")
    gpus: float = Field(0, ge=0)
    # bfloat16 halves the weights' memory and, on CPUs with AVX512-BF16 or AMX, runs matmuls at about twice
    # fp32's rate (docs/benchmarks.md issue #12 (e6)); elsewhere it can be slower, so fp32 stays the default.
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and activations of the base and its adapters (adapters trained in "
                               "fp32 load into any)")
    max_adapters: int = Field(64, gt=0, description="adapters resident per replica (LRU beyond)")
    # 32 (was 16): a decode step reads the weights once for all its rows, so on a loaded replica more rows
    # share that cost and fewer requests wait for a row (docs/benchmarks.md issue #12 (e3)-(e5) run at 32).
    max_batch_size: int = Field(32, gt=0, description="rows decoding together (more wait in the queue)")
    # With continuous batching requests join the running batch at the next step; this wait only
    # applies when the replica is idle, so a burst shares one prefill instead of starting one by one.
    batch_wait_ms: float = Field(50, ge=0, description="how long an idle replica waits for a burst to prefill together")
    max_queue: int = Field(64, gt=0, description="requests waiting per replica beyond the running batch (then 429)")
    packed_weights: bool = Field(True, description="CPU: keep the base's linear weights also packed for oneDNN's "
                                                   "matmul kernels (faster products; those weights take twice "
                                                   "their memory)")
    # Two Python threads with a matrix product each use two cores where two torch threads on one product
    # stall each other (docs/benchmarks.md issue #12 (e5), (e8)).
    prefill_thread: bool = Field(True, description="prefill arriving prompts on a second thread beside the decode "
                                                   "steps (a replica then runs up to 2 x threads torch threads)")

    @property
    def model_name(self) -> str:
        return self.alias or re.sub(r"[^A-Za-z0-9._-]", "-", self.name.rstrip("/").split("/")[-1])


class AdapterRef(Strict):
    id: str = Field(pattern=ADAPTER_ID_PATTERN, description="the model name requests use (1-64 letters, digits, "
                                                            "'.', '_', '-')")
    source: str = Field(min_length=1, description="a local directory, models:/name/version, models:/name@alias "
                                                  "or s3://bucket/prefix")
    base: str | None = Field(None, description="the base to serve it on (default: matched by fingerprint)")
    prefix_cache: bool = Field(True, description="prompt programs: keep the demo prefix's KV cache on the replica "
                                                 "(false recomputes it per request, for comparison)")


class AuthSpec(Strict):
    api_keys: list[str] = Field(default_factory=list, description="empty: queries need no key")
    api_keys_env: str | None = Field(None, description="env var with comma-separated API keys")
    admin_token: str | None = None
    admin_token_env: str | None = Field(None, description="env var holding the admin token")

    def keys(self) -> set[str]:
        keys = set(self.api_keys)
        if self.api_keys_env:
            keys |= {k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()}
        return keys

    def admin(self) -> str | None:
        if self.admin_token_env and os.environ.get(self.admin_token_env):
            return os.environ[self.admin_token_env]
        return self.admin_token


class LimitSpec(Strict):
    max_prompt_tokens: int = Field(1024, gt=0)
    max_tokens: int = Field(256, gt=0, description="new tokens per completion")
    max_inputs: int = Field(64, gt=0, description="texts per /v1/classify request")
    max_n: int = Field(8, gt=0, description="samples per completion request (n)")
    # Reserved at admission (prompt + max_tokens): running rows cannot be preempted, so the most a
    # row may grow to is what must fit (serve/kv_budget.py).
    kv_cache_tokens: int | None = Field(None, gt=0, description="KV-cache positions a replica's running rows may hold "
                                        "(each reserves prompt + max_tokens, rows padded to their batch's longest); "
                                        "more wait in the queue. Unset: no bound")
    # Kept apart from the running rows' cache; memory per position: layers x 2 x KV heads x head dim x
    # dtype bytes (SmolLM2-135M fp32: 45 KiB, so 2048 positions ~ 90 MiB per replica).
    prefix_cache_tokens: int = Field(2048, ge=0, description="prompt KV positions a replica keeps for reuse by "
                                     "later prompts that start alike (system turns, few-shot demos, earlier "
                                     "chat turns), least recently used out; 0: off")


class ServeArgs(Strict):
    bases: list[BaseSpec] = Field(min_length=1, description="bases served, one deployment each")
    adapters: list[AdapterRef] = Field(default_factory=list, description="adapters and prompt programs loaded "
                                                                         "at start (more through the admin API)")
    tracking_uri: str | None = None
    auth: AuthSpec = Field(default_factory=AuthSpec)
    limits: LimitSpec = Field(default_factory=LimitSpec, description="request limits")

    @model_validator(mode="after")
    def _unique_names(self) -> ServeArgs:
        names = [b.model_name for b in self.bases]
        if len(set(names)) != len(names):
            raise ValueError(f"bases: two bases are served under one name ({names}); set alias")
        ids = [a.id for a in self.adapters]
        clash = set(ids) & set(names) or {i for i in ids if ids.count(i) > 1}
        if clash:
            raise ValueError(f"adapters: id {sorted(clash)[0]!r} is used twice (adapter ids and base names are "
                             "model names)")
        return self
