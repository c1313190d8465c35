"""Prompt-program benchmark (issue #10): the frozen SmolLM2-135M-Instruct prompted, not tuned.

(a) Tweet sentiment on the held-out rows the fine-tune jobs use (jobs/prompt-tweet-sentiment-*.yaml:
    bundled tweets, validation fraction 0.1, seed 42, 600 rows), macro-F1 with log-likelihood scoring:
    majority class; zero-shot; k-shot ICL (random demos from the training split) for each k and demo
    seed, each with and without contextual calibration (one forward pass gives both: p and p_cf);
    gold vs random demo labels; `similar` vs `random` selection.
(b) APE (`onebase prompt search`, on Ray) vs the hand-written instruction, dev and evaluation scores.
(c) Reasoning on the generated tasks: exact match of direct vs CoT vs CoT + self-consistency (n
    samples) vs least-to-most, on the shipped arithmetic and last-letter programs.
(d) Latency of one request at a time on the same loaded base: zero-shot, 8-shot with the demo-prefix
    KV cache, 8-shot recomputing the prefix.

    .venv/bin/python bench/prompt.py                      # the full run (~45 min on 2 free cores)
    .venv/bin/python bench/prompt.py --rows 150 --seeds 2 --reasoning-rows 30 --sc 5 --no-ape  # cut down
Prints and writes bench/results/prompt.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("ONEBASE_CACHE", str(REPO / ".onebase" / "cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
sys.path.insert(0, str(REPO / "platform"))

import torch  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402

from onebase.model.assets import resolve_model  # noqa: E402
from onebase.prompt import ProgramRunner  # noqa: E402
from onebase.prompt.answers import normalise  # noqa: E402
from onebase.prompt.calibration import calibrate  # noqa: E402
from onebase.prompt.demos import build_program  # noqa: E402
from onebase.prompt.evaluate import prepare  # noqa: E402
from onebase.prompt.spec import load_program_spec  # noqa: E402
from onebase.prompt.worker import load_base  # noqa: E402

JOBS = REPO / "jobs"


def macro_f1(golds: list[str], preds: list[str], labels: list[str]) -> float:
    return float(f1_score(golds, preds, labels=labels, average="macro", zero_division=0))


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": values}


class Sentiment:
    def __init__(self, model, tokenizer, rows: int, pool: int = 2000) -> None:
        self.pool = pool  # `similar`: training rows searched for each query's neighbours
        self.spec = load_program_spec(JOBS / "prompt-tweet-sentiment-zero-shot.yaml")
        self.prepared = prepare(self.spec)
        self.queries, self.golds = self.prepared.queries[:rows], self.prepared.golds[:rows]
        self.labels = self.prepared.dataset.labels
        self.model, self.tokenizer = model, tokenizer

    def majority(self) -> float:
        top = Counter(r["label"] for r in self.prepared.dataset.train).most_common(1)[0][0]
        return macro_f1(self.golds, [top] * len(self.golds), self.labels)

    def run(self, k: int, seed: int, selection: str = "random", demo_labels: str = "gold") -> dict:
        spec = self.spec.model_copy(update={"demos": self.spec.demos.model_copy(
            update={"k": k, "seed": seed, "selection": selection, "labels": demo_labels, "pool": self.pool})})
        program = build_program(spec, self.prepared.dataset.train, self.labels, "bench")
        runner = ProgramRunner(self.model, self.tokenizer, program, batch_size=8)
        started = time.perf_counter()
        probs = [list(p.values()) for p in runner.classify(self.queries)]
        seconds = time.perf_counter() - started
        p_cf = runner.content_free_probs()
        calibrated = calibrate(probs, p_cf)

        def f1(ps):
            return macro_f1(self.golds, [self.labels[max(range(len(p)), key=p.__getitem__)] for p in ps], self.labels)

        preds = Counter(self.labels[max(range(len(p)), key=p.__getitem__)] for p in probs)
        return {"k": k, "seed": seed, "selection": selection, "demo_labels": demo_labels,
                "macro_f1": f1(probs), "macro_f1_calibrated": f1(calibrated), "p_cf": p_cf,
                "predicted": dict(preds), "ms_per_query": 1000 * seconds / len(self.queries),
                "prompt_tokens": runner.prompt_tokens(self.queries[0])}


def sentiment_section(model, tokenizer, args) -> dict:
    bench = Sentiment(model, tokenizer, args.rows, args.pool)
    out: dict = {"rows": len(bench.queries), "majority_macro_f1": bench.majority(), "k_shot": {}}
    print(f"(a) tweet sentiment, {len(bench.queries)} held-out rows; majority class macro-F1 "
          f"{out['majority_macro_f1']:.3f}")
    print("k  seeds  macro-F1 mean [min, max]   calibrated mean [min, max]   ms/query  prompt tokens")
    for k in args.ks:
        runs = [bench.run(k, seed) for seed in (range(args.seeds) if k else [0])]
        row = {"uncalibrated": spread([r["macro_f1"] for r in runs]),
               "calibrated": spread([r["macro_f1_calibrated"] for r in runs]),
               "ms_per_query": statistics.mean(r["ms_per_query"] for r in runs),
               "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in runs), "runs": runs}
        out["k_shot"][k] = row
        u, c = row["uncalibrated"], row["calibrated"]
        print(f"{k:<2} {len(runs):>5}  {u['mean']:.3f} [{u['min']:.3f}, {u['max']:.3f}]        "
              f"{c['mean']:.3f} [{c['min']:.3f}, {c['max']:.3f}]          {row['ms_per_query']:7.1f}  "
              f"{row['prompt_tokens']:.0f}")
    k = args.ablation_k
    for name, kwargs in (("random_labels", {"demo_labels": "random"}), ("similar", {"selection": "similar"})):
        seeds = range(args.seeds) if name == "random_labels" else [0]
        runs = [bench.run(k, seed, **kwargs) for seed in seeds]
        out[name] = {"k": k, "uncalibrated": spread([r["macro_f1"] for r in runs]),
                     "calibrated": spread([r["macro_f1_calibrated"] for r in runs]), "runs": runs}
        u, c = out[name]["uncalibrated"], out[name]["calibrated"]
        print(f"{k}-shot {name}: macro-F1 {u['mean']:.3f} [{u['min']:.3f}, {u['max']:.3f}], calibrated "
              f"{c['mean']:.3f} [{c['min']:.3f}, {c['max']:.3f}]")
    return out


def latency_section(model, tokenizer, args) -> dict:
    bench = Sentiment(model, tokenizer, args.latency_requests)
    spec8 = bench.spec.model_copy(update={"demos": bench.spec.demos.model_copy(update={"k": 8})})
    zero = build_program(bench.spec, bench.prepared.dataset.train, bench.labels, "bench")
    eight = build_program(spec8, bench.prepared.dataset.train, bench.labels, "bench")
    runners = {"zero_shot": ProgramRunner(model, tokenizer, zero),
               "8_shot_cached": ProgramRunner(model, tokenizer, eight),
               "8_shot_uncached": ProgramRunner(model, tokenizer, eight, cache_prefix=False)}
    out = {}
    for name, runner in runners.items():
        runner.classify(bench.queries[:1])  # warm-up
        times = []
        for text in bench.queries:  # one request at a time, as a lone client would see it
            started = time.perf_counter()
            runner.classify([text])
            times.append(1000 * (time.perf_counter() - started))
        out[name] = {"p50_ms": statistics.median(times), "mean_ms": statistics.mean(times),
                     "prompt_tokens": runner.prompt_tokens(bench.queries[0])}
    out["cached_over_zero_shot"] = out["8_shot_cached"]["p50_ms"] / out["zero_shot"]["p50_ms"]
    out["uncached_over_zero_shot"] = out["8_shot_uncached"]["p50_ms"] / out["zero_shot"]["p50_ms"]
    print(f"(d) latency, one request at a time, p50: zero-shot {out['zero_shot']['p50_ms']:.0f} ms, 8-shot cached "
          f"{out['8_shot_cached']['p50_ms']:.0f} ms ({out['cached_over_zero_shot']:.2f}x), 8-shot uncached "
          f"{out['8_shot_uncached']['p50_ms']:.0f} ms ({out['uncached_over_zero_shot']:.2f}x)")
    return out


def reasoning_section(model, tokenizer, args) -> dict:
    plans = {"arithmetic": [("direct", "prompt-arithmetic-direct", 1), ("cot", "prompt-arithmetic-cot", 1)]
             + [(f"cot+sc{n}", "prompt-arithmetic-cot-sc", n) for n in args.sc],
             "last-letter": [("direct", "prompt-last-letter-direct", 1), ("cot", "prompt-last-letter-cot", 1),
                             ("least-to-most", "prompt-last-letter-least-to-most", 1)]}
    out: dict = {}
    for task, runs in plans.items():
        out[task] = {}
        for name, job, samples in runs:
            spec = load_program_spec(JOBS / f"{job}.yaml")
            if samples > 1:
                spec = spec.model_copy(update={"self_consistency": spec.self_consistency.model_copy(
                    update={"samples": samples})})
            prepared = prepare(spec)
            program = build_program(spec, prepared.dataset.train, prepared.dataset.labels, "bench")
            runner = ProgramRunner(model, tokenizer, program, batch_size=8)
            queries, golds = prepared.queries[: args.reasoning_rows], prepared.golds[: args.reasoning_rows]
            started = time.perf_counter()
            predictions = runner.predict(queries)
            seconds = time.perf_counter() - started
            em = sum(normalise(p.answer) == normalise(g) for p, g in zip(predictions, golds)) / len(golds)
            out[task][name] = {"exact_match": em, "rows": len(golds), "ms_per_query": 1000 * seconds / len(golds),
                               "answered": sum(p.answer is not None for p in predictions) / len(golds),
                               "example": {"query": queries[0], "gold": golds[0], "text": predictions[0].text,
                                           "answer": predictions[0].answer}}
            print(f"(c) {task:11s} {name:14s} exact match {em:.3f} over {len(golds)} rows, "
                  f"{1000 * seconds / len(golds):.0f} ms/query")
    return out


def ape_section(args) -> dict:
    from onebase.prompt.search import search_program

    spec = load_program_spec(JOBS / "prompt-tweet-sentiment-ape.yaml",
                             [f"data.validation.max_samples={args.rows}", f"search.dev_rows={args.ape_dev_rows}",
                              f"search.candidates={args.ape_candidates}", "workers=2"])
    import tempfile

    uri = f"sqlite:///{tempfile.mkdtemp(prefix='bench-prompt-')}/mlflow.db"
    result = search_program(spec, (JOBS / "prompt-tweet-sentiment-ape.yaml").read_text(), tracking_uri=uri)
    table = result.extra["table"]
    for row in table:
        print(f"(b) APE {row['source']:12s} dev {row['dev']:.3f} eval {row['eval']:.3f}  {row['instruction'][:90]}")
    return {"table": table, "best": result.extra["best"], "metric": result.extra["metric"],
            "eval_rows": args.rows, "dev_rows": args.ape_dev_rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=600, help="held-out tweets (the fine-tune jobs' 600)")
    parser.add_argument("--seeds", type=int, default=3, help="demo seeds per k")
    parser.add_argument("--ks", type=lambda s: [int(k) for k in s.split(",")], default=[0, 1, 2, 4, 8, 16])
    parser.add_argument("--ablation-k", type=int, default=8)
    parser.add_argument("--pool", type=int, default=2000, help="similar selection: candidate training rows")
    parser.add_argument("--reasoning-rows", type=int, default=200)
    parser.add_argument("--sc", type=lambda s: [int(n) for n in s.split(",")], default=[5, 10])
    parser.add_argument("--latency-requests", type=int, default=40)
    parser.add_argument("--no-ape", action="store_true")
    parser.add_argument("--ape-candidates", type=int, default=8)
    parser.add_argument("--ape-dev-rows", type=int, default=60)
    parser.add_argument("--sections", default="a,b,c,d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "prompt.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    spec = load_program_spec(JOBS / "prompt-tweet-sentiment-zero-shot.yaml")
    model, tokenizer = load_base(spec, resolve_model(spec.base))
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
                     "args": vars(args)}
    if "a" in sections:
        results["sentiment"] = sentiment_section(model, tokenizer, args)
    if "d" in sections:
        results["latency"] = latency_section(model, tokenizer, args)
    if "c" in sections:
        results["reasoning"] = reasoning_section(model, tokenizer, args)
    if "b" in sections and not args.no_ape:
        results["ape"] = ape_section(args)
    results["wall_seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out} ({results['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
