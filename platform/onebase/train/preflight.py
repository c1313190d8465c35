"""Every check a job passes before Ray starts: `onebase run` and `onebase validate` both run these.

Each failure is a OnebaseError with one line naming what is wrong; nothing here starts Ray or trains.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from onebase.data.sources import Dataset, load_dataset
from onebase.errors import OnebaseError, SpecError, error_line
from onebase.methods import get_method
from onebase.model.assets import check_model_available
from onebase.spec.schema import JobSpec
from onebase.train.forked_checks import ModelChecks
from onebase.train.heldout import HeldOut, check_held_out

# MLflow tracking stores onebase can write to: a database, a local folder, or a tracking server.
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
REACH_TIMEOUT_S = 5.0


@dataclass
class Checked:
    model_path: str
    dataset: Dataset
    held_out: list[HeldOut]  # prepared once here, scored after training


def preflight(spec: JobSpec, tracking_uri: str, model_checks: ModelChecks | None = None) -> Checked:
    """Model, method on that model, data, tracking store, output folder: in that order.

    `model_checks`: the model's checks already under way on a second process (train/forked_checks.py,
    `onebase run`); their errors still come in this order."""
    if model_checks is None:
        model_path = check_model_available(spec.model.name, spec.model.revision)
        check_method_base(spec, model_path)
    try:
        dataset = load_dataset(spec)
    except OnebaseError:
        if model_checks is not None:
            model_checks.failed_before_data()
        raise
    if model_checks is None:
        check_method_applies(spec, model_path, dataset.labels)
    else:
        model_path = model_checks.model_path(dataset.labels)
    held_out = check_held_out(spec)  # evaluation.held_out: each task a valid zero-shot program whose rows load
    check_tracking_uri(tracking_uri)
    check_output_writable(spec.output.path)
    check_nvme_offload(spec)
    return Checked(model_path=model_path, dataset=dataset, held_out=held_out)


def check_method_base(spec: JobSpec, model_path: str) -> None:
    """Methods that cannot use this base (e.g. BitFit on a bias-free Llama) fail before Ray starts."""
    method = get_method(spec.method.name)
    if method.check_base is None:
        return
    from transformers import AutoConfig

    try:
        method.check_base(AutoConfig.from_pretrained(model_path, revision=spec.model.revision), spec.task)
    except ValueError as err:
        raise SpecError(f"method: {err}") from None


def check_method_applies(spec: JobSpec, model_path: str, labels: list[str] | None) -> None:
    """Apply the method to the model built on the meta device (no weights, no memory): target modules
    that match nothing, or a config the method's library refuses, fail here, not inside a Ray worker."""
    import torch

    from onebase.model.build import model_class, model_config

    try:
        config = model_config(spec, model_path, labels)
    except ValueError as err:
        raise SpecError(str(err)) from None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library deprecation chatter: not the user's problem
            model = model_class(spec.task).from_config(config)
            get_method(spec.method.name).apply(model, spec.method, spec.task)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise SpecError(f"method: {spec.method.name} cannot be applied to {spec.model.name}: "
                        f"{error_line(err)}") from None


def check_tracking_uri(uri: str) -> None:
    """A scheme MLflow can track to here, and a store that answers (servers) or can be created (files)."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("", "file"):
        folder = Path(parsed.path if scheme else uri).expanduser()
        check_writable(folder if folder.exists() else nearest_existing(folder), f"tracking.uri {uri}")
    elif scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///")).expanduser()  # sqlite:////abs.db or sqlite:///relative.db
        check_writable(nearest_existing(db.parent), f"tracking.uri {uri}")
    elif scheme in ("http", "https"):
        check_reachable(uri)
    elif scheme not in DB_SCHEMES and scheme != "databricks":
        raise SpecError(f"tracking.uri: unsupported scheme {parsed.scheme!r} in {uri} "
                        "(sqlite:///path.db, a folder, http(s)://server, or a database URI)")


def check_reachable(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=REACH_TIMEOUT_S) as response:
            response.read(64)
    except urllib.error.HTTPError:
        return  # it answered: a server behind a proxy may not expose /health
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise SpecError(f"tracking.uri: cannot reach the MLflow server at {uri} ({reason})") from None


def check_output_writable(path: str) -> None:
    folder = Path(path).expanduser()
    check_writable(folder if folder.is_dir() else nearest_existing(folder), "output.path")


def check_nvme_offload(spec: JobSpec) -> None:
    """NVMe offload needs a folder to swap into and DeepSpeed's async_io op (libaio) on this machine;
    without them DeepSpeed fails inside every worker, after Ray and the model have started."""
    ds = spec.deepspeed
    on_nvme = ds.on_nvme
    if not on_nvme:
        return
    check_writable(Path(ds.nvme_path or "/"), "deepspeed.nvme_path")  # the schema made sure it is given
    from onebase.train.ds_ops import async_io_missing

    missing = async_io_missing()
    if missing:
        raise SpecError(f"deepspeed.{on_nvme[0]}: nvme needs DeepSpeed's async_io op, which cannot build here: "
                        f"{missing}; offload to cpu instead")


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path, field: str) -> None:
    """Create and remove a scratch file: permissions, read-only mounts and full disks all show up."""
    if not folder.is_dir():
        raise SpecError(f"{field}: {folder} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".onebase-write-check-"):
            pass
    except OSError as err:
        raise SpecError(f"{field}: cannot write to {folder} ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(f"{field}: cannot write to {folder} (permission denied)")


def validate_job(spec: JobSpec, tracking_uri: str | None = None, address: str | None = None) -> str:
    """`onebase validate`: the same checks as `onebase run`; with an address, also whether the
    workers fit that running cluster (Ray is asked, never started). Returns a one-line summary."""
    from onebase.tracking.mlflow_run import resolve_tracking_uri

    checked = preflight(spec, resolve_tracking_uri(tracking_uri, spec.tracking.uri))
    summary = f"{len(checked.dataset.train)} training / {len(checked.dataset.validation)} validation rows"
    if address:
        summary += f"; fits {address}"
        check_fits_cluster(spec, address)
    return summary


def check_fits_cluster(spec: JobSpec, address: str) -> None:
    import ray

    from onebase.errors import ClusterError
    from onebase.runtime import check_ray_address, check_resources

    if address == "local":
        raise SpecError("--address: give a running cluster's address (validate never starts Ray)")
    check_ray_address(address)  # a dead address: one line now, not Ray's retries for minutes
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"--address {address}: cannot connect to a Ray cluster ({error_line(err)})") from None
    try:
        check_resources(spec)
    finally:
        ray.shutdown()
