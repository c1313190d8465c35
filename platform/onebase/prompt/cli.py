"""`onebase prompt eval|search SPEC`: evaluate or search prompt programs on a frozen base."""

from __future__ import annotations

import argparse
import json


def register(sub) -> dict:
    prompt = sub.add_parser("prompt", help="prompt programs on the frozen base: evaluate, search (APE)")
    verbs = prompt.add_subparsers(dest="verb", required=True)
    for verb, text in (("eval", "run a program over the evaluation rows on Ray; log and register it"),
                       ("search", "automatic prompt engineering: the base proposes instructions; register the best"),
                       ("validate", "check a program spec without running it")):
        parser = verbs.add_parser(verb, help=text)
        parser.add_argument("spec", help="prompt-program spec YAML")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a spec field, e.g. --set demos.k=8")
        if verb != "validate":
            parser.add_argument("--address", help="Ray cluster address ('auto' for a running local cluster)")
            parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's, else ./mlflow.db)")
    return {"prompt": cmd_prompt}


def cmd_prompt(args: argparse.Namespace) -> int:
    from pathlib import Path

    from onebase.prompt.spec import load_program_spec

    if args.verb == "validate":
        return validate_program(args.spec, args.overrides)
    spec = load_program_spec(args.spec, args.overrides)  # one-line errors before anything runs
    text = Path(args.spec).read_text()
    if args.verb == "search":
        from onebase.prompt.search import print_report, search_program

        print_report(search_program(spec, text, address=args.address, tracking_uri=args.tracking_uri))
        return 0
    from onebase.prompt.evaluate import evaluate_program

    result = evaluate_program(spec, text, address=args.address, tracking_uri=args.tracking_uri)
    shown = {k: round(v, 4) for k, v in result.metrics.items()}
    print(f"eval: {json.dumps(shown)}")
    if result.program.calibration.p_cf:
        print(f"content-free probabilities: {[round(p, 4) for p in result.program.calibration.p_cf]}")
    print(f"program: {result.export_dir}")
    print(f"mlflow run: {result.run_url}")
    if result.registered:
        print(f"registered: {result.registered}")
    return 0


def validate_program(path: str, overrides: list[str]) -> int:
    """Every check `onebase prompt eval` makes before Ray starts (also `onebase validate` on a program)."""
    from onebase.prompt.evaluate import prepare
    from onebase.prompt.spec import load_program_spec

    spec = load_program_spec(path, overrides)
    prepared = prepare(spec)
    print(f"{path}: ok ({spec.task}, {spec.demos.k}-shot {spec.demos.selection}, {spec.reasoning.mode}, "
          f"{len(prepared.queries)} evaluation rows)")
    return 0
