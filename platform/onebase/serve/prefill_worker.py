"""A second thread that prefills arriving prompts while the decoding thread runs decode steps.

On a CPU replica a prefill and a decode step are each one thread's matrix products (one torch thread
per reserved CPU: two torch threads on one product wait for each other whenever one is preempted,
docs/benchmarks.md issue #12 (e5)). Two Python threads with a product each scale instead: torch
releases the GIL inside its kernels. So the decoding thread hands each step's arrivals to this
thread and goes on decoding the running rows; the prefilled rows (their KV cache and last logits)
join the batch at a later step. One job at a time: arrivals that come meanwhile wait in the queue
and are prefilled together next.

What two forwards at once may share: the model's weights (read only) and a LoRA pool in its gathered
path (each thread's rows are its own, `gathered.GatheredLora.rows`). What they may not: PEFT's
`adapter_names` path installs forward hooks on the model for the duration of a call, so such rows,
prompt-learning rows and anything that changes the model (hot load, unload) first wait for this
thread to be idle (`wait_idle`); the decoder only hands over rows whose prefill is safe beside a
decode step (`decode._Batch.overlaps`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


class PrefillWorker:
    """Runs one job (a function) at a time on its own thread; its result waits until `take` collects it."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._cond = threading.Condition()
        self._job: Callable[[], Any] | None = None
        self._result: list[Any] = []  # [result] once the job ran, until taken
        self._running = False
        threading.Thread(target=self._run, name="onebase-prefill", daemon=True).start()

    def busy(self) -> bool:
        """A job submitted and not yet taken (running, or done and waiting for `take`)."""
        with self._cond:
            return self._job is not None or self._running or bool(self._result)

    def submit(self, job: Callable[[], Any]) -> None:
        with self._cond:
            if self.busy():
                raise RuntimeError("the prefill worker already has a job")
            self._job = job
            self._cond.notify_all()

    def take(self, block: bool) -> tuple[bool, Any]:
        """(True, the finished job's result) or (False, None) when none is done (`block`: wait for the
        job submitted, if any)."""
        with self._cond:
            if block:
                self.wait_idle()
            if not self._result:
                return False, None
            return True, self._result.pop()

    def wait_idle(self) -> None:
        """Until no job runs (its result may still wait for `take`)."""
        with self._cond:
            while self._job is not None or self._running:
                self._cond.wait()

    def _run(self) -> None:
        torch.set_num_threads(self._threads)  # the decoding thread's count (the replica's `threads`)
        while True:
            with self._cond:
                while self._job is None:
                    self._cond.wait()
                job, self._job, self._running = self._job, None, True
            try:
                with torch.inference_mode():
                    result = job()
            except BaseException as err:  # the job's own failures are its result's business
                result = err
            with self._cond:
                self._running = False
                self._result.append(result)
                self._cond.notify_all()
