"""Benchmark for the training engine (issue #2); prints and writes bench/results/train.json.

(a) overhead: samples/s of `onebase run` (1 worker, ZeRO-0 and ZeRO-2) against a plain
    single-process PyTorch + PEFT loop, same model, rows, batch, optimizer and threads, same run.
(b) quality: bundled tweet sentiment on MiniLM, LoRA vs full fine-tune vs the majority class.

    .venv/bin/python bench/train.py            # both parts (~25 min on 2 CPU cores)
    .venv/bin/python bench/train.py --part a   # overhead only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
LORA_JOB = REPO / "jobs" / "tweet-sentiment-lora.yaml"


def onebase(job: Path, overrides: list[str]) -> dict:
    from onebase.spec import load_spec
    from onebase.train.launch import run_job

    spec = load_spec(job, overrides)
    started = time.perf_counter()
    result = run_job(spec, job.read_text(), echo=lambda *_: None)
    wall = time.perf_counter() - started
    client_metrics = result.metrics
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(result.run_id).data.metrics
    return {"wall_s": wall, "samples_per_s": run["train_samples_per_s"],
            "trainable_percent": 100 * result.info["trainable_params"] / result.info["total_params"],
            **{k: client_metrics[k] for k in ("accuracy", "macro_f1") if k in client_metrics}}


def part_a(threads: int, steps: int) -> dict:
    from plain_loop import plain_train

    common = [f"train.max_steps={steps}", "train.eval_every_steps=null", "data.validation.max_samples=64",
              f"scaling.resources_per_worker={{CPU: {threads}}}", "tracking.register_model=false"]
    plain = plain_train(str(LORA_JOB), threads, steps)
    runs = {"plain_peft_loop": {"samples_per_s": plain["samples_per_s"]}}
    for stage in (0, 2):
        runs[f"onebase_zero{stage}"] = onebase(LORA_JOB, [*common, f"deepspeed.stage={stage}",
                                                          f"name=bench-overhead-z{stage}"])
    for stage in (0, 2):
        runs[f"onebase_zero{stage}"]["plain_over_onebase"] = (
            plain["samples_per_s"] / runs[f"onebase_zero{stage}"]["samples_per_s"])
    return {"steps": steps, "threads": threads, "batch_size": 32, "runs": runs}


def part_b(threads: int) -> dict:
    from onebase.data.sources import load_dataset
    from onebase.spec import load_spec

    spec = load_spec(LORA_JOB)
    data = load_dataset(spec)
    counts = Counter(r["label"] for r in data.validation)
    majority = counts.most_common(1)[0][1] / len(data.validation)
    majority_f1 = (2 * majority / (1 + majority)) / len(data.labels)  # F1 of the majority class, 0 for the rest
    res = f"scaling.resources_per_worker={{CPU: {threads}}}"
    lora = onebase(LORA_JOB, [res, "name=bench-quality-lora", "train.eval_every_steps=null"])
    full = onebase(LORA_JOB, [res, "name=bench-quality-full", "method={name: full}", "train.learning_rate=1.0e-4",
                              "train.eval_every_steps=null", "tracking.registered_model=tweet-sentiment-full"])
    return {"train_rows": len(data.train), "validation_rows": len(data.validation), "epochs": 2, "batch_size": 32,
            "max_length": 64, "majority_class": {"accuracy": majority, "macro_f1": majority_f1},
            "lora_r8_query_value": lora, "full_finetune": full}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    os.chdir(tempfile.mkdtemp(prefix="onebase-bench-"))  # its own mlflow.db and runs/
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
           "date": time.strftime("%Y-%m-%d")}
    if args.part in ("a", "all"):
        out["overhead"] = part_a(args.threads, args.steps)
    if args.part in ("b", "all"):
        out["quality"] = part_b(args.threads)
    print(json.dumps(out, indent=2))
    target = REPO / "bench" / "results" / "train.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
