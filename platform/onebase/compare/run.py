"""Run a compare: one MLflow parent run, a child run per row. Prompt rows run on Ray actors (one
model load per base, every program and seed scored on it), training rows as Ray Train jobs inside
Ray Tune (a learning-rate search per method), the generalist as a Ray Train job then a program on
its export. A row that fails is recorded failed with its one-line reason; the others go on."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from onebase.compare.plan import Row
from onebase.compare.rows import digest, ids_of_dataset_rows, row_ids
from onebase.compare.spec import CompareSpec
from onebase.errors import OnebaseError, root_cause
from onebase.tracking import mlflow_run

ROW_TAG = "onebase.compare.row"


def start_parent(uri: str, spec: CompareSpec, text: str) -> str:
    client = mlflow_run.client(uri)
    run = client.create_run(mlflow_run.experiment_id(uri, spec.tracking.experiment), run_name=spec.name,
                            tags={"onebase.compare": spec.name, "onebase.compare.metric": spec.metric_name()})
    client.log_text(run.info.run_id, text, "compare.yaml")
    return run.info.run_id


def start_child(uri: str, spec: CompareSpec, parent: str, row: Row) -> str:
    client = mlflow_run.client(uri)
    run = client.create_run(mlflow_run.experiment_id(uri, spec.tracking.experiment), run_name=row.name,
                            tags={"mlflow.parentRunId": parent, "onebase.compare.kind": row.kind})
    return run.info.run_id


def adopt(uri: str, run_id: str, parent: str) -> None:
    """A run made by `prompt eval|search` or `onebase run` becomes a child of this contender's run."""
    mlflow_run.client(uri).set_tag(run_id, "mlflow.parentRunId", parent)


def finish_child(uri: str, run_id: str, record: dict[str, Any], ids: list[str] | None) -> None:
    """Everything the report needs goes on the child run, so --report-only rebuilds from MLflow alone."""
    client = mlflow_run.client(uri)
    if ids is not None:
        client.log_dict(run_id, ids, "eval_row_ids.json")
        record["eval_rows"], record["eval_rows_sha256"] = len(ids), digest(ids)
    client.set_tag(run_id, ROW_TAG, json.dumps(record, default=float)[:7900])
    numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)
               and not math.isnan(v)}
    mlflow_run.log_metrics(uri, run_id, numbers)
    client.set_terminated(run_id, "FINISHED" if record["status"] == "finished" else "FAILED")


def settle(runner, spec: CompareSpec, row: Row, uri: str, child: str, out: Path, workers,
           wall_before: float = 0.0) -> dict[str, Any]:
    """Run one row (`runner` -> its figures and row ids) and record the outcome on its child run. A failure
    is recorded with its one-line reason, never raised: the other rows still run."""
    started = time.monotonic()
    record: dict[str, Any] = {"name": row.name, "kind": row.kind, "base": row.base, **row.params}
    ids = None
    try:
        result, ids = runner(spec, row, uri, child, out, workers)
        record.update(result, status="finished")
    except Exception as err:
        record.update(status="failed", reason=root_cause(err))
    record["wall_s"] = wall_before + time.monotonic() - started
    finish_child(uri, child, record, ids)
    return record


def shown(record: dict[str, Any]) -> str:
    return f"{record['metric']:.4f}" if record["status"] == "finished" else f"FAILED: {record['reason']}"


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_compare(spec: CompareSpec, rows: list[Row], text: str, address: str | None = None,
                tracking_uri: str | None = None, echo=print) -> dict[str, Any]:
    from onebase.compare import report
    from onebase.train.launch import connect_ray

    uri = mlflow_run.resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    connect_ray(address, quiet=True)  # first: it sets Ray Train's env vars when Ray starts
    parent = start_parent(uri, spec, text)
    out_dir = Path(spec.output.path).expanduser().resolve() / spec.name / parent
    echo(f"compare {spec.name}: {len(rows)} rows; mlflow parent run {parent}")
    workers: dict[tuple, Any] = {}
    try:
        for row in rows:
            child = start_child(uri, spec, parent, row)
            record = settle(RUNNERS[row.kind], spec, row, uri, child, out_dir / row.name, workers)
            echo(f"[compare] {row.name}: {shown(record)}")
    finally:
        close_pools(workers)
    result = report.build(uri, parent, out_dir)
    mlflow_run.client(uri).set_terminated(parent, "FINISHED")
    return result


