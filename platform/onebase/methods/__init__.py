"""The method registry: one module per tuning method, one line each below.

A method module defines a config class (its YAML fields under `method:`) and a
`Method` object that applies the method to a base model and exports what it trained.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from onebase.methods import adapterbias, bitfit, dora, full, houlsby, ia3, lora, prefix, prompt, ptuning
from onebase.methods.base import Method
from onebase.spec.schema import MethodConfig

METHODS: dict[str, Method] = {
    full.METHOD.name: full.METHOD,
    lora.METHOD.name: lora.METHOD,
    dora.METHOD.name: dora.METHOD,
    ia3.METHOD.name: ia3.METHOD,
    prefix.METHOD.name: prefix.METHOD,
    prompt.METHOD.name: prompt.METHOD,
    ptuning.METHOD.name: ptuning.METHOD,
    bitfit.METHOD.name: bitfit.METHOD,
    houlsby.METHOD.name: houlsby.METHOD,
    adapterbias.METHOD.name: adapterbias.METHOD,
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})") from None


def method_config(value: Any) -> MethodConfig:
    """Validate the spec's `method:` mapping with the named method's own config class."""
    if isinstance(value, MethodConfig):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError("needs a mapping with a 'name' (e.g. {name: lora, r: 8})")
    method = get_method(str(value["name"]))
    try:
        return method.config_class.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise ValueError(f"{field}: {msg} (for method {method.name})") from None


def check_method_task(config: MethodConfig, task: str) -> None:
    method = get_method(config.name)
    if task not in method.tasks:
        raise ValueError(f"method {method.name} does not support task {task} "
                         f"(supports: {', '.join(sorted(method.tasks))})")


def load_trained(base, path):
    """Rebuild a tuned model from a fresh base and an export directory (any method)."""
    import json
    from pathlib import Path

    info = json.loads((Path(path) / "onebase.json").read_text())
    return get_method(info["method"]).load(base, Path(path))


__all__ = ["METHODS", "Method", "check_method_task", "get_method", "load_trained", "method_config"]
