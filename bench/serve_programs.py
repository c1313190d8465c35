"""Serving prompt programs (issue #10): per-request latency of an 8-shot program with the demo
prefix's KV cache, the same program recomputing its prefix, and zero-shot, on ONE base replica.

SmolLM2-135M-Instruct (fp32), tweet sentiment, log-likelihood scoring of the three labels, chat
template. The three programs are loaded side by side into one running server (`prefix_cache: false`
on the admin load for the uncached copy); each timed request classifies one evaluation row, and the
three programs take turns row by row (rotating which goes first), so load on a shared machine hits
all three alike. The cached and uncached answers are compared too (they must be equal).

    .venv/bin/python bench/serve_programs.py               # ~3 min on 2 cores
    .venv/bin/python bench/serve_programs.py --rows 20     # quicker, noisier
Prints and writes bench/results/serve_programs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "smollm2-135m-instruct"
VERBALIZERS = {"negative": ["negative"], "neutral": ["neutral"], "positive": ["positive"]}
INSTRUCTION = "Classify the sentiment of the tweet as negative, neutral or positive."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spec_for(k: int):
    from onebase.prompt.spec import ProgramSpec

    return ProgramSpec.model_validate({
        "kind": "prompt-program", "name": f"sentiment-{k}shot", "base": BASE, "task": "classification",
        "labels": VERBALIZERS, "instruction": INSTRUCTION, "data": {"source": "bundled:tweet-sentiment"},
        "demos": {"k": k, "selection": "balanced", "seed": 0}})


def programs(fingerprint: str, root: Path) -> tuple[dict[str, Path], dict[str, int], list[str]]:
    """Zero-shot and 8-shot programs built the way `onebase prompt eval` builds them (demos from the
    training split), saved as artifacts; their shared-prefix lengths; the evaluation rows' texts."""
    from onebase.data.sources import load_dataset
    from onebase.model.assets import resolve_model
    from onebase.model.build import load_tokenizer
    from onebase.prompt import save_program
    from onebase.prompt.demos import build_program, row_query
    from onebase.prompt.render import head_ids, render

    tokenizer = load_tokenizer(resolve_model(BASE))
    dirs, prefix = {}, {}
    for k in (0, 8):
        spec = spec_for(k)
        dataset = load_dataset(spec.job_spec())
        program = build_program(spec, dataset.train, dataset.labels, fingerprint)
        dirs[f"{k}shot"] = save_program(program, root / f"{k}shot")
        prefix[f"{k}shot"] = len(head_ids(program, tokenizer, render(program, tokenizer, program.demos).head))
    texts = [row_query(r, True)[0] for r in dataset.validation]
    return dirs, prefix, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60, help="timed requests per program (one row each)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_programs.json"))
    args = parser.parse_args()

    import requests
    from ray import serve

    from onebase.serve.app import build
    from onebase.serve.client import Client
    from onebase.train.launch import connect_ray

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="obbench-", dir="/tmp"))
    connect_ray(None)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"bases": [{"name": BASE, "alias": "smollm2", "threads": 2, "cpus": 1}],
                     "auth": {"admin_token": "bench"}, "limits": {"max_prompt_tokens": 512}}),
              name="onebase-programs-bench", route_prefix="/", blocking=False)
    url, admin = f"http://127.0.0.1:{port}", {"Authorization": "Bearer bench"}
    Client(url).wait_ready(300)
    try:
        fingerprint = requests.get(f"{url}/admin/adapters", headers=admin, timeout=60).json()["bases"]["smollm2"][
            "fingerprint"]
        with tempfile.TemporaryDirectory() as tmp:
            dirs, prefix, texts = programs(fingerprint, Path(tmp))
            variants = {"zero_shot": (dirs["0shot"], True), "8shot_cached": (dirs["8shot"], True),
                        "8shot_uncached": (dirs["8shot"], False)}
            load_ms = {}
            for name, (path, cached) in variants.items():
                started = time.perf_counter()
                r = requests.post(f"{url}/admin/adapters", headers=admin, timeout=300,
                                  json={"id": name, "source": str(path), "prefix_cache": cached})
                r.raise_for_status()
                load_ms[name] = (time.perf_counter() - started) * 1000
            figures = measure(url, list(variants), texts[: args.rows + args.warmup], args.warmup)
    finally:
        serve.delete("onebase-programs-bench")
        serve.shutdown()
    zero = figures["zero_shot"]["p50_ms"]
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
                   "shared with other jobs while measured",
        "base": BASE, "replica": "1 replica, 2 torch threads, fp32", "rows_timed": args.rows,
        "prefix_tokens": {"zero_shot": prefix["0shot"], "8shot": prefix["8shot"]},
        "admin_load_ms": {k: round(v, 1) for k, v in load_ms.items()},
        "latency": {k: {m: round(v, 2) for m, v in f.items() if m != "answers"} for k, f in figures.items()},
        "ratio_p50_8shot_cached_over_zero": round(figures["8shot_cached"]["p50_ms"] / zero, 3),
        "ratio_p50_8shot_uncached_over_zero": round(figures["8shot_uncached"]["p50_ms"] / zero, 3),
        "ratio_mean_8shot_cached_over_zero": round(figures["8shot_cached"]["mean_ms"] / figures["zero_shot"]["mean_ms"],
                                                   3),
        "ratio_mean_8shot_uncached_over_zero": round(
            figures["8shot_uncached"]["mean_ms"] / figures["zero_shot"]["mean_ms"], 3),
        "goal_cached_over_zero": 1.3,
        "cached_equals_uncached": compare(figures["8shot_cached"]["answers"], figures["8shot_uncached"]["answers"]),
    }
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


def measure(url: str, models: list[str], texts: list[str], warmup: int) -> dict[str, dict]:
    """One request per row per program, the programs rotating which goes first on each row."""
    import requests

    latencies: dict[str, list[float]] = {m: [] for m in models}
    answers: dict[str, list[dict]] = {m: [] for m in models}
    for i, text in enumerate(texts):
        order = models[i % len(models):] + models[: i % len(models)]
        for model in order:
            started = time.perf_counter()
            r = requests.post(f"{url}/v1/classify", json={"model": model, "input": text}, timeout=300)
            elapsed = (time.perf_counter() - started) * 1000
            r.raise_for_status()
            if i >= warmup:
                latencies[model].append(elapsed)
                answers[model].append(r.json()["data"][0])
    return {m: {"p50_ms": statistics.median(v), "mean_ms": statistics.fmean(v), "min_ms": min(v),
                "p90_ms": sorted(v)[int(0.9 * (len(v) - 1))], "answers": answers[m]} for m, v in latencies.items()}


def compare(cached: list[dict], uncached: list[dict]) -> dict:
    same_label = sum(a["label"] == b["label"] for a, b in zip(cached, uncached))
    diff = max(abs(a["probabilities"][k] - b["probabilities"][k]) for a, b in zip(cached, uncached)
               for k in a["probabilities"])
    return {"same_label": f"{same_label}/{len(cached)}", "max_abs_prob_diff": diff}


if __name__ == "__main__":
    main()
