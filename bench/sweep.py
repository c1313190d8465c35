"""Benchmark for the adapter zoo + sweeps (issue #3); prints and writes bench/results/sweep.json.

(a) jobs/sweep-adapters.yaml: every method + full fine-tune on MiniLM, bundled tweet sentiment.
(b) jobs/sweep-smollm2-sentiment.yaml: the causal-LM variant on SmolLM2-135M-Instruct.
Each sweep writes its report (markdown + Pareto PNG) under runs/<sweep>/<parent run>/.

    .venv/bin/python bench/sweep.py               # both sweeps
    .venv/bin/python bench/sweep.py --part a      # MiniLM only
    .venv/bin/python bench/sweep.py --part a --no-early-stop   # every trial runs to the end (fair table)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEPS = {"a": REPO / "jobs" / "sweep-adapters.yaml", "b": REPO / "jobs" / "sweep-smollm2-sentiment.yaml"}


def run(path: Path, early_stop: bool) -> dict:
    from onebase.sweep.run import run_sweep
    from onebase.sweep.spec import load_sweep

    sweep, base = load_sweep(path)
    if not early_stop:
        sweep.scheduler.type = "none"
        sweep.name = f"{sweep.name}-no-early-stop"
    began = time.perf_counter()
    result = run_sweep(sweep, base, path.read_text())
    table = [{k: row[k] for k in ("method", "metric", "trainable_params", "trainable_percent", "adapter_mb",
                                  "wall_s", "peak_memory_mb", "tokens_per_s", "trials", "stopped")}
             for row in result["table"]]
    full = next((r["metric"] for r in table if r["method"] == "full"), None)
    small = [r for r in table if r["method"] != "full" and r["trainable_percent"] < 1]
    best_small = max(small, key=lambda r: r["metric"]) if small else None
    figures = {"sweep": sweep.name, "metric": sweep.metric, "scheduler": sweep.scheduler.type,
               "wall_s": time.perf_counter() - began,
               "table": table, "full_finetune": full,
               "best_under_1pct": best_small and {"method": best_small["method"], "metric": best_small["metric"],
                                                  "gap_to_full": (full - best_small["metric"]) if full else None},
               "report": str(result["report_dir"] / "report.md"), "plot": str(result["report_dir"] / "pareto.png")}
    out = REPO / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(result["report_dir"] / "pareto.png", out / f"{sweep.name}-pareto.png")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--no-early-stop", action="store_true", help="scheduler none instead of the spec's ASHA")
    args = parser.parse_args()
    os.chdir(REPO)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d")}
    for part in ("a", "b"):
        if args.part in (part, "all"):
            key = f"{part}-no-early-stop" if args.no_early_stop else part
            results[key] = run(SWEEPS[part], early_stop=not args.no_early_stop)
            print(json.dumps(results[key], indent=2))
    out = REPO / "bench" / "results" / "sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**previous, **results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
