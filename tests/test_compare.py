"""`onebase compare --quick`: every contender kind end to end on tiny models (real Ray, Tune, MLflow
sqlite), every row scored on the same evaluation rows, the report rebuilt from MLflow alone, and
bad input refused in one line before Ray starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, onebase_cli
from onebase.compare.report import PLOTS

TWEETS = {"source": "bundled:tweet-sentiment", "validation": {"fraction": 0.1, "seed": 42, "max_samples": 24}}
LABELS = {"negative": ["negative"], "neutral": ["neutral"], "positive": ["positive"]}


def compare_spec(**fields) -> dict:
    """Every contender kind once; --quick shrinks the bases to tiny random models."""
    spec = {
        "kind": "compare", "name": "tiny-compare", "task": "classification", "data": TWEETS, "labels": LABELS,
        "instruction": "Classify the sentiment.", "bases": {"decoder": {"name": "smollm2-135m-instruct"},
                                                             "encoder": {"name": "minilm"}},
        "program": {"template": "Tweet: {input}\nSentiment:"},
        "contenders": [
            {"kind": "majority", "name": "majority"},
            {"kind": "program", "name": "zero-shot", "base": "decoder", "seeds": [0]},
            {"kind": "icl", "name": "icl", "base": "decoder", "k": [2], "seeds": [0, 1],
             "labels": ["gold", "random"], "calibration": ["none", "contextual"]},
            {"kind": "ape", "name": "ape", "base": "decoder"},
            {"kind": "train", "name": "lora-decoder", "base": "decoder",
             "method": {"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
             "learning_rate": [1e-3, 1e-2], "draws": 2},
            {"kind": "generalist", "name": "generalist", "base": "decoder",
             "job_file": str(REPO / "jobs" / "flan-mixture-smollm2.yaml")},
        ],
        "tracking": {"experiment": "compare", "uri": None},
    }
    spec.update(fields)
    return spec


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("compare")
    # Its own store, named: an earlier test's mlflow.set_tracking_uri leaves MLFLOW_TRACKING_URI in this
    # process's environment, which every later CLI run would inherit.
    tracking = {"experiment": "compare", "uri": f"sqlite:///{work / 'mlflow.db'}"}
    path = write(work / "compare.yaml", compare_spec(tracking=tracking))
    result = onebase_cli("compare", str(path), "--quick", cwd=work, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    parent = result.stdout.split("mlflow parent run: ")[1].split()[0]
    return work, path, parent, result.stdout


@pytest.mark.slow
def test_quick_compare_scores_every_kind_on_the_same_rows(quick_run):
    work, _, parent, stdout = quick_run
    out = work / "runs" / "tiny-compare" / parent
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    expected = {"majority", "zero-shot", "icl-k2-gold", "icl-k2-gold-cal", "icl-k2-random", "icl-k2-random-cal",
                "ape", "lora-decoder", "generalist"}
    assert set(rows) == expected
    failed = {n: r.get("reason") for n, r in rows.items() if r["status"] != "finished"}
    assert not failed
    # The same row ids, recorded by each contender from the rows it actually scored.
    assert report["same_rows"]["same"] and len({r["eval_rows_sha256"] for r in rows.values()}) == 1
    assert all(r["eval_rows"] == 24 for r in rows.values())
    assert rows["icl-k2-gold"]["seeds"] == 2 and len(rows["icl-k2-gold"]["per_seed"]) == 2
    assert rows["lora-decoder"]["draws_scored"] == 2 and rows["lora-decoder"]["trainable_params"] > 0
    assert rows["lora-decoder"]["ms_per_query"] > 0 and rows["zero-shot"]["prompt_tokens_per_query"] > 0
    assert 0 < rows["generalist"]["stored_bytes"] and rows["majority"]["trainable_params"] == 0
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in expected)
    assert len(rows["lora-decoder"]["draw_run_ids"]) == 2  # every draw's loss curve is in the report
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 1000


@pytest.mark.slow
def test_a_generalist_trained_once_is_reused_by_export(quick_run):
    """`export:` scores an already-trained generalist without training it again: same export, same rows,
    same program, so the same score as the row that trained it."""
    work, _, parent, _ = quick_run
    first = {r["name"]: r for r in json.loads((work / "runs" / "tiny-compare" / parent / "report.json")
                                               .read_text())["rows"]}
    spec = compare_spec(name="tiny-reuse", contenders=[
        {"kind": "majority", "name": "majority"},
        {"kind": "generalist", "name": "generalist", "base": "decoder",
         "export": first["generalist"]["generalist_export"]}])
    result = onebase_cli("compare", str(write(work / "reuse.yaml", spec)), "--quick", cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reused = json.loads(next((work / "runs" / "tiny-reuse").glob("*/report.json")).read_text())
    row = {r["name"]: r for r in reused["rows"]}["generalist"]
    assert row["status"] == "finished" and row["metric"] == pytest.approx(first["generalist"]["metric"], abs=1e-9)
    assert row["train_seconds"] != row["train_seconds"]  # NaN: trained elsewhere, its cost not re-counted
    assert reused["same_rows"]["sha256"] == [first["majority"]["eval_rows_sha256"]]


@pytest.mark.slow
def test_report_only_rebuilds_the_same_table_from_mlflow(quick_run):
    work, path, parent, _ = quick_run
    rebuilt = onebase_cli("compare", str(path), "--report-only", parent, "--out", str(work / "again"), cwd=work)
    assert rebuilt.returncode == 0, rebuilt.stderr
    first = (work / "runs" / "tiny-compare" / parent / "report.md").read_text()
    assert (work / "again" / "report.md").read_text() == first


BAD = [
    ({"contenders": [{"kind": "oracle", "name": "x"}]}, "contenders.0"),
    ({"contenders": [{"kind": "train", "name": "bitfit", "base": "decoder", "method": {"name": "bitfit"},
                      "learning_rate": [1e-3, 1e-2]}]}, "bitfit"),
    ({"labels": None}, "labels"),
    ({"data": {"source": "reviews.csv", "columns": {"text": "review", "label": "stars"}},
      "contenders": [{"kind": "majority", "name": "m"}]}, "column"),
    ({"contenders": [{"kind": "generalist", "name": "g", "base": "decoder", "job_file": "nolabels.yaml"}]},
     "held_out"),
    ({"contenders": [{"kind": "generalist", "name": "g", "base": "decoder", "job_file": "nolabels.yaml",
                      "export": "runs/x"}]}, "exactly one of job_file"),
    ({"contenders": [{"kind": "generalist", "name": "g", "base": "decoder", "export": "reviews.csv"}]},
     "not a directory"),
]


@pytest.mark.parametrize("fields,needle", BAD, ids=["unknown-contender", "bitfit-on-llama", "no-labels",
                                                    "missing-column", "held-out-without-labels",
                                                    "generalist-two-sources", "generalist-export-not-an-export"])
def test_bad_input_is_one_line_exit_2_before_ray(tmp_path, fields, needle):
    (tmp_path / "reviews.csv").write_text("review,score\ngreat,5\nbad,1\n")
    job = yaml.safe_load((REPO / "jobs" / "flan-mixture-smollm2.yaml").read_text())
    job["evaluation"]["held_out"][0].pop("labels")
    write(tmp_path / "nolabels.yaml", job)
    path = write(tmp_path / "bad.yaml", compare_spec(**fields))
    result = onebase_cli("compare", str(path), cwd=tmp_path, env={"RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onebase: error:") and needle in lines[0], result.stderr
    assert not (tmp_path / "mlflow.db").exists() and shutil.which("python")


def test_a_calibrated_icl_row_reuses_its_twins_forwards_exactly(workspace, ray_cluster):
    """Contextual calibration only reweights label probabilities, so the calibrated ICL row is derived from
    its uncalibrated twin's scores; the result must equal scoring the calibrated program from scratch."""
    from onebase.compare.plan import plan
    from onebase.compare.quick import cut_down
    from onebase.compare.run import close_pools, evaluate_program, pool_for
    from onebase.compare.spec import parse_compare
    from onebase.prompt.evaluate import evaluate_on

    grid = {"kind": "icl", "name": "icl", "base": "decoder", "k": [2], "seeds": [0], "labels": ["gold"],
            "calibration": ["none", "contextual"]}
    spec = parse_compare(cut_down(compare_spec(contenders=[grid])))
    pools: dict = {}
    try:
        scored = [evaluate_program(row.programs[0], pools) for row in plan(spec, workspace)]
        (_, _, _, twin, twin_preds), (program_spec, prepared, program, shared, shared_preds) = scored
        fresh, fresh_preds = evaluate_on(pool_for(pools, program_spec), prepared, program)
    finally:
        close_pools(pools)
    assert program.calibration.mode == "contextual" and shared["ms_per_query"] == twin["ms_per_query"]
    assert [p["answer"] for p in shared_preds] == [p["answer"] for p in fresh_preds]
    for mine, theirs in zip(shared_preds, fresh_preds):
        assert mine["probs"] == pytest.approx(theirs["probs"], abs=1e-6)
    assert shared["macro_f1"] == fresh["macro_f1"]
    assert any(a["probs"] != pytest.approx(b["probs"], abs=1e-6) for a, b in zip(shared_preds, twin_preds))


