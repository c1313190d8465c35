"""Cluster operations: `onebase submit`, `onebase jobs`, `onebase deploy`, the local stack.

Fast tests: bad input gets one line and exit 2 before (or without) a cluster. The slow one starts the
real local stack (a Ray head, a second Ray node, an MLflow server; infra/local-stack.sh) and talks to
it over the Jobs API and the dashboard only, as a user would; it never uses conftest's in-process Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_BERT, onebase_cli, write_spec
from onebase.runtime import free_port

TWEET_LABELS = {"negative", "neutral", "positive"}


def one_error(result) -> str:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("onebase: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def small_job(name: str, **changes) -> dict:
    """LoRA on the real bundled MiniLM, a handful of rows and steps, one worker."""
    spec = {
        "name": name,
        "task": "sequence-classification",
        "model": {"name": "minilm"},
        "data": {"source": "bundled:tweet-sentiment", "max_samples": 64, "max_length": 32,
                 "validation": {"max_samples": 32}},
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "train": {"max_steps": 4, "batch_size": 16, "learning_rate": 2e-3, "log_every_steps": 1},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "max_failures": 0},
        "tracking": {"experiment": "cluster", "registered_model": name},
    }
    spec.update(changes)
    return spec


@pytest.fixture(scope="module")
def dead_address() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture(scope="module")
def fake_dashboard():
    """Answers like a Ray dashboard that has no jobs: /api/version, and 404 for any job id."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/api/version":
                body, code = json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}), 200
            else:
                body, code = f"Job {self.path.split('/')[3] if self.path.count('/') > 2 else ''} does not exist", 404
            self.send_response(code)
            self.send_header("Content-Type", "application/json" if code == 200 else "text/plain")
            self.end_headers()
            self.wfile.write(body.encode())

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- fast: bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["submit", "SPEC"], ["jobs", "list"], ["jobs", "status", "some-job"], ["jobs", "logs", "some-job", "--follow"],
    ["jobs", "stop", "some-job"], ["deploy", "--status"], ["deploy", "CONFIG"],
])
def test_unreachable_address_is_one_line(workspace, dead_address, command):
    spec = write_spec(workspace / "reach.yaml", small_job("reach"))
    config = workspace / "reach-serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "a", "import_path": "onebase.serve.app:build",
                                                         "args": {"bases": [{"name": "minilm"}]}}]}))
    args = [str(spec) if a == "SPEC" else str(config) if a == "CONFIG" else a for a in command]
    started = time.monotonic()
    line = one_error(onebase_cli(*args, "--address", dead_address, cwd=workspace, timeout=60))
    assert time.monotonic() - started < 20
    assert dead_address in line and "Connection refused" in line


def test_address_from_env_and_unroutable_host_does_not_hang(workspace):
    # TEST-NET-1 (RFC 5737) never answers: the connect timeout bounds the wait.
    started = time.monotonic()
    result = onebase_cli("jobs", "list", cwd=workspace, timeout=60, env={"RAY_ADDRESS": "192.0.2.123:8265"})
    line = one_error(result)
    assert time.monotonic() - started < 20
    assert "http://192.0.2.123:8265" in line and "cannot reach" in line


def test_unknown_job_id(workspace, fake_dashboard):
    for command in (["status", "no-such-job"], ["logs", "no-such-job"], ["stop", "no-such-job"]):
        line = one_error(onebase_cli("jobs", *command, "--address", fake_dashboard, cwd=workspace, timeout=60))
        assert "job no-such-job: no such job on" in line and fake_dashboard in line


def test_local_tracking_uri_refused(workspace, dead_address):
    spec = write_spec(workspace / "sq.yaml", small_job("sq"))
    line = one_error(onebase_cli("submit", str(spec), "--tracking-uri", "sqlite:///mlflow.db",
                                 "--address", dead_address, cwd=workspace, timeout=60))
    assert "--tracking-uri sqlite:///mlflow.db" in line and "cannot write this machine's" in line
    spec = write_spec(workspace / "sq2.yaml", small_job("sq2", tracking={"uri": "file:///tmp/mlruns"}))
    line = one_error(onebase_cli("submit", str(spec), "--address", dead_address, cwd=workspace, timeout=60))
    assert "tracking.uri file:///tmp/mlruns" in line


