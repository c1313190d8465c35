"""`onebase prompt eval`: check everything, run the program over the evaluation rows on Ray actors,
score it, log an MLflow run and register the program as a model version.

The evaluation rows are the job spec loader's validation split of `data:` (what a fine-tune of the
same data is evaluated on); demonstrations come from its training split only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onebase.data.sources import Dataset, load_dataset
from onebase.errors import ClusterError, SpecError
from onebase.prompt.answers import normalise
from onebase.prompt.demos import build_program, check_demo_count, row_query
from onebase.prompt.program import Program
from onebase.prompt.spec import ProgramSpec


@dataclass
class Prepared:
    spec: ProgramSpec
    model_path: str
    dataset: Dataset
    queries: list[str]
    golds: list[str]


@dataclass
class EvalResult:
    program: Program
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    export_dir: Path
    run_id: str | None = None
    run_url: str | None = None
    registered: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def prepare(spec: ProgramSpec) -> Prepared:
    """Every check that needs no Ray: the base is a causal LM, the data loads, labels have verbalizers,
    k fits the training split."""
    from transformers import AutoConfig

    from onebase.methods.prompt_learning import is_decoder_only
    from onebase.model.assets import check_model_available

    model_path = check_model_available(spec.base)
    config = AutoConfig.from_pretrained(model_path)
    if not is_decoder_only(config):
        raise SpecError(f"base: {spec.base} is not a causal LM (model type {config.model_type}); "
                        "a prompt program needs a decoder-only base")
    if spec.adapter:
        from onebase.prompt.adapter import check_export

        check_export(spec.adapter, spec.base)
    dataset = load_dataset(spec.job_spec())
    if spec.task == "classification":
        missing = [label for label in dataset.labels or [] if label not in (spec.labels or {})]
        if missing:
            raise SpecError(f"labels: the data has label {missing[0]!r} without a verbalizer")
    check_demo_count(spec, len(dataset.train))
    classification = spec.task == "classification"
    pairs = [row_query(r, classification) for r in dataset.validation]
    return Prepared(spec, model_path, dataset, [q for q, _ in pairs], [g for _, g in pairs])


class Workers:
    """Ray actors, one model load each; requests are split across them in contiguous shards."""

    def __init__(self, spec: ProgramSpec, model_path: str) -> None:
        import ray

        from onebase.prompt.worker import ProgramWorker

        cpus = ray.cluster_resources().get("CPU", 0)
        if spec.workers * spec.cpus_per_worker > cpus:
            raise ClusterError(f"workers: {spec.workers} x {spec.cpus_per_worker:g} CPU do not fit the cluster "
                               f"(CPU={cpus:g})")
        actor = ray.remote(num_cpus=spec.cpus_per_worker)(ProgramWorker)
        threads = max(1, int(spec.cpus_per_worker))
        self.actors = [actor.remote(spec.model_dump(mode="json"), model_path, threads) for _ in range(spec.workers)]
        self.adapter = spec.adapter

    def fingerprint(self) -> str:
        """The frozen base's fingerprint (before any adapter), checked against the adapter's base."""
        import ray

        fingerprint = ray.get(self.actors[0].fingerprint.remote())
        if self.adapter:
            from onebase.prompt.adapter import check_base_fingerprint

            check_base_fingerprint(self.adapter, fingerprint)
        return fingerprint

    def content_free(self, program: Program) -> list[float]:
        import ray

        return ray.get(self.actors[0].content_free.remote(program.model_dump(mode="json")))

    def predict(self, program: Program, texts: list[str]) -> tuple[list[dict[str, Any]], float]:
        """Predictions in order, and the summed actor seconds (for ms per query)."""
        import ray

        payload = program.model_dump(mode="json")
        size = -(-len(texts) // len(self.actors))
        futures = [a.predict.remote(payload, texts[i * size: (i + 1) * size])
                   for i, a in enumerate(self.actors) if texts[i * size: (i + 1) * size]]
        results = ray.get(futures)
        return [p for r in results for p in r["predictions"]], sum(r["seconds"] for r in results)

    def propose(self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        import ray

        return ray.get(self.actors[0].propose.remote(prompts, max_new_tokens, temperature, seed))

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def finalise(program: Program, workers: Workers) -> Program:
    """Measure what the program keeps from its base: p_cf for contextual calibration."""
    if program.calibration.mode == "contextual" and program.calibration.p_cf is None:
        program.calibration.p_cf = workers.content_free(program)
    return program


def score(spec: ProgramSpec, predictions: list[dict[str, Any]], golds: list[str], labels: list[str] | None,
          seconds: float) -> dict[str, float]:
    n = max(len(golds), 1)
    metrics = {"eval_samples": float(len(golds)),
               "prompt_tokens_per_query": sum(p["prompt_tokens"] for p in predictions) / n,
               "ms_per_query": 1000 * seconds / n,
               "answered": sum(p["answer"] is not None for p in predictions) / n}
    answers = [p["answer"] for p in predictions]
    if spec.task == "classification":
        from sklearn.metrics import f1_score

        preds = [a if a is not None else "\u2205" for a in answers]
        metrics["accuracy"] = sum(p == g for p, g in zip(preds, golds)) / n
        metrics["macro_f1"] = float(f1_score(golds, preds, labels=labels, average="macro", zero_division=0))
    else:
        metrics["exact_match"] = sum(normalise(a) == normalise(g) for a, g in zip(answers, golds)) / n
    return metrics


def evaluate_on(workers: Workers, prepared: Prepared, program: Program) -> tuple[dict[str, float], list[dict]]:
    predictions, seconds = workers.predict(program, prepared.queries)
    return score(prepared.spec, predictions, prepared.golds, prepared.dataset.labels, seconds), predictions


def evaluate_program(spec: ProgramSpec, spec_text: str, address: str | None = None, tracking_uri: str | None = None,
                     echo=print, instruction: str | None = None, register: bool = True) -> EvalResult:
    from onebase.runtime import connect_ray  # plain Ray: programs need none of Ray Train's settings

    prepared = prepare(spec)
    dataset = prepared.dataset
    echo(f"data: {len(dataset.train)} training / {len(dataset.validation)} evaluation rows"
         + (f", labels {dataset.labels}" if dataset.labels else ""))
    connect_ray(address)
    workers = Workers(spec, prepared.model_path)
    try:
        started = time.perf_counter()
        program = build_program(spec, dataset.train, dataset.labels, workers.fingerprint(), instruction)
        program = finalise(program, workers)
        metrics, predictions = evaluate_on(workers, prepared, program)
        metrics["wall_seconds"] = time.perf_counter() - started
    finally:
        workers.close()
    return record(prepared, spec_text, program, metrics, predictions, tracking_uri=tracking_uri, register=register)


def record(prepared: Prepared, spec_text: str, program: Program, metrics: dict[str, float],
           predictions: list[dict[str, Any]], tracking_uri: str | None = None, register: bool = True,
           report: dict[str, Any] | None = None) -> EvalResult:
    """Save the program under output.path/<name>/program, log the MLflow run, register a version."""
    from onebase.prompt import tracking
    from onebase.prompt.artifact import save_program
    from onebase.tracking import mlflow_run

    spec = prepared.spec
    uri = mlflow_run.resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    export_dir = save_program(program, Path(spec.output.path).expanduser().resolve() / spec.name / "program",
                              metrics)
    run_id = tracking.start(uri, spec, spec_text)
    full = {**(report or {}), "metrics": metrics,
            "predictions": [{**p, "gold": g} for p, g in zip(predictions, prepared.golds)]}
    registered = tracking.finish(uri, run_id, spec, program, export_dir, metrics, full,
                                 prepared.dataset.fingerprint(), register=register)
    return EvalResult(program, metrics, predictions, export_dir, run_id, mlflow_run.run_url(uri, run_id), registered,
                      extra=report or {})
