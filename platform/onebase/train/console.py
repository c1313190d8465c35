"""What `onebase run` shows while it trains: one live progress bar on the driver, fed by rank 0.

Rank 0 pushes small events (step, loss, lr, throughput; evaluation results) to a `ProgressBoard`
actor; a thread on the driver drains it and draws them: a tqdm bar on a terminal, plain lines every
`log_every_steps` elsewhere (CI, `onebase jobs logs`). Worker log lines play no part in it. Rank 0's
MLflow params and metrics travel the same way and the driver writes them (train/tracker.py).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import ray

from onebase.train.tracker import METRICS, PARAMS

POLL_S = 0.25  # how late a step shows at most; the board answers in ~1 ms
PUSH_EVERY_S = 0.5  # rank 0 sends at most this often, plus at log steps, evaluations and the end


@ray.remote(num_cpus=0)  # no CPU: it must never take a worker's place
class ProgressBoard:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def push(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out


class Reporter:
    """Rank 0's side: loss and throughput since the last event, sent fire-and-forget."""

    def __init__(self, board, total: int, log_every: int) -> None:
        self.board, self.total, self.log_every = board, total, log_every
        self.losses: list[float] = []
        self.tokens = self.samples = 0
        self.seconds, self.last_push = 0.0, 0.0

    def add(self, loss: float, samples: int, tokens: int, seconds: float) -> None:
        """One micro-batch."""
        self.losses.append(loss)
        self.samples, self.tokens, self.seconds = self.samples + samples, self.tokens + tokens, self.seconds + seconds

    def step(self, step: int, lr: float) -> None:
        """An optimizer step ended."""
        due = step % self.log_every == 0 or step == self.total or time.monotonic() - self.last_push >= PUSH_EVERY_S
        if not due:
            return
        seconds = max(self.seconds, 1e-9)
        self.board.push.remote({"kind": "step", "step": step, "total": self.total, "lr": lr,
                                "loss": sum(self.losses) / max(len(self.losses), 1),
                                "tokens_per_s": self.tokens / seconds, "samples_per_s": self.samples / seconds})
        self.losses, self.tokens, self.samples, self.seconds = [], 0, 0, 0.0
        self.last_push = time.monotonic()

    def evaluated(self, step: int, metrics: dict[str, float], final: bool = False) -> None:
        self.board.push.remote({"kind": "eval", "step": step, "metrics": metrics, "final": final})


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def eval_line(event: dict[str, Any]) -> str:
    shown = " | ".join(f"{k} {v:.4g}" for k, v in event["metrics"].items() if k != "eval_samples")
    return f"[onebase] {'final eval' if event['final'] else 'eval'} at step {event['step']}: {shown}"


class Console:
    """The driver's side: a thread that draws the board's events until `close()`.

    `record`: writes rank 0's MLflow events (train/tracker.py Recorder); one that fails is raised
    when the block ends, as it would have failed the worker that logged itself."""

    def __init__(self, board, log_every: int, out: TextIO | None = None, live: bool | None = None,
                 record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.board, self.log_every, self.out, self.record = board, log_every, out or sys.stdout, record
        self.record_error: Exception | None = None
        self.live = self.out.isatty() if live is None else live
        self.bar = None
        self.began = time.monotonic()
        self.first_step: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="onebase-console", daemon=True)

    def __enter__(self) -> Console:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.drain()  # what arrived after the last poll
        if self.bar is not None:
            self.bar.close()
        if self.record_error is not None and exc[0] is None:
            raise self.record_error

    def _run(self) -> None:
        while not self.stop.wait(POLL_S):
            self.drain()

    def drain(self) -> None:
        try:
            events = ray.get(self.board.drain.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the board went with Ray at shutdown: nothing left to draw
            return
        for event in events:
            self.show(event)

    def show(self, event: dict[str, Any]) -> None:
        if event["kind"] in (PARAMS, METRICS):
            self.log(event)
            return
        if event["kind"] == "eval":
            self.write(eval_line(event))
            return
        if self.first_step is None:
            self.first_step, self.began = event["step"], time.monotonic()
        if self.live:
            self.draw_bar(event)
        elif event["step"] % self.log_every == 0 or event["step"] == event["total"]:
            self.write(self.plain_line(event))

    def log(self, event: dict[str, Any]) -> None:
        if self.record is None or self.record_error is not None:
            return
        try:
            self.record(event)
        except Exception as err:  # noqa: BLE001 - raised when the block ends, not in this thread
            self.record_error = err

    def draw_bar(self, event: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event["total"], initial=event["step"] - 1, unit="step", file=self.out,
                            dynamic_ncols=True, desc="[onebase] train")
        self.bar.set_postfix_str(f"loss {event['loss']:.4f} | lr {event['lr']:.2e} | "
                                 f"{event['tokens_per_s']:,.0f} tok/s", refresh=False)
        self.bar.update(event["step"] - self.bar.n)

    def plain_line(self, event: dict[str, Any]) -> str:
        step, total = event["step"], event["total"]
        elapsed = time.monotonic() - self.began
        done = max(step - (self.first_step or step), 0)
        eta = clock(elapsed / done * (total - step)) if done or step == total else "?"
        return (f"[onebase] step {step}/{total} ({100 * step / total:3.0f}%) | loss {event['loss']:.4f} | "
                f"lr {event['lr']:.2e} | {event['tokens_per_s']:,.0f} tok/s | "
                f"{event['samples_per_s']:.1f} samples/s | elapsed {clock(elapsed)} | ETA {eta}")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)