@pytest.mark.parametrize("change, expected", [
    ({"trian": {}}, "trian: unknown field"),
    ({"method": {"name": "lorax"}}, "unknown method 'lorax'"),
    ({"data": {"source": "missing.csv"}}, "data.source: file not found: missing.csv"),
    ({"model": {"name": "./no/such/model"}}, "model.name"),
])
def test_bad_spec_refused_before_contacting_the_cluster(workspace, dead_address, change, expected):
    spec = write_spec(workspace / "bad.yaml", small_job("bad", **change))
    line = one_error(onebase_cli("submit", str(spec), "--address", dead_address, cwd=workspace, timeout=60))
    assert expected in line and dead_address not in line


@pytest.mark.parametrize("address, expected", [
    ("DEAD", "no Ray cluster answers at 127.0.0.1:"),  # refused at once: Ray alone retries for ~14 min
    ("http://127.0.0.1:8265", "not a Ray address"),  # the dashboard URL `submit` takes is not a GCS address
    ("nonsense", "expected host:port"),
])
def test_validate_with_an_address_no_ray_answers_at_is_one_line(workspace, address, expected):
    address = address.replace("DEAD", f"127.0.0.1:{free_port()}")
    spec = write_spec(workspace / "validate-reach.yaml", small_job("validate-reach"))
    started = time.monotonic()
    line = one_error(onebase_cli("validate", str(spec), "--address", address, cwd=workspace, timeout=120))
    assert time.monotonic() - started < 60
    assert f"--address {address}: {expected}" in line


def test_run_with_an_address_no_ray_answers_at_is_one_line(workspace):
    address = f"127.0.0.1:{free_port()}"
    spec = write_spec(workspace / "run-reach.yaml", small_job("run-reach"))
    started = time.monotonic()
    line = one_error(onebase_cli("run", str(spec), "--address", address, cwd=workspace, timeout=120))
    assert time.monotonic() - started < 60
    assert f"--address {address}: no Ray cluster answers at {address} (Connection refused)" in line


def test_bad_data_and_sweep_refused_locally(workspace, dead_address):
    csv = workspace / "reviews.csv"
    csv.write_text("review,stars\ngreat,pos\nbad,neg\nmeh,pos\nok,neg\n")
    data = {"source": str(csv), "columns": {"text": "review"}}
    spec = write_spec(workspace / "cols.yaml", small_job("cols", data=data))
    line = one_error(onebase_cli("submit", str(spec), "--address", dead_address, cwd=workspace, timeout=60))
    assert "data.columns.label" in line
    sweep = workspace / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "job": "cols.yaml", "methods": {"lora": {"rr": [8]}}}))
    line = one_error(onebase_cli("submit", str(sweep), "--address", dead_address, cwd=workspace, timeout=60))
    assert "methods.lora.rr" in line


def test_packaging_rewrites_local_files(workspace, tmp_path):
    """What a job carries: the spec (a sweep also its base job) and local data, under relative paths."""
    from onebase.cluster.submit import package

    csv = workspace / "pkg.csv"
    csv.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20)))
    spec = write_spec(workspace / "pkg.yaml", small_job("pkg", data={"source": str(csv), "max_length": 16}))
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    pkg = package(spec, job_dir, overrides=["train.max_steps=2"], tracking_uri="http://mlflow:5000")
    assert pkg.entrypoint == "onebase run pkg.yaml --tracking-uri http://mlflow:5000"
    written = yaml.safe_load((job_dir / "pkg.yaml").read_text())
    assert written["train"]["max_steps"] == 2
    assert not Path(written["data"]["source"]).is_absolute()
    assert (job_dir / written["data"]["source"]).read_text() == csv.read_text()

    base = workspace / "pkg-base.yaml"
    base.write_text(yaml.safe_dump(small_job("pkg-base", data={"source": "pkg.csv", "max_length": 16},
                                             train={"max_steps": 2, "eval_every_steps": 1})))
    sweep = workspace / "pkg-sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "pkg-sweep", "job": "pkg-base.yaml",
                                     "methods": {"lora": {"r": [4]}, "ia3": {}}}))
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    pkg = package(sweep, sweep_dir)
    assert (pkg.kind, pkg.entrypoint) == ("sweep", "onebase sweep pkg-sweep.yaml")
    job = yaml.safe_load((sweep_dir / yaml.safe_load((sweep_dir / "pkg-sweep.yaml").read_text())["job"]).read_text())
    assert (sweep_dir / job["data"]["source"]).is_file()