@pytest.mark.slow
def test_a_generative_tune_is_scored_draw_by_draw_on_the_same_rows(tmp_path):
    """Training reports only a loss for a generative task: the compare scores every draw's export under the
    task's program, picks the best by exact match, logs each score on its draw's run and registers the best."""
    from mlflow.tracking import MlflowClient

    spec = {"kind": "compare", "name": "tiny-coins", "task": "generation",
            "data": {"source": "bundled:coin-flip?n=160&seed=0&people=2", "validation": {"fraction": 0.2}},
            "instruction": "Answer yes or no.", "bases": {"decoder": {"name": "smollm2-135m-instruct"}},
            "program": {"template": "chat", "extractor": {"kind": "regex", "pattern": "(?i)\\b(yes|no)\\b"}},
            "contenders": [
                {"kind": "program", "name": "direct", "base": "decoder", "program": {"scoring": "generate"}},
                {"kind": "train", "name": "lora-coins", "base": "decoder",
                 "method": {"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
                 "learning_rate": [1e-3, 1e-2], "draws": 2}],
            "tracking": {"experiment": "compare", "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    result = onebase_cli("compare", str(write(tmp_path / "coins.yaml", spec)), "--quick", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads(next((tmp_path / "runs" / "tiny-coins").glob("*/report.json")).read_text())
    rows = {r["name"]: r for r in report["rows"]}
    lora = rows["lora-coins"]
    assert lora["status"] == "finished", lora.get("reason")
    assert lora["draws_scored"] == 2 and lora["draw_min"] <= lora["metric"] == lora["draw_max"]
    assert lora["ms_per_query"] > 0 and lora["registered"]
    assert report["same_rows"]["same"] and rows["direct"]["eval_rows_sha256"] == lora["eval_rows_sha256"]
    client = MlflowClient(spec["tracking"]["uri"])  # not onebase's client(): it would set MLFLOW_TRACKING_URI here
    best = client.get_run(lora["best_run_id"])
    parent = best.data.tags["mlflow.parentRunId"]
    draws = [r for r in client.search_runs([best.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
             if "onebase.trial" in r.data.tags]
    assert sorted(r.data.metrics["exact_match"] for r in draws) == [lora["draw_min"], lora["draw_max"]]


@pytest.mark.slow
def test_rescore_finishes_a_training_row_again_from_the_trials_it_ran(quick_run):
    """`--rescore RUN_ID`: after a crash past training (say, in measuring the cost per query), the row is
    finished from the trials it already ran: nothing trains again, the same best draw, the report rebuilt."""
    work, path, parent, _ = quick_run
    report_json = work / "runs" / "tiny-compare" / parent / "report.json"
    before = {r["name"]: r for r in json.loads(report_json.read_text())["rows"]}
    result = onebase_cli("compare", str(path), "--quick", "--rescore", parent, "--rows", "lora-decoder", cwd=work,
                         timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[compare] lora-decoder rescored: " in result.stdout
    after = {r["name"]: r for r in json.loads(report_json.read_text())["rows"]}
    assert set(after) == set(before)
    old, new = before["lora-decoder"], after["lora-decoder"]
    assert new["status"] == "finished" and new["metric"] == old["metric"] and new["best_run_id"] == old["best_run_id"]
    assert sorted(new["draw_run_ids"]) == sorted(old["draw_run_ids"])  # the same two trials, none added
    assert new["wall_s"] > old["wall_s"] and new["ms_per_query"] > 0

    wrong = onebase_cli("compare", str(path), "--quick", "--rescore", parent, "--rows", "zero-shot", cwd=work)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        f"onebase: error: --rescore: zero-shot is not a training row of compare run {parent} "
        "(its training rows: lora-decoder)"]
