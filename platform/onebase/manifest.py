"""`onebase.json`, the manifest beside every export: what was trained, on which base, how well.

Training writes it (train/loop.py) into the export; `onebase run` reads it back to log and register
the export, `load_trained` to pick the method's loader, serving to match an adapter to a base, and
prompt programs on an adapter to check what they merge. Prompt programs write a manifest of their
own under the same name (prompt/artifact.py, method `prompt-program`): this model reads that too.
It imports nothing of onebase's layers, so every one of them may use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from onebase.errors import OnebaseError, validation_line

MANIFEST = "onebase.json"


class RunInfo(BaseModel):
    """The manifest. Fields a newer writer adds (e.g. `held_out`) are kept, not rejected: an old
    reader must still serve a new export."""

    model_config = ConfigDict(extra="allow")

    method: str
    task: str | None = None  # a task of onebase.tasks; prompt programs: classification | generation
    method_config: dict[str, Any] | None = None
    base_model: str | None = None
    base_fingerprint: str | None = None  # sha256 over the backbone's weights (model/build.py)
    labels: list[str] | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    dataset_fingerprint: str | None = None
    prompt: dict[str, Any] | None = None  # the causal-LM prompt template the export was trained with
    precision: str | None = None
    steps: int | None = None
    metrics: dict[str, float] = {}

    # Read like the dict it used to be (`info["labels"]`), for callers written against that.
    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields or key in (self.model_extra or {}):
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def read_run_info(directory: str | Path, error: type[OnebaseError] = OnebaseError) -> RunInfo:
    """The manifest of an export directory; `error` (one line naming the file) when it is missing,
    not JSON, or has a field of the wrong type."""
    path = Path(directory) / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: missing (not an onebase export)") from None
    except (OSError, ValueError) as err:
        raise error(f"{path}: not readable JSON ({err})") from None
    return run_info(raw, str(path), error)


def run_info(raw: Any, where: str = MANIFEST, error: type[OnebaseError] = OnebaseError) -> RunInfo:
    """Validate an already-parsed manifest."""
    if not isinstance(raw, dict):
        raise error(f"{where}: not a JSON object")
    try:
        return RunInfo.model_validate(raw)
    except ValidationError as err:
        raise error(f"{where}: {validation_line(err)}") from None


def write_run_info(directory: str | Path, info: RunInfo | dict[str, Any]) -> RunInfo:
    """Validate `info` and write it as the manifest of `directory`; returns what was written."""
    checked = info if isinstance(info, RunInfo) else run_info(info)
    (Path(directory) / MANIFEST).write_text(json.dumps(checked.as_dict(), indent=2))
    return checked
