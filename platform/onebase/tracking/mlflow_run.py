"""Driver-side MLflow: open the job's run, log the spec, then artifacts and the registry version."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from onebase.manifest import RunInfo
from onebase.spec.schema import JobSpec

MAX_PARAM_LENGTH = 6000  # MLflow rejects longer param values


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (e.g. a cluster's MLflow server, for submitted jobs), else ./mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking_uri(given: str | None, spec_uri: str | None = None) -> str:
    """Where a command tracks: --tracking-uri, else the spec's tracking.uri, else the default above."""
    return given or spec_uri or default_tracking_uri()


def client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec -> {'train.learning_rate': '5e-05', ...} for MLflow params."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, child in value.items():
            out.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = json.dumps(value) if isinstance(value, list) else str(value)
    return {prefix: text[:MAX_PARAM_LENGTH]}


def experiment_id(uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except MlflowException:  # created meanwhile by a concurrent trial
        return mlflow_client.get_experiment_by_name(name).experiment_id


def start_run(uri: str, spec: JobSpec, spec_text: str, run_name: str | None = None,
              parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    mlflow_client = client(uri)
    run_tags = {"onebase.job": spec.name, "onebase.task": spec.task, "onebase.method": spec.method.name,
                **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment_id(uri, spec.tracking.experiment), run_name=run_name or spec.name,
                                   tags=run_tags)
    log_params(mlflow_client, run.info.run_id, flatten(spec.model_dump(mode="json")))
    mlflow_client.log_text(run.info.run_id, spec_text, "spec.yaml")
    return run.info.run_id


def start_sweep_run(uri: str, experiment: str, name: str, sweep_text: str) -> str:
    mlflow_client = client(uri)
    run = mlflow_client.create_run(experiment_id(uri, experiment), run_name=name, tags={"onebase.sweep": name})
    mlflow_client.log_text(run.info.run_id, sweep_text, "sweep.yaml")
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0, mlflow_client=None,
                at_ms: int | None = None) -> None:
    """One batch of metrics at `step`; `mlflow_client`: one the caller holds (the training workers');
    `at_ms`: when they were measured, for metrics logged later on another's behalf (default: now)."""
    import time

    from mlflow.entities import Metric

    now = at_ms if at_ms is not None else int(time.time() * 1000)
    (mlflow_client or client(uri)).log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                                               for k, v in metrics.items()])


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    """Params as strings, 100 per call (MLflow's limit per batch)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i: i + 100])


def run_url(uri: str, run_id: str) -> str:
    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"{uri} experiment {run.info.experiment_id} run {run_id} (view: mlflow ui --backend-store-uri {uri})"


def sha256_dir(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def finish_run(uri: str, run_id: str, export_dir: Path, info: RunInfo, is_adapter: bool,
               status: str = "FINISHED") -> str:
    """Log the trained export and the eval report; returns the artifact path of the export."""
    mlflow_client = client(uri)
    artifact_path = "adapter" if is_adapter else "model"
    mlflow_client.log_artifacts(run_id, str(export_dir), artifact_path)
    mlflow_client.log_dict(run_id, info.metrics, "eval_report.json")
    mlflow_client.set_terminated(run_id, status)
    return artifact_path


def fail_run(uri: str, run_id: str, reason: str) -> None:
    mlflow_client = client(uri)
    mlflow_client.set_tag(run_id, "onebase.failure", reason[:5000])
    mlflow_client.set_terminated(run_id, "FAILED")
