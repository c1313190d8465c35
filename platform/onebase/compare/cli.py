"""`onebase compare SPEC`: every prompting way and every tuning method on one task and split."""

from __future__ import annotations

import argparse


def register(sub) -> dict:
    compare = sub.add_parser("compare", help="prompting vs fine-tuning on one task: one report, one MLflow parent run")
    compare.add_argument("spec", help="compare spec YAML (kind: compare)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a spec field, e.g. --set data.validation.max_samples=200")
    compare.add_argument("--quick", action="store_true",
                         help="tiny random models and a few rows: every contender kind, in minutes")
    compare.add_argument("--address", help="Ray cluster address ('auto' for a running local cluster)")
    compare.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's, else ./mlflow.db)")
    compare.add_argument("--report-only", metavar="RUN_ID", help="rebuild the report of an earlier compare from "
                                                                  "its MLflow parent run; runs nothing")
    compare.add_argument("--out", help="where --report-only writes (default: runs/<compare>/<run id>)")
    compare.add_argument("--rescore", metavar="RUN_ID",
                         help="finish the training rows of an earlier compare again from the trials they already "
                              "ran (default: those that failed), then rebuild its report; trains nothing")
    compare.add_argument("--rows", help="with --rescore: comma-separated training rows to rescore")
    return {"compare": cmd_compare}


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from onebase.compare.plan import check_before_ray, plan
    from onebase.compare.spec import load_compare
    from onebase.errors import OnebaseError

    spec, folder = load_compare(args.spec, args.overrides, quick=args.quick)
    from onebase.compare import report
    from onebase.tracking import mlflow_run

    if args.report_only:
        uri = mlflow_run.resolve_tracking_uri(args.tracking_uri, spec.tracking.uri)
        out = Path(args.out or Path(spec.output.path) / spec.name / args.report_only)
        try:
            result = report.build(uri, args.report_only, out)
        except Exception as err:  # a wrong run id is the usual cause: say so in one line
            raise OnebaseError(f"--report-only {args.report_only}: {err}") from None
    elif args.rescore:
        from onebase.compare.run import rescore

        result = rescore(spec, plan(spec, folder), args.rescore, names=args.rows.split(",") if args.rows else None,
                         address=args.address, tracking_uri=args.tracking_uri)
    else:
        rows = plan(spec, folder)
        n = check_before_ray(spec, rows)  # bad input: one line, exit 2, before Ray starts
        print(f"compare {spec.name}: {len(rows)} rows, every one scored on the same {n} evaluation rows")
        from onebase.compare.run import run_compare

        result = run_compare(spec, rows, Path(args.spec).read_text(), address=args.address,
                             tracking_uri=args.tracking_uri)
    print(result["markdown"])
    print(f"report: {result['report_dir'] / 'report.md'} (+ report.json, {', '.join(report.PLOTS)})")
    print(f"mlflow parent run: {result['parent_run_id']}")
    if not result["same_rows"]["same"]:
        print("onebase: error: the rows were not all scored on the same evaluation rows", flush=True)
        return 1
    return 0


def validate_compare(path: str, overrides: list[str]) -> int:
    """Every check `onebase compare` makes before Ray starts (also `onebase validate` on a compare spec)."""
    from onebase.compare.plan import check_before_ray, plan
    from onebase.compare.spec import load_compare

    spec, folder = load_compare(path, overrides)
    rows = plan(spec, folder)
    n = check_before_ray(spec, rows)
    kinds = sorted({r.kind for r in rows})
    print(f"{path}: ok ({spec.task}, {len(rows)} rows of kinds {', '.join(kinds)}, {n} evaluation rows)")
    return 0
