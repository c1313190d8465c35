"""Benchmark for cluster operations (issue #5); prints and writes bench/results/cluster.json.

The same job, two ways, in one run:
  local    `onebase run SPEC` (embedded Ray, MLflow in a local sqlite file)
  cluster  `onebase submit SPEC` to the local two-node stack (Ray head + second node + MLflow server,
           infra/local-stack.sh), followed with `onebase jobs logs --follow`
Measured from the moment the command starts: the first training step (the first `[onebase] step`
progress line in the output / job logs) and the registered adapter (the `registered:` line, checked
in the MLflow registry afterwards). Then, on the stack, `onebase deploy` of that adapter until RUNNING
and the first /v1/classify answer.

    .venv/bin/python bench/cluster.py                  # 2 runs of each, alternated: ~7 min on 2 CPU cores
    .venv/bin/python bench/cluster.py --repeat 1 --steps 20 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from onebase.runtime import free_port

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "tweet-sentiment-lora.yaml"
STEP = re.compile(r"\[onebase\] step 1/")
REGISTERED = re.compile(r"^registered: (\S+)/(\d+)")


def onebase(*args: str) -> list[str]:
    return [sys.executable, "-m", "onebase.cli", *args]


def watch(cmd: list[str], cwd: Path, env: dict[str, str], started: float, log: Path) -> dict:
    """Run a command, timestamp the first step line and the registered line (seconds from `started`)."""
    marks: dict = {}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            now = time.perf_counter() - started
            out.write(f"{now:7.1f}s {line}")
            if "first_step_s" not in marks and STEP.search(line):
                marks["first_step_s"] = now
            found = REGISTERED.search(line.strip())
            if found:
                marks["registered_s"] = now
                marks["registered"] = f"{found.group(1)}/{found.group(2)}"
        marks["returncode"] = proc.wait()
        marks["exit_s"] = time.perf_counter() - started
    return marks


def run_local(spec: Path, sets: list[str], work: Path, env: dict[str, str], i: int) -> dict:
    uri = f"sqlite:///{work / 'local-mlflow.db'}"
    # Embedded Ray: a short private temp dir and free metrics ports, so it stays out of other Rays' way.
    local_env = {**env, "RAY_TMPDIR": str(work / "ray"),
                 "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port())}
    started = time.perf_counter()
    marks = watch(onebase("run", str(spec), "--tracking-uri", uri, *sets), work, local_env, started,
                  work / f"local-{i}.log")
    marks["tracking_uri"] = uri
    return marks


def run_cluster(spec: Path, sets: list[str], work: Path, env: dict[str, str], info: dict, i: int) -> dict:
    address, uri = info["dashboard"], info["mlflow"]
    started = time.perf_counter()
    submitted = subprocess.run(onebase("submit", str(spec), "--tracking-uri", uri, "--address", address, *sets),
                               cwd=work, env=env, capture_output=True, text=True, timeout=300)
    if submitted.returncode != 0:
        raise SystemExit(f"submit failed: {submitted.stderr}")
    submit_s = time.perf_counter() - started
    job_id = submitted.stdout.strip()
    marks = watch(onebase("jobs", "logs", job_id, "--follow", "--address", address), work, env, started,
                  work / f"cluster-{i}.log")
    status = subprocess.run(onebase("jobs", "status", job_id, "--address", address), cwd=work, env=env,
                            capture_output=True, text=True, timeout=60).stdout
    return {"submit_s": submit_s, "job_id": job_id, **marks,
            "status": re.search(r"status:\s+(\S+)", status).group(1), "tracking_uri": uri}


def deploy(work: Path, env: dict[str, str], info: dict, registered: str) -> dict:
    name, version = registered.split("/")
    port = free_port()
    config = work / "serve.yaml"
    config.write_text(json.dumps({
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "onebase", "route_prefix": "/", "import_path": "onebase.serve.app:build",
                          "args": {"tracking_uri": info["mlflow"],
                                   "bases": [{"name": "minilm", "task": "sequence-classification", "cpus": 0.5}],
                                   "adapters": [{"id": "tweet-sentiment", "source": f"models:/{name}/{version}"}],
                                   "auth": {"api_keys": ["bench"]}}}],
    }))
    started = time.perf_counter()
    result = subprocess.run(onebase("deploy", str(config), "--address", info["dashboard"]), cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    running_s = time.perf_counter() - started
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/classify",
                                     data=json.dumps({"model": "tweet-sentiment", "input": ["I love this"]}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer bench"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    first_ms = 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return {"deploy_to_running_s": running_s, "first_classify_ms": first_ms,
            "second_classify_ms": 1000 * (time.perf_counter() - t0), "label": answer["data"][0]["label"]}


def check_registry(uri: str, registered: str | None) -> dict:
    from mlflow.tracking import MlflowClient

    if not registered:
        return {"registry_ok": False}
    name, version = registered.split("/")
    mv = MlflowClient(tracking_uri=uri).get_model_version(name, version)
    return {"registry_ok": bool(mv.tags.get("base_sha256")) and mv.tags.get("method") == "lora"}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="train.max_steps of the job (default 20)")
    parser.add_argument("--no-deploy", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, MLflow stores)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, alternated (default 2)")
    args = parser.parse_args()
    sets = ["--set", f"train.max_steps={args.steps}", "--set", "train.eval_every_steps=null",
            "--set", "train.log_every_steps=1", "--set", "data.validation.max_samples=200",
            "--set", "name=bench-cluster", "--set", "tracking.registered_model=bench-cluster"]

    from onebase.cluster import stack

    work = Path(tempfile.mkdtemp(prefix="obbench-", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
           "RAY_AUTH_MODE": "disabled"}
    env.setdefault("ONEBASE_CACHE", str(REPO / ".onebase" / "cache"))
    env["TORCH_EXTENSIONS_DIR"] = env.get("TORCH_EXTENSIONS_DIR", str(Path(env["ONEBASE_CACHE"]) / "torch_extensions"))
    os.environ.update({k: env[k] for k in ("ONEBASE_CACHE", "TORCH_EXTENSIONS_DIR", "RAY_AUTH_MODE")})
    spec = work / JOB.name
    spec.write_text(JOB.read_text())

    started = time.perf_counter()
    info = stack.start(work / "stack", echo=lambda *_: None)
    stack_start_s = time.perf_counter() - started
    runs: dict[str, list[dict]] = {"local": [], "cluster": []}
    serving: dict = {}
    try:
        # Alternate the two, so that load from anything else on the machine hits both alike.
        for i in range(args.repeat):
            print(f"[{i + 1}/{args.repeat}] local: onebase run {JOB.name} ({args.steps} steps) ...", flush=True)
            local = run_local(spec, sets, work, env, i)
            local.update(check_registry(local["tracking_uri"], local.get("registered")))
            runs["local"].append(local)
            print(json.dumps(local), flush=True)
            print(f"[{i + 1}/{args.repeat}] cluster: onebase submit to {info['dashboard']} ...", flush=True)
            cluster = run_cluster(spec, sets, work, env, info, i)
            cluster.update(check_registry(info["mlflow"], cluster.get("registered")))
            runs["cluster"].append(cluster)
            print(json.dumps(cluster), flush=True)
        last = runs["cluster"][-1].get("registered")
        if not args.no_deploy and last:
            serving = deploy(work, env, info, last)
            print(json.dumps(serving), flush=True)
    finally:
        left = stack.stop(work / "stack", echo=lambda *_: None)
    keys = ("first_step_s", "registered_s", "exit_s")
    summary = {way: {k: statistics.mean(r.get(k, float("nan")) for r in rows) for k in keys}
               for way, rows in runs.items()}
    summary["cluster"]["submit_s"] = statistics.mean(r["submit_s"] for r in runs["cluster"])
    result = {"machine": machine(), "job": f"jobs/{JOB.name} " + " ".join(sets[1::2]), "repeat": args.repeat,
              "stack_start_s": stack_start_s, "mean": summary, "runs": runs, "serving": serving,
              "stack_leftover_pids": left}
    out = REPO / "bench" / "results" / "cluster.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    rows = [("first training step", "first_step_s"), ("registered adapter", "registered_s"),
            ("command exits", "exit_s")]
    print(f"\n{'from command start to':<24}{'local run':>12}{'cluster submit':>16}   (mean of {args.repeat})")
    for label, key in rows:
        each = "  ".join(f"{a.get(key, float('nan')):.1f}/{b.get(key, float('nan')):.1f}"
                         for a, b in zip(runs["local"], runs["cluster"]))
        print(f"{label:<24}{summary['local'][key]:>11.1f}s{summary['cluster'][key]:>15.1f}s   runs: {each}")
    print(f"(stack start {stack_start_s:.1f} s, submit command {summary['cluster']['submit_s']:.1f} s; "
          f"deploy to RUNNING {serving.get('deploy_to_running_s', float('nan')):.1f} s)")
    print(f"written: {out}")
    if args.keep:
        print(f"logs and stores kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