def rescore(spec: CompareSpec, rows: list[Row], parent: str, names: list[str] | None = None,
            address: str | None = None, tracking_uri: str | None = None, echo=print) -> dict[str, Any]:
    """Finish training rows of an earlier compare again from the trials they already ran (by default the
    training rows that failed), then rebuild its report: a crash after training costs no retraining."""
    from onebase.compare import report
    from onebase.train.launch import connect_ray

    uri = mlflow_run.resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    try:
        done = recorded_rows(uri, parent)
    except Exception as err:  # a wrong run id is the usual cause
        raise OnebaseError(f"--rescore {parent}: {root_cause(err)}") from None
    planned = {r.name: r for r in rows}
    names = names or [n for n, (_, r) in done.items() if r["kind"] == "train" and r["status"] == "failed"]
    for name in names:
        if name not in done or planned.get(name) is None or planned[name].kind != "train":
            trained = ", ".join(n for n, (_, r) in done.items() if r["kind"] == "train") or "none"
            raise OnebaseError(f"--rescore: {name} is not a training row of compare run {parent} "
                               f"(its training rows: {trained})")
    connect_ray(address, quiet=True)
    out_dir = Path(spec.output.path).expanduser().resolve() / spec.name / parent
    workers: dict[tuple, Any] = {}
    try:
        for name in names:
            (child, before), row = done[name], planned[name]
            record = settle(finish_train, spec, row, uri, child, out_dir / row.name, workers,
                            wall_before=float(before.get("wall_s", 0.0)))
            echo(f"[compare] {name} rescored: {shown(record)}")
    finally:
        close_pools(workers)
    return report.build(uri, parent, out_dir)


def recorded_rows(uri: str, parent: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """{row name: (its child run id, its recorded row)} of a compare's parent run."""
    client = mlflow_run.client(uri)
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'", max_results=5000,
                                  order_by=["attributes.start_time ASC"])
    rows = {}
    for run in children:
        if ROW_TAG in run.data.tags:
            record = json.loads(run.data.tags[ROW_TAG])
            rows[record["name"]] = (run.info.run_id, record)
    return rows


# --- majority class -------------------------------------------------------------------------------

def run_majority(spec: CompareSpec, row: Row, uri: str, child: str, out: Path, workers) -> tuple[dict, list[str]]:
    import ray

    from onebase.compare.plan import majority_job
    from onebase.data.sources import load_dataset

    dataset = load_dataset(majority_job(spec))

    @ray.remote(num_cpus=0.5)
    def majority(train_labels: list[str], golds: list[str], labels: list[str]) -> dict[str, Any]:
        from sklearn.metrics import f1_score

        top = Counter(train_labels).most_common(1)[0][0]  # the training split's most frequent label
        preds = [top] * len(golds)
        return {"label": top, "accuracy": sum(p == g for p, g in zip(preds, golds)) / len(golds),
                "macro_f1": float(f1_score(golds, preds, labels=labels, average="macro", zero_division=0))}

    scored = ray.get(majority.remote([r["label"] for r in dataset.train], [r["label"] for r in dataset.validation],
                                     dataset.labels))
    return ({"metric": scored[spec.metric_name()], "metric_std": 0.0, "seeds": 1, "answer": scored["label"],
             "trainable_params": 0, "stored_bytes": len(scored["label"].encode()), "train_seconds": 0.0,
             "prompt_tokens_per_query": 0.0, "ms_per_query": 0.0},
            ids_of_dataset_rows(dataset.validation, True))


# --- prompt programs ------------------------------------------------------------------------------

def pool_for(workers: dict, program) -> Any:
    """One set of Ray actors per (base, adapter): each loads the model once for every program on it."""
    from onebase.prompt.evaluate import Workers, prepare

    key = (program.base, program.base_init, json.dumps(program.base_config_overrides, sort_keys=True),
           program.adapter)
    if key not in workers:
        close_pools(workers)  # two bases' actors at once would not fit 2 CPUs
        workers[key] = Workers(program, prepare(program).model_path)
    return workers[key]


def close_pools(workers: dict) -> None:
    """Stop every prompt actor pool (their CPUs go to whatever runs next)."""
    for key in list(workers):
        workers.pop(key).close()


def run_programs(spec: CompareSpec, row: Row, uri: str, child: str, out: Path, workers) -> tuple[dict, list[str]]:
    """Every seed's program scored on the evaluation rows; each seed logged, the best registered."""
    return record_programs(spec, [evaluate_program(p, workers) for p in row.programs], uri, child)


