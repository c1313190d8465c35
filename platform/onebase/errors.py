"""User-facing errors: each one renders as a single line naming what is wrong; and the helpers that
turn a library's multi-line error (a traceback, a validation report) into that line."""

from __future__ import annotations


class OnebaseError(Exception):
    """An error caused by user input (spec, data, model, cluster); shown as one line, exit 2."""

    exit_code = 2


class SpecError(OnebaseError):
    """A job spec field is missing, unknown or invalid."""


class DataError(OnebaseError):
    """A data source is missing, malformed, or disagrees with the spec."""


class ModelError(OnebaseError):
    """A model cannot be found or does not fit the task."""


class ClusterError(OnebaseError):
    """The Ray cluster cannot run the job as asked (address, resources)."""


def validation_line(err) -> str:
    """A pydantic ValidationError's first problem as one line, 'field.path: message'."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{loc}: {msg}" if loc else msg


def error_line(source: BaseException | str | None, last: bool = False, limit: int | None = None) -> str:
    """The first (`last`: the last) non-empty line of an error or message, stripped and cut to
    `limit` characters; an error without text gives its type's name, an empty message ''."""
    lines = [line.strip() for line in str(source or "").splitlines() if line.strip()]
    line = (lines[-1] if last else lines[0]) if lines else (type(source).__name__ if isinstance(source, BaseException)
                                                             else "")
    return line[:limit] if limit else line


def root_cause(err: BaseException) -> str:
    """An exception chain as one line: the innermost cause's last line, with its type when that line
    does not already say what it is (Ray wraps worker errors several times)."""
    while err.__cause__ is not None:
        err = err.__cause__
    last = error_line(err, last=True)
    return last if ":" in last else f"{type(err).__name__}: {last}"
