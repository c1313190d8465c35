"""`onebase run`: check everything, start Ray Train, then log and register what was trained."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onebase import runtime
from onebase.errors import OnebaseError
from onebase.manifest import RunInfo, read_run_info, run_info
from onebase.methods import get_method
from onebase.spec.schema import JobSpec
from onebase.tracking import mlflow_run, registry
from onebase.train import heldout, startup
from onebase.train.console import Console, ProgressBoard
from onebase.train.deepspeed_config import nvme_folder, nvme_no_resume
from onebase.train.ds_ops import extensions_dir, pin_ninja
from onebase.train.forked_checks import ModelChecks
from onebase.train.loop import EXPORT_DIR, PROBE_FILE, train_loop_per_worker
from onebase.train.preflight import check_method_base, preflight
from onebase.train.tracker import Recorder

# Moved to onebase.runtime; still importable from here.
check_resources, root_cause = runtime.check_resources, runtime.root_cause
worker_resources, worker_slots = runtime.worker_resources, runtime.worker_slots

__all__ = ["TrainingFailed", "check_method_base", "check_resources", "connect_ray", "root_cause", "run_job",
           "train_once", "worker_resources", "worker_slots"]  # check_method_base: sweeps check each trial with it

STATE = "latest.json"


@dataclass
class RunResult:
    run_id: str
    run_url: str
    metrics: dict[str, float]
    export_dir: Path
    registered: str | None  # "name/version"
    info: RunInfo  # the export's onebase.json


def run_job(spec: JobSpec, spec_text: str, address: str | None = None, resume: bool = False,
            tracking_uri: str | None = None, echo=print, verbose: bool = False, progress: bool = True,
            model_checks: ModelChecks | None = None) -> RunResult:
    """`verbose`: Ray's, DeepSpeed's and the workers' own log lines on the console too;
    `progress`: the live progress bar / lines (see train/console.py); `model_checks`: pre-flight's
    model checks already started on a second process (train/forked_checks.py, the CLI's)."""
    started = time.time()  # the worker reports how long it took from here to its first step
    uri = mlflow_run.resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    job_dir = Path(spec.output.path).expanduser().resolve() / spec.name
    if resume and nvme_no_resume(spec):
        raise OnebaseError(f"--resume: {nvme_no_resume(spec)}")
    previous = read_state(job_dir) if resume else None

    tracking = None
    if model_checks is not None:  # while the model checks run on their process (~2.5 s), this one
        import mlflow  # noqa: F401 - imports MLflow (~0.7 s)

        if not verbose:
            runtime.quiet_driver_loggers()
        if startup.existing_sqlite_store(uri):  # and opens a store that is there already: reading only
            tracking = startup.TrackingWarmup(uri)
    checked = preflight(spec, uri, model_checks)
    model_path, dataset = checked.model_path, checked.dataset
    echo(f"data: {len(dataset.train)} training / {len(dataset.validation)} validation rows"
         + (f", labels {dataset.labels}" if dataset.labels else ""))

    if not verbose:
        runtime.quiet_driver_loggers()  # before the store opens on its thread: its set-up lines stay off
    tracking = tracking or startup.TrackingWarmup(uri)  # while Ray starts
    dashboard = connect_ray(address, quiet=not verbose)
    if is_local(address):
        startup.prestart_train_actors()  # while the MLflow run opens
    tracking.wait()
    check_resources(spec)

    run_id = previous["mlflow_run_id"] if previous else mlflow_run.start_run(uri, spec, spec_text)
    ray_name = previous["ray_run_name"] if previous else f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    write_state(job_dir, {"mlflow_run_id": run_id, "ray_run_name": ray_name, "tracking_uri": uri})
    if dashboard:
        echo(f"ray dashboard: {dashboard}")
    echo(f"mlflow run: {mlflow_run.run_url(uri, run_id)}" + (" (resumed)" if previous else ""))

    board = ProgressBoard.remote() if progress else None
    try:
        return train_once(spec, model_path, dataset, uri, run_id, job_dir, ray_name, alone=is_local(address),
                          extra_config={"driver_started": started, "progress_board": board},
                          after_export=heldout.after_export(spec, uri, run_id, echo, checked.held_out),
                          console=Console(board, spec.train.log_every_steps, record=Recorder(uri, run_id))
                          if board else None)
    except TrainingFailed as err:
        hint = "" if verbose else " (--verbose shows the workers' logs)"
        raise OnebaseError(f"training failed: {err.reason}{hint}") from err


class TrainingFailed(OnebaseError):
    """The Ray Train run failed; `reason` is its root cause in one line (already on the MLflow run)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def train_once(spec: JobSpec, model_path: str, dataset, uri: str, run_id: str, job_dir: Path, run_name: str, *,
               register: bool = True, callbacks=(), startup_retries: int = -1, alone: bool = False,
               extra_config: dict[str, Any] | None = None, console=None, after_export=None) -> RunResult:
    """One Ray Train run of a checked `spec` into MLflow run `run_id`, then its export collected,
    logged and (with `register`) registered: the core of `onebase run` and of every sweep trial.

    `callbacks`, `startup_retries`, `alone`: see make_trainer; `extra_config`: more for the workers' config;
    `console`: a context manager around training (the live progress display). A failure is marked
    on the MLflow run and raised as TrainingFailed. `after_export(export_dir, info) -> info`: runs on
    the export before it is logged (held-out evaluation, train/heldout.py)."""
    config = {**worker_config(spec, model_path, dataset, uri, run_id), **(extra_config or {})}
    try:
        with console or contextlib.nullcontext():
            result = make_trainer(spec, config, job_dir, run_name, callbacks=callbacks,
                                  startup_retries=startup_retries, alone=alone).fit()
    except Exception as err:  # Ray wraps worker errors; report the root cause in one line
        reason = root_cause(err)
        mlflow_run.fail_run(uri, run_id, reason)
        raise TrainingFailed(reason) from err
    finally:
        remove_job_swap(spec)
    return collect(spec, uri, run_id, result, job_dir, register=register, after_export=after_export)


def remove_job_swap(spec: JobSpec) -> None:
    """NVMe offload: the job's swap folder, where this node has it. Each worker deletes its own files
    when its loop ends, but Ray kills the workers still in a collective when another one fails."""
    import shutil

    folder = nvme_folder(spec)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def worker_config(spec: JobSpec, model_path: str, dataset, uri: str, run_id: str) -> dict[str, Any]:
    """What every Ray Train worker gets: the spec, the data (through the object store), tracking."""
    import ray

    return {"spec": spec.model_dump(mode="json"), "model_path": model_path, "data_ref": ray.put(dataset),
            "data_fingerprint": dataset.fingerprint(), "tracking_uri": uri, "mlflow_run_id": run_id,
            "fail_at_step": int(os.environ.get("ONEBASE_FAIL_AT_STEP", "0")) or None,
            "threads_per_worker": max(1, int(spec.scaling.resources_per_worker.get("CPU", 1)))}


def make_trainer(spec: JobSpec, config: dict[str, Any], job_dir: Path, ray_name: str, callbacks=(),
                 startup_retries: int = -1, alone: bool = False):
    """`startup_retries`: how many times a worker group that found no resources in time (60 s each,
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) is retried before the run fails; -1 waits for ever.
    `alone`: the only run on a Ray this process started (startup.trainer_class)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    resources = dict(spec.scaling.resources_per_worker)
    if spec.scaling.use_gpu:
        resources.setdefault("GPU", 1)
    return startup.trainer_class(alone_on_local_ray=alone)(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=ray_name, storage_path=str(job_dir / "ray"),
                             failure_config=FailureConfig(max_failures=spec.scaling.max_failures,
                                                          controller_failure_limit=startup_retries),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                             callbacks=list(callbacks)),
    )


