"""A program on disk: `onebase.json` (the manifest serving reads) + `program.json` (the program).

    dir/onebase.json  {"method": "prompt-program", "format": 1, "name", "task": classification|generation,
                       "base_model", "base_sha256", "base_fingerprint" (same value, the adapters' key),
                       "labels": [...] | null, "verbalizers": {label: [...]} | null, "metrics": {...},
                       "adapter": null | {"path", "method", "base_model", "base_fingerprint", "export_sha256"}}
                      (adapter: the training export the program runs on, merged into the base)
    dir/program.json  Program.model_dump(): instruction, template, demos, scoring, calibration (p_cf),
                      reasoning, self_consistency, extractor, ...

No weights and no pickle: a program is text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from onebase.errors import OnebaseError, validation_line
from onebase.prompt.program import METHOD, Program

MANIFEST = "onebase.json"
PROGRAM = "program.json"
FORMAT = 1


def manifest(program: Program, metrics: dict[str, float] | None = None) -> dict[str, Any]:
    return {"method": METHOD, "format": FORMAT, "name": program.name, "task": program.task,
            "base_model": program.base, "base_sha256": program.base_sha256,
            "base_fingerprint": program.base_sha256, "labels": program.label_names or None,
            "verbalizers": program.labels, "metrics": metrics or {},
            "adapter": program.adapter.model_dump() if program.adapter else None}


def save_program(program: Program, directory: str | Path, metrics: dict[str, float] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PROGRAM).write_text(json.dumps(program.model_dump(mode="json"), indent=2, ensure_ascii=False))
    (directory / MANIFEST).write_text(json.dumps(manifest(program, metrics), indent=2, ensure_ascii=False))
    return directory


def is_program_dir(directory: str | Path) -> bool:
    """True when `directory` (or its one subdirectory, as MLflow downloads it) holds a prompt program."""
    return _root(Path(directory)) is not None


def read_manifest(directory: str | Path) -> dict[str, Any]:
    root = _root(Path(directory))
    if root is None:
        raise OnebaseError(f"{directory}: not a prompt program (no {MANIFEST} with method {METHOD})")
    return json.loads((root / MANIFEST).read_text())


def load_program(directory: str | Path) -> Program:
    root = _root(Path(directory))
    if root is None or not (root / PROGRAM).is_file():
        raise OnebaseError(f"{directory}: not a prompt program (needs {MANIFEST} with method {METHOD} "
                           f"and {PROGRAM})")
    try:
        return Program.model_validate_json((root / PROGRAM).read_text())
    except ValidationError as err:
        raise OnebaseError(f"{directory}/{PROGRAM}: {validation_line(err)}") from None


def _root(path: Path) -> Path | None:
    for candidate in [path, *(sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else [])]:
        try:
            meta = json.loads((candidate / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("method") == METHOD:
            return candidate
    return None
