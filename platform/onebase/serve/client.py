"""A small Python client for an onebase endpoint (the OpenAI routes also work with the `openai` client)."""

from __future__ import annotations

import os
import time
from typing import Any

import requests

from onebase.errors import OnebaseError


class ServeError(OnebaseError):
    """The endpoint refused a request or cannot be reached."""


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, admin_token: str | None = None,
                 timeout: float = 120) -> None:
        self.url = (url or os.environ.get("ONEBASE_URL") or "http://127.0.0.1:8000").rstrip("/")
        self.api_key = api_key or os.environ.get("ONEBASE_API_KEY")
        self.admin_token = admin_token or os.environ.get("ONEBASE_ADMIN_TOKEN")
        self.timeout = timeout

    def wait_ready(self, timeout_s: float = 300) -> None:
        """Return once the endpoint answers /healthz (a fresh Serve app loads its bases first)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                if requests.get(f"{self.url}/healthz", timeout=60).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise ServeError(f"{self.url}: not ready after {timeout_s:.0f} s")

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models")["data"]

    def classify(self, model: str, texts: str | list[str]) -> list[dict[str, Any]]:
        return self._call("POST", "/v1/classify", {"model": model, "input": texts})["data"]

    def complete(self, model: str, prompt: str, max_tokens: int = 64, temperature: float = 0.0) -> str:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
        return self._call("POST", "/v1/completions", body)["choices"][0]["text"]

    def chat(self, model: str, message: str, max_tokens: int = 64, temperature: float = 0.0) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": message}], "max_tokens": max_tokens,
                "temperature": temperature}
        return self._call("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"]

    # admin
    def adapters(self) -> dict[str, Any]:
        return self._call("GET", "/admin/adapters", admin=True)

    def load(self, adapter_id: str, source: str, base: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/admin/adapters", {"id": adapter_id, "source": source, "base": base}, admin=True)

    def unload(self, adapter_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/admin/adapters/{adapter_id}", admin=True)

    def promote(self, adapter_id: str, version: str | int, alias: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"/admin/adapters/{adapter_id}/promote", {"version": version, "alias": alias},
                          admin=True)

    def _call(self, method: str, path: str, body: dict | None = None, admin: bool = False) -> dict[str, Any]:
        token = self.admin_token if admin else self.api_key
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = requests.request(method, self.url + path, json=body, headers=headers, timeout=self.timeout)
        except requests.RequestException as err:
            raise ServeError(f"{self.url}: cannot reach the endpoint ({type(err).__name__})") from None
        if response.status_code >= 400:
            try:
                detail = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = response.text[:300]
            raise ServeError(f"{method} {path}: HTTP {response.status_code}: {detail}")
        return response.json()
