"""Pre-flight's model checks on a second process, while `onebase run` imports the rest and loads the data.

Whether the model resolves and the method applies to it on the meta device (train/preflight.py) is
the slow part of pre-flight: importing transformers' modeling code and PEFT (~2.7 s on 2 cores),
while the driver itself still has torch, Ray and MLflow to import (~2.7 s). A child forked before
those imports runs the checks on the other core. Ray still starts only after both have passed, and
the errors are the same lines, in the same order, as the checks made one after another
(preflight.preflight). Nothing here is imported but `os`, `json` and `threading`, so forking
early costs ~10 ms.

Where forking is unsafe (threads already running: a Ray, an MLflow client in this process) or
impossible, or the child ends in anything but a verdict, the checks run in this process as before.
"""

from __future__ import annotations

import json
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onebase.spec.schema import JobSpec

class ModelChecks:
    """check_model_available, check_method_base and check_method_applies of one spec, on a forked child."""

    def __init__(self, spec: JobSpec, pid: int | None, reader: int | None) -> None:
        self.spec, self.pid, self.reader = spec, pid, reader
        self.verdict: dict | None = None

    @classmethod
    def start(cls, spec: JobSpec) -> ModelChecks:
        if not hasattr(os, "fork") or threading.active_count() > 1:
            return cls(spec, None, None)  # checked in this process when asked
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(reader)
            _child(spec, writer)
        os.close(writer)
        return cls(spec, pid, reader)

    def failed_before_data(self) -> None:
        """The data failed to load in this process: the model's and the base's checks come first in
        pre-flight's order, so their error, if any, is the one to show."""
        verdict = self._wait()
        if verdict.get("stage") in ("model", "base"):
            raise _error(verdict)
        if not verdict:  # no child, or no verdict from it: the model's checks here, still before the data's
            _check_model(self.spec)

    def model_path(self, labels: list[str] | None) -> str:
        """The resolved model path once every model check passed; the first failure's error otherwise."""
        verdict = self._wait()
        if verdict.get("stage") in ("model", "base", "applies"):
            raise _error(verdict)
        if "model_path" in verdict:
            return verdict["model_path"]
        return _check_here(self.spec, labels)  # no child, or no verdict from it: as before, in this process

    def close(self) -> None:
        """Stop and reap a child whose verdict nobody asked for (the run failed before pre-flight)."""
        if self.pid is not None and self.verdict is None:
            import signal

            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait()

    def _wait(self) -> dict:
        if self.verdict is None:
            self.verdict = {}
            if self.pid is not None and self.reader is not None:
                with os.fdopen(self.reader, "rb") as pipe:
                    raw = pipe.read()
                os.waitpid(self.pid, 0)
                try:
                    self.verdict = json.loads(raw) if raw else {}
                except ValueError:
                    self.verdict = {}
        return self.verdict


def _check_model(spec: JobSpec) -> str:
    """The model resolves and the method may apply to it (pre-flight's first two checks); its path."""
    from onebase.model.assets import check_model_available
    from onebase.train.preflight import check_method_base

    model_path = check_model_available(spec.model.name, spec.model.revision)
    check_method_base(spec, model_path)
    return model_path


def _check_here(spec: JobSpec, labels: list[str] | None) -> str:
    from onebase.train.preflight import check_method_applies

    model_path = _check_model(spec)
    check_method_applies(spec, model_path, labels)
    return model_path


def _child(spec: JobSpec, writer: int) -> None:
    """Run the checks and write one JSON verdict: {"model_path"}, {"stage", "kind", "message"} for a
    user error, {"stage": "data"} when the data did not load (the model's checks had passed), or {}
    (anything unexpected: the parent then checks in its own process)."""
    verdict: dict = {}
    stage = "model"
    try:
        from onebase.data.sources import load_dataset
        from onebase.errors import OnebaseError
        from onebase.model.assets import check_model_available
        from onebase.train.preflight import check_method_applies, check_method_base

        try:
            model_path = check_model_available(spec.model.name, spec.model.revision)
            stage = "base"
            check_method_base(spec, model_path)
            stage = "data"
            labels = load_dataset(spec).labels
            stage = "applies"
            check_method_applies(spec, model_path, labels)
            verdict = {"model_path": model_path}
        except OnebaseError as err:
            # A data error is the parent's to report (it loads the same data); it then asks no more.
            verdict = {"stage": "data"} if stage == "data" else \
                {"stage": stage, "kind": type(err).__name__, "message": str(err)}
    except BaseException:  # noqa: BLE001 - anything else: the parent repeats the checks and shows it as before
        verdict = {}
    finally:
        try:
            os.write(writer, json.dumps(verdict).encode())
        finally:
            os._exit(0)  # no atexit handlers, no flushing of the parent's buffers a second time


def _error(verdict: dict) -> Exception:
    from onebase import errors

    kind = getattr(errors, verdict.get("kind", ""), None)
    if not (isinstance(kind, type) and issubclass(kind, errors.OnebaseError)):
        kind = errors.SpecError
    return kind(verdict["message"])
