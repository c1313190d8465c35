"""Instruction tuning on a mixture, held-out tasks zero-shot (issue #11 item 2): runs
jobs/flan-mixture-smollm2.yaml and prints and writes bench/results/mixture.json with the held-out
figures of the tuned model next to the untuned base (same rows, same prompts), the per-source
validation figures and the wall time.

    .venv/bin/python bench/mixture.py                                  # the shipped job (~10-15 min on 2 cores)
    .venv/bin/python bench/mixture.py --set train.max_steps=20         # cut down
    .venv/bin/python bench/mixture.py --collect runs/flan-mixture-smollm2/export --wall-s 812
        # figures of a run `onebase run jobs/flan-mixture-smollm2.yaml` already made
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from figures import header, save  # noqa: E402

JOB = REPO / "jobs" / "flan-mixture-smollm2.yaml"
MAIN = ("accuracy", "macro_f1", "exact_match")


def run(job: Path, overrides: list[str], tracking_uri: str | None) -> tuple[Path, float]:
    from onebase.spec import load_spec
    from onebase.train.launch import print_summary, run_job

    spec = load_spec(job, overrides)
    started = time.perf_counter()
    result = run_job(spec, job.read_text(), tracking_uri=tracking_uri, progress=False)
    wall = time.perf_counter() - started
    print_summary(result)
    return result.export_dir, wall


def figures(export: Path) -> dict:
    """Held-out tuned vs base (and the difference), per-source validation metrics, from onebase.json."""
    info = json.loads((export / "onebase.json").read_text())
    held = {}
    for task, result in (info.get("held_out") or {}).items():
        row = {"rows": result["rows"], "task": result["task"]}
        for metric in MAIN:
            if metric in result["tuned"]:
                tuned, base = result["tuned"][metric], result["base"][metric]
                row[metric] = {"tuned": round(tuned, 4), "base": round(base, 4), "delta": round(tuned - base, 4)}
        row["ms_per_query"] = {side: round(result[side]["ms_per_query"], 1) for side in ("tuned", "base")}
        held[task] = row
    return {"steps": info.get("steps"), "trainable_params": info.get("trainable_params"),
            "total_params": info.get("total_params"), "eval": {k: round(v, 4) for k, v in info["metrics"].items()},
            "held_out": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, default=JOB)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--collect", type=Path, help="an export the job already wrote: only read its figures")
    parser.add_argument("--wall-s", type=float, help="with --collect: the run's wall time, if known")
    args = parser.parse_args()
    out = {**header(), "job": str(args.job.relative_to(REPO) if args.job.is_relative_to(REPO) else args.job),
           "overrides": args.overrides}
    if args.collect:
        export, wall = args.collect, args.wall_s
    else:
        export, wall = run(args.job, args.overrides, args.tracking_uri)
    out.update({"wall_s": round(wall, 1) if wall else None, **figures(export)})
    save("mixture", out)


if __name__ == "__main__":
    main()
