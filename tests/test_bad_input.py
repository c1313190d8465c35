"""Bad input gets one clear line naming what is wrong, exit code 2, and no traceback, before Ray starts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from conftest import onebase_cli, tiny_spec, write_spec


def ray_sessions(ray_tmp: Path) -> list[Path]:
    """Ray sessions started under this RAY_TMPDIR: any `ray.init` that starts Ray creates one."""
    return list(ray_tmp.rglob("session_*"))


def test_the_no_ray_check_finds_a_session_when_ray_did_start(ray_cluster):
    # Every "Ray must not start" below rests on this: a started Ray leaves a session under RAY_TMPDIR.
    import os

    assert ray_sessions(Path(os.environ["RAY_TMPDIR"])), "a running Ray left no session dir to find"
    assert not ray_sessions(fresh_ray_tmp())


def fresh_ray_tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="obbad-", dir="/tmp"))  # short: Ray's socket paths are limited


def run_bad(workspace, spec: dict, command: str = "run") -> str:
    path = write_spec(workspace / f"{spec['name']}.yaml", spec)
    ray_tmp = fresh_ray_tmp()
    result = onebase_cli(command, str(path), cwd=workspace, timeout=120, env={"RAY_TMPDIR": str(ray_tmp)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("onebase: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert not ray_sessions(ray_tmp), "Ray must not start for bad input"
    return lines[0]


SPEC_ERRORS = [
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
]


def test_spec_errors_name_the_field(workspace):
    paths = [write_spec(workspace / f"bad-spec-{i}.yaml", tiny_spec("bad-spec", **change))
             for i, (change, _) in enumerate(SPEC_ERRORS)]
    results, ray_tmp = run_batch(workspace, [["run", str(path)] for path in paths])
    for (_, expected), result in zip(SPEC_ERRORS, results):
        assert expected in assert_one_line_exit_2(result)
    assert not ray_sessions(ray_tmp), "Ray must not start for bad input"


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

    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    results, ray_tmp = run_batch(workspace, [["validate", str(job)] for job in jobs])
    for job, result in zip(jobs, results):
        assert result["code"] == 0, f"{job.name}: {result['stderr']}"
        assert ": ok (" in result["stdout"]
    assert not ray_sessions(ray_tmp), "validate never starts Ray"


def test_set_override_is_validated(workspace):
    path = write_spec(workspace / "ok.yaml", tiny_spec("ok"))
    result = onebase_cli("validate", str(path), "--set", "scaling.num_workers=0", cwd=workspace, timeout=60)
    assert result.returncode == 2 and "scaling.num_workers" in result.stderr


# --- every pre-flight check, through `onebase run` and `onebase validate` in one interpreter -----------

REPO = Path(__file__).resolve().parents[1]


def is_job_spec(path: Path) -> bool:
    """Prompt programs and compare specs say their `kind:`, sweeps name their `job:`; each kind has its own
    bad-input tests (test_prompt.py, test_compare.py, test_sweep.py)."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    return isinstance(raw, dict) and "kind" not in raw and "job" not in raw


SHIPPED_JOBS = sorted(p for p in (REPO / "jobs").glob("*.yaml") if is_job_spec(p))
# Free-form mappings: any key is allowed there (Ray custom resources; the model's own config fields
# are checked against the architecture, so they stay in).
FREE_FORM = {("scaling", "resources_per_worker")}


def run_batch(workspace: Path, cases: list[list[str]], env: dict | None = None) -> tuple[list[dict], Path]:
    """Each argv through `onebase.cli.main` in one fresh interpreter (`env` added to its environment);
    its Ray temp dir comes back to check."""
    ray_tmp = fresh_ray_tmp()
    cases_file, results_file = workspace / "cases.json", workspace / "results.json"
    cases_file.write_text(json.dumps(cases))
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / "tests" / "cli_batch.py"), str(cases_file), str(results_file)],
                          cwd=workspace, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, **(env or {}), "RAY_TMPDIR": str(ray_tmp)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(results_file.read_text()), ray_tmp


def assert_one_line_exit_2(result: dict) -> str:
    where = f"{result['argv']}: {result['stderr'][-1500:]}"
    assert result["code"] == 2, where
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onebase: error: "), where
    assert not result["ray"], f"{result['argv']}: Ray was initialised"
    return lines[0]


