"""The replica's engine loop: one thread owns the model and runs every request in steps.

Generation requests become sequences of the engine's continuous batcher (`decode.Decoder`): they
join the running batch at the next step and leave it when done, so nothing holds the model for a
whole generation. Classification requests that arrived meanwhile run between two decode steps as
one batched forward. The queue is bounded: a request that finds `max_queue` others waiting is
refused (HTTP 429) rather than parked without limit. With a KV-cache budget (`kv_tokens`) a request
also waits in that queue until its reservation fits beside the running rows (`kv_budget.py`). A
request whose caller went away (HTTP disconnect cancels the Serve call) is marked cancelled and
leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from onebase.serve.artifacts import AdapterError
from onebase.serve.kv_budget import KvBudget
from onebase.serve.prefix_cache import PrefixCache


@dataclass
class Piece:
    """Streamed text of one sequence and the logprobs of the tokens it begins (None: not asked)."""

    text: str
    logprobs: list[dict[str, Any]] | None = None

    def __add__(self, other: Piece) -> Piece:
        logprobs = None if self.logprobs is None else self.logprobs + (other.logprobs or [])
        return Piece(self.text + other.text, logprobs)


class QueueFull(AdapterError):
    """Too many requests waiting on this replica."""

    status = 429


class Scheduler:
    def __init__(self, engine, max_rows: int, max_queue: int, wait_s: float, kv_tokens: int | None = None,
                 prefix_tokens: int = 0, prefill_thread: bool = False) -> None:
        self.engine, self.batcher = engine, engine.batcher
        self.batcher.kv = KvBudget(kv_tokens)
        self.batcher.prefix = PrefixCache(prefix_tokens)
        if prefill_thread:
            self.batcher.prefill_thread()
        self.max_rows, self.max_queue, self.wait_s = max_rows, max_queue, wait_s
        self.jobs: deque[tuple[str, list, Any, asyncio.AbstractEventLoop]] = deque()  # heads' forwards
        self.wake = threading.Condition()
        self.steps = 0
        # Events of one step (pieces, results) for the request handlers' event loops, handed over once per
        # step and loop: one wake-up of the replica's loop per step instead of one per row and token.
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, tuple]] = []
        threading.Thread(target=self._loop, name="onebase-scheduler", daemon=True).start()

    # ---- called from the replica's event loop -------------------------------------------------

    def load(self) -> dict[str, Any]:
        """Rows decoding, rows being prefilled beside them, requests waiting, sequences finished per reason
        (cancelled: client gone), the KV-cache budget's figures (positions reserved and held, now and at
        their peak) and the prefix cache's (prompts kept, rows that reused one, prompt tokens reused and
        prefilled)."""
        return {"running": self.batcher.running(), "prefilling": len(self.batcher.prefilling),
                "waiting": len(self.batcher.waiting),
                "finished": dict(self.batcher.finished), "kv": self.batcher.kv.summary(),
                "prefix_cache": self.batcher.prefix.summary()}

    def _admit(self, count: int) -> None:
        waiting = len(self.batcher.waiting) + sum(len(job[1]) for job in self.jobs)
        if waiting + count > self.max_queue:
            raise QueueFull(f"this replica has {waiting} requests waiting (max_queue {self.max_queue}); retry later")

    async def predict(self, rows: list, task: str) -> list[dict[str, Any]]:
        """A non-generating head's answers (classification, tags, spans), run between two decode steps."""
        self._admit(len(rows))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.wake:
            self.jobs.append((task, rows, future, loop))
            self.wake.notify()
        return await future

    async def generate(self, seqs: list, stream: bool = True) -> AsyncIterator[tuple[int, Piece | dict[str, Any]]]:
        """(index, Piece) as the sequences produce text (`stream`), then (index, result) once each
        is done. Pieces that piled up meanwhile come as one (their logprobs joined): under load, one
        event per several tokens rather than one per token through the replica's loop, the gateway
        and the HTTP proxy."""
        self._admit(len(seqs))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, seq in enumerate(seqs):
            if stream:  # a whole-answer request needs no per-token hop into the event loop
                seq.on_text = lambda text, logprobs, i=i: self._outbox.append(
                    (loop, events, (i, Piece(text, logprobs))))
            seq.on_done = lambda seq=seq, i=i: self._outbox.append((loop, events, (i, seq.result())))
        with self.wake:
            for seq in seqs:
                self.batcher.submit(seq)
            self.wake.notify()
        left = len(seqs)
        try:
            while left:
                for index, item in _coalesced([await events.get()] + _drain(events)):
                    left -= isinstance(item, dict)
                    yield index, item
        finally:  # the caller went away (or stopped reading): free the rows at the next step
            for seq in seqs:
                seq.cancelled = True
            with self.wake:
                self.wake.notify()

    # ---- the thread that owns the model --------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.jobs and not self.batcher.pending():
                    self.wake.wait()
                idle = not self.batcher.running() and not self.batcher.prefilling
            if idle and self.wait_s:
                time.sleep(self.wait_s)  # an idle replica lets a burst of requests arrive for one prefill
            self._predict()
            try:
                self.batcher.step(self.max_rows)
                self.steps += 1
            except Exception as err:  # a failing step fails its requests, never the loop
                self.batcher.fail_all(err)
            self._hand_over()

    def _hand_over(self) -> None:
        """This step's events to their event loops, one call per loop (the decoding thread fills the outbox)."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple]]] = {}
        for loop, events, item in outbox:
            by_loop.setdefault(loop, []).append((events, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed: nobody waits for these events any more
                pass

    def _predict(self) -> None:
        with self.wake:
            jobs, self.jobs = list(self.jobs), deque()
        by_task: dict[str, list] = {}
        for job in jobs:
            by_task.setdefault(job[0], []).append(job)
        for task, group in by_task.items():
            self._run_heads(task, group)

    def _run_heads(self, task: str, jobs: list) -> None:
        """One batched forward for every job of a task; a failure fails those jobs alone."""
        rows = [row for _, job_rows, _, _ in jobs for row in job_rows]
        try:
            results: list[Any] = self.engine.predict(rows, task)
        except Exception as err:
            if len(jobs) > 1:  # find the culprit: the others must not fail with it
                for job in jobs:
                    self._run_heads(task, [job])
                return
            results = [err] * len(rows)
        start = 0
        for _, job_rows, future, loop in jobs:
            part = results[start: start + len(job_rows)]
            start += len(job_rows)
            error = next((r for r in part if isinstance(r, Exception)), None)
            loop.call_soon_threadsafe(_settle, future, None if error else part, error)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for events, item in items:
        events.put_nowait(item)


def _drain(events: asyncio.Queue) -> list:
    items = []
    while not events.empty():
        items.append(events.get_nowait())
    return items


def _coalesced(items: list) -> list:
    """Consecutive pieces of one sequence joined (results and other sequences' pieces kept in order)."""
    out: list = []
    for index, item in items:
        if isinstance(item, Piece) and out and out[-1][0] == index and isinstance(out[-1][1], Piece):
            out[-1] = (index, out[-1][1] + item)
        else:
            out.append((index, item))
    return out
