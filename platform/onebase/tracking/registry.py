"""Registry versions for trained adapters and models, tagged so serving can check the base."""

from __future__ import annotations

from onebase.manifest import RunInfo
from onebase.tracking.mlflow_run import client


def version_tags(info: RunInfo, export_sha256: str) -> dict[str, str]:
    trainable, total = info.trainable_params or 0, info.total_params or 0
    return {
        "base_model": str(info.base_model),
        "base_sha256": str(info.base_fingerprint),
        "method": info.method,
        "task": str(info.task),
        "trainable_params": str(trainable),
        "trainable_percent": f"{100 * trainable / max(total, 1):.4f}",
        "dataset_sha256": str(info.dataset_fingerprint),
        "export_sha256": export_sha256,
    }


def register(uri: str, name: str, run_id: str, artifact_path: str, tags: dict[str, str]) -> str:
    """Create a model version pointing at the run's artifact folder; returns the version number.

    mlflow.register_model needs a logged model; a plain artifact folder goes through
    create_model_version with the artifact URI as its source.
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    try:
        mlflow_client.create_registered_model(name, tags={"onebase": "true"})
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{mlflow_client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return str(version.version)
