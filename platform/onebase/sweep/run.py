"""Run a sweep: every trial is the same Ray Train job `onebase run` starts, inside a Tune
function trainable (Ray Train V2 cannot be a Tune trainable itself), stopped early by ASHA.

MLflow: one parent run for the sweep, one child run per trial; the report and the registry
versions of each method's best trial go on the parent.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from onebase.errors import OnebaseError
from onebase.sweep.spec import SweepSpec, draw_trials, trial_spec

TRIAL_STARTUP_RETRIES = 5  # worker-group start attempts of 60 s each after the first


def run_sweep(sweep: SweepSpec, base: dict[str, Any], sweep_text: str, address: str | None = None,
              tracking_uri: str | None = None, echo=print) -> dict[str, Any]:
    from onebase.data.sources import load_dataset
    from onebase.model.assets import check_model_available
    from onebase.spec.load import parse_spec
    from onebase.sweep import report
    from onebase.tracking import mlflow_run
    from onebase.train import launch

    first = parse_spec(base)
    uri = mlflow_run.resolve_tracking_uri(tracking_uri, first.tracking.uri)
    trials = draw_trials(sweep)
    model_path = check_model_available(first.model.name, first.model.revision)
    for trial in trials:  # bases that a method cannot use (e.g. soft prompts on a decoder classifier)
        launch.check_method_base(trial_spec(base, trial), model_path)
    load_dataset(first)  # missing files and columns fail here, not in every trial
    launch.connect_ray(address)
    launch.check_resources(first)
    concurrency = min(sweep.max_concurrent_trials, launch.worker_slots(first) // first.scaling.num_workers)

    parent = mlflow_run.start_sweep_run(uri, first.tracking.experiment, sweep.name, sweep_text)
    out_dir = Path(first.output.path).expanduser().resolve() / sweep.name / parent
    echo(f"sweep {sweep.name}: {len(trials)} trials over {', '.join(sweep.methods)}; "
         f"{concurrency} at a time; mlflow parent run {parent}")
    try:
        errored = tune_trials(sweep, base, trials, uri, parent, out_dir, concurrency)
    except Exception as err:
        mlflow_run.fail_run(uri, parent, launch.root_cause(err))
        raise OnebaseError(f"sweep failed: {launch.root_cause(err)}") from err
    report.close_stopped_trials(uri, parent, errored)
    result = report.build(uri, parent, sweep.metric, sweep.mode, out_dir)
    if sweep.register_best:
        result["registered"] = report.register_best(uri, result, f"{first.tracking.registered_model or sweep.name}")
    mlflow_run.client(uri).set_terminated(parent, "FINISHED")
    return result


def tune_trials(sweep: SweepSpec, base: dict[str, Any], trials: list[dict[str, Any]], uri: str, parent: str,
                out_dir: Path, concurrency: int) -> set[str]:
    """Run the trials; returns the ids of those that failed (stopped ones are not failures)."""
    from ray import tune
    from ray.tune import CLIReporter
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=10**6, grace_period=sweep.scheduler.grace_period,
                               reduction_factor=sweep.scheduler.reduction_factor)
                 if sweep.scheduler.type == "asha" else FIFOScheduler())
    # Reports between evaluations (checkpoints) carry no metric; Tune must not reject them.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Trials are named "<method>-<n>" in Tune's progress table; their overrides go to MLflow.
    by_label = {f"{t['method']}-{t['index']}": t for t in trials}
    trainable = tune.with_parameters(trial_main, trials=by_label, base=base, uri=uri, parent=parent,
                                     out_dir=str(out_dir))
    failures = FailedTrials()
    reporter = CLIReporter(metric_columns=[sweep.metric, "step", "training_iteration"], parameter_columns=["trial"],
                           max_report_frequency=30, max_progress_rows=50)
    tuner = tune.Tuner(
        # The trial function only drives its Ray Train workers, which hold the CPUs/GPUs. It reserves
        # a token of memory instead of CPU: with {"CPU": 0.01}, two 1-CPU trials no longer fit 2 CPUs.
        tune.with_resources(trainable, {"memory": 2**20}),
        param_space={"trial": tune.grid_search(list(by_label))},
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=f"tune-{sweep.name}", storage_path=str(out_dir / "tune"),
                                  progress_reporter=reporter, verbose=1, callbacks=[failures],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        results = tuner.fit()
    finally:
        reap_orphan_controllers()
    errors = [r.error for r in results if r.error is not None]
    if errors and len(errors) == len(trials):
        raise errors[0]
    return failures.trial_ids


def reap_orphan_controllers(timeout_s: float = 60.0) -> list[str]:
    """Kill the Ray Train controllers of this driver's job that are still alive once the sweep is over.

    A trial Tune stops while it is starting its Train run can create the run's controller after Ray has
    already marked the trial's actor dead; that controller is then not fate-shared with it and keeps its
    workers' CPUs for good (on a 2-CPU machine, the next two-worker job waited for ever). Nothing of this
    job trains once `tuner.fit()` has returned, so every controller left is such an orphan. Returns their
    ids; waits (up to `timeout_s`) until Ray reports them dead, so their placement groups are released."""
    import ray
    from ray.util.state import list_actors

    def alive() -> list[str]:
        actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[
            ("class_name", "=", "TrainController"), ("state", "=", "ALIVE"),
            ("job_id", "=", ray.get_runtime_context().get_job_id())], raise_on_missing_output=False)
        return [a.actor_id for a in actors]

    try:
        orphans = alive()
    except Exception as err:  # e.g. a Ray Client driver without the state API: the sweep's result stands
        print(f"warning: could not check for Train runs left behind by stopped trials ({err})")
        return []
    for actor_id in orphans:  # by id: Ray has no handle-free public kill, and these have no name
        ray._private.worker.global_worker.core_worker.kill_actor(ray.ActorID.from_hex(actor_id), True)
    deadline = time.monotonic() + timeout_s
    while orphans and set(alive()) & set(orphans) and time.monotonic() < deadline:
        time.sleep(1)
    return orphans


class FailedTrials(Callback):
    """Collects the ids of trials that raised (not those the scheduler stopped)."""

    def __init__(self) -> None:
        self.trial_ids: set[str] = set()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.trial_ids.add(trial.trial_id)


def trial_main(config: dict[str, Any], trials: dict[str, dict[str, Any]], base: dict[str, Any], uri: str,
               parent: str, out_dir: str) -> None:
    """One Tune trial: the `onebase run` path with a child MLflow run and Train→Tune reporting."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from onebase.data.sources import load_dataset
    from onebase.model.assets import check_model_available
    from onebase.tracking import mlflow_run
    from onebase.train import launch

    trial = trials[config["trial"]]
    spec = trial_spec(base, trial)
    spec.checkpoint.every_steps = None  # checkpoint at evaluations only: each Tune result then has the metric
    trial_id = tune.get_context().get_trial_id()
    run_id = mlflow_run.start_run(uri, spec, json.dumps(trial, indent=2), run_name=f"{trial['method']}-{trial_id}",
                                  parent_run_id=parent, tags={"onebase.trial": trial_id})
    job_dir = Path(out_dir) / "trials" / trial_id
    began = time.monotonic()
    model_path = check_model_available(spec.model.name, spec.model.revision)
    if stopped_by_tune():  # stopped while it was setting up: starting Train now would only leave an orphan
        return
    # Tune only starts a trial when its workers fit, so a worker group that cannot start is a
    # fault (e.g. resources held by something else): fail the trial, never wait for ever.
    outcome = launch.train_once(spec, model_path, load_dataset(spec), uri, run_id, job_dir, f"trial-{trial_id}",
                                register=False, callbacks=[TuneReportCallback()],
                                startup_retries=TRIAL_STARTUP_RETRIES)
    extra = {"wall_s": time.monotonic() - began, "adapter_bytes": float(weights_bytes(outcome.export_dir))}
    mlflow_run.log_metrics(uri, run_id, extra)
    tune.report({**outcome.metrics, **extra, "step": float(outcome.info.get("steps", 0))})


def stopped_by_tune() -> bool:
    """Whether Tune has already stopped this trial (the function keeps running in its thread until it returns)."""
    from ray.train._internal.session import get_session

    session = get_session()
    return bool(session and session.stop_event.is_set())


def weights_bytes(export_dir: Path) -> int:
    """Size of the trained weights on disk (tokenizer files and configs excluded)."""
    return sum(p.stat().st_size for p in export_dir.glob("*.safetensors"))
