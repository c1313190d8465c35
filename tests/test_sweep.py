"""`onebase sweep`: every method against each other on a tiny model, ASHA, MLflow parent + children."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import onebase_cli, tiny_spec, wait_for, write_spec
from onebase.errors import SpecError
from onebase.methods import METHODS
from onebase.spec.load import parse_spec
from onebase.sweep import report
from onebase.sweep.run import run_sweep
from onebase.sweep.spec import draw_trials, load_sweep
from onebase.tracking import mlflow_run
from onebase.tracking.mlflow_run import default_tracking_uri


def write_sweep(tmp_path, **fields):
    job = tiny_spec("tiny-sweep-job", scaling={"num_workers": 1, "resources_per_worker": {"CPU": 1}},
                    train={"max_steps": 6, "eval_every_steps": 2, "batch_size": 16, "log_every_steps": 2},
                    tracking={"experiment": "sweeps", "registered_model": "tiny-sweep"})
    write_spec(tmp_path / "job.yaml", job)
    sweep = {"name": "tiny-sweep", "job": "job.yaml", "metric": "macro_f1", "mode": "max",
             "methods": {name: {} for name in sorted(METHODS)}, "max_concurrent_trials": 2,
             "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.fixture
def another_ray_on_this_machine():
    """A second Ray instance beside the sweep's, as a user's local stack or Serve app would be.

    Ray Train's placement-group cleaner once crashed on finding two instances, so every trial ASHA
    stopped kept its CPU and the sweep hung waiting for a worker group.
    """
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from onebase.cluster.stack import free_port, node_ports, port_free

    temp = tempfile.mkdtemp(prefix="obr2-", dir="/tmp")
    ray, gcs_port = str(Path(sys.executable).parent / "ray"), free_port(set())
    proc = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "0",
                             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp,
                             "--port", str(gcs_port), *node_ports(set())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while port_free(gcs_port):  # until its GCS listens
            assert proc.poll() is None and time.monotonic() < deadline, "the second Ray instance did not start"
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()  # `ray start --block` takes its node down on SIGTERM
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


# Four methods of different kinds (PEFT LoRA and prompt tuning, onebase's Houlsby, the full fine-tune):
# every method trains end to end in tests/test_methods.py; here the sweep machinery is what is tested, and
# each trial pays a Ray Train start, so all ten would only make the suite slower. Adapters first: ASHA
# lets the first trial at each rung continue, so an adapter trial finishes for the size checks below.
SWEPT = ("lora", "prompt", "houlsby", "full")


@pytest.mark.slow
def test_sweep_over_methods_reports_and_registers(ray_cluster, another_ray_on_this_machine, workspace, tmp_path):
    path = write_sweep(tmp_path, methods={
        **{name: {} for name in SWEPT},
        "lora": {"r": [2, 4], "train.learning_rate": {"loguniform": [1e-3, 1e-2]}},
        "prompt": {"num_virtual_tokens": {"randint": [4, 8]}, "train.learning_rate": 3e-2},
    })
    sweep, base = load_sweep(path)
    result = run_sweep(sweep, base, path.read_text())

    assert {row["method"] for row in result["table"]} == set(SWEPT)
    for file in ("report.md", "pareto.png", "report.json"):
        assert (result["report_dir"] / file).stat().st_size > 0
    markdown = (result["report_dir"] / "report.md").read_text()
    assert all(re.search(rf"^\| {name}( \(stopped\))? \| [\d.]+ \|", markdown, re.M) for name in SWEPT)

    client = MlflowClient(tracking_uri=default_tracking_uri())
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.md",
                                                                                    "report/pareto.png"}
    children = report.trial_runs(default_tracking_uri(), parent.info.run_id)
    assert len(children) == len(SWEPT)
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished and all("macro_f1" in c.data.metrics and "adapter_bytes" in c.data.metrics for c in finished)

    # The best finished trial of each method is a registry version tagged with its method.
    for method, version in result["registered"].items():
        name, number = version.split("/")
        assert client.get_model_version(name, number).tags["method"] == method

    # Adapters are far smaller than the full fine-tune, in parameters and on disk.
    rows = {row["method"]: row for row in result["table"]}
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"] / 10
    # On disk: each finished trial's export folder, weighed here, against the full fine-tune's fp32
    # weights (4 bytes a parameter). ASHA may stop the full trial; when it finished, it holds them all.
    full_bytes = 4 * rows["full"]["trainable_params"]
    on_disk = {}
    for child in finished:
        export = result["report_dir"] / "trials" / child.data.tags["onebase.trial"] / "export"
        on_disk[child.data.tags["onebase.method"]] = sum(p.stat().st_size for p in export.glob("*.safetensors"))
        assert on_disk[child.data.tags["onebase.method"]] == child.data.metrics["adapter_bytes"]  # what the table shows
    adapters = {method: size for method, size in on_disk.items() if method != "full"}
    assert adapters, "no adapter trial finished"
    assert 0 < min(adapters.values()) < full_bytes / 10, (adapters, full_bytes)
    if "full" in on_disk:
        assert on_disk["full"] >= full_bytes > 10 * min(adapters.values())

    # --report-only rebuilds the same report from MLflow alone.
    out = tmp_path / "again"
    cli = onebase_cli("sweep", str(path), "--report-only", parent.info.run_id, "--out", str(out), cwd=workspace)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert (out / "pareto.png").is_file()
    # No stopped trial keeps a Train controller or a CPU (the next test trains two workers on 2 CPUs).
    wait_for(all_cpus_free, "every CPU is free after the sweep (no stopped trial keeps one)", 60)
    again = json.loads((out / "report.json").read_text())
    assert [r["run_id"] for r in again["table"]] == [r["run_id"] for r in result["table"]]


def test_trials_are_drawn_per_method_and_seeded(tmp_path):
    path = write_sweep(tmp_path, samples_per_method=3, seed=7, methods={
        "lora": {"r": [4, 8], "alpha": {"uniform": [8, 32]}}, "ia3": {}, "full": {"train.learning_rate": 1e-4}},
        search={"train.learning_rate": {"loguniform": [1e-4, 1e-2]}})
    sweep, _ = load_sweep(path)
    trials = draw_trials(sweep)
    assert [t["method"] for t in trials].count("lora") == 3 and len(trials) == 9
    assert all(t["overrides"]["method.r"] in (4, 8) for t in trials if t["method"] == "lora")
    assert all("method.r" not in t["overrides"] for t in trials if t["method"] != "lora")  # conditional
    assert all(t["overrides"]["train.learning_rate"] == 1e-4 for t in trials if t["method"] == "full")
    assert trials == draw_trials(sweep)


@pytest.mark.parametrize(("fields", "message"), [
    ({"methods": {"lorax": {}}}, "methods.lorax: unknown method"),
    ({"methods": {"ia3": {"r": [4, 8]}}}, "methods.ia3.r: not a hyperparameter of method ia3"),
    ({"methods": {}}, "methods: empty search space"),
    ({"methods": {"lora": {"r": []}}}, "methods.lora.r: empty list of choices"),
    ({"methods": {"lora": {"train.learning_rate": {"loguniform": [0.1, 0.01]}}}}, "empty loguniform range"),
    ({"methods": {"lora": {"r": [0]}}}, "r: Input should be greater than 0"),
    ({"search": {"r": [4]}}, "search.r: shared keys are dotted job fields"),
    ({"metric_typo": 1}, "metric_typo: unknown field"),
])
def test_bad_sweeps_fail_in_one_line_before_tune(tmp_path, fields, message):
    with pytest.raises(SpecError, match=message) as err:
        load_sweep(write_sweep(tmp_path, **fields))
    assert "\n" not in str(err.value)


def test_a_sweep_or_its_job_that_is_not_yaml_fails_in_one_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: s\nmethods: [\n")
    with pytest.raises(SpecError, match=r"broken.yaml: not valid YAML \(line 3\)$"):
        load_sweep(tmp_path / "broken.yaml")
    path = write_sweep(tmp_path)
    (tmp_path / "job.yaml").write_text("name: [\n")  # the base job it names
    with pytest.raises(SpecError, match=r"job.yaml: not valid YAML \(line 2\)$"):
        load_sweep(path)


def test_a_method_that_cannot_do_the_task_is_rejected(tmp_path):
    job = tiny_spec("qa", task="extractive-qa")
    write_spec(tmp_path / "job.yaml", job)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"name": "s", "job": "job.yaml", "methods": {"lora": {}, "prompt": {}}}))
    cli = onebase_cli("sweep", str(tmp_path / "sweep.yaml"), cwd=tmp_path)
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == [
        f"onebase: error: {tmp_path / 'sweep.yaml'}: methods.prompt: method prompt does not support "
        "task extractive-qa (supports: causal-lm, sequence-classification)"]


def test_stopped_trials_end_killed_and_real_failures_stay_failed(tmp_path):
    # A stopped trial's Train controller can die before the trial does, so its run may say FAILED.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = mlflow_run.start_sweep_run(uri, "sweeps", "stops", "name: stops")
    spec = parse_spec(tiny_spec("stops-job", tracking={"experiment": "sweeps"}))
    runs = {trial: mlflow_run.start_run(uri, spec, "{}", parent_run_id=parent, tags={"onebase.trial": trial})
            for trial in ("running", "stopped", "broken", "done")}
    mlflow_run.fail_run(uri, runs["stopped"], "The actor is dead: its placement group was removed")
    mlflow_run.fail_run(uri, runs["broken"], "CUDA out of memory")
    mlflow_run.client(uri).set_terminated(runs["done"], "FINISHED")

    report.close_stopped_trials(uri, parent, errored={"broken"})

    status = {c.data.tags["onebase.trial"]: (c.info.status, c.data.tags) for c in report.trial_runs(uri, parent)}
    assert {trial: s for trial, (s, _) in status.items()} == {
        "running": "KILLED", "stopped": "KILLED", "broken": "FAILED", "done": "FINISHED"}
    assert "onebase.failure" not in status["stopped"][1] and status["stopped"][1]["onebase.stopped"]
    assert status["broken"][1]["onebase.failure"] == "CUDA out of memory"



def all_cpus_free() -> bool:
    import ray

    return ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_a_train_run_left_behind_by_a_stopped_trial_is_reaped_and_its_cpus_come_back(ray_cluster, workspace):
    """What a trial stopped while starting its Train run can leave: a controller that outlives the trial and
    keeps its workers' CPUs. When a sweep ends it kills every Train controller its job still has."""
    import threading
    import time

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from onebase.sweep.run import reap_orphan_controllers

    started = workspace / "left-behind.started"
    started.unlink(missing_ok=True)

    def train_forever(config):
        started.touch()  # the worker group is up and its placement group known to Train's cleaner
        time.sleep(600)

    trainer = TorchTrainer(train_forever, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="left-behind", storage_path=str(workspace / "ray-left")))
    outcome: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except Exception as err:  # the run's controller is killed under it
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    wait_for(started.exists, "the Train run starts", 90)
    assert not all_cpus_free()
    assert len(reap_orphan_controllers()) == 1
    wait_for(all_cpus_free, "the reaped run's CPU comes back", 60)
    thread.join(60)
    assert not thread.is_alive() and "error" in outcome  # its fit() ended: the run is gone, not just hidden
    assert reap_orphan_controllers() == []
