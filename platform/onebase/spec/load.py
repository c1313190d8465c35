"""Load a YAML job spec, apply `--set a.b=c` overrides, validate into a JobSpec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from onebase.errors import SpecError
from onebase.errors import validation_line as describe  # noqa: F401 - 'describe': others import it from here
from onebase.spec.schema import JobSpec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read and validate a spec file; raise SpecError with one line on any problem."""
    path = Path(path)
    return parse_spec(read_spec_mapping(path, "a job spec", overrides), source=str(path))


def read_spec_mapping(path: Path, what: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """A spec file's YAML mapping with `--set` overrides applied; SpecError in one line otherwise."""
    raw = read_yaml(path, missing=f"spec file not found: {path}")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: {what} is a YAML mapping")
    for item in overrides or []:
        apply_override(raw, item)
    return raw


def read_yaml(path: Path, missing: str | None = None) -> Any:
    """The YAML in `path`; SpecError in one line (`missing`, or the line where parsing failed)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(missing or f"file not found: {path}")
    try:
        return yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text (byte {err.start}); a spec is a YAML text file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}") from None


def spec_kind(path: str | Path) -> str:
    """'sweep' for a sweep spec (methods to pit against each other), else 'job'; unreadable files are 'job'
    so that the job loader reports what is wrong with them."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return "job"
    if isinstance(raw, dict) and raw.get("kind") in ("prompt-program", "compare"):  # prompt/spec.py, compare/spec.py
        return raw["kind"]
    is_sweep = isinstance(raw, dict) and "methods" in raw and ("job" in raw or "base" in raw)
    return "sweep" if is_sweep else "job"


def parse_kind(raw: dict[str, Any], kind: str, model: type[Any], source: str = "spec") -> Any:
    """A spec that says its `kind:` (prompt programs, compare specs), validated by its pydantic model."""
    if raw.get("kind") != kind:
        raise SpecError(f"{source}: kind: must be {kind} (got {raw.get('kind')!r})")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"{source}: {describe(err)}") from None


def parse_spec(raw: dict[str, Any], source: str = "spec") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"{source}: {describe(err)}") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set a dotted key from 'a.b.c=value'; the value is parsed as YAML (numbers, lists, bools)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {item!r}: expected key.path=value")
    set_dotted(raw, key, yaml.safe_load(value), where=f"--set {key}")


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """raw['a']['b']['c'] = value for key 'a.b.c', creating mappings on the way; SpecError (prefixed
    with `where`, default the key) when a step on the way holds something else."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{where or key}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value
