"""Cold start (issue #13): what a local `onebase run` starts on its way to the first training step.

The timing itself is bench/coldstart.py's (docs/benchmarks.md); here, the pieces it rests on."""

from __future__ import annotations

import json
import os

import ray
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from conftest import tiny_spec
from onebase import runtime
from onebase.spec import parse_spec
from onebase.train.ds_ops import extensions_dir
from onebase.train.launch import run_job


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