def issue_cases(workspace: Path) -> dict[str, tuple[Path, str]]:
    """The inputs that used to slip through (issue #13), each with the words its one line must hold."""
    binary = workspace / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    one_label = workspace / "one-label.csv"
    one_label.write_text("text,label\n" + "".join(f"row {i},pos\n" for i in range(20)))
    empty_text = workspace / "empty-text.csv"
    empty_text.write_text("text,label\n" + "".join(f",{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    blocker = workspace / "a-file"
    blocker.write_text("not a folder")
    specs = {
        "unsupported tracking uri": (tiny_spec("u1", tracking={"uri": "ftp://example.org/mlflow"}),
                                     "tracking.uri: unsupported scheme 'ftp'"),
        "unwritable output path": (tiny_spec("u2", output={"path": str(blocker / "runs")}), "output.path"),
        "target modules match nothing": (tiny_spec("u3", method={"name": "lora", "target_modules": ["nope_proj"]}),
                                         "method: lora cannot be applied"),
        "bundled columns that do not exist": (tiny_spec("u4", data={"columns": {"text": "review"}}),
                                              "data.columns.text: column 'review' not in bundled:tweet-sentiment"),
        "binary csv": (tiny_spec("u5", data={"source": str(binary)}), "binary.csv"),
        "a single label": (tiny_spec("u6", data={"source": str(one_label), "validation": {"fraction": 0.2}}),
                           "classification needs at least two"),
        "every text empty": (tiny_spec("u7", data={"source": str(empty_text), "validation": {"fraction": 0.2}}),
                             "empty in every training row"),
        "config field the model lacks": (tiny_spec("u8", model={"name": "minilm", "init": "random",
                                                                 "config_overrides": {"hiddn_size": 8}}),
                                         "has no field 'hiddn_size'"),
    }
    out = {key: (write_spec(workspace / f"{spec['name']}.yaml", spec), expected)
           for key, (spec, expected) in specs.items()}
    latin1 = workspace / "latin1.yaml"
    latin1.write_bytes((workspace / "u1.yaml").read_bytes().replace(b"name: u1", b"name: caf\xe9"))
    out["non-UTF-8 spec"] = (latin1, "not UTF-8 text")
    return out


def test_what_slipped_through_now_fails_in_one_line_in_run_and_validate(workspace):
    cases = issue_cases(workspace)
    argvs = [[command, str(path)] for path, _ in cases.values() for command in ("validate", "run")]
    results, ray_tmp = run_batch(workspace, argvs)
    for (key, (_, expected)), pair in zip(cases.items(), zip(results[::2], results[1::2])):
        validate_line, run_line = (assert_one_line_exit_2(r) for r in pair)
        assert expected in run_line, f"{key}: {run_line}"
        assert validate_line == run_line, f"{key}: validate and run disagree"
    assert not ray_sessions(ray_tmp), "Ray must not start for bad input"


def test_a_spec_without_method_is_a_full_fine_tune(workspace):
    spec = tiny_spec("no-method")
    del spec["method"]
    (result,), _ = run_batch(workspace, [["validate", str(write_spec(workspace / "no-method.yaml", spec))]])
    assert result["code"] == 0 and "method full" in result["stdout"], result["stderr"]


def leaves(node, path=()):
    """(path, value) for every field of a spec, mappings included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*path, key), value
            if (*path, key) not in FREE_FORM:
                yield from leaves(value, (*path, key))


def set_at(spec: dict, path: tuple, value) -> dict:
    import copy

    out = copy.deepcopy(spec)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


DELETE = object()
REQUIRED = [("name",), ("task",), ("model",), ("data",), ("model", "name"), ("data", "source"), ("method", "name")]


def wrong_type(value):
    """A value of another kind than the field's: never valid for it."""
    if isinstance(value, bool):
        return "maybe"
    if isinstance(value, (int, float)):
        return "lots"
    if isinstance(value, str):
        return {"not": "a string"}
    if isinstance(value, list):
        return 7
    return 7  # a mapping


def mutations(spec: dict, workspace: Path):
    """(label, mutated spec): each must be refused."""
    for path in REQUIRED:
        if len(path) == 1 or path[0] in spec:
            yield f"delete {'.'.join(path)}", set_at(spec, path, DELETE)
    for path, value in leaves(spec):
        yield f"wrong type {'.'.join(path)}", set_at(spec, path, wrong_type(value))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"out of range {'.'.join(path)}", set_at(spec, path, -1)
        if isinstance(value, dict) and path not in FREE_FORM:
            yield f"unknown key in {'.'.join(path)}", set_at(spec, (*path, "bogus_field"), 1)
    yield "unknown top-level key", {**spec, "bogus_field": 1}
    noise = workspace / "noise"
    noise.mkdir(exist_ok=True)
    import random

    rng = random.Random(13)
    for suffix in (".csv", ".jsonl"):
        data = noise / f"random{suffix}"
        data.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
        yield f"random bytes as {suffix}", set_at(spec, ("data", "source"), str(data))


def test_mutated_shipped_specs_fail_in_one_line(workspace):
    """Property-style: every shipped job spec, mutated the ways users get specs wrong, is refused by both
    `validate` and `run` with exit 2 and one line, before Ray starts."""
    import yaml

    folder = workspace / "mutants"
    folder.mkdir(exist_ok=True)
    argvs, labels = [], []
    for job in SHIPPED_JOBS:
        spec = yaml.safe_load(job.read_text())
        spec.setdefault("tracking", {})["uri"] = f"sqlite:///{workspace / 'mutants.db'}"
        for i, (label, mutant) in enumerate(mutations(spec, workspace)):
            path = folder / f"{job.stem}-{i}.yaml"
            path.write_text(yaml.safe_dump(mutant, sort_keys=False))
            argvs.append(["validate", str(path)])
            labels.append(f"{job.name}: {label}")
        broken = folder / f"{job.stem}-latin1.yaml"
        broken.write_bytes(job.read_bytes() + "\nnote: caf\u00e9\n".encode("latin-1"))
        argvs.append(["validate", str(broken)])
        labels.append(f"{job.name}: non-UTF-8 bytes")
    assert len(argvs) > 100
    # validate first: a mutant it accepted would make `run` start Ray and train.
    for command in ("validate", "run"):
        results, ray_tmp = run_batch(workspace, [[command, *argv[1:]] for argv in argvs])
        for label, result in zip(labels, results):
            assert result["code"] == 2, f"{command} {label}: exit {result['code']}: {result['stderr'][-1500:]}"
            assert_one_line_exit_2(result)
        assert not ray_sessions(ray_tmp), "Ray must not start for bad input"
