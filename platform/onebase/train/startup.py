"""A shorter way from `onebase run` to the first training step: what Ray Train would start one after
another, started earlier, side by side, or not at all where it does nothing for a run.

Measured on 2 cores (bench/coldstart.py, docs/benchmarks.md issue #13 part a): every Ray actor is a
Python process whose start costs about a second of CPU, and Ray starts at most one per core at a
time, so each process Ray Train starts on the way to the first step delays it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from onebase.tracking import mlflow_run


def local_train_env(local: bool) -> dict[str, str]:
    """Ray Train settings for a run on a fresh local Ray (nothing for a cluster).

    The preemption watcher (one more actor, started while the workers load the model) follows node
    drains, which a single local machine never has; on a cluster it stays on."""
    return {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"} if local else {}


def prestart_train_actors() -> None:
    """Start the autoscaling coordinator Ray Train's controller asks for first, now, from the driver.

    The controller would create it and wait for its process before requesting the workers; created
    here, it starts while the driver opens the MLflow run, on a worker Ray prestarted (the driver has
    no runtime env of its own on a local Ray), and the controller finds it by name. A Ray without it
    (another version) is left alone: the controller then creates it as before."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()


def trainer_class(alone_on_local_ray: bool = False):
    """TorchTrainer without the actors of Ray Train's that do nothing for this run, each a process
    starting beside (and queued with) the workers':

    - Ray Data's dataset manager, when the run passes no Ray Datasets (onebase never does: its data
      travels in the object store);
    - with `alone_on_local_ray` (`onebase run` on the Ray it started itself), the placement-group
      cleaner, which frees a worker group's resources should the controller die while Ray lives on:
      that Ray ends with this run's driver. Sweeps keep it: Tune stops trials by killing them."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray: its default callbacks as they are
        return TorchTrainer
    idle = (PlacementGroupCleanerCallback,) if alone_on_local_ray else ()

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            unused = idle if getattr(self, "datasets", None) else (DatasetsCallback, *idle)
            return [c for c in callbacks if not isinstance(c, unused)] if unused else callbacks

    return Trainer


def existing_sqlite_store(uri: str) -> bool:
    """A sqlite tracking store whose database file is there already: opening it writes nothing (a
    new or empty one gets MLflow's tables), so it may be opened before pre-flight has passed."""
    if not uri.startswith("sqlite:///"):
        return False
    db = Path(uri.removeprefix("sqlite:///")).expanduser()
    return db.is_file() and db.stat().st_size > 0


class TrackingWarmup:
    """Open the MLflow store (the first connection creates or checks the database schema, ~1-2 s)
    on a thread while Ray starts, so opening the run afterwards is quick. Nothing is written that
    opening the run would not write."""

    def __init__(self, uri: str) -> None:
        self.thread = threading.Thread(target=self._open, args=(uri,), name="onebase-mlflow-warmup", daemon=True)
        self.thread.start()

    @staticmethod
    def _open(uri: str) -> None:
        try:
            mlflow_run.client(uri).search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - opening the run reports the store's problem in one line
            pass

    def wait(self) -> None:
        self.thread.join()
