"""Held-out tasks: after training, each `evaluation.held_out` task is scored zero-shot on the trained
model and on the untuned base, on the same rows, as FLAN/T0 report instruction tuning.

A held-out task is a zero-shot prompt program (prompt/spec.py's fields: labels with verbalizers or
an extractor, instruction, template, scoring) on the job's base; the tuned side is the same program
with `adapter:` set to the job's export (merged into the base). Scoring reuses `onebase prompt eval`'s
Ray actors (prompt/evaluate.py): one actor set per side, every task run on it. The evaluation rows
are the validation split of the task's `data:` block, as for any program.

Results go to the job's MLflow run as `heldout/<task>/<metric>` (tuned) and
`heldout_base/<task>/<metric>` (base), into the export's onebase.json under `held_out`, and into
the run summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onebase.errors import OnebaseError, SpecError
from onebase.prompt.evaluate import Prepared, Workers, evaluate_on, finalise, prepare
from onebase.prompt.spec import KIND, ProgramSpec, parse_program_spec
from onebase.spec.schema import HeldOutTask, JobSpec

SIDES = {"tuned": "heldout", "base": "heldout_base"}  # side -> MLflow metric prefix
SHOWN = ("accuracy", "macro_f1", "exact_match")  # what the summary prints (MLflow gets every metric)


@dataclass
class HeldOut:
    name: str
    spec: ProgramSpec  # on the bare base; the tuned side sets `adapter`
    prepared: Prepared


def held_out_tasks(job: JobSpec) -> list[HeldOutTask]:
    return list(job.evaluation.held_out) if job.evaluation else []


def program_spec(job: JobSpec, index: int, task: HeldOutTask, adapter: str | None = None) -> ProgramSpec:
    """The zero-shot program that scores `task` on the job's base (+ `adapter`); errors name the task."""
    evaluation = job.evaluation
    raw: dict[str, Any] = {
        "kind": KIND, "name": f"{job.name}-heldout-{task.label}"[:100], "base": job.model.name,
        "base_init": job.model.init, "base_config_overrides": job.model.config_overrides, "adapter": adapter,
        "task": task.task, "labels": task.labels, "data": task.data.model_dump(), "instruction": task.instruction,
        "system": task.system, "template": task.template, "scoring": task.scoring,
        "max_new_tokens": task.max_new_tokens, "workers": evaluation.workers,
        "cpus_per_worker": evaluation.cpus_per_worker, "batch_size": evaluation.batch_size,
    }
    if task.extractor is not None:
        raw["extractor"] = task.extractor
    return parse_program_spec(raw, source=f"evaluation.held_out[{index}] ({task.label})")


def check_held_out(job: JobSpec) -> list[HeldOut]:
    """Before Ray (`onebase run` and `validate`): every held-out task is a valid zero-shot program on
    this base, its rows load, and the job trains something a program can run on."""
    tasks = held_out_tasks(job)
    if not tasks:
        return []
    from onebase.prompt.adapter import LOADED, MERGED

    if job.task != "causal-lm":
        raise SpecError(f"evaluation.held_out: held-out tasks are scored zero-shot by the tuned causal LM; "
                        f"this job trains {job.task}")
    if job.method.name not in MERGED | LOADED:
        raise SpecError(f"evaluation.held_out: method {job.method.name} feeds its own prefix and cannot run "
                        f"under a prompt program; use one of {', '.join(sorted(MERGED | LOADED))}")
    checked = []
    for index, task in enumerate(tasks):
        spec = program_spec(job, index, task)
        try:
            prepared = prepare(spec)
        except OnebaseError as err:
            raise type(err)(f"evaluation.held_out[{index}] ({task.label}): {err}") from None
        checked.append(HeldOut(task.label, spec, prepared))
    return checked


def evaluate_held_out(job: JobSpec, export_dir: Path, echo=print,
                      checked: list[HeldOut] | None = None) -> dict[str, dict[str, Any]]:
    """{task: {"task", "rows", "tuned": metrics, "base": metrics}}; Ray must be connected. `checked`: the
    tasks as pre-flight prepared them (their rows are not loaded again)."""
    from onebase.prompt.demos import build_program

    checked = check_held_out(job) if checked is None else checked
    results: dict[str, dict[str, Any]] = {
        item.name: {"task": item.spec.task, "rows": len(item.prepared.queries)} for item in checked}
    echo(f"held-out: scoring {', '.join(results)} zero-shot on the tuned model and on the base")
    for side, adapter in (("tuned", str(export_dir)), ("base", None)):
        first = checked[0].spec.model_copy(update={"adapter": adapter})
        workers = Workers(first, checked[0].prepared.model_path)  # one model load per actor for every task
        try:
            fingerprint = workers.fingerprint()  # the tuned side checks the export's base here
            for item in checked:
                spec = item.spec.model_copy(update={"adapter": adapter})
                program = build_program(spec, item.prepared.dataset.train, item.prepared.dataset.labels,
                                        fingerprint)
                metrics, _ = evaluate_on(workers, item.prepared, finalise(program, workers))
                results[item.name][side] = metrics
        finally:
            workers.close()
    return results


def metrics_for_mlflow(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"{prefix}/{name}/{metric}": value for name, result in results.items()
            for side, prefix in SIDES.items() for metric, value in result.get(side, {}).items()}


def record(uri: str, run_id: str, export_dir: Path, info: dict[str, Any],
           results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Log the figures to the run and write them into the export's onebase.json (before it is logged)."""
    from onebase.manifest import write_run_info
    from onebase.tracking import mlflow_run

    mlflow_run.log_metrics(uri, run_id, metrics_for_mlflow(results), step=int(info.get("steps") or 0))
    return write_run_info(export_dir, {**info, "held_out": results}).as_dict()


def after_export(job: JobSpec, uri: str, run_id: str, echo=print, checked: list[HeldOut] | None = None):
    """The hook `onebase run` passes to train_once: score, log and record the held-out tasks (`checked`:
    pre-flight's prepared tasks)."""
    def hook(export_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
        from onebase.runtime import root_cause
        from onebase.tracking import mlflow_run

        try:
            return record(uri, run_id, export_dir, info, evaluate_held_out(job, export_dir, echo, checked))
        except Exception as err:  # the run must not stay RUNNING; the export is on disk already
            mlflow_run.fail_run(uri, run_id, f"held-out evaluation: {root_cause(err)}")
            raise

    return hook if held_out_tasks(job) else None


def summary_lines(info: dict[str, Any]) -> list[str]:
    """`held-out <task>: accuracy 0.41 (base 0.33) | macro_f1 ...` per task, for the run summary."""
    lines = []
    for name, result in (info.get("held_out") or {}).items():
        tuned, base = result.get("tuned", {}), result.get("base", {})
        shown = [f"{m} {tuned[m]:.4f} (base {base.get(m, float('nan')):.4f})" for m in SHOWN if m in tuned]
        lines.append(f"held-out {name} ({result.get('rows')} rows): {' | '.join(shown)}")
    return lines
