"""The sweep report, rebuilt from MLflow alone (so `--report-only <parent run>` works anywhere):
a table per method and a Pareto plot of metric vs trainable parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from onebase.tracking import mlflow_run, registry

COLUMNS = ["method", "metric", "trainable_params", "trainable_percent", "adapter_mb", "wall_s", "peak_memory_mb",
           "tokens_per_s", "trials", "stopped", "run_id"]


def trial_runs(uri: str, parent: str) -> list[Any]:
    """The trial runs (tagged onebase.trial) under a sweep's parent run. Other runs can be filed under the
    same parent (a compare's training row also holds the prompt program that scored its best draw): they
    are not trials."""
    client = mlflow_run.client(uri)
    run = client.get_run(parent)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                                  max_results=5000)
    return [c for c in children if "onebase.trial" in c.data.tags]


def close_stopped_trials(uri: str, parent: str, errored: set[str]) -> None:
    """Trials ASHA stopped never finish their MLflow run: mark them KILLED, tagged why.

    A stopped trial may also have seen its Train controller die first and marked its run FAILED;
    only trials Tune itself reports as errored (`errored`: trial ids) stay FAILED.
    """
    client = mlflow_run.client(uri)
    for run in trial_runs(uri, parent):
        stopped = run.info.status == "RUNNING" or (
            run.info.status == "FAILED" and run.data.tags.get("onebase.trial") not in errored)
        if stopped:
            if "onebase.failure" in run.data.tags:  # the controller's death, not the trial's fault
                client.delete_tag(run.info.run_id, "onebase.failure")
            client.set_tag(run.info.run_id, "onebase.stopped", "early-stopped by the scheduler")
            client.set_terminated(run.info.run_id, "KILLED")


def seconds_logged(client, run) -> float:
    """From the run's start to its last logged loss: the wall time of a trial that was stopped."""
    history = client.get_metric_history(run.info.run_id, "loss")
    return (max(m.timestamp for m in history) - run.info.start_time) / 1000 if history else math.nan


def trial_rows(uri: str, parent: str, metric: str) -> list[dict[str, Any]]:
    client = mlflow_run.client(uri)
    rows = []
    for run in trial_runs(uri, parent):
        metrics, tags, params = run.data.metrics, run.data.tags, run.data.params
        trainable = float(params.get("trainable_params", "nan"))
        total = float(params.get("total_params", "nan"))
        rows.append({
            "method": tags.get("onebase.method", "?"), "metric": metrics.get(metric, math.nan),
            "trainable_params": trainable, "trainable_percent": 100 * trainable / total if total else math.nan,
            "adapter_mb": metrics.get("adapter_bytes", math.nan) / 2**20,
            "wall_s": metrics.get("wall_s") or seconds_logged(client, run),
            "peak_memory_mb": metrics.get("peak_memory_mb", math.nan),
            # A stopped trial never logged its whole-run throughput: its last logging window stands in.
            "tokens_per_s": metrics.get("train_tokens_per_s", metrics.get("tokens_per_s", math.nan)),
            "finished": run.info.status == "FINISHED", "run_id": run.info.run_id,
        })
    return rows


def best_per_method(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best finished trial of each method (a stopped trial has no export to register)."""
    sign = 1 if mode == "max" else -1
    table = []
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        done = [r for r in mine if r["finished"] and not math.isnan(r["metric"])]
        pool = done or [r for r in mine if not math.isnan(r["metric"])] or mine
        best = max(pool, key=lambda r: sign * (r["metric"] if not math.isnan(r["metric"]) else -math.inf * sign))
        table.append({**best, "trials": len(mine), "stopped": sum(not r["finished"] for r in mine),
                      "registrable": bool(done)})
    return sorted(table, key=lambda r: -sign * (r["metric"] if not math.isnan(r["metric"]) else -math.inf * sign))


def markdown(table: list[dict[str, Any]], metric: str, title: str) -> str:
    lines = [f"# {title}", "", f"| method | {metric} | trainable params | trainable % | adapter MB | wall s | "
             "peak mem MB | tokens/s | trials (stopped) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']}{'' if r['registrable'] else ' (stopped)'} | {cell(r['metric'], '.4f')} | "
                     f"{cell(r['trainable_params'], ',.0f')} | {cell(r['trainable_percent'], '.3f')} | "
                     f"{cell(r['adapter_mb'], '.2f')} | {cell(r['wall_s'], '.0f')} | "
                     f"{cell(r['peak_memory_mb'], '.0f')} | {cell(r['tokens_per_s'], ',.0f')} | "
                     f"{r['trials']} ({r['stopped']}) |")
    notes = ["", "A method marked (stopped) had every trial stopped early by the scheduler: its figures are "
             "from the last evaluation before the stop, and it has no export (adapter size —)."]
    return "\n".join(lines + (notes if any(not r["registrable"] for r in table) else [])) + "\n"


def cell(value: float, spec: str) -> str:
    return "—" if value is None or math.isnan(value) else format(value, spec)


def pareto_plot(rows: list[dict[str, Any]], table: list[dict[str, Any]], metric: str, mode: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [r for r in rows if not math.isnan(r["metric"]) and r["trainable_params"] > 0]
    for method in sorted({r["method"] for r in points}):
        mine = [r for r in points if r["method"] == method]
        ax.scatter([r["trainable_params"] for r in mine], [r["metric"] for r in mine], label=method,
                   alpha=0.8, marker="o" if any(r["finished"] for r in mine) else "x")
    frontier = pareto_front(points, mode)
    if frontier:
        ax.plot([r["trainable_params"] for r in frontier], [r["metric"] for r in frontier], "k--", lw=1,
                label="Pareto front")
    for r in table:
        if not math.isnan(r["metric"]) and r["trainable_params"] > 0:
            ax.annotate(r["method"], (r["trainable_params"], r["metric"]), fontsize=8, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto_front(points: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Trials no other trial beats with fewer-or-equal trainable parameters."""
    sign = 1 if mode == "max" else -1
    front, best = [], -math.inf
    for r in sorted(points, key=lambda r: (r["trainable_params"], -sign * r["metric"])):
        if sign * r["metric"] > best:
            front.append(r)
            best = sign * r["metric"]
    return front


def build(uri: str, parent: str, metric: str, mode: str, out_dir: Path) -> dict[str, Any]:
    """Write report.md, pareto.png and report.json under out_dir and log them to the parent run."""
    client = mlflow_run.client(uri)
    rows = trial_rows(uri, parent, metric)
    if not rows:
        raise ValueError(f"run {parent} has no trial (child) runs: is it a sweep's parent run?")
    table = best_per_method(rows, mode)
    name = client.get_run(parent).info.run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(markdown(table, metric, f"Sweep {name}: best trial per method"))
    pareto_plot(rows, table, metric, mode, out_dir / "pareto.png")
    (out_dir / "report.json").write_text(json.dumps({"metric": metric, "mode": mode, "table": table,
                                                     "trials": rows}, indent=2, default=str))
    for file in ("report.md", "pareto.png", "report.json"):
        client.log_artifact(parent, str(out_dir / file), "report")
    for r in table:
        if not math.isnan(r["metric"]):
            client.log_metric(parent, f"best_{metric}.{r['method']}", r["metric"])
    return {"table": table, "trials": rows, "report_dir": out_dir, "parent_run_id": parent, "metric": metric}


def register_best(uri: str, result: dict[str, Any], name: str) -> dict[str, str]:
    """The best finished trial of each method becomes a version of one registered model."""
    client = mlflow_run.client(uri)
    registered = {}
    for r in result["table"]:
        if not r["registrable"]:
            continue
        tags = client.get_run(r["run_id"]).data.tags
        version_tags = {**json.loads(tags["onebase.version_tags"]), "sweep_parent_run": result["parent_run_id"],
                        result["metric"]: f"{r['metric']:.6f}"}
        version = registry.register(uri, name, r["run_id"], tags["onebase.artifact_path"], version_tags)
        registered[r["method"]] = f"{name}/{version}"
    return registered
