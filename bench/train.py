"""Benchmark for the training engine (issue #2); prints and writes bench/results/train.json.

(a) overhead: samples/s of `onebase run` (1 worker, ZeRO-0 and ZeRO-2) against a plain
    single-process PyTorch + PEFT loop, same model, rows, batch, optimizer and threads, same run.
(b) quality: bundled tweet sentiment on MiniLM, LoRA vs full fine-tune vs the majority class.

    .venv/bin/python bench/train.py            # both parts (~25 min on 2 CPU cores)
    .venv/bin/python bench/train.py --part a   # overhead only (3 rounds: median and spread)
    .venv/bin/python bench/train.py --part a --repeat 2 --steps 20   # cut down
"""

from __future__ import annotations

import argparse
import json
import os
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
    result = run_job(spec, job.read_text(), echo=lambda *_: None, progress=False)
    wall = time.perf_counter() - started
    client_metrics = result.metrics
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(result.run_id).data.metrics
    return {"wall_s": wall, "samples_per_s": run["train_samples_per_s"],
            "trainable_percent": 100 * result.info["trainable_params"] / result.info["total_params"],
            **{k: client_metrics[k] for k in ("accuracy", "macro_f1") if k in client_metrics}}


def part_a(threads: int, steps: int, repeat: int) -> dict:
    """`repeat` rounds, each running the plain loop, ZeRO-0 and ZeRO-2 back to back (so machine noise
    hits all three alike); the ratio is taken within a round, then the median and spread over rounds."""
    import statistics

    from plain_loop import plain_train

    common = [f"train.max_steps={steps}", "train.eval_every_steps=null", "data.validation.max_samples=64",
              f"scaling.resources_per_worker={{CPU: {threads}}}", "tracking.register_model=false"]
    rounds = []
    for i in range(repeat):
        plain = plain_train(str(LORA_JOB), threads, steps)["samples_per_s"]
        row = {"plain_peft_loop": plain}
        for stage in (0, 2):
            run = onebase(LORA_JOB, [*common, f"deepspeed.stage={stage}", f"name=bench-overhead-z{stage}-{i}"])
            row[f"onebase_zero{stage}"] = run["samples_per_s"]
            row[f"zero{stage}_over_plain"] = plain / run["samples_per_s"]  # time per sample, onebase / plain
        print(json.dumps(row), flush=True)
        rounds.append(row)
    summary = {key: {"median": statistics.median(r[key] for r in rounds), "min": min(r[key] for r in rounds),
                     "max": max(r[key] for r in rounds)} for key in rounds[0]}
    return {"steps": steps, "threads": threads, "batch_size": 32, "repeat": repeat, "rounds": rounds,
            "summary": summary}


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
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.chdir(tempfile.mkdtemp(prefix="onebase-bench-"))  # its own mlflow.db and runs/
    from figures import header, save

    out = header()
    if args.part in ("a", "all"):
        out["overhead"] = part_a(args.threads, args.steps, args.repeat)
    if args.part in ("b", "all"):
        out["quality"] = part_b(args.threads)
    save("train", out)


if __name__ == "__main__":
    main()
