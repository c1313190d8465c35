"""MLflow for programs: a run with the spec and metrics, the program as an artifact, a registry
version tagged like an adapter's (base_sha256, method, task, dataset_sha256, export_sha256)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onebase.manifest import RunInfo
from onebase.prompt.program import METHOD, Program
from onebase.prompt.spec import ProgramSpec
from onebase.tracking import mlflow_run, registry

ARTIFACT_PATH = "program"


def start(uri: str, spec: ProgramSpec, spec_text: str, run_name: str | None = None,
          parent_run_id: str | None = None) -> str:
    from mlflow.entities import Param

    client = mlflow_run.client(uri)
    tags = {"onebase.job": spec.name, "onebase.task": spec.task, "onebase.method": METHOD}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(mlflow_run.experiment_id(uri, spec.tracking.experiment),
                            run_name=run_name or spec.name, tags=tags)
    params = [Param(k, v) for k, v in mlflow_run.flatten(spec.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i: i + 100])
    client.log_text(run.info.run_id, spec_text, "spec.yaml")
    return run.info.run_id


def version_tags(program: Program, dataset_sha256: str, export_sha256: str) -> dict[str, str]:
    """The adapter tags (tracking.registry.version_tags) for a program: nothing trains, so 0 params."""
    info = RunInfo(base_model=program.base, base_fingerprint=program.base_sha256, method=METHOD, task=program.task,
                   trainable_params=0, total_params=0, dataset_fingerprint=dataset_sha256)
    tags = {**registry.version_tags(info, export_sha256), "program_k": str(program.k),
            "program_reasoning": program.reasoning.mode}
    if program.adapter:  # the program runs on base + this export: serving must apply it too
        tags.update({"adapter_path": program.adapter.path, "adapter_method": program.adapter.method,
                     "adapter_sha256": program.adapter.export_sha256 or ""})
    return tags


def finish(uri: str, run_id: str, spec: ProgramSpec, program: Program, export_dir: Path,
           metrics: dict[str, float], report: dict[str, Any], dataset_sha256: str, register: bool = True) -> str | None:
    """Log the program and its report, register a version; returns 'name/version' (None: not registered)."""
    client = mlflow_run.client(uri)
    mlflow_run.log_metrics(uri, run_id, metrics)
    client.log_artifacts(run_id, str(export_dir), ARTIFACT_PATH)
    client.log_dict(run_id, report, "eval_report.json")
    tags = version_tags(program, dataset_sha256, mlflow_run.sha256_dir(export_dir))
    for key, value in tags.items():
        client.set_tag(run_id, f"onebase.version.{key}", value)
    client.set_terminated(run_id, "FINISHED")
    if not (register and spec.tracking.register_model):
        return None
    name = spec.tracking.registered_model or spec.name
    version = registry.register(uri, name, run_id, ARTIFACT_PATH, tags)
    for key, value in metrics.items():  # the evaluated metrics travel with the version
        client.set_model_version_tag(name, version, f"metric.{key}", f"{value:.6g}")
    return f"{name}/{version}"
