"""The method registry: one module per tuning method, one line each below.

A method module defines a `Method` object that applies the method to a base model and exports
what it trained; its config class (its YAML fields under `method:`, the tasks it supports) lives
in the spec layer, `onebase.spec.method_configs`, so a spec validates without this package.
"""

from __future__ import annotations

from onebase.methods import adapterbias, bitfit, dora, full, houlsby, ia3, lora, prefix, prompt, ptuning
from onebase.methods.base import Method
from onebase.spec.method_configs import check_method_task, method_config  # noqa: F401 - re-exported

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


def load_trained(base, path):
    """Rebuild a tuned model from a fresh base and an export directory (any method)."""
    from pathlib import Path

    from onebase.manifest import read_run_info

    return get_method(read_run_info(path).method).load(base, Path(path))


__all__ = ["METHODS", "Method", "check_method_task", "get_method", "load_trained", "method_config"]
