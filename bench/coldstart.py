"""Cold start (issue #13, item 3): seconds from `onebase run` to the first training step, with a warm
cache; prints and writes bench/results/coldstart.json.

The shipped default job (jobs/tweet-sentiment-lora.yaml) cut to a few steps. Runs alternate between
two PATHs, as happens between a shell with the venv activated and one without (or a Ray node started
from the venv): the venv's `ninja` first, or the system's. Before the fix each switch recompiled
DeepSpeed's `shm_comm` op; the bench reports whether its build log changed in each run.
Where the time goes comes from the worker's own start-up figures in MLflow (startup_* metrics: set-up,
model, tokenize, engine, tracking, the worker's whole way to its first step, and the driver's).

    .venv/bin/python bench/coldstart.py                 # 4 runs (2 per PATH), ~4 min on 2 cores
    .venv/bin/python bench/coldstart.py --repeat 1 --steps 5
    PYTHONPATH=/some/older/checkout/platform .venv/bin/python bench/coldstart.py --label before  # older code
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from figures import header, save  # noqa: E402

JOB = REPO / "jobs" / "tweet-sentiment-lora.yaml"
FIRST_STEP = re.compile(r"step 1/\d+")
MARKS = {"checked_s": re.compile(r"^data: "), "ray_and_mlflow_s": re.compile(r"mlflow run|^ray dashboard")}


def build_log_digest(extensions: Path) -> str:
    log = extensions / "deepspeed_shm_comm" / ".ninja_log"
    return hashlib.sha256(log.read_bytes()).hexdigest()[:12] if log.is_file() else "none"


def one_run(work: Path, env: dict[str, str], steps: int, label: str) -> dict:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "onebase.cli", "run", str(JOB), "--tracking-uri", uri,
           "--set", f"train.max_steps={steps}", "--set", "train.log_every_steps=1",
           "--set", "train.eval_every_steps=null", "--set", "data.validation.max_samples=64",
           "--set", "tracking.register_model=false", "--set", f"name=coldstart-{label}"]
    extensions = Path(env["TORCH_EXTENSIONS_DIR"])
    before = build_log_digest(extensions)
    marks: dict = {"path": label}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    run_id = None
    with open(work / f"{label}-{int(started)}.log", "w") as log:
        for line in proc.stdout:
            now = time.perf_counter() - started
            log.write(f"{now:7.1f}s {line}")
            for key, pattern in MARKS.items():
                if key not in marks and pattern.search(line):
                    marks[key] = round(now, 1)
            if "first_step_s" not in marks and FIRST_STEP.search(line):
                marks["first_step_s"] = round(now, 1)
            found = re.search(r"run ([0-9a-f]{32})", line)
            run_id = run_id or (found.group(1) if found else None)
    marks["returncode"] = proc.wait()
    marks["exit_s"] = round(time.perf_counter() - started, 1)
    marks["shm_comm_rebuilt"] = build_log_digest(extensions) != before
    if run_id:
        from mlflow.tracking import MlflowClient

        metrics = MlflowClient(uri).get_run(run_id).data.metrics
        marks.update({k: round(v, 2) for k, v in metrics.items() if k.startswith("startup_")})
    return marks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2, help="runs per PATH variant")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--label", help="written to bench/results/coldstart-LABEL.json (e.g. 'before' for an "
                                        "older checkout's code), so one run does not overwrite the other")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onebase-coldstart-", dir="/tmp"))
    cache = Path(os.environ.get("ONEBASE_CACHE", REPO / ".onebase" / "cache"))
    base = {**os.environ, "ONEBASE_CACHE": str(cache), "RAY_TMPDIR": str(work / "ray"),
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions")),
            "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}  # a pipe would otherwise hold lines back and skew the timestamps
    venv_bin = str(Path(sys.executable).parent)
    plain_path = os.pathsep.join(p for p in base["PATH"].split(os.pathsep) if p != venv_bin)
    variants = {"venv-first": f"{venv_bin}{os.pathsep}{plain_path}", "system-first": plain_path}
    one_run(work, {**base, "PATH": variants["venv-first"]}, 2, "warmup")  # the cache is warm from here on
    runs = [one_run(work, {**base, "PATH": variants[label]}, args.steps, label)
            for _ in range(args.repeat) for label in variants]
    firsts = [r["first_step_s"] for r in runs if "first_step_s" in r]
    out = {**header(), "steps": args.steps,
           "job": JOB.name, "runs": runs,
           "first_step_s": {"median": statistics.median(firsts), "min": min(firsts), "max": max(firsts)}
           if firsts else None,
           "rebuilds": sum(r["shm_comm_rebuilt"] for r in runs),
           "code": os.environ.get("PYTHONPATH") or "this checkout"}
    save(f"coldstart-{args.label}" if args.label else "coldstart", out)


if __name__ == "__main__":
    main()
