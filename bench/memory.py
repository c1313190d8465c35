"""Memory per worker under each ZeRO stage (issue #13, item 2); prints and writes bench/results/memory.json
and a plot (bench/results/memory.png, also logged to MLflow).

Full fine-tune of the bundled SmolLM2-135M-Instruct (sentiment as an instruction), a few steps, 1 thread
per worker. For every (stage, workers): the largest worker's model states (parameters it holds +
optimizer states and fp32 master partitions, read from DeepSpeed's optimizer after the last step),
its peak RSS, and its parameters right after loading (ZeRO-3 loads partitioned: zero.Init).

    .venv/bin/python bench/memory.py                       # stages 0,1,2,3,3+offload,3+nvme x 1,2,4 workers
    .venv/bin/python bench/memory.py --stages 3+nvme --workers 1 2 --merge   # NVMe offload rows only, added
    .venv/bin/python bench/memory.py --workers 1 2 --steps 2   # what 2 cores hold
    .venv/bin/python bench/memory.py --workers 4 --cpus-per-worker 0.5 --merge   # 4 workers on 2 cores, added
                                                                                     # to the rows already there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "tweet-sentiment-smollm2-lora.yaml"
# offload: False (none), True (parameters and optimizer states to CPU memory) or "nvme" (both to files
# under a folder of the run's own, through DeepSpeed's async_io op: needs libaio)
CONFIGS = [(0, False), (1, False), (2, False), (3, False), (3, True), (3, "nvme")]
LABELS = {False: "", True: " + offload", "nvme": " + NVMe offload"}


def parse_stage(text: str) -> tuple[int, bool | str]:
    """'3' -> (3, False); '3+offload' -> (3, True); '3+nvme' -> (3, 'nvme')."""
    stage, _, extra = text.partition("+")
    return int(stage), {"": False, "offload": True, "nvme": "nvme"}[extra]


def one_run(stage: int, offload: bool | str, workers: int, steps: int, uri: str, cpus_per_worker: float = 1.0,
            ) -> dict:
    from mlflow.tracking import MlflowClient

    from onebase.spec import load_spec
    from onebase.train.launch import run_job

    name = f"bench-memory-z{stage}{'-nvme' if offload == 'nvme' else '-offload' if offload else ''}-w{workers}"
    device = "nvme" if offload == "nvme" else str(bool(offload)).lower()
    nvme = [f"deepspeed.nvme_path={Path.cwd() / 'nvme'}"] if offload == "nvme" else []
    (Path.cwd() / "nvme").mkdir(exist_ok=True)
    spec = load_spec(JOB, [f"name={name}", "method={name: full}", f"train.max_steps={steps}", "train.batch_size=2",
                           "data.max_length=48", "data.validation.max_samples=8", "train.eval_batch_size=8",
                           f"scaling.num_workers={workers}", f"scaling.resources_per_worker={{CPU: {cpus_per_worker}}}",
                           f"deepspeed.stage={stage}", f"deepspeed.offload_param={device if stage == 3 else 'false'}",
                           f"deepspeed.offload_optimizer={device}", "tracking.register_model=false", *nvme])
    started = time.perf_counter()
    result = run_job(spec, JOB.read_text(), tracking_uri=uri, echo=lambda *_: None, progress=False)
    metrics = MlflowClient(uri).get_run(result.run_id).data.metrics
    # A full fine-tune's checkpoints (weights + Adam states per worker) and export: ~2 GB a run, 12 runs
    # filled the disk. Only the MLflow metrics are needed from here on.
    shutil.rmtree(Path("runs") / name, ignore_errors=True)
    keys = ("model_state_mb_per_worker", "param_mb_per_worker", "optimizer_state_mb_per_worker",
            "peak_rss_mb_per_worker", "loaded_param_mb_per_worker", "nvme_swap_mb_per_worker")
    return {"stage": stage, "offload": offload, "workers": workers, "cpus_per_worker": cpus_per_worker,
            "wall_s": round(time.perf_counter() - started, 1),
            **{k: round(metrics[k], 1) for k in keys if k in metrics}, "run_id": result.run_id}


def merged(earlier: Path, rows: list[dict]) -> list[dict]:
    """Earlier rows not measured again (each keeps its own run's `date`), then this run's rows."""
    key = lambda r: (r["stage"], str(r["offload"]), r["workers"])  # noqa: E731 (offload: False, True or "nvme")
    if not earlier.is_file():
        return rows
    old = json.loads(earlier.read_text())
    fresh = {key(r) for r in rows}
    kept = [{"date": old.get("date"), **r} for r in old.get("rows", []) if key(r) not in fresh]
    return sorted(kept + rows, key=key)


def plot(rows: list[dict], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for stage, offload in CONFIGS:
        mine = sorted((r for r in rows if r["stage"] == stage and r["offload"] == offload), key=lambda r: r["workers"])
        if not mine:
            continue
        label = f"ZeRO-{stage}{LABELS[offload]}"
        for ax, key in zip(axes, ("model_state_mb_per_worker", "peak_rss_mb_per_worker")):
            ax.plot([r["workers"] for r in mine], [r.get(key, 0) for r in mine], marker="o", label=label)
    for ax, title in zip(axes, ("model states per worker (MiB)", "peak RSS per worker (MiB)")):
        ax.set_xlabel("workers")
        ax.set_title(title)
        ax.set_xticks(sorted({r["workers"] for r in rows}))
    axes[0].legend()
    fig.suptitle("SmolLM2-135M full fine-tune, fp32, CPU")
    fig.tight_layout()
    fig.savefig(target, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stages", nargs="+", default=["0", "1", "2", "3", "3+offload", "3+nvme"],
                        help="3+offload: parameters and optimizer states offloaded to CPU memory; 3+nvme: to "
                             "files in nvme/ of the run's folder under /tmp")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="Ray CPUs each worker asks for: 0.5 fits 4 workers on 2 cores (each still 1 thread; "
                             "the memory figures do not change, the times are not comparable)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of bench/results/memory.json that this run does not measure again "
                             "(e.g. 1 and 2 workers from an earlier run) in the JSON and the plot")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onebase-memory-", dir="/tmp"))
    os.chdir(work)
    os.environ.setdefault("RAY_TMPDIR", str(work / "ray"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    from onebase.train.launch import connect_ray

    connect_ray(None, quiet=True)
    wanted = [parse_stage(s) for s in args.stages]
    rows = []
    for stage, offload in wanted:
        for workers in args.workers:
            if stage > 0 and workers == 1 and not offload:
                continue  # one worker has nothing to partition: the same as ZeRO-0
            row = one_run(stage, offload, workers, args.steps, uri, args.cpus_per_worker)
            print(json.dumps(row), flush=True)
            rows.append(row)
    target = REPO / "bench" / "results"
    target.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = merged(target / "memory.json", rows)
    plot(rows, target / "memory.png")
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_name="bench-memory"):
        mlflow.log_artifact(str(target / "memory.png"))
        mlflow.log_dict({"rows": rows}, "memory.json")
    sys.path.insert(0, str(REPO / "bench"))
    from figures import header, save

    save("memory", {**header(), "steps": args.steps, "model": "smollm2-135m-instruct (full fine-tune, fp32)",
                    "rows": rows, "mlflow": uri})


if __name__ == "__main__":
    sys.exit(main())