def evaluate_program(program_spec, workers) -> tuple:
    """One program scored on the evaluation rows: (spec, prepared rows, program, metrics, predictions)."""
    from onebase.prompt.demos import build_program
    from onebase.prompt.evaluate import finalise, prepare

    prepared = prepare(program_spec)
    pool = pool_for(workers, program_spec)
    program = finalise(build_program(program_spec, prepared.dataset.train, prepared.dataset.labels,
                                     pool.fingerprint()), pool)
    metrics, predictions = evaluate_sharing(pool, prepared, program)
    return program_spec, prepared, program, metrics, predictions


def record_programs(spec: CompareSpec, scored: list[tuple], uri: str, child: str) -> tuple[dict, list[str]]:
    """Log each scored program under the row's run, register the best; the row's figures over them."""
    from onebase.prompt.evaluate import record

    metric = spec.metric_name()
    best = max(range(len(scored)), key=lambda i: scored[i][3][metric])
    for i, (program_spec, prepared, program, metrics, predictions) in enumerate(scored):
        text = yaml.safe_dump(program_spec.model_dump(mode="json"), sort_keys=False)
        result = record(prepared, text, program, metrics, predictions, tracking_uri=uri, register=i == best)
        adopt(uri, result.run_id, child)
        if i == best:
            registered, export_dir = result.registered, result.export_dir
    values = [s[3][metric] for s in scored]
    mean, std = spread(values)
    ids = row_ids(list(zip(scored[0][1].queries, scored[0][1].golds)))
    if any(row_ids(list(zip(s[1].queries, s[1].golds))) != ids for s in scored):
        raise RuntimeError("the seeds of this row were scored on different rows")
    cost = [s[3] for s in scored]
    return ({"metric": mean, "metric_std": std, "seeds": len(values), "per_seed": values,
             "trainable_params": 0, "stored_bytes": dir_bytes(export_dir), "train_seconds": 0.0,
             "prompt_tokens_per_query": statistics.fmean(c["prompt_tokens_per_query"] for c in cost),
             "ms_per_query": statistics.fmean(c["ms_per_query"] for c in cost), "registered": registered}, ids)


def twin_key(program, prepared) -> str | None:
    """What decides a program's label probabilities before calibration: everything but its name and its
    calibration. None where calibration cannot be applied afterwards (generation, reasoning, voting)."""
    if not (program.is_classification and program.scoring == "loglik" and program.reasoning.mode == "direct"
            and program.self_consistency.samples == 1):
        return None
    fields = program.model_dump(mode="json", exclude={"name", "calibration"})
    return json.dumps([fields, row_ids(list(zip(prepared.queries, prepared.golds)))], sort_keys=True)


def evaluate_sharing(pool, prepared, program) -> tuple[dict[str, float], list[dict]]:
    """Score a program on the evaluation rows. A contextually calibrated program whose uncalibrated twin
    (same prompt, same demos, same rows) was scored on this pool reuses the twin's label probabilities:
    calibration only reweights them by p_cf (Zhao et al. 2021), so running the rows again would repeat
    the very same forwards. Its cost per query is the twin's: serving it costs exactly that."""
    from onebase.prompt.calibration import calibrate
    from onebase.prompt.evaluate import evaluate_on, score

    key = twin_key(program, prepared)
    memo = pool.__dict__.setdefault("uncalibrated", {})  # lives and dies with the pool's model
    if key is not None and program.calibration.mode == "contextual" and key in memo:
        twin, seconds = memo[key]
        labels = program.label_names
        probs = calibrate([[p["probs"][label] for label in labels] for p in twin], program.calibration.p_cf)
        predictions = [{**p, "probs": dict(zip(labels, q)), "answer": labels[max(range(len(q)), key=q.__getitem__)]}
                       for p, q in zip(twin, probs)]
        return score(prepared.spec, predictions, prepared.golds, prepared.dataset.labels, seconds), predictions
    metrics, predictions = evaluate_on(pool, prepared, program)
    if key is not None and program.calibration.mode == "none":
        memo[key] = (predictions, metrics["ms_per_query"] * len(prepared.golds) / 1000)
    return metrics, predictions


