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


FORKED_PREFLIGHT = """
import json, sys
from onebase.errors import OnebaseError
from onebase.spec import parse_spec
from onebase.train.forked_checks import ModelChecks
from onebase.train.preflight import preflight

def outcome(spec, checks):
    try:
        return preflight(parse_spec(spec), sys.argv[2], checks).model_path
    except OnebaseError as err:
        return f"{type(err).__name__}: {err}"

specs = json.loads(sys.argv[1])
forked = []
for spec in specs:  # as `onebase run` does: the checks forked first, then pre-flight in this process
    checks = ModelChecks.start(parse_spec(spec))
    try:
        forked.append([checks.pid is not None, outcome(spec, checks)])
    finally:
        checks.close()
# No child (threads already running, no fork): the same checks, in the same order, in this process.
unforked = [outcome(spec, ModelChecks(parse_spec(spec), None, None)) for spec in specs]
print(json.dumps({"forked": forked, "unforked": unforked, "here": [outcome(spec, None) for spec in specs]}))
"""


def test_model_checks_on_a_forked_process_say_what_checks_in_this_process_say_in_the_same_order(workspace):
    """`onebase run` checks the model and the method on a forked process while it imports the rest
    (train/forked_checks.py): a spec passes or fails there exactly as when every check runs here, and
    with two problems the one pre-flight checks first is named (model, method base, data, method)."""
    good = tiny_spec("tiny-forked", method={"name": "lora", "target_modules": ["query", "value"]})
    no_data = {"source": str(workspace / "missing.csv")}
    specs = [good,
             {**good, "method": {"name": "lora", "target_modules": ["nothing"]}},
             {**good, "method": {"name": "lora", "target_modules": ["nothing"]}, "data": no_data},
             {**good, "model": {"name": "no-such-model"}, "data": no_data}]
    uri = f"sqlite:///{workspace / 'forked.db'}"
    done = subprocess.run([sys.executable, "-c", FORKED_PREFLIGHT, json.dumps(specs), uri],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert all(forked for forked, _ in seen["forked"]), "a fresh interpreter forks the checks"
    assert [line for _, line in seen["forked"]] == seen["here"] == seen["unforked"]
    passed, no_module, data_first, model_first = seen["here"]
    assert "Error" not in passed
    assert no_module.startswith("SpecError: method: lora cannot be applied"), no_module
    assert data_first.startswith("DataError: data.source"), data_first
    assert model_first.startswith("ModelError: model.name"), model_first

