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
