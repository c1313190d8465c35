"""Rank 0's MLflow logging: straight into the run, or relayed through the driver's progress board.

`onebase run` shows a progress board (train/console.py) whose events the driver drains anyway, and
the driver holds an open MLflow client for the run it created. There rank 0 hands its params and
metrics to the board (`Relayed`) and the driver writes them (`Recorder`): the worker never imports
MLflow nor opens its store, ~2 s of CPU that, on a thread beside the model load, still held the GIL
and so delayed the first step (bench/coldstart.py, docs/benchmarks.md issue #13 part a). Without a
board (sweep trials, `progress=False`) rank 0 connects itself (`Tracker`), as before.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

from onebase.tracking import mlflow_run

PARAMS, METRICS = "params", "metrics"  # the board's event kinds for MLflow


class Tracker:
    """Rank 0 logs step metrics straight into the MLflow run the driver opened."""

    def __init__(self, config: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = config["tracking_uri"]
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = config["mlflow_run_id"]
        self.client.get_run(self.run_id)  # opens the store now (and fails early if the run is gone)

    @classmethod
    def connect(cls, config: dict[str, Any]) -> Future:
        """A Tracker made on a thread: `.result()` returns it (or raises what making it raised)."""
        future: Future = Future()

        def make() -> None:
            try:
                future.set_result(cls(config))
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits for it
                future.set_exception(err)

        threading.Thread(target=make, name="onebase-tracker", daemon=True).start()
        return future

    def params(self, params: dict[str, Any]) -> None:
        mlflow_run.log_params(self.client, self.run_id, params)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow_run.log_metrics(self.uri, self.run_id, metrics, step, mlflow_client=self.client)

    def flush(self) -> None:
        """Everything is written already."""


class Relayed:
    """Rank 0's side when the driver shows a board: params and metrics pushed to it, in order."""

    def __init__(self, board) -> None:
        self.board, self.last = board, None

    def params(self, params: dict[str, Any]) -> None:
        self.last = self.board.push.remote({"kind": PARAMS, "params": params})

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        self.last = self.board.push.remote({"kind": METRICS, "step": step, "at_ms": int(time.time() * 1000),
                                            "metrics": {k: float(v) for k, v in metrics.items()}})

    def flush(self) -> None:
        """Wait until the board holds every event pushed so far (one caller's actor calls run in
        order), so the driver, which drains the board once more when training returns, logs them all."""
        import ray

        if self.last is not None:
            ray.get(self.last)


class Recorder:
    """The driver's side: writes relayed events into the run with the driver's MLflow client."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.client = mlflow_run.client(uri)

    def __call__(self, event: dict[str, Any]) -> None:
        if event["kind"] == PARAMS:
            mlflow_run.log_params(self.client, self.run_id, event["params"])
        else:
            mlflow_run.log_metrics(self.uri, self.run_id, event["metrics"], event["step"], mlflow_client=self.client,
                                   at_ms=event["at_ms"])
