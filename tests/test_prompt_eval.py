"""`onebase prompt eval` and `onebase prompt search` end to end: real Ray actors, a real MLflow
(sqlite) registry, a tiny random Llama with SmolLM2's tokenizer over bundled tweets."""

from __future__ import annotations

import pytest
import yaml

from conftest import TINY_LLAMA

pytestmark = pytest.mark.slow

LABELS = {"negative": ["negative"], "neutral": ["neutral"], "positive": ["positive"]}


def write_program(workspace, name: str, **fields) -> str:
    spec = {"kind": "prompt-program", "name": name, "base": TINY_LLAMA["name"], "base_init": "random",
            "base_config_overrides": TINY_LLAMA["config_overrides"], "task": "classification", "labels": LABELS,
            "data": {"source": "bundled:tweet-sentiment", "max_samples": 120,
                     "validation": {"fraction": 0.1, "seed": 42, "max_samples": 16}},
            "instruction": "Classify the sentiment of this tweet.", "demos": {"k": 3, "selection": "balanced"},
            "calibration": {"mode": "contextual"}, "workers": 2, "batch_size": 8,
            "tracking": {"experiment": "prompt-tests", "registered_model": "tiny-prompt"},
            "output": {"path": str(workspace / "runs")}, **fields}
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def download(uri: str, name: str, version: str, workspace):
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    source = MlflowClient(tracking_uri=uri).get_model_version(name, version).source
    return download_artifacts(artifact_uri=source, dst_path=str(workspace / f"dl-{name}-{version}"),
                              tracking_uri=uri)


def test_eval_registers_a_program_tagged_like_an_adapter(workspace, ray_cluster, capsys):
    from mlflow.tracking import MlflowClient

    from onebase.cli import main
    from onebase.data.sources import load_dataset
    from onebase.model.assets import resolve_model
    from onebase.model.build import base_fingerprint
    from onebase.prompt import ProgramRunner, load_program
    from onebase.prompt.evaluate import prepare
    from onebase.prompt.spec import load_program_spec
    from onebase.prompt.worker import load_base

    uri = f"sqlite:///{workspace / 'prompt-mlflow.db'}"
    path = write_program(workspace, "tiny-sentiment-8shot")
    assert main(["prompt", "eval", path, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "registered: tiny-prompt/" in out
    version = out.split("registered: tiny-prompt/")[1].split()[0]

    spec = load_program_spec(path)
    model, tokenizer = load_base(spec, resolve_model(spec.base))
    dataset = load_dataset(spec.job_spec())
    tags = MlflowClient(tracking_uri=uri).get_model_version("tiny-prompt", version).tags
    assert tags["method"] == "prompt-program" and tags["task"] == "classification"
    assert tags["base_sha256"] == base_fingerprint(model)  # what serving compares with its base
    assert tags["dataset_sha256"] == dataset.fingerprint()
    assert tags["base_model"] == "smollm2-135m-instruct" and tags["trainable_params"] == "0"
    assert {"metric.macro_f1", "metric.accuracy", "metric.ms_per_query", "metric.prompt_tokens_per_query"} <= set(tags)

    program = load_program(download(uri, "tiny-prompt", version, workspace))
    train = {r["text"] for r in dataset.train}
    assert len(program.demos) == 3 and {d.input for d in program.demos} <= train
    assert not {d.input for d in program.demos} & {r["text"] for r in dataset.validation}
    assert program.calibration.p_cf is not None and sum(program.calibration.p_cf) == pytest.approx(1.0)

    # The registered program, run here on the same evaluation rows, gives what the Ray actors reported.
    prepared = prepare(spec)
    local = ProgramRunner(model, tokenizer, program).predict(prepared.queries)
    accuracy = sum(p.answer == g for p, g in zip(local, prepared.golds)) / len(prepared.golds)
    assert float(tags["metric.accuracy"]) == pytest.approx(accuracy, abs=1e-6)


def test_search_scores_on_dev_and_registers_the_best(workspace, ray_cluster, capsys):
    import json

    from mlflow.tracking import MlflowClient

    from onebase.cli import main
    from onebase.prompt import load_program

    uri = f"sqlite:///{workspace / 'prompt-mlflow.db'}"
    path = write_program(workspace, "tiny-sentiment-ape", demos={"k": 0}, tracking={
        "experiment": "prompt-tests", "registered_model": "tiny-prompt-ape"},
        search={"candidates": 2, "demos_per_proposal": 3, "dev_rows": 6, "top": 1, "variations": 1,
                "report_top": 2, "max_new_tokens": 6})
    assert main(["prompt", "search", path, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "| Classify the sentiment of this tweet." in out and "hand-written" in out
    client = MlflowClient(tracking_uri=uri)
    version = max(client.search_model_versions("name='tiny-prompt-ape'"), key=lambda v: int(v.version))
    run_dir = client.download_artifacts(version.run_id, "eval_report.json", str(workspace / "ape-report"))
    report = json.loads(open(run_dir).read())
    table = report["table"]
    assert table[0]["source"] == "hand-written" and len(table) >= 2
    assert all(0 <= row["dev"] <= 1 and 0 <= row["eval"] <= 1 for row in table)
    assert report["best"] == max(table, key=lambda row: row["dev"])["instruction"]  # chosen on dev only
    program = load_program(download(uri, "tiny-prompt-ape", version.version, workspace))
    assert program.instruction == report["best"]