def collect(spec: JobSpec, uri: str, run_id: str, result, job_dir: Path, register: bool = True,
            after_export=None) -> RunResult:
    """Copy the export out of the final checkpoint, log it to MLflow and register it."""
    import shutil

    export_dir = job_dir / "export"
    with result.checkpoint.as_directory() as path:
        if export_dir.exists():
            shutil.rmtree(export_dir)
        shutil.copytree(Path(path) / EXPORT_DIR, export_dir)
        shutil.copy(Path(path) / PROBE_FILE, job_dir / PROBE_FILE)
    info = read_run_info(export_dir)
    if after_export is not None:
        info = run_info(after_export(export_dir, info.as_dict()))
    method = get_method(spec.method.name)
    artifact_path = mlflow_run.finish_run(uri, run_id, export_dir, info, method.is_adapter)
    registered = None
    tags = registry.version_tags(info, mlflow_run.sha256_dir(export_dir))
    # Kept on the run, so a sweep can register its best trials later.
    mlflow_run.client(uri).set_tag(run_id, "onebase.version_tags", json.dumps(tags))
    mlflow_run.client(uri).set_tag(run_id, "onebase.artifact_path", artifact_path)
    if register and spec.tracking.register_model:
        name = spec.tracking.registered_model or spec.name
        registered = f"{name}/{registry.register(uri, name, run_id, artifact_path, tags)}"
    return RunResult(run_id=run_id, run_url=mlflow_run.run_url(uri, run_id), metrics=info.metrics,
                     export_dir=export_dir, registered=registered, info=info)


def connect_ray(address: str | None, quiet: bool = False) -> str | None:
    """`onebase.runtime.connect_ray` plus what Ray Train needs in this process and every worker."""
    import ray

    if ray.is_initialized():
        return runtime.DASHBOARD_URL
    env = {
        # Ray Train's default health check makes every report block ~2 s.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
        "TORCH_EXTENSIONS_DIR": extensions_dir(),
        # Sweep trials keep the user's working directory: relative data paths in a spec stay valid.
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        # Train V2 also copies print() into its logger, so each progress line reached the driver twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        **{k: os.environ.get(k, v) for k, v in startup.local_train_env(is_local(address)).items()},
    }
    pin_ninja()  # local workers inherit this PATH; workers on other nodes pin their own
    return runtime.connect_ray(address, quiet=quiet, env=env)


def is_local(address: str | None) -> bool:
    """Whether connect_ray(address) starts a fresh Ray on this machine (no cluster named anywhere)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def read_state(job_dir: Path) -> dict[str, str]:
    path = job_dir / STATE
    if not path.is_file():
        raise OnebaseError(f"--resume: no earlier run of this job under {job_dir}")
    return json.loads(path.read_text())


def write_state(job_dir: Path, state: dict[str, str]) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / STATE).write_text(json.dumps(state, indent=2))


def print_summary(result: RunResult, out=sys.stdout) -> None:
    shown = {k: round(v, 4) for k, v in result.metrics.items() if not k.endswith("eval_samples")}
    print(f"eval: {shown}", file=out)
    trainable, total = result.info.trainable_params or 0, result.info.total_params or 0
    print(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)", file=out)
    for line in heldout.summary_lines(result.info):
        print(line, file=out)
    print(f"export: {result.export_dir}", file=out)
    if result.registered:
        print(f"registered: {result.registered}", file=out)