def run_ape(spec: CompareSpec, row: Row, uri: str, child: str, out: Path, workers) -> tuple[dict, list[str]]:
    from onebase.prompt.evaluate import prepare
    from onebase.prompt.search import search_program

    close_pools(workers)  # search starts its own actors
    program_spec = row.programs[0]
    result = search_program(program_spec, yaml.safe_dump(program_spec.model_dump(mode="json")), tracking_uri=uri,
                            echo=lambda *_: None)
    adopt(uri, result.run_id, child)
    prepared = prepare(program_spec)
    m = result.metrics
    return ({"metric": m[spec.metric_name()], "metric_std": 0.0, "seeds": 1, "instruction": result.extra["best"],
             "trainable_params": 0, "stored_bytes": dir_bytes(result.export_dir),
             "train_seconds": m.get("wall_seconds", 0.0), "prompt_tokens_per_query": m["prompt_tokens_per_query"],
             "ms_per_query": m["ms_per_query"], "registered": result.registered},
            row_ids(list(zip(prepared.queries, prepared.golds))))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --- training rows (Ray Tune over the learning rate) ----------------------------------------------

def run_train(spec: CompareSpec, row: Row, uri: str, child: str, out: Path, workers) -> tuple[dict, list[str]]:
    from onebase.sweep import report as sweep_report
    from onebase.sweep.run import tune_trials
    from onebase.sweep.spec import draw_trials, trial_spec
    from onebase.train.launch import worker_slots

    close_pools(workers)  # the prompt actors' CPUs go to the training workers
    trials = draw_trials(row.sweep)
    first = trial_spec(row.job, trials[0])
    concurrency = max(1, min(row.sweep.max_concurrent_trials, worker_slots(first) // first.scaling.num_workers))
    errored = tune_trials(row.sweep, row.job, trials, uri, child, out, concurrency)
    sweep_report.close_stopped_trials(uri, child, errored)
    return finish_train(spec, row, uri, child, out, workers)


def finish_train(spec: CompareSpec, row: Row, uri: str, child: str, out: Path, workers) -> tuple[dict, list[str]]:
    """The row's figures from the trials it ran (its runs under `child` in MLflow): the best draw by the
    compare's metric, registered, its cost per query measured."""
    from onebase.data.sources import load_dataset
    from onebase.model.assets import check_model_available
    from onebase.sweep import report as sweep_report
    from onebase.sweep.spec import draw_trials, trial_spec

    first = trial_spec(row.job, draw_trials(row.sweep)[0])
    classification = spec.task == "classification"
    # Training evaluates a generative tune by its loss alone: every finished draw is scored here, as
    # the prompt rows are, so the best draw is chosen (and registered) by the compare's metric.
    draws_scored = {} if classification else score_draws(spec, row, uri, child, out, workers)
    result = sweep_report.build(uri, child, spec.metric_name(), "max", out)
    draws = [r["metric"] for r in result["trials"] if not math.isnan(r["metric"])]
    if not draws:
        raise RuntimeError(f"no learning-rate draw of {row.name} finished with a {spec.metric_name()}")
    registered = sweep_report.register_best(uri, result, first.tracking.registered_model or first.name)
    best = result["table"][0]
    dataset = load_dataset(first)
    ids = ids_of_dataset_rows(dataset.validation, classification)
    record = {"metric": best["metric"], "metric_std": math.nan, "seeds": 1, "draws_scored": len(draws),
              "draw_min": min(draws), "draw_max": max(draws), "trainable_params": best["trainable_params"],
              "stored_bytes": best["adapter_mb"] * 2**20, "train_seconds": best["wall_s"],
              "best_learning_rate": float(mlflow_run.client(uri).get_run(best["run_id"]).data.params.get(
                  "train.learning_rate", "nan")),
              "registered": next(iter(registered.values()), None),
              # for the learning curves (report.curves_plot): every draw's loss history, by MLflow run id
              "best_run_id": best["run_id"], "draw_run_ids": [r["run_id"] for r in result["trials"]]}
    if classification:
        from onebase.compare.infer import measure_on_ray

        export = download_export(uri, best["run_id"], out / "best")
        model_path = check_model_available(first.model.name, first.model.revision)
        record.update(measure_on_ray(first.model_dump(mode="json"), model_path, str(export),
                                     [r["text"] for r in dataset.validation], dataset.labels,
                                     batch_size=program_batch_size(spec)))
    else:  # the best draw's export under the zero-shot program, logged like a prompt row (scored once)
        scored, _ = record_programs(spec, [draws_scored[best["run_id"]]], uri, child)
        record.update({k: scored[k] for k in ("prompt_tokens_per_query", "ms_per_query")})
    return record, ids


def program_batch_size(spec: CompareSpec) -> int:
    """The batch the prompt rows forward at: a tuned classifier's cost per query is measured at the same
    batch (and one thread), so the two costs compare like for like."""
    from onebase.prompt.spec import ProgramSpec

    return int(spec.program.get("batch_size", ProgramSpec.model_fields["batch_size"].default))


def score_draws(spec: CompareSpec, row: Row, uri: str, child: str, out: Path, workers) -> dict[str, tuple]:
    """Each finished draw's export under this task's zero-shot program (spec.program fields), its metric
    logged on the draw's own run; by run id, what `evaluate_program` returns."""
    from onebase.sweep import report as sweep_report

    metric, client, scored = spec.metric_name(), mlflow_run.client(uri), {}
    for run in sweep_report.trial_runs(uri, child):
        if run.info.status != "FINISHED":
            continue
        export = download_export(uri, run.info.run_id, out / "draws" / run.info.run_id)
        scored[run.info.run_id] = evaluate_program(export_program(spec, row, export), workers)
        client.log_metric(run.info.run_id, metric, scored[run.info.run_id][3][metric])
    close_pools(workers)
    return scored


def download_export(uri: str, run_id: str, dst: Path) -> Path:
    client = mlflow_run.client(uri)
    tags = client.get_run(run_id).data.tags
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, tags.get("onebase.artifact_path", "adapter"), str(dst)))


