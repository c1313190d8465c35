"""Bad input gets one clear line naming what is wrong, exit code 2, and no traceback, before Ray starts."""

from __future__ import annotations

import json

import pytest

from conftest import onebase_cli, tiny_spec, write_spec


def run_bad(workspace, spec: dict) -> str:
    path = write_spec(workspace / f"{spec['name']}.yaml", spec)
    result = onebase_cli("run", str(path), cwd=workspace, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("onebase: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "ray" not in result.stdout.lower(), "Ray must not start for bad input"
    return lines[0]


@pytest.mark.parametrize("change, expected", [
    ({"trian": {}}, "trian: unknown field"),
    ({"train": {"learning_rate": -1}}, "train.learning_rate"),
    ({"task": "translation"}, "task"),
    ({"method": {"name": "lorax"}}, "unknown method 'lorax'"),
    ({"method": {"name": "full", "r": 8}}, "r: unknown field (for method full)"),
    ({"method": {"name": "lora", "r": "big"}}, "r: Input should be a valid integer"),
    ({"deepspeed": {"stage": 2, "offload_param": True}}, "offload_param needs stage 3"),
    ({"deepspeed": {"stage": 5}}, "deepspeed.stage"),
    ({"prompt": {"template": "chat"}}, "only the causal-lm task uses a prompt template"),
    ({"data": {"source": "bundled:tweet-sentiment", "columns": {"txt": "x"}}}, "unknown role 'txt'"),
    ({"name": "../escape"}, "name: use letters"),
    ({"model": {"init": "pretrained", "config_overrides": {"hidden_size": 8}}}, "needs init: random"),
])
def test_spec_errors_name_the_field(workspace, change, expected):
    line = run_bad(workspace, tiny_spec("bad-spec", **change))
    assert expected in line


def test_missing_model_and_data(workspace):
    assert "/no/such/model" in run_bad(workspace, tiny_spec("m1", model={"name": "/no/such/model"}))
    missing = run_bad(workspace, tiny_spec("d1", data={"source": str(workspace / "nope.csv")}))
    assert "file not found" in missing and "nope.csv" in missing


def test_missing_column_and_label_outside_set(workspace):
    csv = workspace / "reviews.csv"
    csv.write_text("review,stars\ngreat,pos\nbad,neg\nmeh,pos\nok,neg\n")
    line = run_bad(workspace, tiny_spec("c1", data={"source": str(csv), "columns": {"text": "review"}}))
    assert "data.columns.label" in line and "'label'" in line
    labelled = {"source": str(csv), "columns": {"text": "review", "label": "stars"}, "labels": ["pos", "neu"],
                "validation": {"fraction": 0.5}}
    line = run_bad(workspace, tiny_spec("c2", data=labelled))
    assert "'neg'" in line and "not in the label set" in line


def test_jsonl_errors(workspace):
    bad = workspace / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": ["a"], "tags": ["O"]}) + "\n{oops\n")
    spec = tiny_spec("j1", task="token-classification", data={"source": str(bad)})
    assert "line 2 is not valid JSON" in run_bad(workspace, spec)


def test_validate_command_accepts_the_shipped_jobs(workspace):
    from conftest import REPO

    for job in sorted((REPO / "jobs").glob("*.yaml")):
        result = onebase_cli("validate", str(job), cwd=workspace, timeout=60)
        assert result.returncode == 0, f"{job.name}: {result.stderr}"
        assert ": ok (" in result.stdout


def test_set_override_is_validated(workspace):
    path = write_spec(workspace / "ok.yaml", tiny_spec("ok"))
    result = onebase_cli("validate", str(path), "--set", "scaling.num_workers=0", cwd=workspace, timeout=60)
    assert result.returncode == 2 and "scaling.num_workers" in result.stderr
