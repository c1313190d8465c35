"""Cold start (issue #13): what a local `onebase run` starts on its way to the first training step.

The timing itself is bench/coldstart.py's (docs/benchmarks.md); here, the pieces it rests on."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from conftest import tiny_spec
from onebase import runtime
from onebase.spec import parse_spec
from onebase.tracking import mlflow_run
from onebase.train.console import Console, ProgressBoard
from onebase.train.ds_ops import extensions_dir
from onebase.train.launch import run_job
from onebase.train.tracker import Recorder, Relayed


@ray.remote(num_cpus=0)
def worker_env(keys: tuple[str, ...]) -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in keys}


def test_local_run_starts_only_the_actors_training_needs_and_workers_inherit_its_settings(ray_cluster, workspace):
    spec = tiny_spec("tiny-coldstart", train={"max_steps": 2, "eval_every_steps": None},
                     tracking={"register_model": False})
    api = runtime.DASHBOARD_URL  # this Ray's state API (other Rays may run on the machine)
    earlier = {actor.actor_id for actor in list_actors(address=api, limit=10_000)}  # other tests' runs
    result = run_job(parse_spec(spec), json.dumps(spec))

    started = {a.class_name for a in list_actors(address=api, limit=10_000) if a.actor_id not in earlier}
    assert {"TrainController", "RayTrainWorker", "ProgressBoard"} <= started
    # Each would be one more process starting beside the workers, doing nothing for this run: Ray
    # Data's dataset manager (no Ray Datasets here), the preemption watcher (no node drains on one
    # machine), the placement-group cleaner (this Ray ends with this driver).
    assert not started & {"DatasetManager", "PreemptionWatcher", "PlacementGroupCleaner"}, started

    # No job-wide runtime env (so actors can take Ray's prestarted workers): the settings reach every
    # worker through the environment the local Ray inherited.
    assert not ray.get_runtime_context().runtime_env.get("env_vars")
    keys = ("TORCH_EXTENSIONS_DIR", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PRINT_PATCH",
            "TOKENIZERS_PARALLELISM", "RAY_API_SERVER_ADDRESS")
    seen = ray.get(worker_env.remote(keys))
    assert seen["TORCH_EXTENSIONS_DIR"] == extensions_dir()
    assert seen["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] and seen["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert seen["TOKENIZERS_PARALLELISM"] == "false"
    # The state API of this Ray, for Ray Train's placement-group cleaner; this process keeps none.
    assert seen["RAY_API_SERVER_ADDRESS"] and seen["RAY_API_SERVER_ADDRESS"] != os.environ.get("RAY_API_SERVER_ADDRESS")

    # Where the worker's start-up went, logged at the first step (bench/coldstart.py reports these).
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    phases = {f"startup_{p}_s" for p in ("setup", "model", "tokenize", "engine", "tracking", "worker",
                                          "to_first_step")}
    assert phases <= set(metrics), sorted(set(metrics))
    assert metrics["startup_to_first_step_s"] > metrics["startup_worker_s"] > 0


def test_rank_0_logs_to_mlflow_through_the_drivers_board(ray_cluster, workspace):
    """With a progress board (`onebase run`), rank 0 relays its params and metrics and the driver writes
    them into the run, at the step and time rank 0 measured them (so the worker needs no MLflow of its own)."""
    spec = parse_spec(tiny_spec("tiny-relay"))
    uri = f"sqlite:///{workspace / 'relay.db'}"
    run_id = mlflow_run.start_run(uri, spec, "name: tiny-relay")
    board = ProgressBoard.remote()
    relayed = Relayed(board)  # what rank 0 holds
    relayed.params({"trainable_params": 74883, "precision": "fp32"})
    relayed.metrics({"loss": 1.25, "startup_model_s": 2.5}, 3)
    pushed_ms = int(time.time() * 1000)
    time.sleep(0.3)  # the driver writes them later, when its console drains the board
    with Console(board, log_every=1, out=io.StringIO(), live=False, record=Recorder(uri, run_id)):
        relayed.metrics({"loss": 0.75}, 4)
        relayed.flush()  # the last events are on the board before the block ends (and drains it)
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["trainable_params"] == "74883" and run.data.params["precision"] == "fp32"
    assert run.data.metrics["startup_model_s"] == 2.5
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 1.25), (4, 0.75)]
    assert history[0].timestamp <= pushed_ms  # when rank 0 measured it, not when the driver wrote it

    # A store that refuses what the driver writes fails the block, as it failed the worker that logged itself.
    board = ProgressBoard.remote()
    with pytest.raises(Exception, match="nope"):
        with Console(board, log_every=1, out=io.StringIO(), live=False, record=Recorder(uri, "nope")):
            Relayed(board).metrics({"loss": 1.0}, 1)
            ray.get(board.push.remote({"kind": "step", "step": 1, "total": 1, "loss": 1.0, "lr": 0.0,
                                       "tokens_per_s": 1.0, "samples_per_s": 1.0}))


def test_a_worker_that_relays_imports_deepspeed_without_mlflow():
    """DeepSpeed's autotuner imports MLflow (~0.8 s of each worker's start) only to log autotuning runs;
    a worker that does not log to MLflow itself imports DeepSpeed without it, and MLflow still imports
    afterwards should anything ask for it. A worker that logs itself gets DeepSpeed as it always did."""
    probe = ("import sys; from onebase.train.ds_ops import import_deepspeed; import_deepspeed(without_mlflow={}); "
             "import deepspeed.autotuning.autotuner as tuner; print('mlflow' in sys.modules, tuner.has_mlflow); "
             "import mlflow; print(mlflow.get_tracking_uri is not None)")

    def imported(without_mlflow: bool) -> list[str]:
        out = subprocess.run([sys.executable, "-c", probe.format(without_mlflow)], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout
        return out.split()[-3:]

    assert imported(True) == ["False", "False", "True"]
    assert imported(False) == ["True", "True", "True"]