def test_deploy_config_errors(workspace, dead_address):
    missing = one_error(onebase_cli("deploy", "nope.yaml", "--address", dead_address, cwd=workspace, timeout=60))
    assert "serve config not found: nope.yaml" in missing
    bad = workspace / "bad-serve.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "a", "import_path": "nodots"}]}))
    line = one_error(onebase_cli("deploy", str(bad), "--address", dead_address, cwd=workspace, timeout=60))
    assert "applications.0.import_path" in line and dead_address not in line
    bad.write_text(yaml.safe_dump({"applications": [{"name": "a", "import_path": "a.b"}]}))
    line = one_error(onebase_cli("deploy", str(bad), "--env", "NOEQUALS", "--address", dead_address,
                                 cwd=workspace, timeout=60))
    assert "--env 'NOEQUALS': expected KEY=VALUE" in line


def test_shipped_cluster_files_are_valid():
    import jsonschema
    import ray.autoscaler
    from ray.serve.schema import ServeDeploySchema

    launcher = yaml.safe_load((REPO / "infra" / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    assert {"head", "cpu_worker", "gpu_worker"} <= set(launcher["available_node_types"])
    config = yaml.safe_load((REPO / "serving" / "cluster.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    assert config["applications"][0]["import_path"] == "onebase.serve.app:build"
    subprocess.run(["bash", "-n", str(REPO / "infra" / "local-stack.sh")], check=True)


# --- slow: the real local stack --------------------------------------------------------------------

def http_json(url: str, body: dict | None = None, key: str | None = None, timeout: float = 60):
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


# The stack starts once for the module (fixtures below, module-scoped); each test checks one feature,
# so one failure does not hide the others. Jobs are submitted together and waited for later, in the
# order of the tests below (the jobs, then a sweep while a Serve app deploys), as one user session would.

ENV = {"RAY_AUTH_MODE": "disabled"}  # the stack runs without Ray token auth (a loopback dev cluster)


class Stack:
    def __init__(self, state_dir: Path, started, info: dict, workspace: Path) -> None:
        self.state_dir, self.started, self.info, self.workspace = state_dir, started, info, workspace
        self.stopped = None  # the `stop` command's result, once stopped

    def cli(self, *args, timeout=120):
        return onebase_cli(*args, "--address", self.info["dashboard"], cwd=self.workspace, env=ENV, timeout=timeout)

    def stop(self):
        if self.stopped is None:
            self.stopped = subprocess.run(["bash", str(REPO / "infra" / "local-stack.sh"), "stop", "--dir",
                                           str(self.state_dir)], capture_output=True, text=True, timeout=120)
        return self.stopped


@pytest.fixture(scope="module")
def local_stack(workspace, tmp_path_factory):
    from onebase.cluster import stack

    state_dir = tmp_path_factory.mktemp("stack")
    started = subprocess.run(["bash", str(REPO / "infra" / "local-stack.sh"), "start", "--dir", str(state_dir)],
                             capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    info = stack.read_state(state_dir)
    assert info, started.stderr[-3000:]
    running = Stack(state_dir, started, info, workspace)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def jobs(local_stack):
    """Submitted together: one that succeeds, one that fails at step 2, one stopped at once."""
    cli, workspace = local_stack.cli, local_stack.workspace
    good = write_spec(workspace / "cluster-ok.yaml", small_job("cluster-ok"))
    bad = write_spec(workspace / "cluster-fail.yaml", small_job("cluster-fail"))
    ok = cli("submit", str(good), "--tracking-uri", local_stack.info["mlflow"])
    # No --tracking-uri: the job takes MLFLOW_TRACKING_URI from the cluster's environment.
    failing = cli("submit", str(bad), "--env", "ONEBASE_FAIL_AT_STEP=2")
    stopping = cli("submit", str(write_spec(workspace / "cluster-stop.yaml", small_job("cluster-stop"))))
    return {"ok": ok, "fail": failing, "stop": stopping}


@pytest.fixture(scope="module")
def finished_jobs(local_stack, jobs):
    """The succeeding and the failing job, waited for (status --wait), with the good job's logs."""
    ok_id, fail_id = jobs["ok"].stdout.strip(), jobs["fail"].stdout.strip()
    done = local_stack.cli("jobs", "status", ok_id, "--wait", "--timeout", "400", timeout=450)
    failed = local_stack.cli("jobs", "status", fail_id, "--wait", "--timeout", "400", timeout=450)
    return {"done": done, "logs": local_stack.cli("jobs", "logs", ok_id).stdout, "failed": failed}


@pytest.fixture(scope="module")
def sweep_job(local_stack, finished_jobs):
    """A sweep with a local data file that has to travel with it; it runs while the Serve app deploys."""
    workspace = local_stack.workspace
    csv = workspace / "sweep-rows.csv"
    csv.write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} day {i},{'pos' if i % 2 else 'neg'}\n"
                                           for i in range(120)))
    write_spec(workspace / "cluster-sweep-base.yaml", small_job(
        "cluster-sweep-base", model=TINY_BERT, data={"source": csv.name, "max_samples": 64, "max_length": 16},
        train={"max_steps": 2, "batch_size": 16, "eval_every_steps": 1, "log_every_steps": 1}))
    sweep = workspace / "cluster-sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "cluster-sweep", "job": "cluster-sweep-base.yaml",
                                     "metric": "accuracy", "methods": {"lora": {"r": [4]}}}))
    return local_stack.cli("submit", str(sweep), "--tracking-uri", local_stack.info["mlflow"])


