"""The Helm chart's schema for the serve app's `bases`, `adapters` and `limits`, generated from ServeArgs.

The chart passes these three values to the Serve application unchanged (templates/rayservice.yaml),
so they are typed once, in `serve/config.py`: this module turns `ServeArgs.model_json_schema()` into
the plain draft-07 form of helm/onebase/values.schema.json (references inlined, titles dropped,
optional fields without their `null` alternative: Helm drops null values). tests/test_helm.py fails
when the chart's copy differs; rewrite it with

    .venv/bin/python -m onebase.serve.helm_schema helm/onebase/values.schema.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from onebase.serve.config import ServeArgs

GENERATED = ("bases", "adapters", "limits")  # the serve values typed by ServeArgs (auth is the chart's own)


def serve_values_schema() -> dict[str, Any]:
    """{"bases": ..., "adapters": ..., "limits": ...} as the chart's values.schema.json holds them."""
    schema = ServeArgs.model_json_schema()
    defs = schema.get("$defs", {})
    props = schema["properties"]
    return {name: _plain(props[name], defs) for name in GENERATED}


def _plain(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_plain(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = defs[node["$ref"].rsplit("/", 1)[-1]]
        return _plain({**ref, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    options = node.get("anyOf")
    if options and {"type": "null"} in options:  # Optional[X]: Helm drops null values, so X alone
        rest = [o for o in options if o != {"type": "null"}]
        merged = {k: v for k, v in node.items() if k != "anyOf"}
        node = {**merged, **rest[0]} if len(rest) == 1 else {**merged, "anyOf": rest}
    out = {}
    for key, value in node.items():
        if key == "title" or (key == "default" and value is None):
            continue
        if key == "properties":  # property names are not schemas
            out[key] = {name: _plain(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _plain(value, defs)
    return out


def write(path: str | Path) -> None:
    """Rewrite the generated serve sections of a chart's values.schema.json (the rest is kept)."""
    path = Path(path)
    schema = json.loads(path.read_text())
    schema["properties"]["serve"]["properties"].update(serve_values_schema())
    path.write_text(json.dumps(schema, indent=2) + "\n")


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "helm/onebase/values.schema.json")
