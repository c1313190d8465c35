"""Driver-side MLflow: open the job's run, log the spec, then artifacts and the registry version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from onebase.spec.schema import JobSpec

MAX_PARAM_LENGTH = 6000  # MLflow rejects longer param values


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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


def start_run(uri: str, spec: JobSpec, spec_text: str) -> str:
    from mlflow.entities import Param

    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(spec.tracking.experiment)
    experiment_id = (experiment.experiment_id if experiment
                     else mlflow_client.create_experiment(spec.tracking.experiment))
    run = mlflow_client.create_run(experiment_id, run_name=spec.name,
                                   tags={"onebase.job": spec.name, "onebase.task": spec.task,
                                         "onebase.method": spec.method.name})
    params = flatten(spec.model_dump(mode="json"))
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run.info.run_id, params=items[i: i + 100])
    mlflow_client.log_text(run.info.run_id, spec_text, "spec.yaml")
    return run.info.run_id


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


def finish_run(uri: str, run_id: str, export_dir: Path, info: dict[str, Any], is_adapter: bool,
               status: str = "FINISHED") -> str:
    """Log the trained export and the eval report; returns the artifact path of the export."""
    mlflow_client = client(uri)
    artifact_path = "adapter" if is_adapter else "model"
    mlflow_client.log_artifacts(run_id, str(export_dir), artifact_path)
    mlflow_client.log_dict(run_id, info["metrics"], "eval_report.json")
    mlflow_client.set_terminated(run_id, status)
    return artifact_path


def fail_run(uri: str, run_id: str, reason: str) -> None:
    mlflow_client = client(uri)
    mlflow_client.set_tag(run_id, "onebase.failure", reason[:5000])
    mlflow_client.set_terminated(run_id, "FAILED")