@pytest.fixture(scope="module")
def deployed(local_stack, finished_jobs, sweep_job):
    """Serving on the same cluster, the good job's adapter from the registry, through the dashboard's REST API."""
    port = free_port()
    config = local_stack.workspace / "cluster-serve.yaml"
    config.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly",  # both nodes share 127.0.0.1: one proxy, one port
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "onebase", "route_prefix": "/", "import_path": "onebase.serve.app:build",
            "args": {"tracking_uri": local_stack.info["mlflow"],
                     "bases": [{"name": "minilm", "task": "sequence-classification", "cpus": 0.5}],
                     "adapters": [{"id": "tweet-sentiment", "source": "models:/cluster-ok/1"}],
                     "auth": {"api_keys_env": "TEST_KEYS", "admin_token": "secret"}},
        }],
    }, sort_keys=False))
    result = local_stack.cli("deploy", str(config), "--env", "TEST_KEYS=k1,k2", "--timeout", "300", timeout=360)
    return port, result


@pytest.mark.slow
def test_the_local_stack_starts_two_ray_nodes_and_mlflow(local_stack):
    from onebase.cluster import stack

    address, mlflow_uri = local_stack.info["dashboard"], local_stack.info["mlflow"]
    assert f"jobs/dashboard: {address}" in local_stack.started.stdout and mlflow_uri in local_stack.started.stdout
    status = stack.status(local_stack.state_dir)
    assert status["running"] and status["ray_nodes"] == 2 and status["mlflow_ok"]


@pytest.mark.slow
@pytest.mark.parametrize("override, resource", [("scaling.num_workers=5", "CPU=4"), ("scaling.use_gpu=true", "GPU=0")])
def test_validate_refuses_workers_the_running_cluster_cannot_hold(local_stack, override, resource):
    """Two nodes of 2 CPUs, no GPU: 5 one-CPU workers, or any GPU worker, would make Ray wait forever."""
    spec = write_spec(local_stack.workspace / "validate-big.yaml", small_job("validate-big"))
    line = one_error(onebase_cli("validate", str(spec), "--set", override, "--address", local_stack.info["ray_address"],
                                 cwd=local_stack.workspace, env=ENV, timeout=120))
    assert line.startswith("onebase: error: scaling: ") and "do not fit the cluster" in line
    assert resource in line and "over 2 node(s)" in line


