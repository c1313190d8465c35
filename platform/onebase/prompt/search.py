"""`onebase prompt search`: automatic prompt engineering (APE, Zhou et al. 2022).

1. The base proposes instructions: demo subsets from the training split fill the "I gave a friend an
   instruction ..." template and the base continues "The instruction was to", sampled.
2. Every candidate (and the hand-written instruction) is scored on a dev slice of the training
   split, never on the evaluation rows; demonstrations come from the rest of the training split.
3. The top candidates are resampled into variations, which are scored too.
4. The best instruction becomes the program: evaluated on the evaluation rows, logged, registered.
   The report lists the hand-written instruction beside the top found ones, with dev and eval scores.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import Any

from onebase.prompt.demos import build_program, row_demo
from onebase.prompt.evaluate import EvalResult, Workers, evaluate_on, finalise, prepare, record, score
from onebase.prompt.spec import ProgramSpec

PROPOSE = ("I gave a friend an instruction and {n} inputs. The friend read the instruction and wrote an output "
           "for every one of the inputs. Here are the input-output pairs:\n\n{pairs}\n\nThe instruction was to")
VARIATION = ("Generate a variation of the following instruction while keeping the semantic meaning.\n\n"
             "Input: {instruction}\n\nOutput:")


def metric_name(spec: ProgramSpec) -> str:
    return "macro_f1" if spec.task == "classification" else "exact_match"


def clean(text: str) -> str | None:
    """A proposal's first sentence-like line, as an instruction ("classify ..." -> "Classify ...")."""
    line = text.strip().splitlines()[0].strip().strip('"') if text.strip() else ""
    if len(line) < 4:
        return None
    return line[0].upper() + line[1:]


def propose(workers: Workers, spec: ProgramSpec, pool: list[dict[str, Any]], rng: random.Random) -> list[str]:
    classification = spec.task == "classification"
    prompts = []
    for _ in range(spec.search.candidates):
        subset = rng.sample(pool, min(spec.search.demos_per_proposal, len(pool)))
        demos = [row_demo(r, classification) for r in subset]
        pairs = "\n\n".join(f"Input: {d.input}\nOutput: {d.answer}" for d in demos)
        prompts.append(PROPOSE.format(n=len(demos), pairs=pairs))
    outs = workers.propose(prompts, spec.search.max_new_tokens, spec.search.temperature, spec.search.seed)
    return unique(clean(o) for o in outs)


def vary(workers: Workers, spec: ProgramSpec, instructions: list[str], seed: int) -> list[str]:
    prompts = [VARIATION.format(instruction=i) for i in instructions for _ in range(spec.search.variations)]
    if not prompts:
        return []
    return unique(clean(o) for o in workers.propose(prompts, spec.search.max_new_tokens,
                                                     spec.search.temperature, seed))


def unique(items) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        if item and item not in seen:
            seen[item] = None
    return list(seen)


def search_program(spec: ProgramSpec, spec_text: str, address: str | None = None,
                   tracking_uri: str | None = None, echo=print) -> EvalResult:
    from onebase.runtime import connect_ray  # plain Ray: programs need none of Ray Train's settings

    prepared = prepare(spec)
    train = list(prepared.dataset.train)
    rng = random.Random(spec.search.seed)
    rng.shuffle(train)
    n_dev = min(spec.search.dev_rows, len(train) - max(spec.demos.k, spec.search.demos_per_proposal))
    if n_dev < 2:
        from onebase.errors import SpecError

        raise SpecError(f"search.dev_rows: the training split ({len(train)} rows) leaves no dev slice")
    dev_rows, rest = train[:n_dev], train[n_dev:]
    classification = spec.task == "classification"
    dev = replace(prepared, queries=[row_demo(r, classification).input for r in dev_rows],
                  golds=[row_demo(r, classification).answer for r in dev_rows])
    echo(f"search: {len(rest)} training rows for demos and proposals, {n_dev} dev rows, "
         f"{len(prepared.queries)} evaluation rows")
    connect_ray(address)
    workers = Workers(spec, prepared.model_path)
    metric = metric_name(spec)
    started = time.perf_counter()
    try:
        fingerprint = workers.fingerprint()

        def program_for(instruction: str):
            return finalise(build_program(spec, rest, prepared.dataset.labels, fingerprint, instruction), workers)

        def dev_score(instruction: str) -> float:
            program = program_for(instruction)
            predictions, seconds = workers.predict(program, dev.queries)
            return score(spec, predictions, dev.golds, prepared.dataset.labels, seconds)[metric]

        scored = {spec.instruction: {"dev": dev_score(spec.instruction), "source": "hand-written"}}
        for candidate in propose(workers, spec, rest, rng):
            scored.setdefault(candidate, {"dev": dev_score(candidate), "source": "proposed"})
        found = sorted((i for i, s in scored.items() if s["source"] != "hand-written"),
                       key=lambda i: -scored[i]["dev"])
        for candidate in vary(workers, spec, found[: spec.search.top], spec.search.seed + 1):
            scored.setdefault(candidate, {"dev": dev_score(candidate), "source": "variation"})
        found = sorted((i for i, s in scored.items() if s["source"] != "hand-written"),
                       key=lambda i: -scored[i]["dev"])
        shown = [spec.instruction] + found[: spec.search.report_top]
        results = {}
        for instruction in shown:  # the evaluation rows score only what the report shows
            program = program_for(instruction)
            metrics, predictions = evaluate_on(workers, prepared, program)
            scored[instruction]["eval"] = metrics[metric]
            results[instruction] = (program, metrics, predictions)
    finally:
        workers.close()
    best = max(shown, key=lambda i: scored[i]["dev"])  # chosen on dev only
    program, metrics, predictions = results[best]
    metrics = {**metrics, "wall_seconds": time.perf_counter() - started, "candidates_scored": float(len(scored))}
    table = [{"instruction": i, "source": scored[i]["source"], "dev": scored[i]["dev"], "eval": scored[i]["eval"]}
             for i in shown]
    report = {"metric": metric, "best": best, "table": table,
              "all_dev_scores": [{"instruction": i, **s} for i, s in scored.items()]}
    return record(prepared, spec_text, program, metrics, predictions, tracking_uri=tracking_uri, report=report)


def print_report(result: EvalResult) -> None:
    report = result.extra
    metric = report["metric"]
    print(f"| instruction | source | dev {metric} | eval {metric} |\n|---|---|---|---|")
    for row in report["table"]:
        mark = " (chosen)" if row["instruction"] == report["best"] else ""
        print(f"| {row['instruction'][:100]}{mark} | {row['source']} | {row['dev']:.4f} | {row['eval']:.4f} |")
    print(f"program: {result.export_dir}")
    print(f"mlflow run: {result.run_url}")
    if result.registered:
        print(f"registered: {result.registered}")
