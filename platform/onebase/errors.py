"""User-facing errors: each one renders as a single line naming what is wrong."""


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