@pytest.mark.slow
def test_validate_accepts_workers_the_running_cluster_can_hold(local_stack):
    spec = write_spec(local_stack.workspace / "validate-fit.yaml", small_job("validate-fit"))
    address = local_stack.info["ray_address"]
    result = onebase_cli("validate", str(spec), "--set", "scaling.num_workers=4", "--address", address,
                         cwd=local_stack.workspace, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 worker(s)" in result.stdout and f"fits {address}" in result.stdout


@pytest.mark.slow
def test_jobs_are_submitted_listed_and_stopped(local_stack, jobs):
    for result in jobs.values():
        assert result.returncode == 0, result.stderr[-3000:]
    assert "tracking: the cluster's MLFLOW_TRACKING_URI" in jobs["fail"].stderr
    stopped_job = local_stack.cli("jobs", "stop", jobs["stop"].stdout.strip())
    assert stopped_job.returncode == 0 and stopped_job.stdout.strip().endswith(": STOPPED"), stopped_job.stdout
    listed = local_stack.cli("jobs", "list").stdout
    assert jobs["ok"].stdout.strip() in listed and jobs["fail"].stdout.strip() in listed
    assert "onebase run cluster-ok.yaml" in listed
    assert "no such job" in one_error(local_stack.cli("jobs", "status", "no-such-job"))


@pytest.mark.slow
def test_a_submitted_job_trains_and_registers_its_adapter_in_the_clusters_mlflow(local_stack, finished_jobs):
    from mlflow.tracking import MlflowClient

    done, logs = finished_jobs["done"], finished_jobs["logs"]
    assert done.returncode == 0 and "status:     SUCCEEDED" in done.stdout, done.stdout + logs[-4000:]
    assert "[onebase] step 1/4" in logs and "registered: cluster-ok/1" in logs
    client = MlflowClient(tracking_uri=local_stack.info["mlflow"])
    version = client.get_model_version("cluster-ok", "1")
    assert version.tags["method"] == "lora" and len(version.tags["base_sha256"]) == 64
    assert client.get_run(version.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_failing_job_reports_its_reason_in_one_line_and_its_run_failed(local_stack, finished_jobs):
    from mlflow.tracking import MlflowClient

    failed = finished_jobs["failed"]
    assert failed.returncode == 1 and "status:     FAILED" in failed.stdout, failed.stdout
    assert "reason:     onebase: error: training failed: RuntimeError: injected failure at step 2" in failed.stdout
    assert "log tail" in failed.stdout
    client = MlflowClient(tracking_uri=local_stack.info["mlflow"])
    failed_runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id],
                                     "tags.`onebase.job` = 'cluster-fail'")
    assert [r.info.status for r in failed_runs] == ["FAILED"]


@pytest.mark.slow
def test_serve_deploys_on_the_cluster_and_classifies_with_the_registered_adapter(local_stack, deployed):
    port, result = deployed
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"onebase: RUNNING at http://127.0.0.1:{port}/" in result.stdout
    code, answer = http_json(f"http://127.0.0.1:{port}/v1/classify",
                             {"model": "tweet-sentiment", "input": ["I love this", "this is awful"]}, key="k2")
    assert code == 200 and answer["model"] == "tweet-sentiment", answer
    assert [row["label"] in TWEET_LABELS for row in answer["data"]] == [True, True], answer
    assert set(answer["data"][0]["probabilities"]) == TWEET_LABELS
    assert "onebase: RUNNING" in local_stack.cli("deploy", "--status").stdout


@pytest.mark.slow
def test_a_sweep_with_a_local_data_file_runs_on_the_cluster_and_registers_its_best(local_stack, sweep_job, deployed):
    from mlflow.tracking import MlflowClient

    assert sweep_job.returncode == 0, sweep_job.stderr[-3000:]
    assert "(with 1 local file(s))" in sweep_job.stderr
    sweep_id = sweep_job.stdout.strip()
    swept = local_stack.cli("jobs", "status", sweep_id, "--wait", "--timeout", "400", timeout=450)
    assert swept.returncode == 0, swept.stdout + local_stack.cli("jobs", "logs", sweep_id, "--tail", "60").stdout
    assert "registered lora: cluster-sweep-base/1" in local_stack.cli("jobs", "logs", sweep_id).stdout
    client = MlflowClient(tracking_uri=local_stack.info["mlflow"])
    assert client.get_model_version("cluster-sweep-base", "1").tags["method"] == "lora"


@pytest.mark.slow
def test_stopping_the_stack_leaves_none_of_its_processes(local_stack):
    from onebase.cluster import stack

    stopped = local_stack.stop()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    info = local_stack.info
    assert stack.stack_pids(info["id"]) == []
    assert not any(stack.alive(pid) for pid in info["pids"].values())
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert info["temp_dir"] not in ps and f"--port {info['ports']['mlflow']}" not in ps
