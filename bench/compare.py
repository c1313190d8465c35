"""Benchmark for issue #11: finetune vs prompt on one task; prints and writes bench/results/compare.json.

(a) jobs/compare-tweet-sentiment.yaml: SmolLM2-135M-Instruct prompted (majority, zero-shot, k-shot ICL
    gold/random labels with and without calibration over 3 seeds, APE) vs tuned (LoRA on every linear
    layer, full FT) and MiniLM tuned (prompt tuning, P-tuning, LoRA, Houlsby, full FT), each with a
    4-draw learning-rate search, plus the FLAN-mixture generalist; 600 held-out tweets, macro-F1.
(b) jobs/compare-coin-flip.yaml: direct vs CoT vs self-consistency vs least-to-most vs a LoRA tune vs
    the generalist on a generated reasoning task.
(c) jobs/compare-smollm2-lora-vs-full.yaml: item 3 alone, LoRA on every linear layer vs full FT of SmolLM2
    with twice the steps and a LoRA learning-rate range up to 1e-2 (`--part c`; not part of "all").
The report, its plots and the figures below are copied to docs/img/compare-<spec>-*.png.

    .venv/bin/python bench/compare.py                     # the full run (both parts; the generalist trained once)
    .venv/bin/python bench/compare.py --part a --generalist runs/.../export   # reuse a trained generalist
    .venv/bin/python bench/compare.py --part a --cut 120 200 2   # cut down: 120 eval rows, 200 train rows, 2 lr
    .venv/bin/python bench/compare.py --quick             # tiny models: every contender kind, minutes
    .venv/bin/python bench/compare.py --part b --only direct,lora-finetune   # re-measure some rows
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
SPECS = {"a": REPO / "jobs" / "compare-tweet-sentiment.yaml", "b": REPO / "jobs" / "compare-coin-flip.yaml",
         "c": REPO / "jobs" / "compare-smollm2-lora-vs-full.yaml"}


def cut_down(path: Path, rows: int, train_rows: int, draws: int, out: Path) -> Path:
    """A smaller copy of a compare spec for a shared machine: fewer evaluation rows, ICL k [1, 4] and
    2 seeds, `draws` learning rates per method on `train_rows` rows (1 epoch), a 200-step-capped APE,
    the generalist on 96 mixture rows. Written beside the run; the doc says exactly this."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    raw["name"] = f"{raw['name']}-cut"
    raw["data"]["validation"]["max_samples"] = rows
    for c in raw["contenders"]:
        if c["kind"] == "icl":
            c.update(k=[1, 4], seeds=[0, 1])
        if c["kind"] == "ape":
            c["program"]["search"] = {"candidates": 4, "dev_rows": 24, "top": 1, "variations": 1, "report_top": 2}
        if c["kind"] == "train":
            c["draws"] = draws
            c["job"] = {**c.get("job", {}), "data.max_samples": train_rows, "train.epochs": 1}
        if c["kind"] == "generalist":
            c["job_file"] = str(path.parent / c["job_file"])
            c["job"] = {**c.get("job", {}), "data.max_samples": 96}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def only(path: Path, names: list[str], out: Path) -> Path:
    """A copy of a compare spec with only the named contenders (e.g. re-measure one row)."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    known = [c["name"] for c in raw["contenders"]]
    missing = sorted(set(names) - set(known))
    if missing:
        raise SystemExit(f"--only: no contender {', '.join(missing)} in {path.name} (it has {', '.join(known)})")
    raw["contenders"] = [c for c in raw["contenders"] if c["name"] in names]
    for c in raw["contenders"]:
        if c.get("job_file"):
            c["job_file"] = str(path.parent / c["job_file"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def train_generalist(tracking_uri: str | None) -> tuple[Path, float]:
    """The FLAN-mixture generalist, trained once (`onebase run jobs/flan-mixture-smollm2.yaml`) and then
    reused by both parts, as a generalist is: its training time is reported on its own."""
    import subprocess
    import sys

    out = REPO / "runs" / "bench-compare" / "generalist"
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onebase.cli", "run", str(REPO / "jobs" / "flan-mixture-smollm2.yaml"),
                    "--set", "evaluation=null", "--set", f"output.path={out}"]
                   + (["--tracking-uri", tracking_uri] if tracking_uri else []), check=True)
    return out / "flan-mixture-smollm2" / "export", time.perf_counter() - began


def use_export(path: Path, export: Path, out: Path) -> Path:
    """A copy of a compare spec whose generalist rows score `export` instead of training it again."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    for c in raw["contenders"]:
        if c["kind"] == "generalist":
            c.pop("job_file", None), c.pop("job", None)
            c["export"] = str(export.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def run(path: Path, overrides: list[str], quick: bool, rescore_run: str | None = None) -> dict:
    from onebase.compare.plan import check_before_ray, plan
    from onebase.compare.run import rescore, run_compare
    from onebase.compare.spec import load_compare

    spec, folder = load_compare(path, overrides, quick=quick)
    rows = plan(spec, folder)
    n_rows = check_before_ray(spec, rows)
    began = time.perf_counter()
    result = rescore(spec, rows, rescore_run) if rescore_run else run_compare(spec, rows, path.read_text())
    print(result["markdown"])
    out = REPO / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    tag = "-quick" if quick else ""
    from onebase.compare.report import PLOTS

    for plot in PLOTS:
        shutil.copy(result["report_dir"] / plot, out / f"{spec.name}{tag}-{plot}")
    keep = ("name", "kind", "base", "status", "reason", "metric", "metric_std", "seeds", "draw_min", "draw_max",
            "best_learning_rate", "trainable_params", "stored_bytes", "train_seconds", "prompt_tokens_per_query",
            "ms_per_query", "wall_s")
    return {"spec": str(path), "overrides": overrides, "quick": quick, "metric": result["metric"],
            "evaluation_rows": n_rows, "same_rows": result["same_rows"]["same"],
            # rescored: the rows' own wall times (training then, scoring now), not this call's
            "wall_s": (sum(r["wall_s"] for r in result["rows"]) if rescore_run else time.perf_counter() - began),
            "rescored": rescore_run is not None, "parent_run_id": result["parent_run_id"],
            "report": str(result["report_dir"] / "report.md"), "markdown": result["markdown"],
            "rows": [{k: r[k] for k in keep if k in r} for r in result["rows"]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["a", "b", "c", "all"], default="all",
                        help="c: item 3 alone (LoRA on every linear layer vs full FT on SmolLM2, 100 steps)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cut", nargs=3, type=int, metavar=("ROWS", "TRAIN_ROWS", "DRAWS"),
                        help="a cut-down run (see cut_down) for a shared machine")
    parser.add_argument("--rescore", metavar="RUN_ID", help="finish the failed training rows of that compare run "
                                                             "from the trials they ran (onebase compare --rescore)")
    parser.add_argument("--only", help="comma-separated contender names: run just those rows of the part")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "compare.json"))
    parser.add_argument("--generalist", metavar="EXPORT",
                        help="a trained flan-mixture export to score (default: train it once, then reuse it)")
    parser.add_argument("--generalist-seconds", type=float, help="how long that export took to train (recorded)")
    args = parser.parse_args()
    os.chdir(REPO)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
               "parts": {}}
    export, seconds = (Path(args.generalist), args.generalist_seconds) if args.generalist else (None, None)
    # --only: a kept generalist row trains inline unless --generalist names an export
    needs_generalist = args.part != "c" and not args.only and not args.rescore
    if export is None and not args.quick and not args.cut and needs_generalist:
        uri = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("tracking.uri=")), None)
        export, seconds = train_generalist(uri)
    results["generalist"] = {"export": str(export) if export else None, "train_seconds": seconds}
    for part in (["a", "b"] if args.part == "all" else [args.part]):
        path = SPECS[part]
        if args.only:
            path = only(path, args.only.split(","), REPO / "runs" / "bench-compare" / f"only-{path.name}")
        if args.cut:
            path = cut_down(path, *args.cut, REPO / "runs" / "bench-compare" / path.name)
        if export is not None:
            path = use_export(path, export, REPO / "runs" / "bench-compare" / f"reuse-{path.name}")
        results["parts"][part] = {**run(path, args.overrides, args.quick, args.rescore), "cut": args.cut,
                                  "only": args.only}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    print(json.dumps({p: {k: v for k, v in r.items() if k != "markdown"} for p, r in results["parts"].items()},
                     indent=2, default=float))


if __name__ == "__main__":
    main()