def export_program(spec: CompareSpec, row: Row, export: Path):
    """This task's zero-shot program (spec.program fields) with `export` as its adapter or weights."""
    from onebase.compare.plan import merge, parse_program, program_raw

    contender = next(c for c in spec.contenders if c.name == row.name)
    raw = merge(program_raw(spec, contender, f"{spec.name}-{row.name}-program"), {"adapter": str(export)})
    return parse_program(raw, f"contender {row.name}")


# --- the instruction-tuned generalist -------------------------------------------------------------

def run_generalist(spec: CompareSpec, row: Row, uri: str, child: str, out: Path, workers) -> tuple[dict, list[str]]:
    """Train the generalist's job (`job_file`) or take its export (`export:`), then score the export
    zero-shot. An export trained elsewhere was paid for once for every task it is compared on, so its
    train_seconds is left out (NaN) rather than guessed."""
    from onebase.manifest import read_run_info
    from onebase.sweep.run import weights_bytes

    close_pools(workers)
    program, record = row.programs[0], {"train_seconds": math.nan}
    if row.job is not None:
        program, record = train_generalist(spec, row, uri, child, out)
    export = Path(program.adapter)
    scored, ids = run_programs(spec, Row(row.name, "program", row.base, programs=[program]), uri, child, out,
                               workers)
    return ({**scored, **record, "trainable_params": float(read_run_info(export).trainable_params or math.nan),
             "stored_bytes": weights_bytes(export) + scored["stored_bytes"], "generalist_export": str(export)}, ids)


def train_generalist(spec: CompareSpec, row: Row, uri: str, child: str, out: Path) -> tuple[Any, dict[str, Any]]:
    """Run the generalist's job; its program now names the export (`adapter:`)."""
    from onebase.prompt.spec import parse_program_spec
    from onebase.spec.load import parse_spec
    from onebase.train.launch import run_job

    job = parse_spec({**row.job, "output": {"path": str(out)},
                      "tracking": {**row.job.get("tracking", {}), "experiment": spec.tracking.experiment,
                                   "uri": uri}})
    began = time.monotonic()
    trained = run_job(job, yaml.safe_dump(row.job, sort_keys=False), tracking_uri=uri, echo=lambda *_: None,
                      progress=False)
    train_seconds = time.monotonic() - began
    adopt(uri, trained.run_id, child)
    program = row.programs[0].model_copy(update={"adapter": str(trained.export_dir)})
    program = parse_program_spec(program.model_dump(mode="json"), source=f"contender {row.name}")
    return program, {"train_seconds": train_seconds, "generalist_registered": trained.registered,
                     "best_run_id": trained.run_id, "draw_run_ids": [trained.run_id]}


RUNNERS = {"majority": run_majority, "program": run_programs, "icl": run_programs, "ape": run_ape,
           "train": run_train, "generalist": run_generalist}
